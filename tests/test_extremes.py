"""Finite in, finite out: values at the top of float16's range decode within their stated bound
with every decoder (the library's CPU path, the spec-only decoder and, in test_kernels, the
GPU kernels), never to an infinity (spec section 8, `to_dtype`)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import kvcodec

from conftest import synthetic_cache
from reference_decoder import read_kvc

FP16_MAX = 65504.0


def near_max_cache() -> kvcodec.KVCache:
    """Ones with a single 65504 (quant's rounded-up scale lands the top code past 65520), and
    heavy tails clamped to float16's range (cachegen's steps are thousands wide there)."""
    ones = torch.ones(1, 1, 64, 8, dtype=torch.float16)
    ones[0, 0, 7, 3] = FP16_MAX
    heavy = (torch.randn(1, 2, 256, 16, generator=torch.Generator().manual_seed(0)) * 20000)
    heavy = heavy.clamp(-FP16_MAX, FP16_MAX).half()
    heavy[0, 1, 100, 5], heavy[0, 0, 200, 2] = FP16_MAX, -FP16_MAX
    return kvcodec.KVCache([kvcodec.LayerKV(ones, ones.clone()),
                            kvcodec.LayerKV(heavy, heavy.flip(2).contiguous())])


CASES = [("quant", {"bits": b}) for b in (2, 3, 4, 8)] + [("quant", {"bits": 4, "group_size": 8}),
                                                         ("cachegen", {}), ("cachegen", {"quality": "low"}),
                                                         ("cachegen", {"sinks": 0, "key_emphasis": 0.0})]


@pytest.mark.parametrize("codec,options", CASES, ids=lambda v: str(v))
def test_the_top_of_float16_decodes_finite_and_within_half_a_step(codec, options):
    cache = near_max_cache()
    data = kvcodec.encode(cache, codec, chunk_tokens=128, **options)
    back = kvcodec.decode(data)
    spec = read_kvc(data)
    for i, (a, b) in enumerate(zip(cache.layers, back.layers)):
        for name in ("key", "value"):
            x, y = getattr(a, name).float(), getattr(b, name)
            assert torch.isfinite(y).all(), (i, name)
            assert np.array_equal(spec[(i, name)], y.view(torch.int16).numpy().view(np.uint16)), (i, name)  # spec agrees
            # every element within half its step: the step is at most the layer's spread / levels
            err = (y.float() - x).abs()
            if codec == "quant":
                bound = (x.amax() - x.amin()) / ((1 << options["bits"]) - 1) * (1 + 2 ** -9) / 2 + 64
            else:
                bound = torch.tensor(0.7 * float(x.std()) * 64 + 64)  # steps are a fraction of sigma, emphasis <= 64x
            assert bool((err <= bound).all()), (i, name, float(err.max()), float(bound))


def test_saturation_only_moves_values_toward_the_input():
    """A decoded value past the top of the range becomes the top, which is nearer every finite
    input than the unsaturated value was."""
    x = torch.tensor([65519.0, 65520.0, 70000.0, -80000.0, float("nan"), 1.0])
    y = kvcodec.dtypes.to_dtype(x, torch.float16)
    assert y[:4].tolist() == [65504.0, 65504.0, 65504.0, -65504.0] and torch.isnan(y[4]) and y[5] == 1
    assert kvcodec.dtypes.to_dtype(torch.tensor([3.4e38]), torch.bfloat16).isfinite().all()


def test_an_ordinary_cache_decodes_as_before():
    """Saturation changes nothing where nothing overflows (the golden vectors check the bytes)."""
    cache = synthetic_cache(tokens=40)
    data = kvcodec.encode(cache, "quant", bits=3, chunk_tokens=16)
    q = kvcodec.decode(data)
    assert all(torch.isfinite(t).all() for lay in q.layers for t in (lay.key, lay.value))
