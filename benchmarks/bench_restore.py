"""Restore at the speed of the link: each codec's restore onto the GPU against the host-to-device
copy of its compressed bytes, loading the raw fp16 cache, and recomputing the prefill; restores
from a file against reading the file into pinned memory; time to first token over a link.

    kvc capture -o cache.pt --tokens 1024
    python benchmarks/bench_restore.py --data cache.pt [--tokens 1024,8192,32768]
        [--shapes smollm2,llama3-8b] [--json out.json]

Caches as in bench_gpu_decode.py (a real SmolLM2 cache tiled along tokens; Llama-3-8B-shaped
layers from its heads side by side; files chunked by 1024 tokens). Every figure is a median of
--repeat runs after a warm-up, all measured in this one run:

- H2D: the compressed bytes, pinned, copied to the GPU; its GB/s is the link the bound uses.
- restore: pinned file bytes -> `kvcodec.decode(src, device="cuda").to_hf()` (checksums,
  tables, staging, copy and decode included). Bound: 1.5 x compressed bytes / H2D GB/s + 1 ms.
- raw load: the fp16 tensors, pinned, -> `.to("cuda")` -> DynamicCache.
- prefill: a forward pass of a randomly initialised Llama model of the shape (fp16, SDPA).
- from file (page cache warm): `kvcodec.open(path).to_hf(device="cuda")` and
  `kvcodec.unpack(path, device="cuda")`, against reading the file into a pinned buffer;
  the target is >= 0.8 x that rate.
- time to first token: the first decode step after the restore (measured), plus the fetch of the
  file over a 1, 10 or 100 Gbit/s link (computed: bytes / bandwidth), sequential (fetch, then
  restore) and overlapped (`stream()`: fetch and decode at once, so the last layer group's share
  of the restore after the last byte, and never less than the whole restore); raw fp16 over the
  link likewise; prefill needs no fetch.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import bench_gpu_decode as gpu  # noqa: E402

import kvcodec  # noqa: E402

# (label, codec, options); "cachegen-l1" is cachegen's lane format 1, what files held before format 2
CODECS = [("raw", "raw", {}), ("quant", "quant", {"bits": 4}), ("cachegen", "cachegen", {"quality": "medium"}),
          ("cachegen-l1", "cachegen", {"quality": "medium", "lanes": 1})]
LINKS_GBIT = (1, 10, 100)
EXACT_CHECK_BYTES = 200 << 20  # caches up to this size are also decoded on the CPU and compared


def median_ms(fn, repeat: int) -> float:
    return gpu.cuda_time(fn, repeat) * 1e3


def read_pinned(path: str, size: int):
    def read():
        buf = torch.empty(size, dtype=torch.uint8, pin_memory=True)
        with open(path, "rb", buffering=0) as f:
            f.readinto(buf.numpy())
        return buf
    return read


def first_step_ms(model, cache_hf, tokens: int, repeat: int) -> float:
    """One decode step (one new token) on top of a restored cache; the cache is cropped back after
    each step so every run sees the same length."""
    ids = torch.randint(0, model.config.vocab_size, (1, 1), device="cuda")
    pos = torch.tensor([[tokens]], device="cuda")

    def step():
        with torch.no_grad():
            model(ids, past_key_values=cache_hf, position_ids=pos, use_cache=True)
        cache_hf.crop(-1)
    return median_ms(step, repeat)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data")
    p.add_argument("--tokens", default="1024,8192,32768")
    p.add_argument("--shapes", default="smollm2,llama3-8b")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--no-prefill", action="store_true")
    p.add_argument("--json")
    args = p.parse_args()
    real = gpu.real_layers(args.data)
    rows, ttft = [], []
    workdir = tempfile.mkdtemp()
    for shape in args.shapes.split(","):
        base = gpu.base_cache(shape, real, 2 * gpu.CHUNK)
        model = None if args.no_prefill else gpu.random_model(shape)
        files = {label: kvcodec.encode(base, name, chunk_tokens=gpu.CHUNK, **opts) for label, name, opts in CODECS}
        for tokens in (int(t) for t in args.tokens.split(",")):
            cache = gpu.base_cache(shape, real, tokens)
            raw_ms = gpu.raw_load_time(cache, args.repeat) * 1e3
            prefill_ms = gpu.prefill_time(model, tokens, 3) * 1e3 if model is not None else float("nan")
            step_ms = float("nan")
            for label, name, opts in CODECS:
                data = gpu.replicated_file(files[label], tokens)
                src = gpu.pinned(data)
                h2d_ms = median_ms(lambda: src.to("cuda", non_blocking=True), args.repeat)
                gbps = len(data) / h2d_ms / 1e6
                bound_ms = 1.5 * h2d_ms + 1.0
                restore_ms = median_ms(lambda: kvcodec.decode(src, device="cuda").to_hf(), args.repeat)
                exact = None
                if cache.nbytes <= EXACT_CHECK_BYTES:  # the GPU restore against the CPU decoder, bit for bit
                    got, want = kvcodec.decode(src, device="cuda"), kvcodec.decode(data, decoder="cpu")
                    exact = all(torch.equal(g.cpu(), w) for a, b in zip(got.layers, want.layers)
                                for g, w in ((a.key, b.key), (a.value, b.value)))
                path = os.path.join(workdir, f"{shape}-{tokens}-{label}.kvc")
                Path(path).write_bytes(data)
                file_pinned_ms = median_ms(read_pinned(path, len(data)), args.repeat)
                open_ms = median_ms(lambda: kvcodec.open(path).to_hf(device="cuda"), args.repeat)
                unpack_ms = median_ms(lambda: kvcodec.unpack(path, device="cuda"), args.repeat)
                if model is not None and name == "raw":
                    try:
                        step_ms = first_step_ms(model, kvcodec.decode(src, device="cuda").to_hf(), tokens, args.repeat)
                    except Exception as exc:  # keep the other figures
                        print(f"# first decode step failed: {type(exc).__name__}: {exc}", flush=True)
                row = dict(shape=shape, tokens=tokens, codec=label, options=opts, fp16_bytes=cache.nbytes,
                           file_bytes=len(data), ratio=cache.nbytes / len(data), h2d_ms=h2d_ms, h2d_gbps=gbps,
                           bound_ms=bound_ms, restore_ms=restore_ms, within_bound=restore_ms <= bound_ms,
                           raw_load_ms=raw_ms, prefill_ms=prefill_ms, file_to_pinned_ms=file_pinned_ms,
                           open_to_hf_ms=open_ms, unpack_path_ms=unpack_ms,
                           from_file_rate=file_pinned_ms / max(open_ms, unpack_ms), bit_exact=exact)
                rows.append(row)
                print(json.dumps(row), flush=True)
                src = None  # the pinned copy freed before the next file
                os.unlink(path)
                torch.cuda.empty_cache()
            for r in rows[-len(CODECS):]:
                r["first_step_ms"] = step_ms
                for gbit in LINKS_GBIT:
                    fetch_ms = r["file_bytes"] * 8 / (gbit * 1e9) * 1e3
                    raw_fetch_ms = r["fp16_bytes"] * 8 / (gbit * 1e9) * 1e3
                    groups = max(1, -(-r["file_bytes"] // (4 << 20)))  # stream() fetches >= 4 MiB per group
                    ttft.append(dict(shape=shape, tokens=tokens, codec=r["codec"], link_gbit=gbit, fetch_ms=fetch_ms,
                                     sequential_ms=fetch_ms + r["restore_ms"] + step_ms,
                                     overlapped_ms=max(fetch_ms + r["restore_ms"] / groups, r["restore_ms"]) + step_ms,
                                     raw_ms=raw_fetch_ms + r["raw_load_ms"] + step_ms,
                                     prefill_ms=r["prefill_ms"] + step_ms))
        del model
        torch.cuda.empty_cache()
    device = torch.cuda.get_device_name()
    print(f"\n{device}; torch {torch.__version__}")
    print(f"{'shape':10} {'tokens':>6} {'codec':11} {'ratio':>5} {'H2D ms':>7} {'bound ms':>8} {'restore ms':>10} "
          f"{'met':>4} {'raw load':>8} {'prefill':>8} {'file->pin':>9} {'open.to_hf':>10} {'unpack':>7} {'rate':>5} "
          f"{'exact':>5}")
    for r in rows:
        print(f"{r['shape']:10} {r['tokens']:>6} {r['codec']:11} {r['ratio']:5.2f} {r['h2d_ms']:7.2f} {r['bound_ms']:8.2f} "
              f"{r['restore_ms']:10.2f} {'yes' if r['within_bound'] else 'no':>4} {r['raw_load_ms']:8.2f} "
              f"{r['prefill_ms']:8.1f} {r['file_to_pinned_ms']:9.2f} {r['open_to_hf_ms']:10.2f} "
              f"{r['unpack_path_ms']:7.2f} {r['from_file_rate']:5.2f} {str(r['bit_exact']):>5}")
    print(f"\n{'shape':10} {'tokens':>6} {'codec':11} {'Gbit/s':>6} {'fetch ms':>9} {'seq. TTFT':>9} "
          f"{'overlap TTFT':>12} {'raw TTFT':>9} {'prefill TTFT':>12}")
    for t in ttft:
        print(f"{t['shape']:10} {t['tokens']:>6} {t['codec']:11} {t['link_gbit']:>6} {t['fetch_ms']:9.1f} "
              f"{t['sequential_ms']:9.1f} {t['overlapped_ms']:12.1f} {t['raw_ms']:9.1f} {t['prefill_ms']:12.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device, "torch": torch.__version__, "rows": rows, "ttft": ttft}, f, indent=1)


if __name__ == "__main__":
    main()
