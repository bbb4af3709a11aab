"""`quant`: stated error bounds, grouping axes, exact payload sizes, bit packing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import kvcodec
from kvcodec.codecs import QuantCodec, bitpack
from kvcodec.codecs.base import ChunkInfo
from kvcodec.errors import CodecError

from conftest import DTYPES, synthetic_cache


@pytest.mark.parametrize("bits", bitpack.SUPPORTED_BITS)
def test_bitpack_roundtrip(bits):
    rng = np.random.default_rng(bits)
    for n in (0, 1, 7, 8, 9, 1000):
        codes = rng.integers(0, 1 << bits, n, dtype=np.uint8)
        packed = bitpack.pack(codes, bits)
        assert len(packed) == bitpack.packed_length(n, bits)
        assert np.array_equal(bitpack.unpack(packed, n, bits), codes)


def test_bitpack_is_lsb_first():
    assert bitpack.pack(np.array([1, 2], np.uint8), 4) == bytes([0x21, 0, 0, 0])
    assert bitpack.pack(np.array([1, 2, 3, 0, 0, 0, 0, 7], np.uint8), 3) == (1 | 2 << 3 | 3 << 6 | 7 << 21).to_bytes(3, "little")


def group_ranges(x: torch.Tensor, axis: int, g: int) -> torch.Tensor:
    """max - min of each quantization group, broadcast back to every element."""
    n = x.shape[axis]
    out = torch.empty_like(x)
    for s in range(0, n, g):
        part = x.narrow(axis, s, min(g, n - s))
        out.narrow(axis, s, part.shape[axis]).copy_(
            (part.amax(axis, keepdim=True) - part.amin(axis, keepdim=True)).expand_as(part))
    return out


@pytest.mark.parametrize("bits", bitpack.SUPPORTED_BITS)
@pytest.mark.parametrize("group_size", [8, 32, 64])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_error_within_stated_bound(bits, group_size, dtype):
    """Spec 8.4: |x - x^| <= s/2 with s the float16-rounded (range / (2^b - 1)), plus output rounding."""
    cache = synthetic_cache(tokens=45, head_dim=24, dtype=dtype)
    back = kvcodec.decode(kvcodec.encode(cache, "quant", bits=bits, group_size=group_size, chunk_tokens=20))
    levels = (1 << bits) - 1
    for a, b in zip(cache.layers, back.layers):
        for x, y, axis in ((a.key, b.key, 2), (a.value, b.value, 3)):
            x32 = x.float()
            # per chunk of 20 tokens (groups never cross chunks)
            rng = torch.cat([group_ranges(c, axis, group_size) for c in x32.split(20, dim=2)], dim=2)
            step = (rng + x32.abs().amax() * 2**-10) / levels * (1 + 2**-9)  # fp16 rounding of min and scale
            bound = step / 2 + torch.finfo(dtype).eps * x32.abs() + 1e-6
            err = (y.float() - x32).abs()
            assert bool((err <= bound).all()), f"max excess {float((err - bound).max())}"
            assert y.dtype == dtype


def test_more_bits_means_less_error():
    cache = synthetic_cache(tokens=64, dtype=torch.float32)
    errs = []
    for bits in (2, 3, 4, 8):
        back = kvcodec.decode(kvcodec.encode(cache, "quant", bits=bits))
        errs.append(sum(float((a.key - b.key).norm() + (a.value - b.value).norm()) for a, b in zip(cache.layers, back.layers)))
    assert errs == sorted(errs, reverse=True) and errs[-1] < errs[0] / 20


def test_keys_group_per_channel_and_values_per_token():
    """A key channel with a huge offset must not cost precision in other channels (and vice versa for value tokens)."""
    cache = synthetic_cache(layers=1, tokens=64, dtype=torch.float32)
    cache.layers[0].key[..., 0] += 1000
    cache.layers[0].value[:, :, 0] += 1000
    back = kvcodec.decode(kvcodec.encode(cache, "quant", bits=4, group_size=64)).layers[0]
    assert float((back.key[..., 1:] - cache.layers[0].key[..., 1:]).abs().max()) < 0.5
    assert float((back.value[:, :, 1:] - cache.layers[0].value[:, :, 1:]).abs().max()) < 0.5


def test_payload_size_is_exact():
    codec = QuantCodec(bits=3, group_size=16)
    info = ChunkInfo(0, "key", 0, (1, 2, 33, 24), torch.float16)
    payload = codec.encode(torch.randn(1, 2, 33, 24).half(), info, [])
    n_groups = 1 * 2 * 3 * 24  # ceil(33/16) token groups per channel
    assert len(payload) == 4 * n_groups + (2 * 33 * 24 + 7) // 8 * 3 == codec.payload_length(info)
    with pytest.raises(CodecError, match="bytes"):
        codec.decode(memoryview(payload[:-1]), info, [])


def test_constant_groups_decode_exactly():
    cache = synthetic_cache(layers=1, dtype=torch.float16)
    cache.layers[0].key.fill_(0.25)
    back = kvcodec.decode(kvcodec.encode(cache, "quant", bits=2))
    assert torch.equal(back.layers[0].key, cache.layers[0].key)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 1e6])
def test_unrepresentable_values_are_refused(bad):
    cache = synthetic_cache(layers=1, dtype=torch.float32)
    cache.layers[0].value[0, 0, 0, 0] = bad
    with pytest.raises(CodecError, match="lossless"):
        kvcodec.encode(cache, "quant")


@pytest.mark.parametrize("opts", [dict(bits=5), dict(bits=True), dict(group_size=0), dict(group_size="8"), dict(scale="x")])
def test_bad_options_are_refused(opts):
    with pytest.raises(CodecError):
        kvcodec.get_codec("quant", **opts)


def test_encoding_is_deterministic(small_cache):
    assert kvcodec.encode(small_cache, "quant", bits=3) == kvcodec.encode(small_cache, "quant", bits=3)


@pytest.mark.parametrize("tensor", ["key", "value"])
@pytest.mark.parametrize("shape", [(1, 1, 3, 5), (2, 3, 8, 16), (1, 2, 7, 9)])
def test_the_tensor_dequantizer_of_8_bit_codes_matches_decode(tensor, shape):
    """`dequantize_8bit` (what a GPU read of 8-bit codes runs, here on the CPU) gives `decode`'s
    values, also where the codes do not fill whole groups of 8 and the payload is padded."""
    codec = QuantCodec(bits=8, group_size=4)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1)).half()
    info = ChunkInfo(0, tensor, 0, shape, torch.float16)
    payload = memoryview(codec.encode(x, info, ()))
    assert torch.equal(codec.dequantize_8bit(payload, info, "cpu"), codec.decode(payload, info, ()))
    with pytest.raises(CodecError, match="8-bit codes"):
        QuantCodec(bits=4).dequantize_8bit(payload, info, "cpu")
