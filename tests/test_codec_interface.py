"""The codec interface as a plugin author meets it: `fit` sees the writer's own chunks, contexts
are loaded once per file, codecs are immutable hashable configuration, and the registry holds
every codec to its declared expansion bound."""

from __future__ import annotations

import io

import pytest
import torch

import kvcodec
from kvcodec.codecs import RawCodec
from kvcodec.errors import CodecError
from kvcodec.registry import CODECS

from conftest import synthetic_cache


class Recorder(RawCodec):
    """raw, recording what `fit` and `encode` were given (class-level: codecs are immutable)."""

    codec_id, name = 5100, "recorder-test"
    fitted: list = []
    encoded: list = []
    loads: list = []

    def fit(self, chunks):
        Recorder.fitted.append([(info, chunk.clone()) for info, chunk in chunks])
        return [b"shared"]

    def load_context(self, blobs):
        Recorder.loads.append(list(blobs))
        return {"loaded": blobs[0]}

    def encode(self, chunk, info, context):
        assert context == {"loaded": b"shared"}
        Recorder.encoded.append((info, chunk.clone()))
        return super().encode(chunk, info, context)

    def decode(self, payload, info, context):
        assert context == {"loaded": b"shared"}
        return super().decode(payload, info, context)


@pytest.fixture
def recorder():
    if "recorder-test" not in CODECS:
        kvcodec.register_codec(Recorder)
    for log in (Recorder.fitted, Recorder.encoded, Recorder.loads):
        log.clear()
    return Recorder()


def test_fit_is_given_exactly_the_chunks_the_writer_encodes(recorder):
    cache = synthetic_cache(layers=3, tokens=37, token_counts=[37, 9, 20])
    kvcodec.encode(cache, recorder, chunk_tokens=8)
    (fitted,) = Recorder.fitted
    assert [info for info, _ in fitted] == [info for info, _ in Recorder.encoded]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(fitted, Recorder.encoded))
    assert len(fitted) == sum(2 * -(-n // 8) for n in (37, 9, 20))
    assert {info.shape[2] for info, _ in fitted} == {8, 5, 1, 4}  # the short last chunks too


def test_a_context_is_loaded_once_per_write_and_once_per_reader(recorder):
    data = kvcodec.encode(synthetic_cache(), recorder, chunk_tokens=8)
    assert Recorder.loads == [[b"shared"]]
    with kvcodec.open(data) as reader:
        for layer in range(reader.num_layers):
            reader.read(layer)
    assert Recorder.loads == [[b"shared"], [b"shared"]]


def builtin_codecs():
    """Every built-in codec at its defaults (but those needing an artifact: ae's weights, kvtc's profile)."""
    return [cls() for cls in kvcodec.available_codecs() if cls.codec_id < 1024 and cls.name not in ("ae", "kvtc")]


def test_codecs_are_immutable_and_hashable():
    codecs = builtin_codecs()
    assert {c.name for c in codecs} >= {"raw", "zstd", "shuffle-zstd", "quant", "cachegen"}
    for codec in codecs:
        twin = type(codec).from_config(codec.get_config())
        assert codec == twin and hash(codec) == hash(twin) and len({codec, twin}) == 1
        with pytest.raises(AttributeError, match="immutable"):
            codec.level = 5
        with pytest.raises(AttributeError, match="immutable"):
            del codec.name
    assert kvcodec.get_codec("quant", bits=4) != kvcodec.get_codec("quant", bits=8)
    stage = kvcodec.selector_class("h2o").from_config({"keep": 0.5})
    assert hash(stage) == hash(kvcodec.selector_class("h2o").from_config({"keep": 0.5}))
    with pytest.raises(AttributeError, match="immutable"):
        stage.keep = 0.25


def test_decoding_leaves_a_codec_as_it_was():
    cache = synthetic_cache(tokens=40)
    for codec in builtin_codecs():
        before = dict(vars(codec))
        kvcodec.decode(kvcodec.encode(cache, codec, chunk_tokens=16))
        assert vars(codec) == before, codec.name


def test_a_codec_must_declare_its_expansion_bound():
    class Unbounded(kvcodec.Codec):
        codec_id, name, lossless = 5101, "unbounded-test", True

    with pytest.raises(CodecError, match="must declare max_expansion"):
        kvcodec.register_codec(Unbounded)
    Unbounded.max_expansion = float("inf")
    with pytest.raises(CodecError, match="must declare max_expansion"):
        kvcodec.register_codec(Unbounded)
    assert "unbounded-test" not in CODECS


def test_a_subclass_constructor_may_set_attributes_after_its_parent():
    class Wider(RawCodec):
        codec_id, name = 5102, "wider-test"

        def __init__(self, width: int = 2):
            super().__init__()
            self.width = width

    codec = Wider(3)
    assert codec.get_config() == {"width": 3}
    with pytest.raises(AttributeError, match="immutable"):
        codec.width = 4
    buf = io.BytesIO()
    assert kvcodec.pack(synthetic_cache(), buf, codec) == len(buf.getvalue())


def test_codecs_that_compare_equal_hash_equal():
    a, b = kvcodec.get_codec("cachegen", key_emphasis=1), kvcodec.get_codec("cachegen", key_emphasis=1.0)
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1


def test_a_device_module_that_does_not_load_is_a_codec_error():
    from kvcodec.codecs import device

    class Broken(RawCodec):
        codec_id, name = 5103, "broken-device-test"
        device_decoder = "no_such_package.kernels"

    with pytest.raises(CodecError, match="device decoder 'no_such_package.kernels' cannot be loaded"):
        device.decoder_for(Broken())
