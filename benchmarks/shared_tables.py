"""What cachegen's lanes would cost with a few shared probability tables per (layer, key/value)
at a lower precision, against its per-channel 24-bit tables: the question behind a lane format a
GPU can decode by direct table lookup (a table of 2**P slots per shared table, small enough to
stay in the L1 cache), which per-channel tables are too many for.

    python benchmarks/shared_tables.py cache.pt [--tables 1,4,16,64] [--bits 10,12,16]

The counts are those the file's own tables store. Per tensor, a channel's main table and the
delta tables are grouped separately; channels are clustered into K groups (start: sorted by
spread; then each channel moves to the group whose quantized table codes it in fewest bits,
8 rounds); a group's table is its members' summed counts quantized to 2**P with every symbol
of its support at least 1. Printed: the lanes' ideal size with per-channel tables (their
entropy) and with the shared tables, and the tables blob of the file as written.
"""

from __future__ import annotations

import argparse

import numpy as np

import kvcodec
from kvcodec import cachefiles
from kvcodec.entropy import rans


def quantized(p: np.ndarray, bits: int) -> np.ndarray:
    """Probabilities over a support -> frequencies >= 1 summing to 2**bits, as probabilities."""
    total = 1 << bits
    if len(p) > total:
        return p
    w = 1 + np.floor(p * (total - len(p))).astype(np.int64)
    w[np.argmax(p)] += total - int(w.sum())
    return w / total


def grouped_counts(tt):
    """Per table group (main tables, delta tables) of one tensor: counts aligned by value."""
    counts = np.split(rans.codes_to_counts(tt.codes), np.cumsum(tt.sizes)[:-1])
    c = tt.heads * tt.head_dim
    for idx in (np.arange(c), np.arange(c, len(tt.sizes))):
        if not len(idx):
            continue
        low = int(tt.los[idx].min())
        m = np.zeros((len(idx), int((tt.los[idx] + tt.sizes[idx]).max()) - low))
        for j, i in enumerate(idx):
            m[j, tt.los[i] - low:tt.los[i] - low + tt.sizes[i]] = counts[i]
        yield m


def shared_cost_bytes(m: np.ndarray, k: int, bits: int, rounds: int = 8) -> float:
    k = min(k, len(m))
    p = m / np.maximum(m.sum(1, keepdims=True), 1)
    values = np.arange(m.shape[1])
    spread = (p * np.abs(values - (p * values).sum(1, keepdims=True))).sum(1)
    group = np.argsort(np.argsort(spread)) * k // len(m)
    for _ in range(rounds):
        logs = np.full((k, m.shape[1]), -60.0)  # symbols outside a table's support: never chosen
        for g in range(k):
            summed = m[group == g].sum(0)
            support = summed > 0
            if support.any():
                logs[g, support] = np.log2(quantized(summed[support] / summed.sum(), bits))
        costs = -(m @ logs.T)
        group = np.argmin(costs, 1)
    return float(costs[np.arange(len(m)), group].sum()) / 8


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("cache")
    p.add_argument("--tables", default="1,4,16,64")
    p.add_argument("--bits", default="10,12,16")
    args = p.parse_args()
    cache = cachefiles.load_cache(args.cache)
    data = kvcodec.encode(cache, "cachegen")
    reader = kvcodec.open(data)
    tables = reader.context(0)
    groups = [m for tt in tables.tensors.values() for m in grouped_counts(tt)]
    ideal = sum(float(-(row[row > 0] * np.log2(row[row > 0] / row.sum())).sum()) / 8 for m in groups for row in m)
    print(f"file {len(data)} B: payloads {int(reader.records['length'].sum())} B, tables blob "
          f"{len(reader.context_blobs(0)[0])} B; lanes with per-channel tables (entropy) {ideal:.0f} B")
    for k in (int(v) for v in args.tables.split(",")):
        for bits in (int(v) for v in args.bits.split(",")):
            cost = sum(shared_cost_bytes(m, k, bits) for m in groups)
            print(f"{k:3d} shared tables per tensor group, {bits}-bit: {cost:.0f} B ({100 * (cost / ideal - 1):+.1f}%)",
                  flush=True)


if __name__ == "__main__":
    main()
