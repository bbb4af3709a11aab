"""`cachegen` on synthetic caches: exact sinks, stated error bound, symbol round trip, presets
ordered by size and error, and damaged tables or lanes reported."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import kvcodec
from kvcodec.codecs.base import ChunkInfo
from kvcodec.entropy.quantizer import quantize
from kvcodec.errors import CodecError, KVCError

from conftest import DTYPES, synthetic_cache


def tables_of(data: bytes) -> dict:
    """The decoded steps, channel modes and tables of every (layer, key/value) of a file."""
    reader = kvcodec.open(data)
    ctx = reader.context(0)
    out = {}
    for i, lay in enumerate(reader.header.layers):
        for t in ("key", "value"):
            out[(i, t)] = ctx.for_chunk(ChunkInfo(i, t, 0, getattr(lay, t).shape, torch.float32), "cachegen")
    return out


def smooth_channel_cache(dtype=torch.float32, tokens=300):
    """Synthetic cache whose key channel 1 drifts slowly (as slow rotary channels do)."""
    cache = synthetic_cache(layers=2, tokens=tokens, heads=2, head_dim=16, dtype=dtype)
    g = torch.Generator().manual_seed(1)
    for lay in cache.layers:
        walk = torch.cumsum(torch.randn(lay.key[..., 1].shape, generator=g) * 0.3, dim=2)
        lay.key[..., 1] = walk.to(dtype)
    return cache


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("opts", [dict(quality="high"), dict(quality="medium"), dict(quality="low"),
                                  dict(key_emphasis=0, group_size=4, anchor_bits=2), dict(group_size=1)],
                         ids=["high", "medium", "low", "anchors", "no-anchors"])
def test_error_within_half_a_step_and_sinks_exact(dtype, opts):
    cache = smooth_channel_cache(dtype, tokens=145)
    data = kvcodec.encode(cache, "cachegen", chunk_tokens=16, **opts)
    back = kvcodec.decode(data)
    tables = tables_of(data)
    for i, (a, b) in enumerate(zip(cache.layers, back.layers)):
        for t, x, y in (("key", a.key, b.key), ("value", a.value, b.value)):
            assert torch.equal(x[:, :, :4], y[:, :, :4])  # attention sinks stored exactly
            steps = torch.from_numpy(tables[(i, t)].steps).reshape(1, 2, 1, 16)
            err = (x[:, :, 4:].float() - y[:, :, 4:].float()).abs()
            bound = steps / 2 * (1 + 1e-5) + torch.finfo(dtype).eps * x[:, :, 4:].float().abs() + 1e-6
            assert bool((err <= bound).all()), (i, t, float((err - bound).max()))


def test_anchors_chosen_where_they_save_bits():
    cache = smooth_channel_cache(tokens=1000)
    anchored = kvcodec.encode(cache, "cachegen", key_emphasis=0, chunk_tokens=128)
    plain = kvcodec.encode(cache, "cachegen", key_emphasis=0, chunk_tokens=128, group_size=1)
    modes = tables_of(anchored)
    assert modes[(0, "key")].anchored.reshape(2, 16)[:, 1].all()
    assert not modes[(0, "value")].anchored.any() and not modes[(0, "key")].anchored.reshape(2, 16)[:, 2:].any()
    assert not any(t.anchored.any() for t in tables_of(plain).values())
    assert len(anchored) < len(plain)


def test_symbols_survive_coding_exactly():
    """quantize -> code -> decode gives back the same integers (checked through the exact
    reconstruction `(anchor / 2**bits + delta) * step`, or `symbol * step`)."""
    cache = smooth_channel_cache(tokens=1000)
    codec = kvcodec.get_codec("cachegen", key_emphasis=0, group_size=5, anchor_bits=2)
    data = kvcodec.encode(cache, codec, chunk_tokens=256)
    reader = kvcodec.open(data)
    ctx = reader.context(0)
    checked_anchored = False
    for rec in reader.record_infos():
        tensor = rec.tensor
        x = getattr(cache.layers[rec.layer], tensor)[:, :, rec.token_start:rec.token_start + rec.tokens]
        info = ChunkInfo(rec.layer, tensor, rec.token_start, tuple(x.shape), x.dtype)
        tt = ctx.for_chunk(info, "cachegen")
        s = codec.sink_count(info)
        direct, anchors, deltas = (t.numpy() for t in quantize(x[:, :, s:].float(), torch.from_numpy(tt.steps),
                                                              torch.from_numpy(tt.anchored).nonzero().flatten(),
                                                              tt.group_size, tt.anchor_bits))
        n = x.shape[2] - s
        is_anchor = torch.arange(n) % 5 == 0
        u = torch.from_numpy(direct).double()
        for j, c in enumerate(torch.from_numpy(tt.anchored).nonzero().flatten().tolist()):
            a = torch.from_numpy(anchors[:, j]).double() / 4
            row = a.repeat_interleave(5, dim=1)[:, :n].clone()
            row[:, ~is_anchor] += torch.from_numpy(deltas[:, j]).double()
            u[:, c] = row
            checked_anchored = True
        expected = (u.float() * torch.from_numpy(tt.steps)[:, None]).reshape(1, 2, 16, n).permute(0, 1, 3, 2)
        payload = bytes(reader.source.read(rec.offset, rec.length))
        decoded = codec.decode(memoryview(payload), info, ctx)
        assert torch.equal(decoded[:, :, s:], expected)
    assert checked_anchored


def test_large_channels_get_finer_steps():
    cache = synthetic_cache(layers=1, tokens=200, heads=1, head_dim=16, dtype=torch.float32)  # channel 0 is 8x
    for emphasis, finer in ((1.0, True), (0.0, False)):
        steps = tables_of(kvcodec.encode(cache, "cachegen", key_emphasis=emphasis))[(0, "key")].steps
        assert bool(steps[0] < 0.5 * steps[1:].min()) is finer
        if not finer:
            assert len(set(steps.tolist())) == 1


@pytest.mark.parametrize("lanes", [1, 2])
def test_a_channel_of_outliers_widens_its_step_instead_of_refusing(lanes):
    """Gemma-3's keys hold channels far larger than the rest: key emphasis gives them finer
    steps, and they would need more symbols than a table holds."""
    cache = synthetic_cache(layers=1, tokens=300, heads=1, head_dim=16, dtype=torch.float32)
    cache.layers[0].key[0, 0, :, 3] *= 300 / cache.layers[0].key[0, 0, :, 3].std()
    data = kvcodec.encode(cache, "cachegen", key_step=0.1, value_step=0.1, lanes=lanes, chunk_tokens=128)
    steps = tables_of(data)[(0, "key")].steps
    x = cache.layers[0].key[0, 0, 4:]
    floor = ((x.amax(0) - x.amin(0)) / 4000).numpy()
    assert np.isclose(steps[3], floor[3], rtol=1e-6)  # widened to fit its table
    assert np.all(np.delete(steps, 3) > np.delete(floor, 3))  # the others as asked
    err = (kvcodec.decode(data).layers[0].key[0, 0, 4:] - x).abs()
    assert float(err[:, 3].max()) <= steps[3] / 2 * (1 + 1e-5)
    assert kvcodec.encode(cache, "cachegen", target_ratio=3.0)  # the ladder's finest rung codes it too


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
    tables = tables_of(kvcodec.encode(cache, "cachegen", shallow_layers=0.2))
    steps = {k: float(v.steps[0]) for k, v in tables.items()}
    assert steps[(0, "key")] == steps[(1, "key")] < steps[(2, "key")] == steps[(9, "key")]


def test_explicit_steps_and_bad_options():
    cache = synthetic_cache(dtype=torch.float32)
    coarse = kvcodec.encode(cache, "cachegen", key_step=2.0, value_step=2.0)
    fine = kvcodec.encode(cache, "cachegen", key_step=0.05, value_step=0.05)
    assert len(coarse) < len(fine)
    for opts in (dict(quality="best"), dict(sinks=-1), dict(key_step=0.0), dict(shallow_layers=2),
                 dict(group_size=0), dict(anchor_bits=9), dict(key_emphasis=3), dict(value_emphasis=True)):
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
    ctx = reader.context(0)
    payload = bytes(reader.source.read(rec.offset, rec.length))
    with pytest.raises(CodecError):
        codec.decode(memoryview(payload[:-4]), info, ctx)  # lane words missing
    with pytest.raises(CodecError, match="tables are corrupt"):
        codec.load_context([b"\x28\xb5\x2f\xfd" + bytes(20)])


def test_framed_tables_inflate_in_parallel_and_refuse_bad_directories():
    """Tables are stored as zstd frames of whole layers after a directory of their lengths;
    single-frame tables (earlier writers) still load; bad directories and frames are refused
    before anything is inflated past the bound."""
    import zstandard
    from kvcodec.entropy import tables

    cache = synthetic_cache(layers=3, tokens=30, dtype=torch.float16)
    data = kvcodec.encode(cache, "cachegen", chunk_tokens=16, lanes=1)
    reader = kvcodec.open(data)
    blob = bytes(reader.context_blobs(0)[0])
    codec = kvcodec.get_codec("cachegen", lanes=1)
    content = tables._inflate(blob)
    one_frame = zstandard.ZstdCompressor(write_checksum=True).compress(content)
    assert blob[:4] == tables.DIRECTORY_MAGIC and tables._inflate(one_frame) == content
    assert zstandard.ZstdDecompressor().stream_reader(blob, read_across_frames=True).read() == content
    loaded = codec.load_context([one_frame])
    assert all(np.array_equal(loaded.tensors[k].codes, t.codes) for k, t in reader.context(0).tensors.items())
    frame = zstandard.ZstdCompressor(write_checksum=True, write_content_size=True).compress(content)
    unsized = zstandard.ZstdCompressor(write_checksum=True, write_content_size=False).compress(content)

    def framed(*frames, count=None):
        n = len(frames) if count is None else count
        directory = np.array([n] + [len(f) for f in frames], dtype="<u4").tobytes()
        return tables.DIRECTORY_MAGIC + np.uint32(len(directory)).tobytes() + directory + b"".join(frames)
    assert codec.load_context([framed(frame)]).tensors.keys() == reader.context(0).tensors.keys()
    for bad in (framed(frame)[:-1], framed(frame) + b"\0", framed(frame, count=2), framed(unsized), framed(),
                framed(frame[:len(frame) // 2], frame[len(frame) // 2:]), tables.DIRECTORY_MAGIC + bytes(4)):
        with pytest.raises(CodecError, match="tables are corrupt"):
            codec.load_context([bad])
    big = zstandard.ZstdCompressor(write_checksum=True, write_content_size=True).compress(bytes(8 << 20))  # tiny blob
    with pytest.raises(CodecError, match="expand beyond"):
        codec.load_context([framed(big)])
    unchecked = zstandard.ZstdCompressor(write_checksum=False, write_content_size=True).compress(content)
    half = len(content) // 2
    two = (zstandard.ZstdCompressor(write_checksum=True).compress(content[:half])
           + zstandard.ZstdCompressor(write_checksum=True).compress(content[half:]))
    for bad, why in ((framed(frame + b"junk"), "exactly one frame"), (framed(two), "exactly one frame"),
                     (framed(unchecked), "no content checksum"), (unchecked, "no content checksum")):
        with pytest.raises(CodecError, match=why):
            codec.load_context([bad])


def tables_content(sets, n_layers=None) -> bytes:
    """A tables blob's content: `sets` of (H, D, G, k) with one-symbol-step tables of 2 symbols."""
    parts = [np.uint32(len(sets) // 2 if n_layers is None else n_layers).tobytes()]
    for h, d, g, k in sets:
        c = h * d
        parts += [np.array([h, d, g, k], "<u4").tobytes(), np.ones(c, "<f4").tobytes(), bytes(c),
                  np.zeros(c, "<i4").tobytes(), np.full(c, 2, "<u2").tobytes(), bytes([1, 1]) * c]
    return b"".join(parts)


def test_hostile_table_contents_are_refused_at_once():
    """A tiny blob claiming a million layers, tensors without channels, or out-of-range group
    sizes is refused by the check of its first tensor set (the layer bound is the header's, 4096)."""
    import zstandard

    codec = kvcodec.get_codec("cachegen", lanes=1)
    pack = zstandard.ZstdCompressor(write_checksum=True).compress
    cases = [tables_content([(0, 0, 0, 0)] * 2, n_layers=1_000_000), tables_content([(0, 4, 1, 0)] * 2),
             tables_content([(2, 4, 0, 0)] * 2), tables_content([(2, 4, 2000, 0)] * 2), tables_content([(2, 4, 1, 9)] * 2)]
    for content, why in zip(cases, ["1000000 layers"] + ["out-of-range fields"] * 4):
        with pytest.raises(CodecError, match=f"tables are corrupt .*{why}"):  # refused by the first check
            codec.load_context([pack(content)])
    assert len(codec.load_context([pack(tables_content([(2, 4, 1, 0)] * 2))]).tensors) == 2  # the same shape, valid


def test_every_damaged_byte_of_a_lane_or_table_gives_a_clean_result():
    """Past the record checksums (a reader calling the codec directly): each flipped byte of a
    payload decodes to a tensor of the right shape or raises CodecError; of the tables, raises
    or (where zstd ignores the bit) changes nothing."""
    cache = smooth_channel_cache(tokens=300)
    data = kvcodec.encode(cache, "cachegen", key_emphasis=0, chunk_tokens=256)
    reader = kvcodec.open(data)
    codec, ctx = reader.codec(0), reader.context(0)
    assert any(t.anchored.any() for t in tables_of(data).values())
    rec = reader.record_infos()[0]
    payload = bytes(reader.source.read(rec.offset, rec.length))
    info = ChunkInfo(rec.layer, rec.tensor, rec.token_start, (1, 2, rec.tokens, 16), torch.float32)
    detected = 0
    for i in range(len(payload)):
        bad = bytearray(payload)
        bad[i] ^= 0x10
        try:
            out = codec.decode(memoryview(bytes(bad)), info, ctx)
            assert out.shape == info.shape
        except CodecError:
            detected += 1
    assert detected > len(payload) // 2
    blob, good = reader.context_blobs(0)[0], codec.decode(memoryview(payload), info, ctx)
    for i in range(0, len(blob), 3):  # the checksummed frame either fails or gives the same tables
        bad = bytearray(blob)
        bad[i] ^= 0x10
        try:
            codec = kvcodec.get_codec("cachegen")
            out = codec.decode(memoryview(payload), info, codec.load_context([bytes(bad)]))
        except CodecError:
            continue
        assert torch.equal(out, good), i
