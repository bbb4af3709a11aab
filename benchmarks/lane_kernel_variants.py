"""What bounds the lane-format-2 decode kernel: the kernel as shipped beside variants made by
editing its source (H200 or any CUDA GPU; the lanes launch alone, payloads already on the GPU).

    python benchmarks/lane_kernel_variants.py --data cache.pt [--json out.json]

Variants that still decode (checked bit-exact against the shipped kernel in the same run):
`remap` orders programs so those sharing a GPU core share one tensor's tables; `split` runs
each anchor group as an anchor step and then its delta steps, without per-step selects.
Diagnostics that do NOT decode (their output is wrong on purpose) bound what a bitstream change
could buy: `onetable` has every lane look up table 0 (a warp's lookups in one small table, as
with tables per warp in shared memory); `nowords` never reads a renormalization word;
`coalwords` reads words where a warp-interleaved stream would keep them (lane k's i-th word at
32 i + k); combinations of these. Caches as in bench_gpu_decode.py, chunked by --chunks tokens.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import bench_gpu_decode as gpu  # noqa: E402

import kvcodec  # noqa: E402
from kvcodec import dtypes  # noqa: E402
from kvcodec.container import format as fmt  # noqa: E402
from kvcodec.kernels import cachegen, shared_lane_decode  # noqa: E402

SOURCE = Path(shared_lane_decode.__file__).read_text()
TABLES = ("m_off = tl.load(lut_off_ptr + main_t)\n    o_off = tl.load(lut_off_ptr + other_t)\n"
          "    m_prec = tl.load(lut_prec_ptr + main_t).to(tl.uint32)\n    o_prec = tl.load(lut_prec_ptr + other_t).to(tl.uint32)")
ONE_TABLE = TABLES.replace("+ main_t)", "+ main_t * 0)").replace("+ other_t)", "+ other_t * 0)")
WORD = "nxt = _word(words_ptr, p, valid & low & (p < end))"
WORD_BESIDE = "nxt = _word(words_ptr, p, valid & (p < end))"
NO_WORD = "nxt = tl.zeros_like(x)"
WARP_SETUP = ("p = start + 2\n    wl = tl.minimum(lane - (i % 32) + 31, tl.load(row + LANE_BASE) + n_lanes - 1)\n"
              "    wstart = tl.load(lane_start_ptr + lane - (i % 32))\n    wlim = tl.load(lane_end_ptr + wl)\n")
WARP_WORD = WORD.replace("_word(words_ptr, p,", "_word(words_ptr, tl.minimum(wstart + (p - start) * 32 + (i % 32), wlim - 1),")
WARP_WORD_BESIDE = WORD_BESIDE.replace("_word(words_ptr, p,",
                                       "_word(words_ptr, tl.minimum(wstart + (p - start) * 32 + (i % 32), wlim - 1),")
PROGRAMS = "programs = np.stack([job, first], 1).astype(np.int64)\n"
REMAP = PROGRAMS + ("    G_ = len(programs); S_ = torch.cuda.get_device_properties(device).multi_processor_count\n"
                    "    R_ = -(-G_ // S_)\n"
                    "    perm = np.array([j * R_ + r for r in range(R_) for j in range(S_) if j * R_ + r < G_], dtype=np.int64)\n"
                    "    programs = programs[perm]; job = job[perm]\n")
LOOP = SOURCE[SOURCE.index("    for t in range(0, coded):\n"):SOURCE.index("    ok = (coded == 0)")]
SPLIT_LOOP = """    for g0 in range(0, coded, group):
        x, p, v = _step(lut_ptr, words_ptr, x, p, end, valid, m_off, m_prec, m_mask, PREFETCH)
        a = v * anchor_scale
        tl.store(out + g0 * D, to_output_dtype(tl.where(anchored, a, v) * step, out_ptr), mask=valid)
        for t in range(g0 + 1, tl.minimum(g0 + group, coded)):
            x, p, v = _step(lut_ptr, words_ptr, x, p, end, valid, o_off, o_prec, o_mask, PREFETCH)
            tl.store(out + t * D, to_output_dtype(tl.where(anchored, a + v, v) * step, out_ptr), mask=valid)
"""
STEP = """@triton.jit
def _step(lut_ptr, words_ptr, x, p, end, valid, off, prec, mask, PREFETCH: tl.constexpr):
    e = tl.load(lut_ptr + off + (x & mask), mask=valid, other=0)
    if PREFETCH:
        nxt = _word(words_ptr, p, valid & (p < end))
    ew = (e & 0xFFFFFFFF).to(tl.uint32)
    x = (ew >> 16) * (x >> prec) + (ew & 0xFFFF)
    low = x < STATE_LOW
    if not PREFETCH:
        nxt = _word(words_ptr, p, valid & low & (p < end))
    x = tl.where(low, (x << 16) | nxt, x)
    p += low.to(tl.int64)
    v = (e >> 32).to(tl.int32).to(tl.float32)
    return x, p, v


@triton.jit
def _shared_lanes_kernel("""
EDITS = {  # name: (source edits, decodes correctly)
    "shipped": ([], True),
    "remap": ([(PROGRAMS, REMAP)], True),
    "split": ([(LOOP, SPLIT_LOOP), ("@triton.jit\ndef _shared_lanes_kernel(", STEP)], True),
    "onetable": ([(TABLES, ONE_TABLE)], False),
    "nowords": ([(WORD, NO_WORD), (WORD_BESIDE, NO_WORD)], False),
    "coalwords": ([("p = start + 2\n", WARP_SETUP), (WORD, WARP_WORD), (WORD_BESIDE, WARP_WORD_BESIDE)], False),
    "onetable+coalwords": ([(TABLES, ONE_TABLE), ("p = start + 2\n", WARP_SETUP), (WORD, WARP_WORD),
                            (WORD_BESIDE, WARP_WORD_BESIDE)], False),
    "onetable+nowords": ([(TABLES, ONE_TABLE), (WORD, NO_WORD), (WORD_BESIDE, NO_WORD)], False),
}


def variant_modules(folder: Path) -> dict:
    """Each variant as a module of its own (Triton compiles a kernel from its source file)."""
    out = {}
    for name, (edits, _) in EDITS.items():
        text = SOURCE
        for old, new in edits:
            if old not in text:
                raise SystemExit(f"variant {name}: the kernel's source changed; update this script")
            text = text.replace(old, new)
        path = folder / f"variant_{name.replace('+', '_')}.py"
        path.write_text(text)
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        out[name] = module
    return out


def event_ms(fn, repeat: int) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def measure(data: bytes, modules: dict, repeat: int) -> dict:
    """GB/s of fp16 output of each variant's lanes launch on the file `data`."""
    reader, _, table, buffers, groups, staged = gpu.staged_file(data)
    (slot, dtype_code, _), members = next(iter(groups.items()))
    codec, context = reader.codec(slot), reader.context(slot)
    out = buffers[dtypes.torch_dtype(fmt.record_dtype_name(dtype_code))]
    shipped = cachegen.prepare_shared_lanes
    results, reference = {}, None
    try:
        for name, module in modules.items():
            cachegen.prepare_shared_lanes = module.prepare_shared_lanes
            launch = cachegen.prepare(codec, context, table[members], staged, out)
            out.zero_()
            launch()
            torch.cuda.synchronize()
            reference = out.clone() if reference is None else reference
            exact = bool(torch.equal(out, reference))
            if EDITS[name][1] and not exact:
                raise AssertionError(f"variant {name} no longer decodes like the shipped kernel")
            ms = event_ms(launch._steps[-1], repeat)  # the lanes launch (bounds and sinks run before it)
            results[name] = {"ms": round(ms, 3), "gbps": round(out.numel() * out.element_size() / ms / 1e6),
                             "exact": exact}
    finally:
        cachegen.prepare_shared_lanes = shipped
    return results


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data")
    p.add_argument("--tokens", default="1024,8192,32768")
    p.add_argument("--shapes", default="llama3-8b,smollm2")
    p.add_argument("--chunks", default="1024,512", help="chunk sizes in tokens (the files' lanes are this long)")
    p.add_argument("--repeat", type=int, default=7)
    p.add_argument("--json")
    args = p.parse_args()
    real = gpu.real_layers(args.data)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        modules = variant_modules(Path(folder))
        for chunk in (int(c) for c in args.chunks.split(",")):
            gpu.CHUNK = chunk
            for shape in args.shapes.split(","):
                base = kvcodec.encode(gpu.base_cache(shape, real, 2 * chunk).to("cuda"), "cachegen", chunk_tokens=chunk)
                for tokens in (int(t) for t in args.tokens.split(",")):
                    data = gpu.replicated_file(base, tokens)
                    for name, r in measure(data, modules, args.repeat).items():
                        rows.append({"shape": shape, "tokens": tokens, "chunk": chunk, "file_bytes": len(data),
                                     "variant": name, **r})
                        print(json.dumps(rows[-1]), flush=True)
                    torch.cuda.empty_cache()
    print(f"\n{torch.cuda.get_device_name()}; GB/s of fp16 output")
    names = list(EDITS)
    print(f"{'shape':10} {'tokens':>6} {'chunk':>5} " + " ".join(f"{n:>10.10}" for n in names))
    keys = sorted({(r["shape"], r["tokens"], r["chunk"]) for r in rows}, key=lambda k: (k[2] != 1024, k))
    for key in keys:
        got = {r["variant"]: r["gbps"] for r in rows if (r["shape"], r["tokens"], r["chunk"]) == key}
        print(f"{key[0]:10} {key[1]:>6} {key[2]:>5} " + " ".join(f"{got.get(n, ''):>10}" for n in names))
    if args.json:
        Path(args.json).write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                               "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
