"""`cachegen` on synthetic caches: exact sinks, stated error bound, symbol round trip, presets
ordered by size and error, and damaged tables or lanes reported."""

from __future__ import annotations

import pytest
import torch

import kvcodec
from kvcodec.codec import ChunkInfo
from kvcodec.errors import CodecError, KVCError
from conftest import DTYPES, synthetic_cache


def steps_of(data: bytes) -> dict:
    reader = kvcodec.open(data)
    codec = reader._codec(0)
    ctx = reader._context(0)
    out = {}
    for i, lay in enumerate(reader.header.layers):
        for t in ("key", "value"):
            spec = getattr(lay, t)
            info = ChunkInfo(i, t, 0, spec.shape, torch.float32)
            out[(i, t)] = float(codec._table(ctx, info)[0])
    return out


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("quality", ["high", "medium", "low"])
def test_error_within_half_a_step_and_sinks_exact(dtype, quality):
    cache = synthetic_cache(layers=3, tokens=45, heads=2, head_dim=16, dtype=dtype)
    data = kvcodec.encode(cache, "cachegen", quality=quality, chunk_tokens=16)
    back = kvcodec.decode(data)
    steps = steps_of(data)
    for i, (a, b) in enumerate(zip(cache.layers, back.layers)):
        for t, x, y in (("key", a.key, b.key), ("value", a.value, b.value)):
            assert torch.equal(x[:, :, :4], y[:, :, :4])  # attention sinks stored exactly
            err = (x[:, :, 4:].float() - y[:, :, 4:].float()).abs()
            bound = steps[(i, t)] / 2 * (1 + 1e-5) + torch.finfo(dtype).eps * x[:, :, 4:].float().abs() + 1e-6
            assert bool((err <= bound).all()), (i, t, float((err - bound).max()))
            assert steps[(i, t)] > 0


def test_presets_trade_size_for_error():
    cache = synthetic_cache(layers=2, tokens=400, heads=2, head_dim=16, dtype=torch.float32)
    sizes, errors = [], []
    for quality in ("high", "medium", "low"):
        data = kvcodec.encode(cache, "cachegen", quality=quality, chunk_tokens=128)
        back = kvcodec.decode(data)
        sizes.append(len(data))
        errors.append(sum(float((a.value - b.value).norm()) for a, b in zip(cache.layers, back.layers)))
    assert sizes[0] > sizes[1] > sizes[2] and errors[0] < errors[1] < errors[2]


def test_shallow_layers_get_finer_steps():
    cache = synthetic_cache(layers=10, tokens=40, dtype=torch.float32)
    for lay in cache.layers:  # equal statistics in every layer
        lay.key.copy_(cache.layers[0].key)
        lay.value.copy_(cache.layers[0].value)
    steps = steps_of(kvcodec.encode(cache, "cachegen", shallow_layers=0.2))
    assert steps[(0, "key")] == steps[(1, "key")] < steps[(2, "key")] == steps[(9, "key")]


def test_explicit_steps_and_bad_options():
    cache = synthetic_cache(dtype=torch.float32)
    coarse = kvcodec.encode(cache, "cachegen", key_step=2.0, value_step=2.0)
    fine = kvcodec.encode(cache, "cachegen", key_step=0.05, value_step=0.05)
    assert len(coarse) < len(fine)
    for opts in (dict(quality="best"), dict(sinks=-1), dict(key_step=0.0), dict(shallow_layers=2)):
        with pytest.raises(CodecError):
            kvcodec.get_codec("cachegen", **opts)


def test_damaged_tables_or_lanes_are_reported():
    cache = synthetic_cache(layers=2, tokens=30, dtype=torch.float16)
    data = kvcodec.encode(cache, "cachegen", chunk_tokens=16)
    reader = kvcodec.open(data)
    blob = reader.blobs[0]
    rec = reader.record_infos()[1]
    for offset in (int(blob["offset"]) + int(blob["length"]) // 2, rec.offset + rec.length - 3):
        bad = bytearray(data)
        bad[offset] ^= 0x40
        with pytest.raises(KVCError):
            kvcodec.decode(bytes(bad))
    codec = kvcodec.get_codec("cachegen")
    info = ChunkInfo(0, "key", 16, (1, 2, 14, 16), torch.float16)
    ctx = reader._context(0)
    payload = bytes(reader._src.read(rec.offset, rec.length))
    with pytest.raises(CodecError):
        codec.decode(memoryview(payload[:-4]), info, ctx)  # lane words missing
    with pytest.raises(CodecError, match="tables are corrupt"):
        codec.decode(memoryview(payload), info, [b"\x28\xb5\x2f\xfd" + bytes(20)])
