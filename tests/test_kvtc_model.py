"""kvtc on the real models: a profile calibrated on the training texts, judged on an evaluation
text it never saw. Its divergence lands near the target it was asked for, and it beats 4-bit
quantization: less divergence at a higher ratio. Short prefixes, so that CI stays quick; the
full measurements are in BENCHMARKS.md."""

from __future__ import annotations

import pytest
import torch

from kvcodec.calibration.fit import calibrate
from kvcodec.eval import fidelity

pytestmark = pytest.mark.model
PREFIX, CONTINUATION = 512, 128


def judged(model: str, tmp_path_factory):
    profile = calibrate(model, tokens=PREFIX, continuation=64, per_text=1)  # calibrated at the judged length
    path = tmp_path_factory.mktemp(f"profile-{model}") / "profile.safetensors"
    path.write_bytes(profile.to_bytes())
    ctx = fidelity.Context.from_text("prose", prefix=PREFIX, continuation=CONTINUATION, greedy=0, model=model)
    return str(path), ctx


@pytest.fixture(scope="module")
def smollm2(real_model, tmp_path_factory):
    return judged("smollm2", tmp_path_factory)


@pytest.fixture(scope="module")
def gemma_context(tmp_path_factory):
    return judged("gemma3-270m", tmp_path_factory)


def check(profile: str, ctx) -> None:
    quant = fidelity.evaluate_codec([ctx], "quant", {"bits": 4}).mean
    got = {target: fidelity.evaluate_codec([ctx], "kvtc", {"profile": profile, "target_kl": target}).mean
           for target in (0.002, 0.004)}
    for target, mean in got.items():
        assert target / 4 < mean["kl"] < target * 4, (target, mean)
    assert got[0.002]["ratio"] < got[0.004]["ratio"]
    assert got[0.002]["ratio"] > quant["ratio"] and got[0.002]["kl"] < quant["kl"], (got, quant)


@torch.no_grad()
def test_kvtc_meets_its_target_and_beats_quant_on_smollm2(smollm2):
    check(*smollm2)


@torch.no_grad()
def test_kvtc_meets_its_target_and_beats_quant_on_gemma(gemma_context):
    check(*gemma_context)
