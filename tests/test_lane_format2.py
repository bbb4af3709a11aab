"""cachegen's lane format 2: the 32-bit-state rANS of spec section 10 against the spec's own
step-by-step decoder, the shared tables (grouping, the blob and what a reader refuses), the
batched coders, and the GPU kernels (in Triton's interpreter without a GPU)."""

from __future__ import annotations

import io
import re
import struct

import numpy as np
import pytest
import torch
import zstandard

import kvcodec
from kvcodec.codecs.base import ChunkInfo
from kvcodec.container.chunking import cut
from kvcodec.entropy import rans, rans32, shared_tables
from kvcodec.errors import CodecError

from conftest import synthetic_cache
from reference_decoder import decode_lane2, precision


def random_tables(rng, sizes):
    """Weights of tables of these alphabet sizes (random counts, some zero), back to back."""
    sizes = np.asarray(sizes, dtype=np.int64)
    counts = rng.integers(0, 50, int(sizes.sum())) * (rng.random(int(sizes.sum())) < 0.8)
    return rans32.weights_from_counts_many(counts, sizes)


def flat_of(weights, sizes, los):
    sizes = np.asarray(sizes, dtype=np.int64)
    return shared_tables.FlatTables(np.asarray(los, np.int64), sizes, rans32.precision_of(sizes),
                                    np.cumsum(sizes) - sizes, weights, rans.cumulative_many(weights, sizes))


def test_precision_rule_is_one_rule_everywhere():
    sizes = np.array([2, 3, 4, 5, 9, 16, 17, 100, 1000, 1025, 2048, 4096])
    want = [precision(int(n)) for n in sizes]
    assert rans32.precision_of(sizes).tolist() == want == rans32.precision_of(torch.tensor(sizes)).tolist()
    assert want[0] == 4 and want[-1] == 14  # 2 symbols: 16 slots; the largest alphabets stop at 2**14


def test_lookup_slots_are_the_cumulative_search():
    """Every slot of every table: the symbol whose cumulative range holds it, its weight and offset."""
    rng = np.random.default_rng(0)
    sizes = np.array([2, 7, 40, 300, 4096])
    los = np.array([-1, 5, -20, 0, -2048])
    w = random_tables(rng, sizes)
    lookup = rans32.Lookup.build(w, sizes, los).numpy()
    first = np.cumsum(sizes) - sizes
    for t, (n, lo) in enumerate(zip(sizes, los)):
        wt = w[first[t]:first[t] + n]
        c = np.r_[0, np.cumsum(wt)]
        slots = np.arange(1 << precision(int(n)))
        s = np.searchsorted(c, slots, side="right") - 1
        e = lookup.entry[lookup.offset[t] + slots].astype(np.int64)
        assert np.array_equal(e >> 32, lo + s)
        assert np.array_equal((e >> 16) & 0xFFFF, wt[s]) and np.array_equal(e & 0xFFFF, slots - c[s])


@pytest.mark.parametrize("steps", [0, 1, 5, 300])
def test_lanes_decode_as_the_spec_says(steps):
    """Lanes switching between two tables by step phase: the numpy decoder, the spec's decoder
    step by step, and the symbols coded all agree."""
    rng = np.random.default_rng(steps)
    sizes = np.array([3, 30, 200, 2, 4096])
    los = np.array([0, -15, -100, 7, -2000])
    w = random_tables(rng, sizes)
    flat = flat_of(w, sizes, los)
    lanes = 9
    phases = rng.integers(0, len(sizes), (2, lanes))
    phase_of_step = (np.arange(steps) % 3 != 0).astype(np.int64)
    table = phases[phase_of_step]  # [steps, lanes]
    values = (los[table] + (rng.random(table.shape) * sizes[table]).astype(np.int64)).astype(np.int32)
    words, counts = rans32.encode_lanes(values, phases, phase_of_step, flat)
    ends = np.cumsum(counts)
    lookup = rans32.Lookup.build(w, sizes, los).numpy()
    padded = np.concatenate([words, np.zeros(steps + 2, np.uint16)])
    got = rans32.decode_lanes(padded, ends - counts, ends, phases, phase_of_step, lookup)
    assert np.array_equal(got, values)
    tables = [(int(lo), list(w[f:f + n]), [int(x) for x in np.r_[0, np.cumsum(w[f:f + n])][:-1]], precision(int(n)))
              for lo, n, f in zip(los, sizes, np.cumsum(sizes) - sizes)]
    for i in range(lanes):
        lane = words[ends[i] - counts[i]:ends[i]].tolist()
        assert decode_lane2(lane, [tables[table[t, i]] for t in range(steps)]) == values[:, i].tolist()
    if steps:  # a lane missing its last word, or with one too many, is refused
        for cut_end in (ends - 1, ends + 1):
            cut_end = np.minimum(cut_end, len(words))
            starts = np.minimum(ends - counts, cut_end)
            with pytest.raises(CodecError):
                rans32.decode_lanes(padded, starts[:1], cut_end[:1] if cut_end[0] != ends[0] else ends[:1] - 1,
                                    phases[:, :1], phase_of_step, lookup)


def test_tables_group_channels_and_cover_every_value():
    rng = np.random.default_rng(1)
    n = 40
    los = rng.integers(-30, 0, n)
    sizes = rng.integers(2, 60, n)
    los[0], sizes[0] = -5000, 3  # far from the others: a group spanning it would pass 4096 values
    counts = np.concatenate([rng.integers(0, 100, s) for s in sizes])
    table_of, t_los, t_sizes, weights = shared_tables.cluster(los, sizes, counts, 4)
    again = shared_tables.cluster(los, sizes, counts, 4)
    assert np.array_equal(table_of, again[0]) and np.array_equal(weights, again[3])  # deterministic
    assert 2 <= len(t_sizes) <= 5 and t_sizes.max() <= 4096
    assert np.all(t_los[table_of] <= los) and np.all(los + sizes <= t_los[table_of] + t_sizes[table_of])
    rans32.check_tables(weights, t_sizes)


def shared_blob(sets, n_layers=None, weights=None, extra=b"", size=2, main=0, delta=0xFFFF):
    """A lane-format-2 tables blob of `sets` (H, D, G, k, T) with T tables of `size` symbols each
    (weights 8, 8 unless given), every channel on table `main` with delta table `delta`."""
    if weights is None:
        total = 1 << precision(size)
        weights = [total // size + total % size] + [total // size] * (size - 1)
    c = [h * d for h, d, _, _, _ in sets]
    t = sum(s[4] for s in sets)
    parts = [np.uint32(len(sets) // 2 if n_layers is None else n_layers).tobytes(),
             np.array(sets, "<u4").tobytes(), np.ones(sum(c), "<f4").tobytes(), np.full(sum(c), main, "<u2").tobytes(),
             np.full(sum(c), delta, "<u2").tobytes(), np.zeros(t, "<i4").tobytes(), np.full(t, size, "<u2").tobytes(),
             np.array(list(weights) * t, "<u2").tobytes(), extra]
    return zstandard.ZstdCompressor(write_checksum=True, write_content_size=True).compress(b"".join(parts))


def test_hostile_tables_are_refused():
    codec = kvcodec.get_codec("cachegen")
    assert len(codec.load_context([shared_blob([(2, 4, 1, 0, 1)] * 2)]).tensors) == 2  # the valid shape
    unchecked = zstandard.ZstdCompressor(write_checksum=False).compress(b"\0" * 8)
    for blob, why in ((shared_blob([(2, 4, 1, 0, 1)] * 2, n_layers=1_000_000), "layers"),
                      (shared_blob([(2, 4, 1, 0, 1)] * 2, n_layers=4096), "end early"),
                      (shared_blob([(0, 4, 1, 0, 1)] * 2), "out-of-range"),
                      (shared_blob([(2, 4, 1, 0, 0)] * 2), "out-of-range"),
                      (shared_blob([(2, 4, 1, 0, 1)] * 2, weights=[9, 8]), "malformed"),  # sums to 17, not 16
                      (shared_blob([(2, 4, 1, 0, 1)] * 2, weights=[0, 16]), "malformed"),
                      (shared_blob([(2, 4, 1, 0, 1)] * 2, extra=b"\0\0"), "left over"),
                      (shared_blob([(2, 4, 1, 0, 1)] * 2)[:-3], "one frame"),
                      (zstandard.ZstdCompressor(write_checksum=True, write_content_size=True).compress(
                          struct.pack("<I", 2) + struct.pack("<5I", 1 << 31, 1 << 31, 1, 0, 1) * 4), "out-of-range"),
                      (shared_blob([(2, 4, 1, 0, 1)] * 2, main=1), "out-of-range"),  # a table past T
                      (shared_blob([(2, 4, 1, 0, 1)] * 2, delta=0), "out-of-range"),  # deltas without groups
                      (shared_blob([(2, 4, 2, 0, 1)] * 2, delta=0), "delta table is its main"),
                      (shared_blob([(2, 4, 1, 9, 1)] * 2), "out-of-range"),
                      (unchecked, "checksum")):
        with pytest.raises(CodecError, match=f"tables are corrupt.*{why}"):
            codec.load_context([blob])


def test_a_small_blob_cannot_ask_for_a_large_lookup():
    """Tables needing more lookup slots than 2**20 + 64 per blob byte are refused before anything
    is built (here 256 tables of 1,025 symbols, 4M slots, in about a kilobyte)."""
    blob = shared_blob([(1, 1, 1, 0, 128)] * 2, size=1025)
    assert len(blob) < 8 << 10 and shared_tables.lookup_slots(len(blob)) < 256 * (1 << precision(1025))
    with pytest.raises(CodecError, match="lookup slots, more than a reader accepts"):
        kvcodec.get_codec("cachegen").load_context([blob])
    assert len(kvcodec.get_codec("cachegen").load_context([shared_blob([(1, 1, 1, 0, 4)] * 2, size=1025)]).tensors)


def test_batched_decode_equals_one_by_one_and_names_a_corrupt_chunk():
    cache = synthetic_cache(layers=2, heads=2, tokens=50, head_dim=16)
    codec = kvcodec.get_codec("cachegen", group_size=4, key_emphasis=0.0)
    chunks = cut(cache, 16)
    context = codec.load_context(codec.fit(chunks))
    infos, tensors = [info for info, _ in chunks], [chunk for _, chunk in chunks]
    payloads = codec.encode_many(tensors, infos, context)
    assert payloads == [codec.encode(c, i, context) for c, i in zip(tensors, infos)]
    together = codec.decode_many([memoryview(p) for p in payloads], infos, context)
    for p, info, got, x in zip(payloads, infos, together, tensors):
        alone = codec.decode(memoryview(p), info, context)
        assert torch.equal(got, alone)
        step = torch.from_numpy(context.for_chunk(info, "cachegen").steps).reshape(1, info.shape[1], 1, -1)
        s = codec.sink_count(info)
        assert torch.equal(got[:, :, :s], x[:, :, :s])  # sinks exact, the rest within half a step
        assert bool(((got[:, :, s:].float() - x[:, :, s:].float()).abs() <= step / 2 * 1.001 + 1e-3).all())
    bad = 3
    damaged = list(payloads)
    damaged[bad] = payloads[bad][:-2]
    with pytest.raises(CodecError, match=re.escape(infos[bad].where)):
        codec.decode_many([memoryview(p) for p in damaged], infos, context)


def test_values_outside_the_tables_are_refused_when_encoding():
    codec = kvcodec.get_codec("cachegen")
    small = synthetic_cache(layers=1, tokens=20)
    chunks = cut(small, 16)
    context = codec.load_context(codec.fit(chunks))
    info, chunk = list(chunks)[0]
    with pytest.raises(CodecError, match="outside its tables"):
        codec.encode(chunk * 50, info, context)


def test_files_without_the_lanes_member_are_lane_format_1():
    cache = synthetic_cache(layers=1, tokens=20)
    new, old = kvcodec.encode(cache, "cachegen"), kvcodec.encode(cache, "cachegen", lanes=1)
    assert kvcodec.open(new).codec(0).lanes == 2 and kvcodec.open(old).codec(0).lanes == 1
    assert kvcodec.get_codec("cachegen").from_header({k: v for k, v in kvcodec.open(old).codec(0).get_config().items()
                                                      if k not in ("lanes", "tables")}).lanes == 1


@pytest.mark.parametrize("prefetch_below", [0, 1 << 30])
def test_kernel_modes_decode_bit_exactly(monkeypatch, prefetch_below):
    """Both ways the kernel reads renormalization words (beside the lookup, or when needed)."""
    pytest.importorskip("triton")
    from kvcodec.kernels import shared_lane_decode

    monkeypatch.setattr(shared_lane_decode, "PREFETCH_BELOW_LANES", prefetch_below)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cache = synthetic_cache(layers=2, batch=2, heads=2, tokens=40, head_dim=16, dtype=torch.bfloat16)
    data = kvcodec.encode(cache, "cachegen", chunk_tokens=16, group_size=3, key_emphasis=0.0, sinks=3)
    assert kvcodec.decode(data, device=device, decoder="kernels").equal(kvcodec.decode(data, decoder="cpu"))


def test_write_batches_only_codecs_that_code_many_chunks_at_once():
    from kvcodec.encoding.engine import Encoding

    cache = synthetic_cache(layers=2, tokens=20)
    for name, batched in (("cachegen", True), ("quant", False), ("raw", False)):
        codec = kvcodec.get_codec(name)
        assert Encoding.fitted(cut(cache, 16), codec).batched is batched
        out = io.BytesIO()
        kvcodec.pack(cache, out, codec=codec, chunk_tokens=16)
        assert kvcodec.decode(out.getvalue()).layers[1].key.shape == cache.layers[1].key.shape
    info = ChunkInfo(0, "key", 0, (1, 2, 20, 16), torch.float16)
    assert info.numel == 640


def test_lane_lengths_moved_between_lanes_are_refused_by_both_decoders():
    """Lengths that still add up but put a lane's boundary elsewhere: the CPU decoder and the
    kernels (their lane bounds clipped to the payload) both refuse the file."""
    pytest.importorskip("triton")
    from kvcodec.encoding.engine import Encoding, write_cache

    class Shifted(Encoding):
        def payload(self, info, chunk):
            slot, data = super().payload(info, chunk)
            lanes = info.shape[0] * info.shape[1] * info.shape[3]
            counts = np.frombuffer(data, "<u4", lanes).copy()
            counts[0], counts[1] = counts[0] - 1, counts[1] + 1
            return slot, counts.tobytes() + data[4 * lanes:]

    cache = synthetic_cache(layers=1, heads=2, tokens=20, head_dim=16)
    codec = kvcodec.get_codec("cachegen", sinks=0)
    enc = Encoding.fitted(cut(cache, 16), codec)
    out = io.BytesIO()
    write_cache(cache, out, Shifted(enc.codecs, enc.blobs, enc.contexts), 16)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for decoder in ("cpu", "kernels"):
        with pytest.raises(CodecError):
            kvcodec.decode(out.getvalue(), device=device if decoder == "kernels" else None, decoder=decoder)


def test_lanes_of_different_lengths_step_together():
    """Lanes of 7, 3 and 0 symbols coded in one lockstep give each lane the words it would get
    alone (a lane of no symbols none), and decode back."""
    rng = np.random.default_rng(5)
    sizes, los = np.array([5, 40]), np.array([-2, 0])
    w = random_tables(rng, sizes)
    flat = flat_of(w, sizes, los)
    lookup = rans32.Lookup.build(w, sizes, los).numpy()
    lengths = [7, 7, 3, 0]
    phases = np.array([[0, 1, 1, 0], [1, 1, 0, 0]])
    phase_of_step = np.array([0, 1, 1, 0, 1, 1, 0])
    table = phases[phase_of_step]
    values = (los[table] + (rng.random(table.shape) * sizes[table]).astype(np.int64)).astype(np.int32)
    active = (np.array(lengths)[None, :] > np.arange(7)[:, None]).sum(1)
    words, counts = rans32.encode_lanes(values, phases, phase_of_step, flat, active)
    for i, n in enumerate(lengths):
        alone, count = rans32.encode_lanes(values[:n, i:i + 1], phases[:, i:i + 1], phase_of_step[:n], flat)
        assert counts[i] == count[0] and np.array_equal(words[counts[:i].sum():counts[:i + 1].sum()], alone)
    assert counts[3] == 0
    ends = np.cumsum(counts)
    got = rans32.decode_lanes(np.concatenate([words, np.zeros(9, np.uint16)]), ends - counts, ends, phases,
                              phase_of_step, lookup, active)
    for i, n in enumerate(lengths):
        assert np.array_equal(got[:n, i], values[:n, i])


def test_wide_tables_decode_alike_on_both_paths():
    """A channel far larger than the others (its steps finer by the emphasis) gives tables of
    thousands of symbols, P up to 14: the kernels read those lookups as the CPU does."""
    pytest.importorskip("triton")
    cache = synthetic_cache(layers=1, heads=2, tokens=40, head_dim=16)
    for lay in cache.layers:
        lay.key[..., 3] *= 10
    data = kvcodec.encode(cache, "cachegen", chunk_tokens=16, key_step=0.1)
    sizes = kvcodec.open(data).context(0).fields.sizes
    assert sizes.max() > 1024 and rans32.precision_of(sizes).max() == 14
    device = "cuda" if torch.cuda.is_available() else "cpu"
    assert kvcodec.decode(data, device=device, decoder="kernels").equal(kvcodec.decode(data, decoder="cpu"))


def test_lookup_refuses_weights_that_do_not_fill_their_slots():
    """The lookup's sizes come from the host arrays: tables whose weights do not sum to their
    slots are refused before any device work (a GPU would otherwise fault)."""
    sizes, los = np.array([3, 2]), np.array([0, -1])
    good = np.array([30, 1, 1, 15, 1])  # 2**5 and 2**4 slots
    assert rans32.Lookup.build(good, sizes, los).numpy().entry.shape == (48,)
    for bad_weights, bad_sizes in ((np.array([30, 1, 1, 15, 2]), sizes), (good, np.array([3, 3]))):
        with pytest.raises(CodecError, match="malformed"):
            rans32.Lookup.build(bad_weights, bad_sizes, los)


def test_device_tables_are_the_stored_fields_and_the_hosts_lookup():
    """The GPU decoder reads the blob's stored fields as they are (the bytes a fresh `to_blob`
    stores) and makes the lookup on the device: the same entries as `Lookup.build`, for tables
    of over 1024 symbols and 2**14 slots (several blocks of sums and of slots per table)."""
    pytest.importorskip("triton")
    from kvcodec.kernels.shared_lane_decode import DeviceSharedTables

    cache = synthetic_cache(layers=1, heads=2, tokens=40, head_dim=16)
    for lay in cache.layers:
        lay.key[..., 3] *= 10
    tables = kvcodec.open(kvcodec.encode(cache, "cachegen", chunk_tokens=16, key_step=0.1)).context(0)
    assert tables.fields.sizes.max() > 1024
    assert tables.stored.tobytes() == shared_tables.SharedTables(tables.tensors).stored.tobytes()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    got, want = DeviceSharedTables(tables, device).lookup, tables.lookup()
    for g, w in ((got.entry, want.entry), (got.offset, want.offset), (got.precision, want.precision)):
        assert np.array_equal(g.cpu().numpy(), w)
