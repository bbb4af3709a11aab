"""Run inside the SGLang test environment (`tests/stacks.py`): kvcodec's HiCache backend made by
SGLang's own `StorageBackendFactory` ("dynamic", as `--hicache-storage-backend dynamic` makes
it), storing and loading pages through the `HiCacheStorage` interface. The host pool is a
stand-in with an MHA pool's geometry (a real one needs a GPU's KV pool). Prints one JSON object.

    python sglang_backend.py FOLDER_OR_URL
"""

from __future__ import annotations

import json
import logging
import sys
from types import SimpleNamespace

import torch
from sglang.srt.mem_cache.hicache_storage import HiCacheStorage, HiCacheStorageConfig
from sglang.srt.mem_cache.storage.backend_factory import StorageBackendFactory

import kvcodec
from kvcodec.storage.store import backend_for
from tamper import overwrite

LAYERS, PAGE, HEADS, HEAD_DIM = 3, 64, 2, 16


def backend(url, layout="layer_first", codec="zstd", options=None, tp_rank=0, pp_rank=0, pp_size=1):
    config = HiCacheStorageConfig(tp_rank=tp_rank, tp_size=2, pp_rank=pp_rank, pp_size=pp_size, attn_cp_rank=0,
                                  attn_cp_size=1,
                                  is_mla_model=False, enable_storage_metrics=False,
                                  is_page_first_layout=layout == "page_first", model_name="org/model",
                                  extra_config={"backend_name": "kvcodec", "module_path": "kvcodec.integrations.sglang",
                                                "class_name": "KVCodecHiCacheStorage", "url": url, "codec": codec,
                                                "options": options or {}})
    made = StorageBackendFactory.create_backend("dynamic", config, None)
    pool = SimpleNamespace(layout=layout, layer_num=LAYERS, page_size=PAGE, head_num=HEADS, head_dim=HEAD_DIM,
                           dtype=torch.bfloat16)
    made.register_mem_pool_host(pool)
    return made


def pages(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(2 * LAYERS * PAGE * HEADS * HEAD_DIM, generator=g) * 3).to(torch.bfloat16) for _ in range(n)]


def main():
    url = sys.argv[1]
    logging.basicConfig(level=logging.WARNING)
    out = {}
    written = pages(3)
    keys = ["p0", "p1", "p2"]
    first = backend(url)
    out["is_hicache_storage"] = isinstance(first, HiCacheStorage)
    out["batch_set"] = first.batch_set(keys, written)
    out["batch_exists"] = first.batch_exists(keys + ["p9"])
    out["exists_unknown"] = first.exists("p9")
    again = backend(url)  # a fresh backend (a restarted server) on the same store
    loaded = again.batch_get(keys, [torch.zeros_like(p) for p in written])
    out["lossless_exact"] = all(t is not None and torch.equal(t, p) for t, p in zip(loaded, written))
    out["other_rank_exists"] = backend(url, tp_rank=1).batch_exists(keys)
    stages = [backend(url + "-pp", pp_rank=r, pp_size=2) for r in (0, 1)]
    stages[0].set("s", written[0])
    out["other_stage_exists"] = stages[1].exists("s")
    out["stage_suffixes"] = [b.suffix for b in stages]
    page_first = backend(url + "-pf", layout="page_first")
    page_first.set("q", written[0])
    view = written[0].view(2, PAGE, LAYERS, HEADS, HEAD_DIM)
    stored = page_first.backend.get_many(page_first.backend.keys())[0]
    layer1_key = kvcodec.decode(stored).layers[1].key[0]  # [heads, tokens, head_dim]
    out["page_first_layers_are_layers"] = bool(torch.equal(layer1_key, view[0, :, 1].permute(1, 0, 2)))
    out["page_first_exact"] = bool(torch.equal(page_first.get("q", torch.zeros_like(written[0])), written[0]))
    lossy = backend(url + "-q", codec="quant", options={"bits": 8})
    lossy.set("r", written[0])
    back = lossy.get("r", torch.zeros_like(written[0]))
    out["lossy_max_error"] = (back.float() - written[0].float()).abs().max().item()
    out["scale"] = written[0].float().abs().max().item()
    store = backend_for(url, namespace="kvc:sglang:")
    names = sorted(store.keys())
    out["stored_keys"] = names
    out["entry_bytes"] = [len(d) for d in store.get_many(names)]
    out["raw_page_bytes"] = written[0].numel() * 2
    data = bytearray(store.get_many(["p1@org-model@tp0of2"])[0])
    data[len(data) // 2] ^= 0xFF
    overwrite(store, "p1@org-model@tp0of2", bytes(data))
    overwrite(store, "p2@org-model@tp0of2", store.get_many(["p0@org-model@tp0of2"])[0])
    damaged = backend(url).batch_get(keys, [torch.zeros_like(p) for p in written])
    out["after_damage"] = [t is not None and bool(torch.equal(t, p)) for t, p in zip(damaged, written)]
    out["exists_after_damage"] = backend(url).batch_exists(keys)  # refused entries are deleted
    print(json.dumps(out))


if __name__ == "__main__":
    main()
