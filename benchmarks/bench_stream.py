"""Restoring a cache from an HTTP server at a given bandwidth: fetch the whole file, then decode,
versus `KVCReader.stream()`, which decodes each layer while the next ones arrive.

The server (`kvc serve --rate-mbit`) runs in its own process on the loopback address and caps
each response's bandwidth; the cache has SmolLM2-135M's shape (random float16 values).

    python benchmarks/bench_stream.py --json benchmarks/results/stream_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

import torch

import kvcodec
from kvcodec.container.remote import HTTPBackend

sys.path.insert(0, os.path.dirname(__file__))
from bench_ttft import BYTES_PER_TOKEN, random_cache  # noqa: E402

CODECS = {"raw": ("raw", {}), "quant": ("quant", {"bits": 4}), "cachegen": ("cachegen", {})}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`kvc serve` in a child process."""

    def __init__(self, root: str, mbit: float):
        self.port = free_port()
        self.proc = subprocess.Popen([sys.executable, "-m", "kvcodec.tools.cli", "serve", root, "--port",
                                      str(self.port), "--rate-mbit", str(mbit)], stderr=subprocess.PIPE, text=True)
        line = self.proc.stderr.readline()
        if "serving" not in line:
            raise RuntimeError(f"the server did not start: {line}")

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/{name}"

    def close(self):
        self.proc.terminate()
        self.proc.wait()


def fetch_then_decode(url: str, device) -> tuple[float, float]:
    """(total, of which fetching) seconds."""
    start = time.perf_counter()
    backend = HTTPBackend(url)
    data, _ = backend.fetch(0, None)
    backend.close()
    fetched = time.perf_counter()
    kvcodec.decode(data, device=device)
    return time.perf_counter() - start, fetched - start


def streamed(url: str, device) -> float:
    start = time.perf_counter()
    with kvcodec.open(url) as reader:
        for _ in reader.stream(device=device):
            pass
    return time.perf_counter() - start


def decode_only(path: str, device) -> float:
    with open(path, "rb") as f:
        data = f.read()
    start = time.perf_counter()
    kvcodec.decode(data, device=device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=float, default=200)
    parser.add_argument("--gbit", type=float, nargs="+", default=[1, 10])
    parser.add_argument("--codecs", nargs="+", default=list(CODECS), choices=list(CODECS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    tokens = int(args.size_mb * 1e6 // BYTES_PER_TOKEN)
    cache = random_cache(tokens)
    rows = []
    with tempfile.TemporaryDirectory() as root:
        for name in args.codecs:
            codec, options = CODECS[name]
            kvcodec.pack(cache, os.path.join(root, f"{name}.kvc"), codec, **options)
        print(f"{'codec':>9} {'Gbit/s':>6} {'file MB':>8} {'decode s':>8} {'fetch s':>8} "
              f"{'fetch+decode s':>14} {'streamed s':>10} {'saved':>6}")
        for gbit in args.gbit:
            server = Server(root, gbit * 1000)
            try:
                for name in args.codecs:
                    path = os.path.join(root, f"{name}.kvc")
                    url = server.url(f"{name}.kvc")
                    decode_s = min(decode_only(path, args.device) for _ in range(args.repeat))
                    whole = min((fetch_then_decode(url, args.device) for _ in range(args.repeat)), key=lambda r: r[0])
                    stream_s = min(streamed(url, args.device) for _ in range(args.repeat))
                    row = {"codec": name, "gbit_s": gbit, "file_mb": os.path.getsize(path) / 1e6,
                           "decode_s": decode_s, "fetch_s": whole[1], "fetch_then_decode_s": whole[0],
                           "streamed_s": stream_s}
                    rows.append(row)
                    print(f"{name:>9} {gbit:6g} {row['file_mb']:8.1f} {decode_s:8.3f} {whole[1]:8.3f} "
                          f"{whole[0]:14.3f} {stream_s:10.3f} {1 - stream_s / whole[0]:6.0%}", flush=True)
            finally:
                server.close()
    if args.json:
        doc = {"device": torch.cuda.get_device_name(0) if str(args.device).startswith("cuda") else "cpu",
               "cache_mb": cache.nbytes / 1e6, "tokens": tokens, "rows": rows}
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=2)


if __name__ == "__main__":
    main()
