"""Time to first token when a context is restored from a `.kvc` file, with and without
compression, for caches from 1 MB to 1 GB (the learned-compression work's benchmark).

The model has SmolLM2-135M's shape with random weights (speed does not depend on them), so the
same script runs where the real weights are not installed, e.g. on a lent GPU. Caches are random
float16 tensors of that shape; the `ae` weights are a randomly initialised network of the same
shape, referenced by hash (not embedded). TTFT = read the file + decode onto the device + one
forward step of the next token on the restored cache.

    python benchmarks/bench_ttft.py --device cpu --json benchmarks/results/ttft_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import torch

import kvcodec
from kvcodec.codecs.autoencoder import AEConfig, CacheAutoencoder

LAYERS, KV_HEADS, HEAD_DIM = 30, 3, 64
BYTES_PER_TOKEN = LAYERS * 2 * KV_HEADS * HEAD_DIM * 2  # float16 keys and values
CODECS = {  # label -> (codec, options)
    "raw": ("raw", {}),
    "quant": ("quant", {"bits": 4}),
    "cachegen": ("cachegen", {}),
    "ae": ("ae", {"embed": False}),
    "ae-entropy": ("ae", {"embed": False, "entropy": True}),
}


def model_like_smollm2(device):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=LAYERS,
                         num_attention_heads=9, num_key_value_heads=KV_HEADS, max_position_embeddings=65536,
                         rope_theta=100000.0, tie_word_embeddings=True)
    torch.manual_seed(0)
    dtype = torch.float16 if str(device).startswith("cuda") else torch.float32
    return LlamaForCausalLM(config).to(device=device, dtype=dtype).eval()


def random_cache(tokens: int, seed: int = 0) -> kvcodec.KVCache:
    g = torch.Generator().manual_seed(seed)
    layers = []
    for _ in range(LAYERS):
        k = torch.randn(1, KV_HEADS, tokens, HEAD_DIM, generator=g)
        k[..., :4] *= 6  # a few large key channels, as real keys have
        layers.append(kvcodec.LayerKV(k.half(), torch.randn(1, KV_HEADS, tokens, HEAD_DIM, generator=g).half()))
    return kvcodec.KVCache(layers)


def sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


@torch.no_grad()
def ttft(model, path: str, tokens: int, device, repeat: int) -> tuple[float, float]:
    """(best time to first token, of which restoring) in seconds."""
    best = (float("inf"), 0.0)
    token = torch.tensor([[1]], device=device)
    position = torch.tensor([[tokens]], device=device)
    for _ in range(repeat):
        sync(device)
        start = time.perf_counter()
        cache = kvcodec.unpack(path, device=device, strict=False).to(dtype=model.dtype)
        sync(device)
        restored = time.perf_counter()
        model(token, past_key_values=cache.to_hf(), position_ids=position)
        sync(device)
        total = time.perf_counter() - start
        if total < best[0]:
            best = (total, restored - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sizes-mb", type=float, nargs="+", default=[1, 10, 100, 1000])
    parser.add_argument("--codecs", nargs="+", default=list(CODECS), choices=list(CODECS))
    parser.add_argument("--latent-dim", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    model = model_like_smollm2(device)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ae = CacheAutoencoder(AEConfig(LAYERS, KV_HEADS, {"key": HEAD_DIM, "value": HEAD_DIM}, args.latent_dim))
        ae.save(os.path.join(tmp, "ae.safetensors"))
        os.environ["KVCODEC_AE_PATH"] = tmp
        print(f"{'size MB':>8} {'tokens':>7} {'codec':>10} {'ratio':>6} {'TTFT s':>8} {'restore s':>9}")
        for size in args.sizes_mb:
            tokens = max(1, int(size * 1e6 // BYTES_PER_TOKEN))
            cache = random_cache(tokens)
            for name in args.codecs:
                codec, options = CODECS[name]
                if codec == "ae":
                    options = dict(options, weights=os.path.join(tmp, "ae.safetensors"))
                path = os.path.join(tmp, f"{name}.kvc")
                stored = kvcodec.pack(cache, path, codec, **options)
                total, restore = ttft(model, path, tokens, device, args.repeat)
                row = {"size_mb": size, "tokens": tokens, "codec": name, "ratio": cache.nbytes / stored,
                       "ttft_s": total, "restore_s": restore}
                rows.append(row)
                print(f"{size:8.0f} {tokens:7d} {name:>10} {row['ratio']:6.2f} {total:8.4f} {restore:9.4f}", flush=True)
                os.unlink(path)
    if args.json:
        doc = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "latent_dim": args.latent_dim, "rows": rows}
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=2)


if __name__ == "__main__":
    main()
