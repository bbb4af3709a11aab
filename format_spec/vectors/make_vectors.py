"""Regenerate the golden `.kvc` test vectors in this directory.

For each vector: NAME.kvc, NAME.input.safetensors (the cache that was encoded, with its
positions, token ids and metadata) and, for lossy codecs, NAME.expected.safetensors (what a
decoder must produce). manifest.json records how each file was encoded.

    python format_spec/vectors/make_vectors.py [NAME ...]

With names, only those vectors are made again. Vectors the manifest marks "legacy" (files as an
earlier writer wrote them, which readers must still decode) are never rewritten.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import zstandard

import kvcodec
from kvcodec import cachefiles

HERE = Path(__file__).parent

# name: (codec, config, chunk_tokens, cache description)
VECTORS = {
    "raw-f16-mha": ("raw", {}, 4, dict(layers=2, heads=2, tokens=10, dims=(4, 4), dtype=torch.float16, ids=True)),
    "zstd-bf16-mixed": ("zstd", {"level": 3}, 4,
                        dict(layers=3, heads=2, tokens=[9, 3, 0], dims=(8, 4), dtype=torch.bfloat16, positions=True)),
    "shuffle-zstd-f32-gqa": ("shuffle-zstd", {"level": 5}, 5,
                             dict(layers=2, batch=2, heads=1, tokens=6, dims=(4, 4), dtype=torch.float32,
                                  positions="per-head")),
    "quant2-f16": ("quant", {"bits": 2, "group_size": 4}, 8, dict(layers=2, heads=2, tokens=13, dims=(8, 8), dtype=torch.float16)),
    "quant3-bf16": ("quant", {"bits": 3, "group_size": 4}, 8, dict(layers=2, heads=2, tokens=13, dims=(8, 6), dtype=torch.bfloat16)),
    "quant4-f16": ("quant", {"bits": 4, "group_size": 8}, 8, dict(layers=2, heads=3, tokens=11, dims=(8, 8), dtype=torch.float16)),
    "quant8-f32": ("quant", {"bits": 8, "group_size": 5}, 6, dict(layers=1, heads=2, tokens=9, dims=(7, 7), dtype=torch.float32)),
    "cachegen-f16-anchors": ("cachegen", {"key_emphasis": 0.0, "group_size": 6, "anchor_bits": 2}, 128,
                             dict(layers=2, heads=2, tokens=250, dims=(16, 8), dtype=torch.float16, drift=True)),
    "cachegen-bf16-ladder": ("cachegen", {"target_ratio": 2.0, "sinks": 2}, 64,
                             dict(layers=2, batch=2, heads=1, tokens=200, dims=(16, 16), dtype=torch.bfloat16, drift=True)),
    "raw-f16-pruned": ("raw", {}, 4, dict(layers=2, heads=2, tokens=9, dims=(4, 4), dtype=torch.float16,
                                          positions="pruned", ids=True)),
    # ae: a small random network embedded in the file (weights are named by their sha256)
    "ae-f16-embedded": ("ae", {"group_size": 3}, 8, dict(layers=2, heads=2, tokens=11, dims=(8, 8),
                                                           dtype=torch.float16)),
    "ae-bf16-entropy": ("ae", {"entropy": True, "step": 0.2}, 8, dict(layers=2, heads=2, tokens=21, dims=(8, 8),
                                                                        dtype=torch.bfloat16)),
    # cachegen's lane format 2 (the vectors above were written in lane format 1)
    "cachegen2-f16-anchors": ("cachegen", {"key_emphasis": 0.0, "group_size": 6, "anchor_bits": 2, "tables": 3}, 128,
                              dict(layers=2, heads=2, tokens=250, dims=(16, 8), dtype=torch.float16, drift=True)),
    "cachegen2-bf16-ladder": ("cachegen", {"target_ratio": 2.0, "sinks": 2, "tables": 2}, 64,
                              dict(layers=2, batch=2, heads=1, tokens=200, dims=(16, 16), dtype=torch.bfloat16,
                                   drift=True)),
    # per-chunk presets whose tables are narrowed to the tensors that use them (placeholders for
    # the others, spec 8.5); the ladder vector above was written before, with every preset's tables whole
    "cachegen2-bf16-narrowed": ("cachegen", {"target_ratio": 2.4, "sinks": 2, "tables": 2}, 64,
                                dict(layers=3, batch=1, heads=2, tokens=200, dims=(16, 16), dtype=torch.bfloat16,
                                     drift=True)),
    # kvtc with its profile embedded (NAME.profile.safetensors, kept: safetensors does not write its
    # metadata in the same order twice): sinks in the first chunk; then per-head positions, a
    # batch of two and a rotary embedding over 6 of 8 key channels
    "kvtc-f16-sinks": ("kvtc", {"target_kl": 0.01, "sinks": 2, "tables": 2, "embed": True}, 8,
                       dict(layers=2, heads=2, tokens=20, dims=(8, 4), dtype=torch.float16)),
    "kvtc-bf16-positions": ("kvtc", {"target_kl": 0.05, "sinks": 1, "tables": 3, "embed": True}, 6,
                            dict(layers=2, batch=2, heads=2, tokens=9, dims=(8, 8), dtype=torch.bfloat16,
                                 positions="per-head")),
    # version 1.2: sliding-window layers (window 8: the last 7 of 20 positions) beside a full one
    "zstd-f16-sliding": ("zstd", {"level": 3}, 4, dict(layers=3, heads=1, tokens=[7, 20, 7], dims=(4, 4),
                                                        dtype=torch.float16, positions="window")),
}


def make_cache(seed: int, layers, heads, tokens, dims, dtype, batch=1, ids=False, positions=False,
               drift=False) -> kvcodec.KVCache:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(layers):
        n = tokens[i] if isinstance(tokens, list) else tokens
        k = torch.randn(batch, heads, n, dims[0], generator=g) * (1 + 4 * (torch.arange(dims[0]) == 1))
        v = torch.randn(batch, heads, n, dims[1], generator=g)
        if drift:  # a slowly drifting key channel, as slow rotary channels are (anchors pay there)
            k[..., 2] = torch.cumsum(torch.randn(batch, heads, n, generator=g) * 0.6, dim=2)
        pos = None
        if positions == "per-head":
            pos = torch.stack([torch.arange(n) * (h + 1) for h in range(heads)]).to(torch.int64)
        elif positions == "window":  # a sliding layer holds the tail of the sequence
            pos = torch.arange(20 - n, 20).reshape(1, -1) if n < 20 else None
        elif positions == "pruned":  # head 0 keeps runs (sinks + recent), head 1 scattered tokens (a bitmap)
            pos = torch.tensor([[0, 1, 2, 3, 400, 401, 402, 403, 404], [0, 2, 5, 11, 17, 18, 23, 31, 40]]) + i
        elif positions:
            pos = torch.arange(n, dtype=torch.int64) + 100
        window = 8 if positions == "window" and n < 20 else None
        out.append(kvcodec.LayerKV(k.to(dtype), v.to(dtype), pos, window))
    length = {"pruned": 420, "window": 20}.get(positions) if isinstance(positions, str) else None
    n_ids = length or (max(tokens) if isinstance(tokens, list) else tokens)
    token_ids = torch.randint(0, 50000, (batch, n_ids), generator=g) if ids else None
    selection = {"id": 20, "name": "streamingllm", "config": {"keep": 9, "sink": 4}} if positions == "pruned" else None
    return kvcodec.KVCache(out, token_ids=token_ids, metadata={"model": "test-vector", "seed": str(seed)},
                           length=length, selection=selection)


def ae_weights(path: Path) -> str:
    """A deterministic random autoencoder for 2 layers of 2 heads x 8 (latent 4), saved to `path`."""
    from kvcodec.codecs.autoencoder import AEConfig, CacheAutoencoder

    torch.manual_seed(0)
    ae = CacheAutoencoder(AEConfig(2, 2, {"key": 8, "value": 8}, 4, hidden=16, model="test-vector"))
    for net in ae.nets.values():
        net.mean.normal_()
        net.std.uniform_(0.5, 2.0)
    ae.save(path)
    return str(path)


def kvtc_profile(name: str, cache: kvcodec.KVCache) -> str:
    """The vector's profile file, fitted on the cache itself (rotary frequencies of 3 pairs) when
    it does not exist yet."""
    import numpy as np

    from kvcodec.calibration.fit import from_caches
    from kvcodec.transform.profile import Rope

    path = HERE / f"{name}.profile.safetensors"
    if not path.exists():
        ropes = [Rope(np.array([1.0, 0.1, 0.01], np.float32), 1.25)] * len(cache.layers)
        path.write_bytes(from_caches([cache.to(dtype=torch.float32)], ropes, model="test-vector").to_bytes())
    return str(path)


def main(names: list[str]) -> None:
    import tempfile

    path = HERE / "manifest.json"
    manifest = json.loads(path.read_text()) if path.exists() else {}
    weights = ae_weights(Path(tempfile.mkdtemp()) / "ae.safetensors")
    for seed, (name, (codec, config, chunk, desc)) in enumerate(VECTORS.items()):
        if names and name not in names:
            continue
        cache = make_cache(seed, **desc)
        cachefiles.save_cache(cache, HERE / f"{name}.input.safetensors", overwrite=True)
        cache = cachefiles.load_cache(HERE / f"{name}.input.safetensors")  # layout "safetensors", as the test reads it
        options = dict(config, weights=weights) if codec == "ae" else config
        if codec == "kvtc":
            options = dict(config, profile=kvtc_profile(name, cache))
        data = kvcodec.encode(cache, codec, chunk_tokens=chunk, **options)
        (HERE / f"{name}.kvc").write_bytes(data)
        lossless = kvcodec.codec_class(codec).lossless
        if not lossless:
            cachefiles.save_cache(kvcodec.decode(data), HERE / f"{name}.expected.safetensors", overwrite=True)
        manifest[name] = {"codec": codec, "config": config, "chunk_tokens": chunk, "lossless": lossless}
    manifest["_zstd_library"] = zstandard.ZSTD_VERSION
    path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
