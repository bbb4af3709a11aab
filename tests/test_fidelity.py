"""The fidelity harness on SmolLM2 (short prefix and continuation): its quality bars, pruned
caches at their original positions, determinism, and the `kvc eval` / `kvc bench` commands."""

from __future__ import annotations

import json
import time

import pytest
import torch
from click.testing import CliRunner

import kvcodec
from kvcodec.eval import fidelity
from kvcodec.registry import register_codec
from kvcodec.tools.cli import cli

pytestmark = pytest.mark.model
PREFIX, CONTINUATION, GREEDY = 128, 48, 12


class ZeroValues(kvcodec.codecs.RawCodec):
    """A deliberately broken codec: keys survive, values come back as zeros."""

    codec_id = 9001
    name = "test-zero-values"
    lossless = False

    def decode(self, payload, info, context):
        out = super().decode(payload, info, context)
        return torch.zeros_like(out) if info.tensor == "value" else out


register_codec(ZeroValues)


@pytest.fixture(scope="module")
def contexts(real_model):
    return [fidelity.Context.from_text(t, PREFIX, CONTINUATION, GREEDY) for t in ("prose", "code")]


def test_lossless_codecs_change_nothing(contexts):
    for codec in ("raw", "shuffle-zstd"):
        report = fidelity.evaluate_codec(contexts, codec)
        for ctx, r in zip(contexts, report.results):
            restored = kvcodec.decode(kvcodec.encode(ctx.cache, codec))
            logits = fidelity.continue_logits(restored, ctx.ids[:, ctx.prefix:-1], ctx.prefix)
            assert torch.equal(logits.log_softmax(-1), ctx.ref_logprobs)
            assert r.delta_ppl_pct == 0.0 and r.kl == 0.0 and r.top1 == 1.0 and r.ppl == r.ppl_ref
            assert r.greedy_match == r.greedy_of == GREEDY
            assert max(r.key_rel_err + r.value_rel_err) == 0.0
        assert report.mean["delta_ppl_pct"] == 0.0


def test_quant8_stays_under_half_a_percent(contexts):
    report = fidelity.evaluate_codec(contexts, "quant", {"bits": 8})
    for r in report.results:
        assert abs(r.delta_ppl_pct) < 0.5 and r.top1 >= 0.97 and 0 < max(r.value_rel_err) < 0.02
    assert report.mean["ratio"] == pytest.approx(1.87, abs=0.03)


def test_a_broken_codec_is_reported_as_a_large_loss(contexts):
    report = fidelity.evaluate_codec(contexts, "test-zero-values")
    m = report.mean
    assert m["delta_ppl_pct"] > 50 and m["kl"] > 1.0 and m["top1"] < 0.7
    assert all(max(r.value_rel_err) == 1.0 and max(r.key_rel_err) == 0.0 for r in report.results)


def test_more_bits_score_better(contexts):
    dppl = [fidelity.evaluate_codec(contexts[:1], "quant", {"bits": b}).mean["kl"] for b in (2, 4, 8)]
    assert dppl[0] > dppl[1] > dppl[2] > 0


def test_numbers_are_deterministic(contexts, real_model):
    a = fidelity.evaluate_codec(contexts[:1], "quant", {"bits": 3}).to_dict()
    again = fidelity.Context.from_text("prose", PREFIX, CONTINUATION, GREEDY)
    b = fidelity.evaluate_codec([again], "quant", {"bits": 3}).to_dict()
    assert a == b


def prune(cache: kvcodec.KVCache, keep: torch.Tensor) -> kvcodec.KVCache:
    return kvcodec.KVCache([kvcodec.LayerKV(l.key[:, :, keep], l.value[:, :, keep], keep.clone()) for l in cache.layers])


def test_pruned_cache_continues_at_original_positions(contexts, real_model):
    """Dropping tokens from the cache equals masking them out of the full cache's attention."""
    model, _ = real_model
    ctx = contexts[0]
    keep = torch.cat([torch.arange(0, 8), torch.arange(40, ctx.prefix)])
    pruned = prune(ctx.cache, keep)
    inputs = ctx.ids[:, ctx.prefix:-1]
    got = fidelity.continue_logits(pruned, inputs, ctx.prefix)
    mask = torch.ones(1, ctx.prefix + inputs.shape[1], dtype=torch.long)
    mask[:, 8:40] = 0
    positions = torch.arange(ctx.prefix, ctx.prefix + inputs.shape[1])[None]
    with torch.no_grad():
        masked = model(inputs, past_key_values=ctx.cache.to(dtype=torch.float32).to_hf(), attention_mask=mask,
                       position_ids=positions).logits[0]
        unmasked = model(inputs, past_key_values=ctx.cache.to(dtype=torch.float32).to_hf(),
                         position_ids=positions).logits[0]
    assert (got - masked).abs().max() < 1e-3
    assert (got - unmasked).abs().max() > 0.1  # the dropped tokens do matter, so the check can fail
    # positions that restart at the kept count (the naive way) give different predictions
    naive = fidelity.continue_logits(pruned, inputs, keep.numel())
    assert (naive - masked).abs().max() > 0.1
    data = kvcodec.encode(pruned, "raw")
    r = fidelity.score(ctx, kvcodec.decode(data), len(data))
    assert r.key_rel_err == [0.0] * 30 and r.kl > 1e-4  # kept tokens exact; dropping changes predictions


def test_kvc_eval_with_a_codec_and_with_a_file(tmp_path, real_model):
    runner = CliRunner()
    args = ["eval", "-c", "quant", "--opt", "bits=8", "--texts", "prose,data", "--prefix", "64", "--continuation", "32",
            "--greedy", "4"]
    out = runner.invoke(cli, args + ["--layers"])
    assert out.exit_code == 0, out.output
    assert "mean" in out.output and "relative reconstruction error per layer" in out.output
    # --json prints the report on stdout, as inspect and verify do, and no table
    out = runner.invoke(cli, args + ["--json"])
    assert out.exit_code == 0, out.output
    doc = json.loads(out.stdout)
    assert [t["text"] for t in doc["texts"]] == ["prose", "data"] and len(doc["texts"][0]["key_rel_err"]) == 30
    assert runner.invoke(cli, ["capture", "--tokens", "64", "-o", str(tmp_path / "c.pt"), "-q"]).exit_code == 0
    assert runner.invoke(cli, ["pack", str(tmp_path / "c.pt"), "-q"]).exit_code == 0
    out = runner.invoke(cli, ["eval", str(tmp_path / "c.kvc"), "--original", str(tmp_path / "c.pt"),
                              "--continuation", "32", "--greedy", "4", "--json"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.stdout)["mean"]["delta_ppl_pct"] == 0.0
    for args, pattern in ((["eval"], "either a codec"), (["eval", str(tmp_path / "c.kvc")], "--original"),
                          (["eval", "-c", "quant", "--texts", "poetry"], "unknown text"),
                          (["eval", "-c", "quant", "--json", "r.json"], "--json > r.json")):
        bad = runner.invoke(cli, args)
        assert bad.exit_code == 1 and pattern in bad.output


def test_kvc_bench_writes_table_json_and_plots(tmp_path, real_model):
    out = CliRunner().invoke(cli, ["bench", "--codec", "raw", "--codec", "quant:bits=4", "--codec", "quant:bits=2",
                                   "--texts", "prose", "--prefix", "64", "--continuation", "16", "--greedy", "2",
                                   "--repeat", "1", "--out", str(tmp_path), "-q"])
    assert out.exit_code == 0, out.output
    doc = json.loads((tmp_path / "bench.json").read_text())
    rows = {(r["codec"], r["options"].get("bits")): r for r in doc["rows"]}
    assert rows[("raw", None)]["delta_ppl_pct"] == 0.0 and rows[("raw", None)]["ratio"] == pytest.approx(1.0, abs=0.02)
    assert rows[("quant", 2)]["ratio"] > rows[("quant", 4)]["ratio"] > 3
    assert set(rows[("raw", None)]["ttft_s"]) == {"1", "10", "100"} and doc["prefill_s"] > 0
    assert rows[("raw", None)]["ttft_s"]["1"] > rows[("raw", None)]["ttft_s"]["100"]
    assert doc["repeat"] == 1 and doc["model"] == "smollm2" and all(r["speed_spread"] >= 0 for r in doc["rows"])
    for png in ("rate_distortion.png", "rate_kl.png", "ttft.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "quant" in out.output and "TTFT" in out.output


def test_cachegen_medium_beats_quant4_in_divergence(contexts):
    """On 128-token caches (where its per-file tables cost the most) cachegen's medium preset
    stays within 1.5 % perplexity and 97 % top-1 agreement, with a lower KL than 4-bit quant."""
    cachegen = fidelity.evaluate_codec(contexts, "cachegen", {"quality": "medium"}).mean
    quant = fidelity.evaluate_codec(contexts, "quant", {"bits": 4}).mean
    assert cachegen["abs_delta_ppl_pct"] < 1.5 and cachegen["top1"] >= 0.97
    assert cachegen["kl"] < quant["kl"] and cachegen["ratio"] > 2.5


def test_timings_are_medians_after_a_warm_up():
    from kvcodec.eval.bench import timed

    calls, durations = [], iter([0.0, 0.03, 0.01, 0.02])  # the warm-up first, then three runs

    def work():
        calls.append(1)
        time.sleep(next(durations))

    t = timed(work, 3)
    assert len(calls) == 4 and 0.019 < t.median < 0.03 and 0.5 < t.spread < 1.5


def test_plot_labels_tell_every_row_apart():
    """quant's default 4 bits beside 8 bits: a label shows the options that vary in its codec."""
    from kvcodec.eval.bench import BenchRow, label

    def row(codec, **options):
        return BenchRow(codec, options, False, 4.0, 3.0, 1.0, 1.0, None, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0)

    rows = [row("quant", bits=8, group_size=64), row("quant", bits=4, group_size=64),
            row("quant", bits=4, group_size=32), row("raw")]
    labels = [label(r, rows) for r in rows]
    assert labels == ["quant bits=8 group_size=64", "quant bits=4 group_size=64", "quant bits=4 group_size=32", "raw"]
    assert label(rows[1]) == "quant"  # alone, only what differs from the defaults
