"""SGLang HiCache storage backend: HiCache's host-memory pages stored as `.kvc` entries, in a
folder or a Redis server, with any kvcodec codec.

HiCache hands a storage backend one page at a time, flat, as its MHA host pool lays it out:
`layer_first` pages are `[2, layers, page_size, heads, head_dim]`, `page_first` pages
`[2, page_size, layers, heads, head_dim]`. Each page becomes one `.kvc` entry (every layer's keys
and values for the page's tokens) under HiCache's key and this rank's suffix, which the entry
also records; a read decodes and checks it before filling HiCache's buffer, and a missing,
corrupt or foreign entry is a miss (logged), never wrong data. Start SGLang with:

    --hicache-storage-backend dynamic
    --hicache-storage-backend-extra-config '{"backend_name": "kvcodec",
        "module_path": "kvcodec.integrations.sglang", "class_name": "KVCodecHiCacheStorage",
        "url": "/var/cache/hicache", "codec": "zstd"}'
"""

from __future__ import annotations

import logging

import torch

from kvcodec.api import decode, encode
from kvcodec.cache import KVCache, LayerKV
from kvcodec.errors import InputError, KVCError
from kvcodec.integrations.config import codec_options
from kvcodec.integrations.entries import entry_problem
from kvcodec.storage.store import backend_for, whole_cache_codec

try:
    from sglang.srt.mem_cache.hicache_storage import HiCacheStorage
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("kvcodec.integrations.sglang needs SGLang (pip install 'kvcodec[sglang]')") from exc

log = logging.getLogger(__name__)

KEY_META = "kvcodec.sglang.key"  # the key (with this rank's suffix) an entry was written under
LAYOUTS = ("layer_first", "page_first")
DEFAULT_CODEC = "zstd"


class PageLayout:
    """How a host pool's flat page maps to a KVCache: `layout`, layers, page size, heads, head_dim."""

    def __init__(self, layout: str, layers: int, page_size: int, heads: int, head_dim: int, dtype: torch.dtype):
        if layout not in LAYOUTS:
            raise InputError(f"kvcodec's SGLang backend stores MHA pages laid out {' or '.join(LAYOUTS)}, "
                             f"not {layout!r}")
        self.layout, self.layers, self.page_size, self.heads, self.head_dim = layout, layers, page_size, heads, head_dim
        self.dtype = dtype

    @classmethod
    def of(cls, pool) -> "PageLayout":
        needed = ("layout", "layer_num", "page_size", "head_num", "head_dim", "dtype")
        missing = [a for a in needed if not hasattr(pool, a)]
        if missing:
            raise InputError(f"kvcodec's SGLang backend needs an MHA host pool; {type(pool).__name__} lacks "
                             f"{', '.join(missing)}")
        v_dim = getattr(pool, "v_head_dim", pool.head_dim)
        if v_dim != pool.head_dim:
            raise InputError(f"kvcodec's SGLang backend stores keys and values of one head_dim, not {pool.head_dim} "
                             f"and {v_dim}")
        return cls(pool.layout, pool.layer_num, pool.page_size, pool.head_num, pool.head_dim, pool.dtype)

    @property
    def shape(self) -> tuple[int, ...]:
        if self.layout == "layer_first":
            return (2, self.layers, self.page_size, self.heads, self.head_dim)
        return (2, self.page_size, self.layers, self.heads, self.head_dim)

    def numel(self) -> int:
        return 2 * self.layers * self.page_size * self.heads * self.head_dim

    def to_cache(self, flat: torch.Tensor) -> KVCache:
        page = flat.reshape(self.shape)
        if self.layout == "page_first":
            page = page.transpose(1, 2)  # [2, layers, tokens, heads, head_dim]
        per_head = page.permute(0, 1, 3, 2, 4)  # [2, layers, heads, tokens, head_dim]
        return KVCache([LayerKV(per_head[0, i].unsqueeze(0).contiguous(), per_head[1, i].unsqueeze(0).contiguous())
                        for i in range(self.layers)])

    def to_flat(self, cache: KVCache, out: torch.Tensor) -> None:
        page = torch.stack([torch.stack([lay.key[0], lay.value[0]]) for lay in cache.layers], 1)  # [2, L, H, T, D]
        page = page.permute(0, 1, 3, 2, 4)  # [2, layers, tokens, heads, head_dim]
        if self.layout == "page_first":
            page = page.transpose(1, 2)
        out.view(self.shape).copy_(page)


def rank_suffix(config) -> str:
    """What keeps one rank's pages apart from another's: the model, and the parallel ranks whose
    pages differ (tensor-parallel ranks hold their own heads, except for MLA pages, the same on
    every rank; pipeline stages their own layers; context-parallel ranks their own slices)."""
    model = "-".join((config.model_name or "").split("/"))
    parts = [f"@{model}"]
    if not config.is_mla_model:
        parts.append(f"@tp{config.tp_rank}of{config.tp_size}")
    for name, rank, size in (("pp", config.pp_rank, config.pp_size), ("cp", config.attn_cp_rank, config.attn_cp_size),
                             ("dcp", getattr(config, "dcp_rank", 0), getattr(config, "dcp_size", 1))):
        if size > 1:
            parts.append(f"@{name}{rank}of{size}")
    return "".join(parts)


class KVCodecHiCacheStorage(HiCacheStorage):
    """SGLang `HiCacheStorage` over kvcodec (see the module's docstring). `storage_config`'s
    `extra_config` holds `url` (a folder or redis://), `codec` and its `options`."""

    def __init__(self, storage_config, kwargs=None):
        extra = dict(storage_config.extra_config or {})
        url = extra.get("url")
        if not url:
            raise InputError("kvcodec's SGLang backend needs \"url\" in its extra config (a folder or a redis:// URL)")
        if extra.get("interface_v1"):
            raise InputError("kvcodec's SGLang backend implements the page get/set interface, not interface_v1")
        self.codec = whole_cache_codec(extra.get("codec", DEFAULT_CODEC), codec_options(extra.get("options")))
        self.backend = backend_for(url, namespace="kvc:sglang:")
        self.suffix = rank_suffix(storage_config)
        self.page: PageLayout | None = None

    def register_mem_pool_host(self, mem_pool_host) -> None:
        super().register_mem_pool_host(mem_pool_host)
        self.page = PageLayout.of(mem_pool_host)

    # -- the storage interface -------------------------------------------------------------------
    def exists(self, key: str) -> bool:
        return self.backend.contains([key + self.suffix])[0]

    def batch_exists(self, keys, extra_info=None) -> int:
        found = self.backend.contains([k + self.suffix for k in keys])
        return found.index(False) if False in found else len(found)

    def set(self, key: str, value=None, target_location=None, target_sizes=None) -> bool:
        if self.exists(key):
            return True
        try:
            cache = self._layout(value).to_cache(value.detach().cpu())
            cache.metadata[KEY_META] = key + self.suffix
            self.backend.put(key + self.suffix, encode(cache, self.codec))
            return True
        except (KVCError, OSError) as exc:
            log.error("kvcodec SGLang backend: cannot store %s: %s", key, exc)
            return False

    def batch_set(self, keys, values=None, target_locations=None, target_sizes=None) -> bool:
        return all([self.set(k, v) for k, v in zip(keys, values)])

    def get(self, key: str, target_location=None, target_sizes=None):
        data = self.backend.get_many([key + self.suffix])[0]
        if data is None:
            return None
        page = self._layout(target_location)
        try:
            cache = decode(data)
            problem = entry_problem(cache, KEY_META, key + self.suffix, page.layers,
                                    (1, page.heads, page.page_size, page.head_dim), page.dtype)
        except KVCError as exc:
            problem = f"it does not decode ({exc})"
        if problem is not None:  # deleted, so that HiCache neither counts it as a hit nor skips storing it
            log.warning("kvcodec SGLang backend: entry %s refused: %s; treated as a miss", key, problem)
            self.backend.delete(key + self.suffix)
            return None
        page.to_flat(cache, target_location)
        return target_location

    def batch_get(self, keys, target_locations=None, target_sizes=None):
        return [self.get(k, t) for k, t in zip(keys, target_locations or [None] * len(keys))]

    def close(self) -> None:
        self.backend.close()

    # -- pages -------------------------------------------------------------------------------------
    def _layout(self, flat) -> PageLayout:
        if self.page is None:
            raise InputError("kvcodec's SGLang backend has no host pool registered (register_mem_pool_host)")
        if flat is None or flat.numel() != self.page.numel() or flat.dtype != self.page.dtype:
            got = "nothing" if flat is None else f"{flat.numel()} {flat.dtype} elements"
            raise InputError(f"kvcodec's SGLang backend got {got} for a page of {self.page.numel()} "
                             f"{self.page.dtype} elements")
        return self.page

