"""Pruned caches on SmolLM2-135M: restored from a `.kvc`, they continue exactly like the full
cache with the same tokens hidden from attention (the harness's masked reference)."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

import kvcodec
from kvcodec.eval import fidelity
from kvcodec.tools.cli import cli

pytestmark = pytest.mark.model
PREFIX, CONTINUATION = 160, 24


@pytest.fixture(scope="module")
def ctx(real_model):
    return fidelity.Context.from_text("prose", PREFIX, CONTINUATION, greedy=4, dtype=torch.float32)


def continuation(ctx, cache, start):
    return fidelity.continue_logits(cache, ctx.ids[:, ctx.prefix:-1], start)


@pytest.mark.parametrize("spec, options", [
    ("streamingllm", {"keep": 0.5}),
    ("h2o", {"keep": 0.25}),
    ("keyformer", {"keep": 0.5}),
    ("snapkv", {"keep": 0.25}),
    ("knorm", {"keep": 0.5}),
    ("lacache", {"cache_size": 0.5}),
    ("cam", {"start_ratio": 0.1, "recent_ratio": 0.2}),
    ("h2o+cachegen", {"keep": 0.5}),
    ("snapkv+quant", {"keep": 0.5, "bits": 4}),
])
def test_restored_pruned_cache_continues_like_the_masked_reference(ctx, spec, options):
    data = kvcodec.encode(ctx.cache, spec, scores=ctx.scores, **options)
    restored = kvcodec.decode(data)
    assert restored.next_position == PREFIX and restored.layers[0].key.shape[2] < PREFIX
    got = continuation(ctx, restored, restored.next_position)
    reference = fidelity.masked_reference_logits(ctx, restored)
    assert float((got - reference).abs().max()) < 5e-4
    full = continuation(ctx, ctx.cache, PREFIX)
    assert float((full - reference).abs().max()) > 0.05  # hiding the dropped tokens matters
    kept = restored.layers[0].key.shape[2]
    wrong = continuation(ctx, restored, kept)  # continuing at the kept count instead of the original length
    assert float((wrong - reference).abs().max()) > 0.05


def test_harness_scores_pipelines(ctx):
    report = fidelity.evaluate_codec([ctx], "h2o+quant", {"keep": 0.5, "bits": 8})
    result = report.results[0]
    assert report.label.startswith("h2o keep=0.5") and "+ quant bits=8" in report.label
    assert 3.5 < result.ratio < 4.0  # half the tokens, 8-bit values (positions cost little)
    assert abs(result.delta_ppl_pct) < 50 and 0.5 < result.top1 <= 1.0
    assert all(err < 0.02 for err in result.key_rel_err)  # kept tokens compared at their positions


def test_capture_scores_then_pack_a_pipeline(tmp_path, real_model):
    runner = CliRunner()
    out = runner.invoke(cli, ["capture", "--tokens", "96", "-o", str(tmp_path / "c.pt"), "--scores", "--window", "16"])
    assert out.exit_code == 0, out.output
    scores = kvcodec.AttentionScores.load(tmp_path / "c.scores.safetensors")
    assert scores.window == 16 and scores.attention[0].shape == (1, 3, 96) and scores.queries[0].shape == (1, 9, 16, 64)
    # every query's attention sums to one over its keys: 96 queries x 3 query heads per KV head
    assert torch.allclose(scores.attention[5].sum(-1), torch.full((1, 3), 96.0 * 3), rtol=1e-4)
    out = runner.invoke(cli, ["pack", str(tmp_path / "c.pt"), "-c", "keyformer+cachegen", "--opt", "keep=0.5"])
    assert out.exit_code == 0, out.output
    out = runner.invoke(cli, ["inspect", str(tmp_path / "c.kvc")])
    assert "pipeline: keyformer" in out.output and "50.0%" in out.output


def test_captured_queries_reproduce_the_accumulated_attention(real_model, monkeypatch):
    from kvcodec.eval import attention, capture
    from kvcodec.selection.scored import per_kv_head, window_logits

    monkeypatch.setattr(attention, "QUERY_BLOCK", 20)  # queries in three blocks
    cache, scores = capture.capture_with_scores("code", tokens=48, dtype=torch.float32, window=48)
    plain, _ = capture.capture_with_scores("code", tokens=48, dtype=torch.float32, window=None)
    assert all(torch.allclose(a.key, b.key, atol=1e-5) and torch.allclose(a.value, b.value, atol=1e-5)
               for a, b in zip(cache.layers, plain.layers))  # the hooked attention computes what sdpa does
    for i in (0, 13, 29):  # every query kept: softmax of their logits over the cached keys, summed
        lay = cache.layers[i]
        probs = torch.softmax(window_logits(i, lay, scores, None), dim=-1).sum(dim=2)
        assert torch.allclose(per_kv_head(probs, 3), scores.attention[i][0].double(), rtol=1e-3, atol=1e-4)
