"""Fuzz the GPU (Triton) decoders against the CPU decoders: the same mutated, truncated and
spliced `.kvc` files as `benchmarks/fuzz_reader.py` (`kvcodec.testing.fuzz.cases`), plus every
file in tests/fuzz_regressions/, each decoded twice, `decoder="cpu"` and `decoder="kernels"`.

Each decoder's verdict is "refused" (a KVCError), "decoded" (a cache), or a failure (any other
exception, or no answer within --timeout). The two agree when both refuse, or both decode to the
same cache: bit-identical tensors, positions, token ids, metadata and length (for files whose
header names the `ae` codec the tensors may differ by 1e-3 of the tensor's largest magnitude,
since its GPU network equals the CPU one only to float32 rounding; NaN and infinity positions
must match). They disagree when one refuses and the other decodes, or both decode but differ.
Every disagreeing or failing input is saved under --save, named by its sha256 prefix, and also
carried (base64) in the JSON.

    python benchmarks/fuzz_kernels.py --cases 2000 --json bench_out/fuzz_kernels.json
    python benchmarks/fuzz_kernels.py --cases 30 --device cpu   # Triton's interpreter: slow

Without a GPU (or with --device cpu) the script sets TRITON_INTERPRET=1 before importing Triton.
"""

from __future__ import annotations

import argparse
import base64
import collections
import json
import os
import signal
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REGRESSIONS = HERE.parent / "tests" / "fuzz_regressions"
MAX_INPUTS_IN_JSON = 500  # problems whose input bytes the JSON carries (--save keeps them all)
AE_TOLERANCE = 1e-3  # relative to the tensor's largest finite magnitude
OUTCOMES = ("both refused", "both decoded, equal", "cpu refused, kernels decoded", "cpu decoded, kernels refused",
            "both decoded, differ", "failure")
AGREE = OUTCOMES[:2]


def _setup_device(device: str | None) -> str:
    """The device to decode onto; under no GPU, Triton's interpreter on the CPU (set before
    Triton or kvcodec.kernels are imported)."""
    import torch

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if torch.device(device).type != "cuda":
        os.environ["TRITON_INTERPRET"] = "1"
    return device


class _Tracked(list):
    """The seed list, recording which seeds `fuzz.cases` picks (random.choice indexes the
    sequence): the first pick after a case is yielded is the next case's seed file."""

    def __init__(self, items):
        super().__init__(items)
        self.picks: list[int] = []

    def __getitem__(self, i):
        if isinstance(i, int):
            self.picks.append(i)
        return super().__getitem__(i)


def seed_labels(count: int) -> list[str]:
    from kvcodec.testing import fuzz

    labels = []
    for name, opts in fuzz.SEED_CODECS:
        labels.append(name + "".join(f" {k}={v}" for k, v in opts.items()))
    labels += ["quant (pruned)", "quant (mixed presets)", "ae"]
    labels += [f"extra seed {i}" for i in range(count - len(labels))]
    return labels[:count]


class _Timeout(BaseException):
    pass


def _alarm(signum, frame):
    raise _Timeout()


def verdict(data: bytes, decoder: str, device, timeout: float):
    """("refused", error class, None) | ("decoded", "", cache on the CPU) | ("failed", problem, None)."""
    import kvcodec
    from kvcodec.errors import KVCError

    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, timeout)
    try:
        try:
            cache = kvcodec.decode(data, device=device, decoder=decoder)
            cache = cache.to("cpu")  # synchronizes: kernel errors surface inside the case
            return "decoded", "", cache
        except KVCError as exc:
            return "refused", type(exc).__name__, None
        except _Timeout:
            return "failed", f"no answer within {timeout:g} s", None
        except Exception as exc:  # noqa: BLE001 - what the fuzzer looks for
            return "failed", f"{type(exc).__name__}: {str(exc)[:300]}", None
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def uses_ae(data: bytes) -> bool:
    import kvcodec

    try:
        with kvcodec.open(data) as reader:
            return any(c["name"] == "ae" for c in reader.info()["codecs"])
    except Exception:  # noqa: BLE001 - a file both decoders decoded opens; be safe anyway
        return False


def _close(x, y, tolerance: float) -> bool:
    import torch

    x, y = x.float(), y.float()
    if not torch.equal(torch.isnan(x), torch.isnan(y)):
        return False
    infinite = torch.isinf(x) | torch.isinf(y)
    if not torch.equal(x[infinite], y[infinite]):
        return False
    finite = ~(torch.isnan(x) | infinite)
    if not finite.any():
        return True
    scale = float(x[finite].abs().max())
    return bool(((x[finite] - y[finite]).abs() <= tolerance * scale).all())


def _bit_view(x):
    import torch

    return x.contiguous().view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[x.element_size()])


def _bits(x, y) -> bool:
    """Bit-identical (torch.equal calls two NaNs unequal, whatever their bits)."""
    import torch

    return torch.equal(_bit_view(x), _bit_view(y))


def difference(a, b, tolerance: float = 0.0, notes: list | None = None) -> str:
    """Where caches `a` (CPU decoder) and `b` (kernels) differ, or "" when they do not
    (`tolerance` > 0: tensor values within tolerance x largest magnitude). Bit-exact, except
    that NaNs match NaNs whatever their bits (noted in `notes`)."""
    import torch

    def same(x, y):
        if x is None or y is None:
            return x is None and y is None
        return x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y)

    notes = [] if notes is None else notes
    if len(a.layers) != len(b.layers):
        return f"{len(a.layers)} layers against {len(b.layers)}"
    for i, (la, lb) in enumerate(zip(a.layers, b.layers)):
        for name, x, y in (("key", la.key, lb.key), ("value", la.value, lb.value)):
            if x.dtype != y.dtype or x.shape != y.shape:
                return f"layer {i} {name}: {x.dtype} {tuple(x.shape)} against {y.dtype} {tuple(y.shape)}"
            if _bits(x, y) or (tolerance and _close(x, y, tolerance)):
                continue
            nan = torch.isnan(x)
            bad = (_bit_view(x) != _bit_view(y)) & ~(nan & torch.isnan(y))
            if not bad.any():  # NaN in the same places, their bits (sign, payload) differ: the spec pins no NaN bits
                notes.append(f"layer {i} {name}: NaN bit patterns differ")
                continue
            at = tuple(int(v) for v in torch.nonzero(bad)[0])
            return (f"layer {i} {name}: {int(bad.sum())} of {x.numel()} values differ, first at {at}: "
                    f"{float(x[at])!r} against {float(y[at])!r}")
        if not same(la.positions, lb.positions):
            return f"layer {i} positions differ"
    if not same(a.token_ids, b.token_ids):
        return "token ids differ"
    for field in ("metadata", "layout", "length", "selection"):
        if getattr(a, field) != getattr(b, field):
            return f"{field} differs"
    return ""


def compare(data: bytes, device, timeout: float) -> dict:
    """Both decoders on `data`: their verdicts and the outcome (one of OUTCOMES)."""
    cpu, cpu_note, cpu_cache = verdict(data, "cpu", None, timeout)  # the reference: decoded on the host
    gpu, gpu_note, gpu_cache = verdict(data, "kernels", device, timeout)
    row = {"cpu": cpu, "cpu_note": cpu_note, "kernels": gpu, "kernels_note": gpu_note, "detail": ""}
    if "failed" in (cpu, gpu):
        row["outcome"] = "failure"
    elif cpu == gpu == "refused":
        row["outcome"] = "both refused"
        if cpu_note != gpu_note:
            row["detail"] = f"refused with different errors: {cpu_note} / {gpu_note}"
    elif cpu == "refused":
        row["outcome"] = "cpu refused, kernels decoded"
    elif gpu == "refused":
        row["outcome"] = "cpu decoded, kernels refused"
    else:
        ae = uses_ae(data)
        row["ae"] = ae
        notes = []
        row["detail"] = difference(cpu_cache, gpu_cache, AE_TOLERANCE if ae else 0.0, notes)
        row["nan_bits_differ"] = bool(notes)
        row["outcome"] = "both decoded, differ" if row["detail"] else "both decoded, equal"
    return row


def _context_broken(row: dict) -> bool:
    """A CUDA error (an illegal access, say) leaves the context unusable: later cases would
    all fail for it, so the run stops."""
    note = row.get("kernels_note", "") + row.get("cpu_note", "")
    return row["outcome"] == "failure" and ("CUDA error" in note or "AcceleratorError" in note)


def run(count: int = 2000, seed: int = 0, device: str | None = None, save: str | os.PathLike | None = None,
        seconds: float | None = None, timeout: float = 60.0, regressions: bool = True, log=None) -> dict:
    """Fuzz `count` cases (and the regression files first): a summary dict with per-seed-codec
    counts of OUTCOMES and every disagreement and failure (input bytes in base64)."""
    device = _setup_device(device)
    import torch

    from kvcodec.testing import fuzz

    start = time.perf_counter()
    seeds = _Tracked(fuzz.seed_files())
    labels = seed_labels(len(seeds))
    seeds.picks.clear()
    table: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    problems, nan_bits, different_errors, slowest, stopped = [], [], 0, (0.0, ""), ""

    def inputs():
        if regressions:
            for path in sorted(REGRESSIONS.glob("*.kvc")):
                yield f"regression {path.stem}", "regression", path.read_bytes()
        for i, data in fuzz.cases(seed, count, seeds):
            label = labels[seeds.picks[0]] if seeds.picks else "?"
            seeds.picks.clear()
            yield f"{seed}-{i}", label, data

    ran = 0
    for name, label, data in inputs():
        if seconds is not None and time.perf_counter() - start > seconds:
            stopped = f"wall-clock budget of {seconds:g} s reached"
            break
        began = time.perf_counter()
        row = compare(data, device, timeout)
        took = time.perf_counter() - began
        ran += not name.startswith("regression ")
        if took > slowest[0]:
            slowest = (took, name)
        table[label][row["outcome"]] += 1
        different_errors += bool(row["detail"]) and row["outcome"] == "both refused"
        if row.get("nan_bits_differ"):
            nan_bits.append(f"{name} ({label}, {fuzz.digest(data)})")
        if row["outcome"] not in AGREE:
            digest = fuzz.digest(data)
            row.update(case=name, seed_codec=label, sha256=digest, bytes=len(data))
            if len(problems) < MAX_INPUTS_IN_JSON:
                row["input_base64"] = base64.b64encode(data).decode()
            problems.append(row)
            if save is not None:
                os.makedirs(save, exist_ok=True)
                with open(os.path.join(save, f"{digest}.kvc"), "wb") as f:
                    f.write(data)
            if log:
                log(f"{row['outcome'].upper()} case {name} ({label}, {digest}): cpu {row['cpu']} {row['cpu_note']}"
                    f" | kernels {row['kernels']} {row['kernels_note']} {row['detail']}")
        if log and ran and ran % 2000 == 0 and not name.startswith("regression "):
            log(f"... {ran} cases, {time.perf_counter() - start:.0f} s, {len(problems)} disagreements or failures")
        if _context_broken(row):
            stopped = f"CUDA context broken at case {name}"
            break
    totals = collections.Counter()
    for counts in table.values():
        totals.update(counts)
    return {
        "device": torch.cuda.get_device_name() if torch.device(device).type == "cuda" else "cpu (TRITON_INTERPRET=1)",
        "seed": seed, "cases_asked": count, "cases_run": ran,
        "regression_files": sum(table["regression"].values()) if "regression" in table else 0,
        "stopped": stopped, "seconds": time.perf_counter() - start,
        "slowest_case": {"seconds": slowest[0], "case": slowest[1]},
        "table": {label: dict(counts) for label, counts in sorted(table.items())},
        "totals": dict(totals),
        "agreements": sum(totals[o] for o in AGREE),
        "disagreements": sum(totals[o] for o in OUTCOMES[2:5]),
        "failures": totals["failure"],
        "refused_with_different_error_classes": different_errors,
        "equal_but_nan_bits_differ": nan_bits,
        "problems": problems,
    }


def format_table(result: dict) -> str:
    short = ["both refused", "equal", "cpu ref/gpu dec", "cpu dec/gpu ref", "differ", "failure"]
    rows = [["seed codec", "inputs", *short]]
    for label, counts in list(result["table"].items()) + [("total", result["totals"])]:
        rows.append([label, str(sum(counts.values())), *(str(counts.get(o, 0)) for o in OUTCOMES)])
    width = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, width))) + " |"
             for r in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 1) + (":" if i else "-") for i, w in enumerate(width)) + "|")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None, help="cuda when available, else cpu (Triton's interpreter)")
    parser.add_argument("--save", default="bench_out/fuzz_kernels/", help="folder for disagreeing/failing inputs")
    parser.add_argument("--json", default=None)
    parser.add_argument("--seconds", type=float, default=None, help="stop cleanly after this wall-clock budget")
    parser.add_argument("--timeout", type=float, default=60.0, help="per decode, seconds")
    parser.add_argument("--no-regressions", action="store_true", help="skip tests/fuzz_regressions/")
    args = parser.parse_args(argv)
    result = run(args.cases, args.seed, args.device, args.save, args.seconds, args.timeout,
                 not args.no_regressions, log=lambda s: print(s, flush=True))
    print(f"device: {result['device']}; cases run: {result['cases_run']} of {result['cases_asked']} "
          f"(seed {result['seed']}) + {result['regression_files']} regression files in {result['seconds']:.0f} s"
          f"{'; stopped: ' + result['stopped'] if result['stopped'] else ''}; slowest case "
          f"{result['slowest_case']['seconds']:.2f} s ({result['slowest_case']['case']})")
    print(format_table(result))
    print(f"agreements {result['agreements']}, disagreements {result['disagreements']}, failures {result['failures']}"
          f" (both refused but with different error classes: {result['refused_with_different_error_classes']};"
          f" equal but NaN bit patterns differ: {len(result['equal_but_nan_bits_differ'])})")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 1 if result["disagreements"] or result["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
