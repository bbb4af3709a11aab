"""cachegen's lane formats side by side on real caches (CPU, one thread): file size, bits per
element, encode and decode MB/s of the float16 cache (best of --repeat), and how far the lanes
are above the per-channel entropy of their symbols.

    kvc capture -o smollm2.pt --tokens 1024
    python benchmarks/capture_gemma.py -o gemma.pt
    python benchmarks/bench_lane_formats.py smollm2.pt gemma.pt [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

import kvcodec
from kvcodec import cachefiles
from kvcodec.entropy.quantizer import entropy_bits, quantize


def entropy_of_symbols(cache, data: bytes) -> tuple[float, float]:
    """(bits the lanes hold, entropy of each channel's symbols over the file: its direct or anchor
    symbols, and an anchored channel's deltas)."""
    reader = kvcodec.open(data)
    codec, ctx = reader.codec(0), reader.context(0)
    lane_bits, symbols = 0.0, {}
    for i, rec in enumerate(reader.record_infos()):
        info = reader.record_info(i)
        x = getattr(cache.layers[rec.layer], rec.tensor)[:, :, rec.token_start:rec.token_start + rec.tokens]
        tt, s = ctx.for_chunk(info, "cachegen"), codec.sink_count(info)
        anchored = np.flatnonzero(tt.anchored)
        direct, anchors, deltas = (t.numpy() for t in quantize(x[:, :, s:].float(), torch.from_numpy(tt.steps),
                                                              torch.from_numpy(anchored), tt.group_size, tt.anchor_bits))
        where = {c: j for j, c in enumerate(anchored)}
        for c in range(direct.shape[1]):
            key = (rec.layer, rec.tensor, c)
            symbols.setdefault(key, []).append(anchors[:, where[c]].ravel() if c in where else direct[:, c].ravel())
            if c in where:
                symbols.setdefault(key + ("delta",), []).append(deltas[:, where[c]].ravel())
        lanes = x.shape[0] * x.shape[1] * x.shape[3] + (x.shape[0] * len(anchored) if codec.lanes == 1 else 0)
        lane_bits += 8 * (rec.length - s * x[:, :, :1].numel() * x.element_size() - 4 * lanes)
    entropy = sum(float(entropy_bits(np.concatenate(v)[None])[0]) for v in symbols.values() if sum(map(len, v)))
    return lane_bits, entropy


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("caches", nargs="+")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--json")
    args = p.parse_args()
    torch.set_num_threads(1)
    rows = []
    for path in args.caches:
        cache = cachefiles.load_cache(path)
        nbytes = sum(lay.key.numel() * lay.key.element_size() + lay.value.numel() * lay.value.element_size()
                     for lay in cache.layers)
        for lanes in (1, 2):
            encode_s, decode_s = [], []
            for _ in range(args.repeat):
                t = time.perf_counter()
                data = kvcodec.encode(cache, "cachegen", lanes=lanes)
                encode_s.append(time.perf_counter() - t)
                t = time.perf_counter()
                kvcodec.decode(data)
                decode_s.append(time.perf_counter() - t)
            lane_bits, entropy = entropy_of_symbols(cache, data)
            row = dict(cache=path, model=cache.metadata.get("model", "smollm2"), lanes=lanes, fp16_bytes=nbytes,
                       file_bytes=len(data), bits_per_element=8 * len(data) / (nbytes / 2),
                       tables_bytes=len(kvcodec.open(data).context_blobs(0)[0]),
                       encode_mb_s=nbytes / min(encode_s) / 1e6, decode_mb_s=nbytes / min(decode_s) / 1e6,
                       lanes_over_entropy=lane_bits / entropy - 1)
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"\n{'cache':24} {'lanes':>5} {'file bytes':>11} {'bits/elem':>9} {'tables B':>9} {'enc MB/s':>8} "
          f"{'dec MB/s':>8} {'lanes vs entropy':>16}")
    for r in rows:
        print(f"{r['cache'][-24:]:24} {r['lanes']:>5} {r['file_bytes']:>11} {r['bits_per_element']:9.3f} "
              f"{r['tables_bytes']:>9} {r['encode_mb_s']:8.1f} {r['decode_mb_s']:8.1f} "
              f"{100 * r['lanes_over_entropy']:+15.2f}%")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
