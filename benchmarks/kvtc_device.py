"""kvtc on a GPU: restores decoded on the device are bit-identical to the CPU decoder's, and how
long a restore takes on each, at full size.

    python benchmarks/kvtc_device.py [--shapes smollm2,llama3-8b] [--tokens 1024,4096] [--json out.json]

Caches are synthetic of a real shape: every layer's keys and values mix a few shared directions
across heads (as a model's do), keys rotated at their positions; the profile is fitted on another
cache of the same shape (`kvcodec.calibration.fit.from_caches`). Entropy decoding of kvtc runs
on the host; the transform back and the rotation run on the device (spec 8.7 arithmetic).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import kvcodec
from kvcodec.calibration.fit import from_caches
from kvcodec.transform import rope
from kvcodec.transform.profile import Rope

SHAPES = {"smollm2": (30, 3, 64), "llama3-8b": (32, 8, 128)}


def synthetic(layers, heads, dim, tokens, seed, ropes):
    g = torch.Generator().manual_seed(seed)
    mix = torch.Generator().manual_seed(1234)
    out = []
    for i in range(layers):
        basis = torch.randn(16, heads * dim, generator=mix)
        pos = torch.arange(tokens)[None]
        pre = (torch.randn(tokens, 16, generator=g) @ basis + 0.1 * torch.randn(tokens, heads * dim, generator=g))
        pre = pre.reshape(1, tokens, heads, dim).permute(0, 2, 1, 3).double()
        key = rope.rotate(pre, ropes[i].inv_freq, 1.0, pos).half()
        value = (torch.randn(tokens, 16, generator=g) @ basis).reshape(1, tokens, heads, dim).permute(0, 2, 1, 3).half()
        out.append(kvcodec.LayerKV(key, value))
    return kvcodec.KVCache(out)


def timed(fn, repeat=3):
    times = []
    for _ in range(repeat):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="smollm2,llama3-8b")
    ap.add_argument("--tokens", default="1024,4096")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    rows = []
    for shape in args.shapes.split(","):
        layers, heads, dim = SHAPES[shape]
        ropes = [Rope((1.0 / 10000 ** (np.arange(0, dim, 2) / dim)).astype(np.float32), 1.0)] * layers
        profile = from_caches([synthetic(layers, heads, dim, 512, 1, ropes)], ropes, model=shape)
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "profile.safetensors"
            path.write_bytes(profile.to_bytes())
            for tokens in map(int, args.tokens.split(",")):
                cache = synthetic(layers, heads, dim, tokens, 2, ropes)
                t = time.perf_counter()
                data = kvcodec.encode(cache, "kvtc", profile=str(path), target_kl=0.002)
                encode_s = time.perf_counter() - t
                cpu = kvcodec.decode(data)
                gpu = kvcodec.decode(data, device="cuda")
                exact = all(torch.equal(a.key, b.key.cpu()) and torch.equal(a.value, b.value.cpu())
                            for a, b in zip(cpu.layers, gpu.layers))
                t = time.perf_counter()
                kvcodec.decode(data)
                cpu_s = time.perf_counter() - t
                gpu_s = timed(lambda: kvcodec.decode(data, device="cuda"))
                row = {"shape": shape, "tokens": tokens, "fp16_bytes": cache.nbytes, "file_bytes": len(data),
                       "ratio": cache.nbytes / len(data), "bit_exact": exact, "encode_s": encode_s,
                       "cpu_decode_s": cpu_s, "gpu_restore_s": gpu_s,
                       "gpu_gbps": cache.nbytes / gpu_s / 1e9, "device": torch.cuda.get_device_name()}
                rows.append(row)
                print(json.dumps(row), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
