"""Fuzz the `.kvc` reader and every codec's decoder (`kvcodec.testing.fuzz`) for a fixed number of cases:
mutated, truncated and spliced files, checksums recomputed so the damage reaches validation and
decoders. Prints a table, writes a JSON, and saves every failing input under
tests/fuzz_regressions/ (the test suite replays them).

    python benchmarks/fuzz_reader.py --cases 100000 --json benchmarks/results/fuzz.json
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import resource
import time
from concurrent.futures import ProcessPoolExecutor

from kvcodec.testing import fuzz

REGRESSIONS = os.path.join(os.path.dirname(__file__), "..", "tests", "fuzz_regressions")


ADDRESS_SPACE = 8 << 30  # per worker: an input that makes the reader allocate more fails instead of swapping


def worker(job: tuple[int, int]) -> dict:
    seed, count = job
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, resource.RLIM_INFINITY))
    seeds = fuzz.seed_files()
    counts = collections.Counter()
    failures, peak_ratio, slowest = [], 0.0, 0.0
    for i, data in fuzz.cases(seed, count, seeds):
        start = time.perf_counter()
        outcome = fuzz.run_case(data)
        slowest = max(slowest, time.perf_counter() - start)
        counts["refused" if outcome.refused else "decoded"] += 1
        peak_ratio = max(peak_ratio, outcome.peak_bytes / max(1, len(data)))
        if not outcome.ok:
            counts["failed"] += 1
            failures.append((f"{seed}-{i}", outcome.problem, data))
    return {"counts": counts, "failures": failures, "peak_ratio": peak_ratio, "slowest_s": slowest}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=100_000)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    shards = 8 * args.workers
    jobs = [(args.seed * 1_000_003 + k, args.cases // shards + (k < args.cases % shards)) for k in range(shards)]
    start = time.perf_counter()
    counts, failures, peak, slowest = collections.Counter(), [], 0.0, 0.0
    with ProcessPoolExecutor(args.workers) as pool:
        for result in pool.map(worker, jobs):
            counts.update(result["counts"])
            failures += result["failures"]
            peak, slowest = max(peak, result["peak_ratio"]), max(slowest, result["slowest_s"])
    elapsed = time.perf_counter() - start
    os.makedirs(REGRESSIONS, exist_ok=True)
    for name, problem, data in failures:
        with open(os.path.join(REGRESSIONS, f"{fuzz.digest(data)}.kvc"), "wb") as f:
            f.write(data)
        print(f"FAILED case {name}: {problem}")
    total = sum(v for k, v in counts.items() if k != "failed")
    print(f"{'cases':>8} {'refused':>8} {'decoded':>8} {'failed':>7} {'seconds':>8} {'slowest s':>9} {'peak B/B':>8}")
    print(f"{total:8d} {counts['refused']:8d} {counts['decoded']:8d} {counts['failed']:7d} {elapsed:8.0f} "
          f"{slowest:9.2f} {peak:8.0f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cases": total, "refused": counts["refused"], "decoded": counts["decoded"],
                       "failed": counts["failed"], "seconds": elapsed, "slowest_case_s": slowest,
                       "peak_traced_bytes_per_input_byte": peak, "seed": args.seed,
                       "failures": [[n, p] for n, p, _ in failures]}, f, indent=2)


if __name__ == "__main__":
    main()
