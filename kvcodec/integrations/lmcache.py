"""LMCache remote-storage plugin: LMCache's chunks stored as `.kvc` entries, in a folder or a
Redis server, with any kvcodec codec.

LMCache hands a remote connector one chunk at a time (`KV_2LTD`: keys and values of every layer
for up to `chunk_size` tokens, `[2, layers, tokens, heads * head_dim]`). Each chunk becomes one
`.kvc` entry under LMCache's key, which the entry also records: a read decodes the entry and
checks it is that key's chunk of this engine's shape and dtype before filling LMCache's memory
object. A missing, corrupt or foreign entry is a cache miss (LMCache recomputes), logged as a
warning, never an error or wrong data. Enable it in LMCache's config:

    remote_storage_plugins: ["kvcodec"]
    extra_config:
      remote_storage_plugin.kvcodec.module_path: kvcodec.integrations.lmcache
      remote_storage_plugin.kvcodec.class_name: KVCodecConnector
      remote_storage_plugin.kvcodec.url: redis://127.0.0.1:6379/0    # or a folder path
      remote_storage_plugin.kvcodec.codec: zstd                      # lossless by default
      remote_storage_plugin.kvcodec.options: {"bits": 8}             # the codec's options, if any
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
    from lmcache.v1.exceptions import IrrecoverableException
    from lmcache.v1.storage_backend.connector.base_connector import RemoteConnector
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("kvcodec.integrations.lmcache needs LMCache (pip install 'kvcodec[lmcache]')") from exc

log = logging.getLogger(__name__)

PLUGIN = "kvcodec"  # the default plugin name in LMCache's config
KEY_META = "kvcodec.lmcache.key"  # the LMCache key an entry was written under
DEFAULT_CODEC = "zstd"


def chunk_to_cache(kv: torch.Tensor, heads: int, head_dim: int) -> KVCache:
    """An LMCache `KV_2LTD` chunk `[2, layers, tokens, heads * head_dim]` as a KVCache (batch 1)."""
    two, layers, tokens, hidden = kv.shape
    if two != 2 or hidden != heads * head_dim:
        raise InputError(f"an LMCache chunk of shape {tuple(kv.shape)} is not [2, layers, tokens, "
                         f"{heads} x {head_dim}]")
    per_head = kv.reshape(2, layers, tokens, heads, head_dim).permute(0, 1, 3, 2, 4)  # [2, L, H, T, D]
    return KVCache([LayerKV(per_head[0, i].unsqueeze(0).contiguous(), per_head[1, i].unsqueeze(0).contiguous())
                    for i in range(layers)])


def cache_to_chunk(cache: KVCache, out: torch.Tensor) -> None:
    """Write `cache` (batch 1) into the `KV_2LTD` tensor `out`."""
    for i, lay in enumerate(cache.layers):
        for t, x in enumerate((lay.key, lay.value)):
            _, h, n, d = x.shape
            out[t, i].copy_(x[0].permute(1, 0, 2).reshape(n, h * d))


def _setting(config, name: str, default=None):
    extra = getattr(config, "extra_config", None) or {}
    return extra.get(f"remote_storage_plugin.{_plugin_name(config)}.{name}", default)


def _plugin_name(config) -> str:
    """The name this class is configured under (LMCache does not pass it to plugin classes)."""
    extra = getattr(config, "extra_config", None) or {}
    for name in getattr(config, "remote_storage_plugins", None) or []:
        if extra.get(f"remote_storage_plugin.{name}.module_path") == __name__:
            return name
    return PLUGIN


class KVCodecConnector(RemoteConnector):
    """LMCache `RemoteConnector` storing chunks as `.kvc` (see the module's docstring)."""

    def __init__(self, loop, local_cpu_backend, config):
        try:
            self._setup(loop, local_cpu_backend, config)
        except (KVCError, ValueError) as exc:  # LMCache logs it as an error, then runs without this tier
            raise IrrecoverableException(f"kvcodec LMCache plugin: {exc}") from None

    def _setup(self, loop, local_cpu_backend, config):
        super().__init__(local_cpu_backend.config, local_cpu_backend.metadata)
        metadata = local_cpu_backend.metadata
        if metadata.use_mla:
            raise InputError("it stores keys and values (KV_2LTD); MLA caches are not supported")
        if len(self.meta_shapes) != 1:
            raise InputError(f"it stores one KV layer group; this engine has {len(self.meta_shapes)}")
        if getattr(config, "use_layerwise", False):
            raise InputError("it stores whole chunks; turn use_layerwise off")
        if getattr(config, "remote_serde", "naive") not in (None, "naive"):
            raise InputError(f"it encodes chunks itself: set remote_serde to naive, not {config.remote_serde!r}")
        self.loop, self.allocator = loop, local_cpu_backend
        self.layers, _, self.chunk_tokens, self.heads, self.head_dim = (int(n) for n in metadata.kv_shape)
        self.dtype = self.meta_dtypes[0]
        url = _setting(config, "url")
        if url is None:
            raise InputError(f"it needs remote_storage_plugin.{_plugin_name(config)}.url "
                             "(a folder or a redis:// URL)")
        self.backend = backend_for(url, namespace="kvc:lmcache:")
        self.codec = whole_cache_codec(_setting(config, "codec", DEFAULT_CODEC), codec_options(_setting(config, "options")))

    # -- the connector interface: every store call runs off LMCache's event loop -----------------
    async def _off_loop(self, call, *args):
        return await self.loop.run_in_executor(None, call, *args)

    async def exists(self, key) -> bool:
        return await self._off_loop(self.exists_sync, key)

    def exists_sync(self, key) -> bool:
        return self.backend.contains([key.to_string()])[0]

    async def get(self, key):
        return await self._off_loop(self._restore, key.to_string())

    async def put(self, key, memory_obj) -> None:
        chunk = memory_obj.tensor  # copied before this returns: LMCache may reuse the buffer after
        cache = chunk_to_cache(chunk.detach().cpu().clone(), self.heads, self.head_dim)
        cache.metadata[KEY_META] = key.to_string()
        await self._off_loop(lambda: self.backend.put(key.to_string(), encode(cache, self.codec)))

    async def list(self) -> list[str]:
        return await self._off_loop(self.backend.keys)

    async def close(self) -> None:
        self.backend.close()

    # -- reading an entry ----------------------------------------------------------------------
    def _restore(self, key: str):
        """The memory object of the entry under `key`, or None: missing, or (logged, and the
        entry deleted so that LMCache stores the chunk again) not this engine's chunk for it."""
        data = self.backend.get_many([key])[0]
        if data is None:
            return None
        try:
            cache = decode(data)
            problem = self._problem(cache, key)
        except KVCError as exc:
            problem = f"it does not decode ({exc})"
        if problem is not None:
            log.warning("kvcodec LMCache plugin: entry %s refused: %s; treated as a miss", key, problem)
            self.backend.delete(key)
            return None
        tokens = cache.layers[0].key.shape[2]
        shape = torch.Size([2, self.layers, tokens, self.heads * self.head_dim])
        memory_obj = self.allocator.allocate([shape], [self.dtype], self.meta_fmt)
        if memory_obj is None:
            log.warning("kvcodec LMCache plugin: no memory for entry %s; treated as a miss", key)
            return None
        cache_to_chunk(cache, memory_obj.tensor)
        return memory_obj

    def _problem(self, cache: KVCache, key: str) -> str | None:
        tokens = cache.layers[0].key.shape[2]
        if not 1 <= tokens <= self.chunk_tokens:
            return f"it holds {tokens} tokens (chunks hold 1 to {self.chunk_tokens})"
        return entry_problem(cache, KEY_META, key, self.layers, (1, self.heads, tokens, self.head_dim), self.dtype)
