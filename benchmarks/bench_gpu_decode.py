"""GPU decode speed: output GB/s of each codec's Triton kernels, next to a device-to-device copy
of the same bytes, and end-to-end restore time against loading the raw cache and recomputing
the prefill with a randomly initialised model of the same shape.

    kvc capture -o cache.pt --tokens 1024
    python benchmarks/bench_gpu_decode.py --data cache.pt [--tokens 1024,4096,16384,32768]
        [--shapes smollm2,llama3-8b] [--json out.json]

Data: a real SmolLM2 cache of 1024 tokens (`--data`, any cache file kvcodec loads; synthetic
KV-like tensors without it), tiled along tokens. Llama-3-8B-shaped layers (8 heads x 128) are built
from SmolLM2 heads placed side by side. Files are chunked by 1024 tokens; codecs are fitted on
the first 2048 tokens and the file's later chunks repeat the second chunk's payload (the data is
1024-periodic), so a 32K-token file costs 2K tokens of CPU encoding.

Decode GB/s: fp16 output bytes over the time of the decode launches, payloads already on the
GPU (median of --repeat); "+prep" adds the host-side preparation of the launches. Copy GB/s: bytes written by `copy_` of a tensor that size. Restore:
file bytes in pinned host memory -> a transformers DynamicCache on the GPU (checksums, staging,
copy and decode included). Raw load: the fp16 tensors in pinned memory -> DynamicCache.
Prefill: the model's forward pass over the tokens (random weights: speed does not depend on them).
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import time

import numpy as np
import torch

import kvcodec
from kvcodec.container import format as fmt
from kvcodec.container.writer import KVCWriter

SHAPES = {  # layers, kv heads, head dim, attention heads, hidden, intermediate, vocab
    "smollm2": (30, 3, 64, 9, 576, 1536, 49152),
    "llama3-8b": (32, 8, 128, 32, 4096, 14336, 128256),
}
CODECS = [("raw", {}), ("quant", {"bits": 8}), ("quant", {"bits": 4}), ("quant", {"bits": 2}),
          ("cachegen", {"quality": "medium"})]
CHUNK = 1024


def real_layers(path):
    if path is None:
        g = torch.Generator().manual_seed(0)
        out = []
        for _ in range(30):
            k = torch.randn(1, 3, 1024, 64, generator=g)
            k[..., :8] *= 6
            k[..., 8:16] = torch.cumsum(torch.randn(1, 3, 1024, 8, generator=g) * 0.3, 2)
            out.append((k.half(), torch.randn(1, 3, 1024, 64, generator=g).half()))
        return out
    from kvcodec import cachefiles

    return [(lay.key, lay.value) for lay in cachefiles.load_cache(path).layers]


def base_cache(shape: str, real, tokens: int) -> kvcodec.KVCache:
    layers, heads, dim = SHAPES[shape][:3]
    out = []
    for i in range(layers):
        k, v = real[i % len(real)]
        reps = -(-tokens // k.shape[2])
        k, v = k.repeat(1, 1, reps, 1)[:, :, :tokens], v.repeat(1, 1, reps, 1)[:, :, :tokens]
        if heads != k.shape[1] or dim != k.shape[3]:
            per = dim // k.shape[3]
            k = torch.cat([torch.cat([k[:, (h + j) % k.shape[1]:(h + j) % k.shape[1] + 1] for j in range(per)], 3)
                           for h in range(heads)], 1)
            v = torch.cat([torch.cat([v[:, (h + j) % v.shape[1]:(h + j) % v.shape[1] + 1] for j in range(per)], 3)
                           for h in range(heads)], 1)
        out.append(kvcodec.LayerKV(k.contiguous(), v.contiguous()))
    return kvcodec.KVCache(out, metadata={"shape": shape})


def replicated_file(base: bytes, tokens: int) -> bytes:
    """A `tokens`-token file whose chunks past the second repeat the base file's second chunk."""
    reader = kvcodec.open(base)
    h = reader.header
    layers = [fmt.LayerSpec(*(fmt.TensorSpec(s.batch, s.heads, tokens, s.head_dim, s.dtype) for s in (l.key, l.value)))
              for l in h.layers]
    header = fmt.Header(layers, h.codecs, h.chunk_tokens, h.layout, None, dict(h.metadata))
    buf = io.BytesIO()
    writer = KVCWriter(buf, header)
    for b in reader.blobs:
        writer.add_blob(int(b["owner"]), int(b["ordinal"]), bytes(reader.source.read(int(b["offset"]), int(b["length"]))))
    by_key = {(r.layer, r.tensor, r.token_start): (r, i) for i, r in enumerate(reader.record_infos())}
    for layer, spec in enumerate(layers):
        for t, name in enumerate(fmt.TENSORS):
            s = getattr(spec, name)
            for start in range(0, tokens, CHUNK):
                rec, i = by_key[(layer, name, 0 if start == 0 else CHUNK)]
                raw = reader.records[i]
                payload = bytes(reader.payload(i))
                writer.add_record(layer, t, start, (s.batch, s.heads, min(CHUNK, tokens - start), s.head_dim),
                                  s.dtype, int(raw["codec_slot"]), payload)
    writer.finish()
    return buf.getvalue()


def cuda_time(fn, repeat: int) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def staged_file(data: bytes):
    """A whole file's payloads copied to the GPU as a restore stages them, with what launching
    its decoders needs: (reader, plan, job table, output buffers, {launch key: rows}, staged)."""
    from kvcodec.container import device_read

    reader = kvcodec.open(data)
    wanted = [(i, t, 0, reader.header.layers[i].key.tokens) for i in range(reader.num_layers) for t in (0, 1)]
    device = torch.device("cuda", torch.cuda.current_device())
    plan = reader.plan(wanted)
    table = device_read.job_table(reader, plan)
    buffers = plan.allocate(device)
    groups, cpu = device_read.decoder_groups(reader, plan, table, np.arange(len(plan.records)))
    assert not cpu
    rows = np.concatenate(list(groups.values()))
    with device_read.Checksums(reader, plan, table, on_device=True) as checksums:
        staged, _ = device_read.stage(reader, plan, table, rows, device, torch.cuda.Stream(), checksums)
    torch.cuda.synchronize()
    return reader, plan, table, buffers, groups, staged


def kernel_decode_time(data: bytes, repeat: int) -> tuple[float, float]:
    """Seconds for the decode launches of the whole file with payloads already on the GPU:
    the launches alone, and with their host-side preparation."""
    from kvcodec import dtypes
    from kvcodec.codecs.device import decoder_for

    reader, plan, table, buffers, groups, staged = staged_file(data)

    def prepare():
        out = []
        for (slot, dtype_code, _), members in groups.items():
            codec = reader.codec(slot)
            dtype = dtypes.torch_dtype(fmt.record_dtype_name(dtype_code))
            out.append(decoder_for(codec).prepare(codec, reader.context(slot), table[members], staged,
                                                  buffers[dtype]))
        return out

    launches = prepare()
    launch_s = cuda_time(lambda: [launch() for launch in launches], repeat)
    with_prep_s = cuda_time(lambda: [launch() for launch in prepare()], repeat)
    fp16_bytes = sum(int(np.prod(s.shape)) * 2 for lay in reader.header.layers for s in (lay.key, lay.value))
    if fp16_bytes < (200 << 20):  # bit-exact at this size too
        want = kvcodec.decode(data, decoder="cpu")
        expect = [t for lay in want.layers for t in (lay.key, lay.value)]
        if not all(torch.equal(plan.view(buffers, k).cpu(), w) for k, w in enumerate(expect)):
            raise AssertionError("GPU decode differs from the CPU decoder")
    return launch_s, with_prep_s


def copy_time(nbytes: int, repeat: int) -> float:
    """Seconds of a device-to-device copy writing `nbytes`."""
    src = torch.empty(nbytes // 2, dtype=torch.float16, device="cuda")
    dst = torch.empty_like(src)
    return cuda_time(lambda: dst.copy_(src), repeat)


def pinned(data: bytes) -> torch.Tensor:
    t = torch.empty(len(data), dtype=torch.uint8, pin_memory=True)
    t.numpy()[:] = memoryview(data)
    return t


def restore_time(data: bytes, repeat: int) -> float:
    src = pinned(data)
    return cuda_time(lambda: kvcodec.decode(src, device="cuda").to_hf(), repeat)


def raw_load_time(cache: kvcodec.KVCache, repeat: int) -> float:
    host = [(k.pin_memory(), v.pin_memory()) for k, v in cache]

    def load():
        from transformers import DynamicCache

        c = DynamicCache()
        for i, (k, v) in enumerate(host):
            c.update(k.to("cuda", non_blocking=True), v.to("cuda", non_blocking=True), i)
        return c

    return cuda_time(load, repeat)


def random_model(shape: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    layers, kv, dim, heads, hidden, inter, vocab = SHAPES[shape]
    config = LlamaConfig(num_hidden_layers=layers, num_key_value_heads=kv, head_dim=dim, num_attention_heads=heads,
                         hidden_size=hidden, intermediate_size=inter, vocab_size=vocab,
                         max_position_embeddings=32768, attn_implementation="sdpa")
    torch.set_default_dtype(torch.float16)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).eval()
    torch.set_default_dtype(torch.float32)
    return model


def prefill_time(model, tokens: int, repeat: int) -> float:
    ids = torch.randint(0, model.config.vocab_size, (1, tokens), device="cuda")
    with torch.no_grad():
        return cuda_time(lambda: model(ids, use_cache=True, logits_to_keep=1), repeat)


def encode_benchmark(args, real):
    """Encode MB/s (fp16 input) on the CPU and with the cache on the GPU; the files must match."""
    rows = []
    for shape in args.shapes.split(","):
        base = base_cache(shape, real, 2 * CHUNK)
        on_gpu = base.to("cuda")
        for name, opts in CODECS[1:]:
            start = time.perf_counter()
            cpu = kvcodec.encode(base, name, chunk_tokens=CHUNK, **opts)
            cpu_s = time.perf_counter() - start
            kvcodec.encode(on_gpu, name, chunk_tokens=CHUNK, **opts)  # warm-up: kernel compilation
            gpu_s = cuda_time(lambda: kvcodec.encode(on_gpu, name, chunk_tokens=CHUNK, **opts), 1)
            same = kvcodec.encode(on_gpu, name, chunk_tokens=CHUNK, **opts) == cpu
            row = {"shape": shape, "tokens": 2 * CHUNK, "codec": name, "options": opts, "fp16_bytes": base.nbytes,
                   "cpu_mbps": base.nbytes / cpu_s / 1e6, "gpu_mbps": base.nbytes / gpu_s / 1e6, "identical": same}
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, f, indent=1)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data")
    p.add_argument("--tokens", default="1024,4096,16384,32768")
    p.add_argument("--shapes", default="smollm2,llama3-8b")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--json")
    p.add_argument("--encode-only", action="store_true",
                   help="time CPU against GPU encoding of the 2048-token caches (same bytes) and stop")
    args = p.parse_args()
    real = real_layers(args.data)
    if args.encode_only:
        return encode_benchmark(args, real)
    rows = []
    for shape in args.shapes.split(","):
        base = base_cache(shape, real, 2 * CHUNK)
        model = random_model(shape)
        files = {}
        for name, opts in CODECS:
            start = time.perf_counter()
            files[(name, json.dumps(opts))] = kvcodec.encode(base, name, chunk_tokens=CHUNK, **opts)
            print(f"# {shape} {name} {opts}: encoded 2048 tokens in {time.perf_counter() - start:.1f} s", flush=True)
        for tokens in (int(t) for t in args.tokens.split(",")):
            cache = base_cache(shape, real, tokens)
            out_bytes = cache.nbytes
            copy_s = copy_time(out_bytes, args.repeat)
            raw_s = raw_load_time(cache, args.repeat)
            prefill_s = prefill_time(model, tokens, 3)
            for (name, opts), base_file in files.items():
                data = replicated_file(base_file, tokens)
                row = {"shape": shape, "tokens": tokens, "codec": name, "options": json.loads(opts),
                       "fp16_bytes": out_bytes, "file_bytes": len(data), "ratio": out_bytes / len(data),
                       "copy_gbps": out_bytes / copy_s / 1e9, "raw_load_ms": raw_s * 1e3, "prefill_ms": prefill_s * 1e3}
                try:
                    launch_s, with_prep_s = kernel_decode_time(data, args.repeat)
                    row.update(decode_gbps=out_bytes / launch_s / 1e9, decode_prep_gbps=out_bytes / with_prep_s / 1e9,
                               restore_ms=restore_time(data, 3) * 1e3)
                except Exception as exc:  # keep the other rows
                    row["error"] = f"{type(exc).__name__}: {exc}"
                rows.append(row)
                print(json.dumps(row), flush=True)
                torch.cuda.empty_cache()
        del model
        torch.cuda.empty_cache()
    device = torch.cuda.get_device_name()
    print(f"\n{device}; torch {torch.__version__}")
    print(f"{'shape':10} {'tokens':>6} {'codec':14} {'ratio':>6} {'decode GB/s':>11} {'+prep GB/s':>10} {'copy GB/s':>9} "
          f"{'restore ms':>10} {'raw load ms':>11} {'prefill ms':>10}")
    for r in rows:
        label = r["codec"] + "".join(f" {v}" for v in r["options"].values())
        print(f"{r['shape']:10} {r['tokens']:>6} {label:14} {r['ratio']:6.2f} {r.get('decode_gbps', float('nan')):11.1f} "
              f"{r.get('decode_prep_gbps', float('nan')):10.1f} "
              f"{r['copy_gbps']:9.1f} {r.get('restore_ms', float('nan')):10.2f} {r['raw_load_ms']:11.2f} "
              f"{r['prefill_ms']:10.2f}{'  ' + r['error'] if 'error' in r else ''}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device, "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
