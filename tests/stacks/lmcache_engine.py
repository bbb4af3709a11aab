"""Run inside the LMCache test environment (`tests/stacks.py`): a standalone LMCacheEngine on the
CPU with kvcodec's remote-storage plugin stores a cache, a second engine (empty local tier)
looks it up and retrieves it. Prints one JSON object per scenario.

    python lmcache_engine.py URL CODEC OPTIONS_JSON [corrupt|foreign]
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch
from lmcache.v1.cache_engine import LMCacheEngineBuilder
from lmcache.v1.config import LMCacheEngineConfig
from lmcache.v1.gpu_connector import GPUConnectorInterface
from lmcache.v1.metadata import LMCacheMetadata

import kvcodec
from kvcodec.storage.store import backend_for
from tamper import overwrite

LAYERS, HEADS, HEAD_DIM, CHUNK, TOKENS = 4, 2, 16, 256, 600


class HostKV(GPUConnectorInterface):
    """The serving engine's side, on the host: copies between a [2, layers, tokens, hidden]
    tensor (`kv=` when storing, `out=` when retrieving) and LMCache's memory objects."""

    def __init__(self, shape):
        self.shape = shape

    def from_gpu(self, memory_obj, start, end, **kw):
        memory_obj.tensor.copy_(kw["kv"][:, :, start:end])

    def to_gpu(self, memory_obj, start, end, **kw):
        kw["out"][:, :, start:end].copy_(memory_obj.tensor)

    def batched_from_gpu(self, objs, starts, ends, **kw):
        for o, s, e in zip(objs, starts, ends):
            self.from_gpu(o, s, e, **kw)

    def batched_to_gpu(self, objs, starts, ends, **kw):
        for o, s, e in zip(objs, starts, ends):
            self.to_gpu(o, s, e, **kw)

    def get_shape(self, num_tokens):
        return torch.Size([2, self.shape[0], num_tokens, self.shape[3] * self.shape[4]])


def engine(name, url, codec, options):
    config = LMCacheEngineConfig.from_defaults(
        chunk_size=CHUNK, local_cpu=False, max_local_cpu_size=0.5, remote_storage_plugins=["kvcodec"],
        save_unfull_chunk=True,
        extra_config={"remote_storage_plugin.kvcodec.module_path": "kvcodec.integrations.lmcache",
                      "remote_storage_plugin.kvcodec.class_name": "KVCodecConnector",
                      "remote_storage_plugin.kvcodec.url": url, "remote_storage_plugin.kvcodec.codec": codec,
                      "remote_storage_plugin.kvcodec.options": options})
    metadata = LMCacheMetadata(model_name="kvcodec-test", world_size=1, local_world_size=1, worker_id=0,
                               local_worker_id=0, kv_dtype=torch.bfloat16,
                               kv_shape=(LAYERS, 2, CHUNK, HEADS, HEAD_DIM))
    e = LMCacheEngineBuilder.get_or_create(name, config, metadata, HostKV(metadata.kv_shape),
                                           lambda t, r: None, lambda o, r: o)
    e.post_init()
    return e


def main():
    url, codec, options = sys.argv[1], sys.argv[2], sys.argv[3]
    damage = sys.argv[4] if len(sys.argv) > 4 else None
    g = torch.Generator().manual_seed(0)
    kv = (torch.randn(2, LAYERS, TOKENS, HEADS * HEAD_DIM, generator=g) * 2).to(torch.bfloat16)
    tokens = torch.arange(1000, 1000 + TOKENS)
    first = engine("store", url, codec, options)
    first.store(tokens, kv=kv)
    backend = backend_for(url, namespace="kvc:lmcache:")  # the plugin's store, seen from outside LMCache
    chunks = -(-TOKENS // CHUNK)
    for _ in range(200):  # LMCache's puts are asynchronous
        if len(backend.keys()) == chunks:
            break
        time.sleep(0.05)
    keys = sorted(backend.keys())
    entries = dict(zip(keys, backend.get_many(keys)))
    if damage:  # the entry of tokens [256, 512), found by its contents (this scenario stores losslessly)
        start_of = {k: _start(kvcodec.decode(v), kv) for k, v in entries.items()}
        order = sorted(keys, key=start_of.get)
        victim = order[1]
        if damage == "corrupt":
            data = bytearray(entries[victim])
            data[len(data) // 2] ^= 0xFF
            overwrite(backend, victim, bytes(data))
        else:  # the first chunk's entry under the second chunk's key
            overwrite(backend, victim, entries[order[0]])
    LMCacheEngineBuilder.destroy("store")
    second_engine = engine("load", url, codec, options)
    found = second_engine.lookup(tokens)
    out = torch.zeros_like(kv)
    mask = second_engine.retrieve(tokens, out=out)
    n = int(mask.sum())
    err = (out[:, :, :n].float() - kv[:, :, :n].float()).abs().max().item() if n else None
    scale = kv.float().abs().max().item()
    LMCacheEngineBuilder.destroy("load")
    left = sorted(backend.keys())
    exact = bool(n) and torch.equal(out[:, :, :n], kv[:, :, :n])
    print(json.dumps({"keys": keys, "entry_bytes": [len(entries[k]) for k in keys],
                      "raw_chunk_bytes": 2 * LAYERS * CHUNK * HEADS * HEAD_DIM * 2, "lookup": int(found),
                      "retrieved": n, "exact": exact, "max_error": err, "scale": scale, "damaged": damage,
                      "keys_after": left}))


def _start(cache, kv) -> int:
    """Which chunk of `kv` the decoded entry holds (its first token)."""
    first = cache.layers[0].key[0].permute(1, 0, 2).reshape(-1, HEADS * HEAD_DIM)  # [tokens, hidden]
    for start in range(0, TOKENS, CHUNK):
        if torch.equal(first, kv[0, 0, start:start + len(first)]):
            return start
    raise AssertionError("an entry holds none of the stored chunks")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    main()
