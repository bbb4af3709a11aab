"""vLLM KV connector: the KV of every prompt vLLM prefills stored as `.kvc` chunks, in a folder,
a Redis server or an fsspec location, with any kvcodec codec, and loaded back into vLLM's paged
blocks when a later request (in this process or another) starts with the same tokens.

Entries are `PrefixStore` chunks: content-keyed by the model, the codec and every token up to the
chunk's end, so prompts sharing a prefix share its chunks. The scheduler promises a load only
for chunks whose entries are present and pass their checksums (no decoding); the worker decodes
and checks them again before writing vLLM's blocks, and reports the blocks of an entry that went
missing or bad in between, which vLLM recomputes under `kv_load_failure_policy="recompute"`.
Saves copy the prompt's KV out of the paged blocks and encode it on a background thread, so the
engine does not wait for compression. Start vLLM with:

    --kv-transfer-config '{"kv_connector": "KVCodecConnector",
        "kv_connector_module_path": "kvcodec.integrations.vllm", "kv_role": "kv_both",
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": {"url": "/var/cache/kvc", "codec": "zstd"}}'

Extra config: `url` (a folder, file://, redis://, or an fsspec URL: s3://, gs://, http(s)://
to read, ...), `codec` and `options` (as for `kvcodec.encode`; default lossless zstd),
`chunk_tokens` (default 256), `model_id` (names the model in the keys; default vLLM's model
name and dtype: set it when processes load one model from different paths), `verify_lookup`
(default true: the scheduler reads and checksums entries before promising them; false checks
presence only). `kv_role` "kv_producer" only saves, "kv_consumer" only loads.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from kvcodec.cache import KVCache, LayerKV
from kvcodec.errors import InputError
from kvcodec.integrations.config import codec_options
from kvcodec.integrations.paged import KV_SPLITS, PagedLayer, token_slots
from kvcodec.storage.store import PrefixStore, backend_for

try:
    from vllm.distributed.kv_transfer.kv_connector.v1.base import (
        KVConnectorBase_V1,
        KVConnectorMetadata,
        KVConnectorRole,
    )
    from vllm.model_executor.models.utils import extract_layer_index
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("kvcodec.integrations.vllm needs vLLM (pip install 'kvcodec[vllm]')") from exc

log = logging.getLogger(__name__)

DEFAULT_CODEC = "zstd"
DEFAULT_CHUNK_TOKENS = 256


@dataclass
class Transfer:
    """One request's transfer this step: tokens [start, stop) of its prompt between the store and
    its blocks (`block_ids`, vLLM's block size `block_size`)."""
    req_id: str
    token_ids: list[int]
    block_ids: list[int]
    start: int
    stop: int

    def slots(self, block_size: int, stop: int | None = None) -> torch.Tensor:
        """The paged-cache slot of each token in [start, stop)."""
        return token_slots(self.block_ids, block_size, self.start, self.stop if stop is None else stop)


@dataclass
class KVCodecConnectorMetadata(KVConnectorMetadata):
    loads: list[Transfer] = field(default_factory=list)
    saves: list[Transfer] = field(default_factory=list)


def _config_of(kv_transfer_config) -> dict:
    extra = dict(kv_transfer_config.kv_connector_extra_config or {})
    unknown = set(extra) - {"url", "codec", "options", "chunk_tokens", "model_id", "verify_lookup", "background_save"}
    if unknown:
        raise InputError(f"kvcodec's vLLM connector has no setting {', '.join(sorted(unknown))}")
    if not isinstance(extra.get("url"), str) or not extra["url"]:
        raise InputError("kvcodec's vLLM connector needs kv_connector_extra_config.url: a folder or redis:// URL")
    return extra


class KVCodecConnector(KVConnectorBase_V1):
    """vLLM's KV connector over a kvcodec `PrefixStore` (see the module's docstring)."""

    def __init__(self, vllm_config, role, kv_cache_config=None):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        cfg = _config_of(self._kv_transfer_config)
        groups = getattr(kv_cache_config, "kv_cache_groups", None) or []
        if len(groups) > 1:
            raise InputError(f"kvcodec's vLLM connector stores one KV cache group, not {len(groups)}: "
                             "start vLLM with --disable-hybrid-kv-cache-manager")
        from vllm.v1.kv_cache_interface import FullAttentionSpec

        if groups and not isinstance(groups[0].kv_cache_spec, FullAttentionSpec):
            raise InputError("kvcodec's vLLM connector stores full-attention KV (a sliding window frees the blocks "
                             f"it reads), not {type(groups[0].kv_cache_spec).__name__}")
        if vllm_config.cache_config.cache_dtype != "auto":
            raise InputError(f"kvcodec's vLLM connector stores the model's own KV dtype; kv_cache_dtype is "
                             f"{vllm_config.cache_config.cache_dtype!r} (its scales are not stored)")
        model = vllm_config.model_config
        model_id = cfg.get("model_id") or f"vllm:{model.model}@{model.revision or ''}:{model.dtype}"
        parallel = vllm_config.parallel_config
        self._ranks = [(tp, pp) for pp in range(parallel.pipeline_parallel_size)
                       for tp in range(parallel.tensor_parallel_size)]
        self._model_id = model_id
        self._block_size = vllm_config.cache_config.block_size
        self._verify_lookup = bool(cfg.get("verify_lookup", True))
        self._background = bool(cfg.get("background_save", True))
        chunk_tokens = cfg.get("chunk_tokens", DEFAULT_CHUNK_TOKENS)
        backend = backend_for(cfg["url"])
        codec, options = cfg.get("codec", DEFAULT_CODEC), codec_options(cfg.get("options"))
        # one store per (tensor, pipeline) rank: each worker holds its own heads and layers
        self._stores = {rank: PrefixStore(backend, self._rank_model_id(*rank), codec, chunk_tokens, **options)
                        for rank in self._ranks}
        self._backend = backend
        self._loads_ok = self._kv_transfer_config.is_kv_consumer  # kv_consumer or kv_both
        self._saves_ok = self._kv_transfer_config.is_kv_producer  # kv_producer or kv_both
        if role == KVConnectorRole.SCHEDULER:
            if self._kv_transfer_config.kv_load_failure_policy != "recompute":
                log.warning("kvcodec connector: kv_load_failure_policy is %r: a stored entry that goes missing "
                            "between lookup and load fails its request; 'recompute' recomputes it instead",
                            self._kv_transfer_config.kv_load_failure_policy)
            self._looked_up: dict[str, int] = {}  # req_id: prompt tokens the store holds
            self._computed: dict[str, int] = {}  # req_id: tokens computed locally when it was looked up
            self._loads: dict[str, tuple[Any, int, int]] = {}  # req_id: (request, start, stop)
            self._unsaved: dict[str, Transfer] = {}  # prefilling requests to store when their prompt is done
            self._saved: dict[str, Transfer] = {}  # saves issued, kept in case vLLM rolls the request back
            self._private: set[str] = set()  # requests with a LoRA adapter or a cache salt: never stored
        else:
            self._layers: list[PagedLayer] = []
            self._failed_blocks: set[int] = set()
            self._step_failed_blocks: set[int] = set()  # this step's (the reported ones are taken by vLLM)
            self._saver = ThreadPoolExecutor(1, thread_name_prefix="kvcodec-save")

    def _rank_model_id(self, tp: int, pp: int) -> str:
        parallel = self._vllm_config.parallel_config
        return f"{self._model_id}|tp{tp}/{parallel.tensor_parallel_size}|pp{pp}/{parallel.pipeline_parallel_size}"

    # -- scheduler side ----------------------------------------------------------------------
    def get_num_new_matched_tokens(self, request, num_computed_tokens: int) -> tuple[int, bool]:
        ids = list(request.prompt_token_ids or [])
        if getattr(request, "lora_request", None) is not None or getattr(request, "cache_salt", None):
            # the keys name the base model only: an adapter's or a tenant's KV is neither loaded nor stored
            self._private.add(request.request_id)
            return 0, False
        if not self._loads_ok or len(ids) < 2 or getattr(request, "mm_features", None):
            return 0, False
        stored = self._looked_up.get(request.request_id)
        if stored is None:  # asked again while the request waits for blocks: the first look stands
            try:
                stored = min(store.stored(ids, verify=self._verify_lookup) for store in self._stores.values())
            except Exception as e:  # noqa: BLE001 - a store that fails (Redis down, ...) is a miss, not a crash
                log.warning("kvcodec connector: lookup of request %s failed: %s", request.request_id, e)
                stored = 0
            self._looked_up[request.request_id] = stored
        # whole blocks only, and never the last prompt token: vLLM computes it for the logits
        loadable = min(stored, len(ids) - 1) // self._block_size * self._block_size
        self._computed[request.request_id] = num_computed_tokens
        return max(0, loadable - num_computed_tokens), False

    def update_state_after_alloc(self, request, blocks, num_external_tokens: int):
        self._looked_up.pop(request.request_id, None)
        computed = self._computed.pop(request.request_id, 0)
        if num_external_tokens > 0:
            self._loads[request.request_id] = (request, computed, computed + num_external_tokens)

    def build_connector_meta(self, scheduler_output) -> KVCodecConnectorMetadata:
        meta = KVCodecConnectorMetadata()
        scheduled = scheduler_output.num_scheduled_tokens
        for new in scheduler_output.scheduled_new_reqs:
            ids, blocks = list(new.prompt_token_ids or []), list(new.block_ids[0])
            if new.req_id in self._loads:
                _, start, stop = self._loads.pop(new.req_id)
                meta.loads.append(Transfer(new.req_id, ids, blocks, start, stop))
            self._saved.pop(new.req_id, None)  # (a resumed request arrives as new: its old blocks are gone)
            private = new.req_id in self._private or getattr(new, "lora_request", None) is not None
            if self._saves_ok and ids and not getattr(new, "mm_features", None) and not private:
                self._unsaved[new.req_id] = Transfer(new.req_id, ids, blocks, 0, len(ids))
                self._save_if_done(meta, new.req_id, new.num_computed_tokens + scheduled.get(new.req_id, 0))
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            new_blocks = cached.new_block_ids[i]
            resumed = req_id in getattr(cached, "resumed_req_ids", ())
            if req_id in self._loads:  # resumed after preemption: its blocks are all new
                request, start, stop = self._loads.pop(req_id)
                meta.loads.append(Transfer(req_id, list(request.prompt_token_ids), list(new_blocks[0]), start, stop))
            if req_id in self._saved and cached.num_computed_tokens[i] < self._saved[req_id].stop:
                # vLLM rolled the request back (a failed load): the worker skipped its save
                self._unsaved[req_id] = self._saved.pop(req_id)
            if req_id in self._unsaved:
                track = self._unsaved[req_id]
                if new_blocks is not None:
                    track.block_ids = list(new_blocks[0]) if resumed else track.block_ids + list(new_blocks[0])
                self._save_if_done(meta, req_id, cached.num_computed_tokens[i] + scheduled.get(req_id, 0))
        for req_id in scheduler_output.finished_req_ids:
            self._unsaved.pop(req_id, None)
            self._saved.pop(req_id, None)
            self._private.discard(req_id)
        self._loads.clear()
        return meta

    def _save_if_done(self, meta: KVCodecConnectorMetadata, req_id: str, computed_after: int) -> None:
        """Store a request's prompt in the step that computes its last prompt token."""
        track = self._unsaved[req_id]
        if computed_after >= track.stop:
            self._saved[req_id] = self._unsaved.pop(req_id)
            meta.saves.append(self._saved[req_id])

    def request_finished(self, request, block_ids) -> tuple[bool, dict | None]:
        for tracked in (self._unsaved, self._saved, self._computed, self._looked_up):
            tracked.pop(request.request_id, None)
        self._private.discard(request.request_id)
        return False, None

    # -- worker side -------------------------------------------------------------------------
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]):
        from vllm.distributed.parallel_state import get_pp_group, get_tensor_model_parallel_rank

        rank = (get_tensor_model_parallel_rank(), get_pp_group().rank_in_group)
        self._store = self._stores[rank]
        layers = self._vllm_config.compilation_config.static_forward_context
        seen, self._layers = set(), []
        for name in sorted(kv_caches, key=extract_layer_index):
            kv = kv_caches[name]
            if kv.data_ptr() in seen:  # a layer reading another's KV (cross-layer sharing)
                continue
            seen.add(kv.data_ptr())
            impl = layers[name]
            backend = impl.attn_backend.get_name()
            kernel = getattr(impl, "isa", None) if backend == "CPU_ATTN" else None  # the CPU kernels' layouts differ
            split = KV_SPLITS.get((backend, kernel))
            if split is None:
                known = ", ".join(b if k is None else f"{b} ({k})" for b, k in KV_SPLITS)
                raise InputError(f"kvcodec's vLLM connector does not know how {backend}"
                                 f"{'' if kernel is None else f' ({kernel})'} lays out keys and values (it reads {known})")
            self._layers.append(PagedLayer(name, kv, split, impl.head_size))

    def start_load_kv(self, forward_context, **kwargs) -> None:
        meta = self._get_connector_metadata()
        for load in meta.loads:
            self._load(load)

    def _load(self, load: Transfer) -> None:
        """Write tokens [start, stop) of the stored prompt into the request's blocks. When the
        store no longer holds them all (an entry went missing or bad since the lookup), what it
        holds is written and the blocks from there on are reported: vLLM recomputes them, and the
        request is not saved this step (its KV after that point is not its own)."""
        device = self._layers[0].key.device
        try:
            cache, found = self._store.get(load.token_ids, device=device)
            problem = None if cache is None else self._mismatch(cache)
        except Exception as e:  # noqa: BLE001 - a store that fails is a failed load, recomputed
            cache, found, problem = None, 0, str(e)
        good = load.stop if found >= load.stop else found // self._block_size * self._block_size
        if problem is not None:
            good = load.start
        if good < load.stop:
            log.warning("kvcodec connector: request %s: tokens [%d, %d) could not be loaded (%s); vLLM recomputes "
                        "them", load.req_id, max(good, load.start), load.stop,
                        problem or f"the store holds {found} tokens of its prompt")
            self._failed(load, max(good, load.start))
        if good > load.start:
            slots = load.slots(self._block_size, stop=good).to(device)
            try:
                for layer, lay in zip(self._layers, cache.layers):
                    layer.write(slots, LayerKV(lay.key[:, :, load.start:good], lay.value[:, :, load.start:good]))
            except Exception as e:  # noqa: BLE001 - a load that cannot be written is recomputed, never a crash
                log.warning("kvcodec connector: request %s: writing its loaded KV failed (%s); vLLM recomputes it",
                            load.req_id, e)
                self._failed(load, load.start)

    def _failed(self, load: Transfer, first: int) -> None:
        """Tokens [first, stop) of `load` are not loaded: report their blocks, and keep the
        request (and anything sharing those blocks) from being stored this step."""
        blocks = load.block_ids[first // self._block_size:-(-load.stop // self._block_size)]
        self._failed_blocks.update(blocks)
        self._step_failed_blocks.update(blocks)

    def _mismatch(self, cache: KVCache) -> str | None:
        if cache.num_layers != len(self._layers):
            return f"the entry has {cache.num_layers} layers, this engine {len(self._layers)}"
        for layer, lay in zip(self._layers, cache.layers):
            heads, dim, dtype = layer.key.shape[1], layer.head_dim, layer.key.dtype
            if lay.key.shape[1] != heads or lay.key.shape[3] != dim or lay.key.dtype != dtype:
                return (f"{layer.name} is {dtype} with {heads} heads of {dim}, the entry's "
                        f"{lay.key.dtype} {tuple(lay.key.shape)}")
        return None

    def wait_for_layer_load(self, layer_name: str) -> None:
        return

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata, **kwargs) -> None:
        return  # the whole prompt is read after the forward, in wait_for_save

    def wait_for_save(self):
        failed_blocks, self._step_failed_blocks = self._step_failed_blocks, set()
        if not self.has_connector_metadata():
            return
        for save in self._get_connector_metadata().saves:
            # a request with a block that failed to load (its own load, or one it shares) holds KV not its own
            if not failed_blocks.isdisjoint(save.block_ids):
                continue
            try:
                slots = save.slots(self._block_size).to(self._layers[0].key.device)
                cache = KVCache([layer.read(slots) for layer in self._layers])
            except Exception as e:  # noqa: BLE001 - a save that fails is a future miss, never the engine's failure
                log.warning("kvcodec connector: reading request %s's KV to store it failed: %s", save.req_id, e)
                continue
            if self._background:
                self._saver.submit(self._put, save, cache)
            else:
                self._put(save, cache)

    def _put(self, save: Transfer, cache: KVCache) -> None:
        try:
            self._store.put(cache, save.token_ids)
        except Exception as e:  # noqa: BLE001 - a failed save is a future miss, never the engine's failure
            log.warning("kvcodec connector: storing request %s failed: %s", save.req_id, e)

    def get_block_ids_with_load_errors(self) -> set[int]:
        failed, self._failed_blocks = self._failed_blocks, set()
        return failed

    def wait_for_saves(self) -> None:
        """Return once every save submitted so far is stored (or has failed, logged)."""
        self._saver.submit(lambda: None).result()  # one saver thread: saves finish in order

    def shutdown(self):
        if self._role == KVConnectorRole.WORKER:
            self._saver.shutdown(wait=True)  # pending saves complete before the engine exits
        self._backend.close()


class SavesExtension:
    """A vLLM worker extension (`worker_extension_cls="kvcodec.integrations.vllm.SavesExtension"`)
    so that `llm.collective_rpc("kvcodec_wait_for_saves")` returns once every worker's background
    saves are stored: call it before stopping an engine that has just stored (saves still
    encoding when its processes are killed are lost: future misses)."""

    def kvcodec_wait_for_saves(self) -> None:
        from vllm.distributed.kv_transfer import get_kv_transfer_group, has_kv_transfer_group

        if has_kv_transfer_group() and isinstance(get_kv_transfer_group(), KVCodecConnector):
            get_kv_transfer_group().wait_for_saves()
