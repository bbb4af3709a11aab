"""kvcodec with kvpress (`kvcodec.integrations.kvpress`), tested with the real kvpress 0.5.5 and
SmolLM2 in an environment of its own (`tests/stacks.py`; kvpress pins transformers < 5.3): three
scorer presses prefill 384 tokens, the pressed cache packs with the positions each head kept,
and after a lossless restore it continues like the pressed cache."""

from __future__ import annotations

import pytest

from stacks import run_script, stack_python

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def runs():
    results, _ = run_script(stack_python("kvpress"), "kvpress_continue.py", timeout=600)
    return {r["press"]: r for r in results}


@pytest.mark.parametrize("press, kept", [("KnormPress", 192), ("SnapKVPress", 192), ("StreamingLLMPress", 96)])
def test_a_pressed_cache_restores_with_its_positions_and_continues_alike(runs, press, kept):
    got = runs[press]
    assert got["kept"] == kept and got["length"] == 384 and got["positions_rows"] == 3  # per head
    assert got["true_positions"]  # the kept keys are the unpressed prefill's keys at those positions
    assert got["same_tokens"]  # 12 greedy tokens, fed at the positions after the prefill
    assert got["logit_diff"] <= 1e-5 * got["logit_scale"]  # tokens reordered by position: float rounding only
    assert got["file_bytes"] < got["fp32_bytes"]
