"""Lossless round trips across codecs, dtypes and shapes; lazy reads; bytes and file objects."""

from __future__ import annotations

import io

import pytest
import torch

import kvcodec

from conftest import DTYPES, synthetic_cache

LOSSLESS = ("raw", "zstd", "shuffle-zstd")

SHAPES = {
    "mha": dict(heads=4, tokens=50),
    "gqa": dict(heads=2, tokens=50, batch=2),
    "mqa": dict(heads=1, tokens=33),
    "mixed-lengths": dict(layers=4, token_counts=[40, 8, 40, 0]),  # sliding-window layers, one empty
    "mixed-heads-dims": dict(layers=2, heads=[2, 3], head_dim=16, value_head_dim=8),
}


@pytest.mark.parametrize("codec", LOSSLESS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES)
def test_lossless_roundtrip_is_bit_exact(codec, dtype, shape):
    cache = synthetic_cache(dtype=dtype, **SHAPES[shape])
    data = kvcodec.encode(cache, codec, chunk_tokens=16)
    back = kvcodec.decode(data)
    assert back.equal(cache)
    assert [l.key.dtype for l in back.layers] == [dtype] * cache.num_layers


def test_special_values_survive_lossless_codecs():
    cache = synthetic_cache(dtype=torch.float32)
    k = cache.layers[0].key
    k[0, 0, 0, :4] = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0])
    for codec in LOSSLESS:
        back = kvcodec.decode(kvcodec.encode(cache, codec)).layers[0].key
        assert torch.equal(back.view(torch.int32), k.view(torch.int32))


def test_metadata_positions_and_token_ids_roundtrip():
    cache = synthetic_cache(positions=True, token_ids=True)
    cache.layers[1].positions = torch.arange(cache.layers[1].key.shape[1] * 37).reshape(2, 37)  # per-head rows
    back = kvcodec.decode(kvcodec.encode(cache, "zstd"))
    assert back.metadata == cache.metadata
    assert torch.equal(back.token_ids, cache.token_ids)
    for a, b in zip(cache.layers, back.layers):
        assert torch.equal(a.positions, b.positions)


def test_compression_actually_compresses_and_reports_ratio(small_cache):
    raw = kvcodec.encode(small_cache, "raw")
    sz = kvcodec.encode(small_cache, "shuffle-zstd", level=19)
    q = kvcodec.encode(small_cache, "quant", bits=2)
    assert len(sz) < len(raw) and len(q) < len(raw) / 3
    info = kvcodec.open(q).info()
    assert info["raw_bytes"] == small_cache.nbytes and info["ratio"] == pytest.approx(small_cache.nbytes / len(q))


@pytest.mark.parametrize("tokens", [slice(None), slice(0, 1), slice(15, 17), slice(30, None), slice(-5, None), slice(20, 10)])
def test_lazy_read_of_token_ranges(tokens):
    cache = synthetic_cache(tokens=37)
    reader = kvcodec.open(kvcodec.encode(cache, "zstd", chunk_tokens=8))
    for layer in range(cache.num_layers):
        k, v = reader.read(layer, tokens=tokens)
        assert torch.equal(k, cache.layers[layer].key[:, :, tokens])
        assert torch.equal(v, cache.layers[layer].value[:, :, tokens])


class CountingFile(io.BytesIO):
    """A seekable file that records which byte ranges were read."""

    def __init__(self, data):
        super().__init__(data)
        self.reads = []

    def read(self, n=-1):
        start = self.tell()
        out = super().read(n)
        self.reads.append((start, len(out)))
        return out


def test_reader_touches_only_the_requested_records():
    cache = synthetic_cache(layers=4, tokens=64)
    data = kvcodec.encode(cache, "raw", chunk_tokens=16)
    f = CountingFile(data)
    reader = kvcodec.open(f)
    opened = sum(n for _, n in f.reads)
    f.reads.clear()
    k, _ = reader.read(2, tokens=slice(20, 30))  # inside one chunk of keys and one of values
    assert torch.equal(k, cache.layers[2].key[:, :, 20:30])
    wanted = [r for r in reader.record_infos() if r.layer == 2 and r.token_start == 16]
    assert sorted(f.reads) == sorted((r.offset, r.length) for r in wanted)
    index_and_trailer = len(data) - reader.index_offset
    assert opened == reader.header_end + index_and_trailer  # preamble, header, index and trailer only


def test_pack_to_path_and_file_objects(tmp_path, small_cache):
    path = tmp_path / "c.kvc"
    size = kvcodec.pack(small_cache, path, codec="zstd")
    assert path.stat().st_size == size
    buf = io.BytesIO()
    kvcodec.pack(small_cache, buf, codec="zstd")
    assert buf.getvalue() == path.read_bytes()
    assert kvcodec.unpack(path).equal(small_cache)
    with open(path, "rb") as f:
        assert kvcodec.unpack(f).equal(small_cache)
    assert kvcodec.unpack(io.BufferedReader(io.BytesIO(buf.getvalue()))).equal(small_cache)


class PipeSink:
    """A write-only, non-seekable sink that records the order of writes."""

    def __init__(self):
        self.chunks = []

    def write(self, data):
        self.chunks.append(bytes(data))
        return len(data)


def test_writer_streams_front_to_back_without_seeking(small_cache):
    sink = PipeSink()
    kvcodec.pack(small_cache, sink, codec="zstd", chunk_tokens=8)
    data = b"".join(sink.chunks)
    assert kvcodec.decode(data).equal(small_cache)
    # one write per payload at least: the writer never holds the whole file
    assert max(len(c) for c in sink.chunks) < len(data) / 4


def test_pack_keeps_at_most_one_chunk_of_payload_in_flight(small_cache):
    """Each payload reaches the sink before the next chunk is encoded."""

    class Spy(kvcodec.codecs.RawCodec):
        def encode(self, chunk, info, context):
            seen.append(sum(len(c) for c in sink.chunks))
            return super().encode(chunk, info, context)

    seen, sink = [], PipeSink()
    kvcodec.pack(small_cache, sink, codec=Spy(), chunk_tokens=8)
    assert all(b > a for a, b in zip(seen, seen[1:]))


@pytest.mark.transformers
def test_hf_dynamic_cache_roundtrip(small_cache):
    hf = small_cache.to_hf()
    back = kvcodec.KVCache.from_hf(hf)
    assert back.equal(small_cache)
    assert kvcodec.decode(kvcodec.encode(hf, "raw")).equal(small_cache)


@pytest.mark.transformers
def test_hf_caches_hold_the_tensors_and_sliding_layers_count_their_tokens(small_cache):
    """Plain layers of the DynamicCache take the cache's tensors without copying them; layers of
    another kind (a config's sliding-window layers) go through their own `update`."""
    from transformers import MistralConfig

    hf = small_cache.to_hf()
    assert all(hf.layers[i].keys.data_ptr() == lay.key.data_ptr() for i, lay in enumerate(small_cache.layers))
    keys, _ = hf.update(small_cache.layers[0].key[:, :, :1], small_cache.layers[0].value[:, :, :1], 0)
    assert keys.shape[2] == small_cache.layers[0].key.shape[2] + 1  # generation grows it as before
    n = len(small_cache.layers)
    config = MistralConfig(num_hidden_layers=n, sliding_window=4, num_key_value_heads=small_cache.layers[0].key.shape[1])
    windowed = small_cache.to_hf(config=config)
    assert type(windowed.layers[0]).__name__ != "DynamicLayer"
    assert windowed.get_seq_length() == small_cache.layers[0].key.shape[2]
    assert kvcodec.KVCache.from_hf(hf).layers[1].key.equal(small_cache.layers[1].key)


@pytest.mark.transformers
def test_hf_plain_layers_have_the_state_update_gives_them(small_cache):
    """Plain layers after the first copy its state instead of an empty `update` each: every
    layer must look exactly as transformers' own `update` leaves it (with and without a
    config that creates the layers up front), and generation must grow each of them."""
    from transformers import DynamicCache, LlamaConfig

    n = len(small_cache.layers)
    config = LlamaConfig(num_hidden_layers=n, num_key_value_heads=small_cache.layers[0].key.shape[1])
    for kwargs in ({}, {"config": config}):
        ours = small_cache.to_hf(**kwargs)
        theirs = DynamicCache(**kwargs)
        for i, lay in enumerate(small_cache.layers):
            theirs.update(lay.key, lay.value, i)
        assert len(ours.layers) == len(theirs.layers) == n
        for a, b in zip(ours.layers, theirs.layers):
            assert type(a) is type(b)
            mine, want = vars(a), vars(b)
            assert mine.keys() == want.keys()
            assert all(mine[k] == want[k] for k in mine if not isinstance(mine[k], torch.Tensor))
            assert a.keys.equal(b.keys) and a.values.equal(b.values)
        for i, lay in enumerate(small_cache.layers):
            grown, _ = ours.update(lay.key[:, :, :1], lay.value[:, :, :1], i)
            assert grown.shape[2] == lay.key.shape[2] + 1
        assert ours.layers[0].keys.data_ptr() != ours.layers[1].keys.data_ptr()


def test_read_rejects_bad_layer_and_step(small_cache):
    reader = kvcodec.open(kvcodec.encode(small_cache))
    with pytest.raises(IndexError):
        reader.read(99)
    with pytest.raises(ValueError):
        reader.read(0, tokens=slice(0, 10, 2))
    n = small_cache.layers[0].key.shape[2]
    with pytest.raises(IndexError, match=f"tokens {n}:{2 * n} start outside layer 0's {n} stored tokens"):
        reader.read(0, tokens=slice(n, 2 * n))  # would be empty: an error, not silence
    assert reader.read(0, tokens=slice(n - 2, 2 * n))[0].shape[2] == 2  # a stop past the end stops there



def test_writer_refuses_what_the_reader_would_refuse(tmp_path, small_cache):
    small_cache.metadata.update({f"k{i}": "v" for i in range(2000)})  # more entries than the format allows
    with pytest.raises(kvcodec.InputError, match="metadata"):
        kvcodec.pack(small_cache, tmp_path / "x.kvc")
    assert not list(tmp_path.iterdir())


def test_progress_reports_each_layer(small_cache):
    packed, unpacked = [], []
    data = io.BytesIO()
    kvcodec.pack(small_cache, data, codec="raw", progress=packed.append)
    kvcodec.unpack(data.getvalue(), progress=unpacked.append)
    assert packed == unpacked == list(range(1, small_cache.num_layers + 1))


@pytest.mark.transformers
def test_hf_cache_for_a_config_with_fewer_layers_is_refused(small_cache):
    from transformers import LlamaConfig

    config = LlamaConfig(num_hidden_layers=len(small_cache.layers) - 1,
                         num_key_value_heads=small_cache.layers[0].key.shape[1])
    with pytest.raises(kvcodec.InputError, match="config has 2 layers; the cache has more"):
        small_cache.to_hf(config=config)
