"""Per-chunk presets: size and error targets are met, several presets share one file, and
impossible or ill-posed targets are refused clearly."""

from __future__ import annotations

import pytest
import torch

import kvcodec
from kvcodec.encoding import presets
from kvcodec.errors import CodecError, InputError

from conftest import synthetic_cache


@pytest.fixture(scope="module")
def cache():
    return synthetic_cache(layers=3, tokens=300, heads=2, head_dim=32, dtype=torch.float16, seed=3)


def chunk_errors(cache, back, chunk_tokens):
    out = []
    for a, b in zip(cache.layers, back.layers):
        for x, y in ((a.key, b.key), (a.value, b.value)):
            for s in range(0, x.shape[2], chunk_tokens):
                xs, ys = x[:, :, s:s + chunk_tokens].double(), y[:, :, s:s + chunk_tokens].double()
                out.append(float((xs - ys).norm() / xs.norm()))
    return out


def layer_errors(cache, back):
    """Each layer's key and value relative RMS error, as `kvc verify` reports them."""
    return [float((x.double() - y.double()).norm() / x.double().norm())
            for a, b in zip(cache.layers, back.layers) for x, y in ((a.key, b.key), (a.value, b.value))]


@pytest.mark.parametrize("codec,ratio", [("cachegen", 3.0), ("cachegen", 4.0), ("quant", 3.0), ("quant", 5.0)])
def test_target_ratio_is_met_closely_with_mixed_presets(cache, codec, ratio):
    """The ratio is met within 20 %, mixing presets: a preset's tables are stored only for the
    tensors that use it, so a second preset costs little more than its payloads."""
    data = kvcodec.encode(cache, codec, chunk_tokens=64, target_ratio=ratio)
    achieved = cache.nbytes / len(data)
    assert ratio <= achieved < ratio * 1.2
    reader = kvcodec.open(data)
    assert len(reader.header.codecs) >= 2  # the budget is met by mixing presets
    back = kvcodec.decode(data)
    assert all(e < 0.5 for e in chunk_errors(cache, back, 64))


def test_a_preset_stores_tables_only_for_its_tensors(cache):
    """Narrowed to one tensor, cachegen's tables blob is far smaller, and that tensor's chunks
    decode from it exactly as from the full tables."""
    from kvcodec.container.chunking import cut
    codec = kvcodec.get_codec("cachegen")
    chunks = cut(cache, 64)
    full = codec.fit(chunks)
    narrow = codec.narrow_context(full, {(1, "value")})
    assert len(narrow[0]) < len(full[0]) / 3
    wide, small = codec.load_context(full), codec.load_context(narrow)
    for info, chunk in chunks.of(1, "value"):
        payload = codec.encode(chunk, info, wide)
        assert payload == codec.encode(chunk, info, small)
        assert torch.equal(codec.decode(memoryview(payload), info, small), codec.decode(memoryview(payload), info, wide))
    info, chunk = chunks.of(0, "key")[0]
    with pytest.raises(CodecError, match="outside its tables"):  # the other tensors' tables are gone
        codec.encode(chunk, info, small)


def test_lower_ratio_buys_lower_error(cache):
    errors = []
    for ratio in (2.5, 3.5, 4.5):
        back = kvcodec.decode(kvcodec.encode(cache, "cachegen", chunk_tokens=64, target_ratio=ratio))
        errors.append(sum(e ** 2 for e in chunk_errors(cache, back, 64)))
    assert errors[0] < errors[1] < errors[2]


@pytest.mark.parametrize("bound", [0.03, 0.08, 0.2])
def test_max_error_holds_for_every_layer(cache, bound):
    data = kvcodec.encode(cache, "cachegen", chunk_tokens=64, max_error=bound)
    errors = layer_errors(cache, kvcodec.decode(data))
    assert max(errors) <= bound
    assert max(errors) > bound * 0.7  # the bound is used, not met by storing everything finely


@pytest.mark.parametrize("quality", ["high", "medium", "low"])
def test_max_error_never_loses_to_a_default_that_meets_it(cache, quality):
    """With the error bound a default preset file has, the target's file is no larger."""
    default = kvcodec.encode(cache, "cachegen", chunk_tokens=64, quality=quality)
    bound = max(layer_errors(cache, kvcodec.decode(default)))
    targeted = kvcodec.encode(cache, "cachegen", chunk_tokens=64, max_error=bound, quality=quality)
    assert len(targeted) <= len(default)
    assert max(layer_errors(cache, kvcodec.decode(targeted))) <= bound


def test_unreachable_error_falls_back_to_lossless(cache):
    data = kvcodec.encode(cache, "cachegen", chunk_tokens=64, max_error=0.0)
    back = kvcodec.decode(data)
    assert all(torch.equal(a.key, b.key) and torch.equal(a.value, b.value) for a, b in zip(cache.layers, back.layers))
    assert [c.name for c in kvcodec.open(data).header.codecs] == [presets.LOSSLESS_FALLBACK]


def test_bad_targets_are_refused(cache):
    with pytest.raises(InputError, match="cannot reach ratio 40"):
        kvcodec.encode(cache, "cachegen", target_ratio=40)
    with pytest.raises(InputError, match="no presets"):
        kvcodec.encode(cache, "zstd", target_ratio=2)
    with pytest.raises(InputError, match="chosen per chunk"):
        kvcodec.encode(cache, "quant", target_ratio=3, bits=4)
    with pytest.raises(InputError, match="not both"):
        kvcodec.encode(cache, "quant", target_ratio=3, max_error=0.1)
    for bad in (0.5, float("nan"), "3"):
        with pytest.raises(InputError):
            kvcodec.encode(cache, "quant", target_ratio=bad)
