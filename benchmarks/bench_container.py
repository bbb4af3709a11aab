"""Pack/unpack throughput, ratio and peak memory per codec on a real captured cache.

    python benchmarks/bench_container.py [--cache cache.pt] [--tokens 2048] [--json out.json]

Throughput is MB/s of the uncompressed cache (the cache's own dtype), single process, best of
`--repeat` runs, in memory (encode/decode bytes) and through a file (pack/unpack). Peak memory
is the growth of the resident set during one pack (or one unpack, beyond the decoded tensors
it returns), sampled every millisecond in a fresh subprocess, next to the size of one chunk.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

import torch

import kvcodec
from kvcodec import cachefiles
from kvcodec.eval.bench import best_time

SWEEP = [
    ("raw", {}), ("zstd", {"level": 1}), ("zstd", {"level": 3}), ("shuffle-zstd", {"level": 3}),
    ("quant", {"bits": 8}), ("quant", {"bits": 4}), ("quant", {"bits": 3}), ("quant", {"bits": 2}),
    ("cachegen", {"quality": "high"}), ("cachegen", {"quality": "medium"}), ("cachegen", {"quality": "low"}),
    ("cachegen", {"quality": "medium", "lanes": 1}),  # lane format 1, what cachegen files held before format 2
]


def load(args) -> kvcodec.KVCache:
    if args.cache:
        return cachefiles.load_cache(args.cache)
    from kvcodec.eval import capture

    return capture.capture("prose", args.tokens, torch.float16)


class RssSampler:
    """Samples the resident set size every millisecond in a thread; `.peak` is the maximum seen."""

    def __init__(self):
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.base = self.peak = self.rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(0.001)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())


def memory_probe(path: str, codec: str, opts: str, op: str, chunk_tokens: int) -> None:
    """Run in a subprocess: print the RSS growth (MiB) of one pack, or of one unpack beyond its
    output tensors, after a small warm-up so that imports are excluded."""
    if op == "pack":
        cache = cachefiles.load_cache(path)
        options = json.loads(opts)
        warm = kvcodec.KVCache(cache.layers[:1])  # imports and first-call set-up, without big buffers
        kvcodec.pack(warm, path + ".probe.kvc", codec=codec, chunk_tokens=chunk_tokens, **options)
        with RssSampler() as rss:
            kvcodec.pack(cache, path + ".probe.kvc", codec=codec, chunk_tokens=chunk_tokens, **options)
        print((rss.peak - rss.base) / 2**20)
    else:
        kvcodec.open(path).read(0, tokens=slice(0, 1))
        with RssSampler() as rss:
            out = kvcodec.unpack(path)
        print((rss.peak - rss.base - out.nbytes) / 2**20)


def measure_memory(path: str, codec: str, opts: dict, op: str, chunk_tokens: int) -> float:
    # A fixed mmap threshold makes glibc return freed buffers at once, so RSS tracks live memory
    # instead of what the allocator keeps cached.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    out = subprocess.run([sys.executable, __file__, "--_probe", path, codec, json.dumps(opts), op, str(chunk_tokens)],
                         capture_output=True, text=True, check=True, env=env)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", help="a cache file to use instead of capturing one")
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--chunk-tokens", type=int, default=1024)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", default="bench_out/container.json")
    parser.add_argument("--_probe", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._probe:
        path, codec, opts, op, chunk = args._probe
        memory_probe(path, codec, opts, op, int(chunk))
        return
    torch.set_num_threads(1)
    cache = load(args)
    mb = cache.nbytes / 1e6
    lay = cache.layers[0]
    chunk_mib = lay.key[:, :, :args.chunk_tokens].numel() * lay.key.element_size() / 2**20
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "cache.pt")
        cachefiles.save_cache(cache, src, layout="dict")
        for codec, opts in SWEEP:
            data = kvcodec.encode(cache, codec, chunk_tokens=args.chunk_tokens, **opts)
            enc = best_time(lambda: kvcodec.encode(cache, codec, chunk_tokens=args.chunk_tokens, **opts), args.repeat)
            dec = best_time(lambda: kvcodec.decode(data), args.repeat)
            kvc = os.path.join(tmp, "c.kvc")
            pack = best_time(lambda: kvcodec.pack(cache, kvc, codec=codec, chunk_tokens=args.chunk_tokens, **opts), args.repeat)
            unpack = best_time(lambda: kvcodec.unpack(kvc), args.repeat)
            rows.append({
                "codec": codec, "options": opts, "bytes": len(data), "ratio": cache.nbytes / len(data),
                "bits_per_element": 8 * len(data) / sum(t.numel() for l in cache.layers for t in (l.key, l.value)),
                "encode_MBps": mb / enc, "decode_MBps": mb / dec, "pack_MBps": mb / pack, "unpack_MBps": mb / unpack,
                "pack_peak_extra_MiB": measure_memory(src, codec, opts, "pack", args.chunk_tokens),
                "unpack_peak_extra_MiB": measure_memory(kvc, codec, opts, "unpack", args.chunk_tokens),
            })
    meta = {"cache": args.cache or f"SmolLM2-135M, prose, {args.tokens} tokens, float16",
            "cache_MiB": cache.nbytes / 2**20, "chunk_tokens": args.chunk_tokens, "chunk_MiB": chunk_mib,
            "torch_threads": 1, "cpu": _cpu_name()}
    print_table(rows, meta)
    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"meta": meta, "results": rows}, f, indent=2)
    print(f"wrote {args.json}")


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown"


def print_table(rows, meta) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{meta['cache']} ({meta['cache_MiB']:.1f} MiB), chunks of {meta['chunk_tokens']} tokens "
                        f"({meta['chunk_MiB']:.2f} MiB per chunk tensor)")
    cols = ["codec", "options", "ratio", "bits/elem", "encode MB/s", "decode MB/s", "pack MB/s", "unpack MB/s",
            "pack peak +MiB", "unpack peak +MiB"]
    for c in cols:
        table.add_column(c, justify="left" if c in ("codec", "options") else "right")
    for r in rows:
        table.add_row(r["codec"], " ".join(f"{k}={v}" for k, v in r["options"].items()), f"{r['ratio']:.2f}",
                      f"{r['bits_per_element']:.2f}", f"{r['encode_MBps']:.0f}", f"{r['decode_MBps']:.0f}",
                      f"{r['pack_MBps']:.0f}", f"{r['unpack_MBps']:.0f}", f"{r['pack_peak_extra_MiB']:.1f}",
                      f"{r['unpack_peak_extra_MiB']:.1f}")
    Console(width=200).print(table)


if __name__ == "__main__":
    main()
