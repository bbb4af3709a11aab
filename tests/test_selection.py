"""Token selection stages on synthetic caches: exact budgets, sinks and recent windows kept,
determinism, what each method ranks by, pipelines and the pruned container."""

from __future__ import annotations

import json
import struct
import zlib

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

import kvcodec
from kvcodec import cachefiles
from kvcodec.container import positions
from kvcodec.encoding import pipeline
from kvcodec.errors import CodecError, FormatError, InputError
from kvcodec.selection import CaM, LaCache
from kvcodec.selection.positional import ladder
from kvcodec.selection.scores import AttentionScores
from kvcodec.tools.cli import cli

from conftest import synthetic_cache

TOKENS, HEADS, QUERY_HEADS, WINDOW = 64, 2, 6, 32
METHODS = ["streamingllm", "h2o", "keyformer", "snapkv", "knorm", "lacache", "cam"]


def budget_options(method: str, keep) -> dict:
    """Options asking `method` to keep `keep` (a count or a ratio) of the tokens."""
    if method == "lacache":
        return {"cache_size": keep}
    if method == "cam":
        half = keep // 2 if isinstance(keep, int) else keep / 2
        return {"start_ratio": half, "recent_ratio": keep - half}
    return {"keep": keep}


def make_scores(cache, seed=0, window=WINDOW) -> AttentionScores:
    g = torch.Generator().manual_seed(seed)
    attention = [torch.rand(lay.key.shape[:3], generator=g) * 10 for lay in cache.layers]
    queries = [torch.randn(lay.key.shape[0], QUERY_HEADS, window, lay.key.shape[3], generator=g) for lay in cache.layers]
    return AttentionScores(attention, queries)


@pytest.fixture
def cache():
    return synthetic_cache(layers=4, heads=HEADS, tokens=TOKENS, dtype=torch.float32, token_ids=True)


def select(method, cache, scores=None, **options):
    return kvcodec.selector_class(method).from_config(options).select(cache, scores)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("keep, expected", [(0.5, 32), (0.25, 16), (20, 20)])
def test_each_method_keeps_exactly_its_budget(cache, method, keep, expected):
    pruned = select(method, cache, make_scores(cache), **budget_options(method, keep))
    assert pruned.length == TOKENS and pruned.selection["name"] == method
    for lay in pruned.layers:
        assert lay.key.shape == (1, HEADS, expected, 16) and lay.value.shape == (1, HEADS, expected, 16)
        rows = lay.positions.expand(HEADS, -1)
        assert bool((rows[:, 1:] > rows[:, :-1]).all()) and int(rows.max()) < TOKENS


@pytest.mark.parametrize("method", METHODS)
def test_kept_tokens_hold_the_original_keys(cache, method):
    pruned = select(method, cache, make_scores(cache))
    for full, lay in zip(cache.layers, pruned.layers):
        rows = lay.positions.expand(HEADS, -1)
        for h in range(HEADS):
            assert torch.equal(lay.key[0, h], full.key[0, h, rows[h]])
            if method != "cam":  # CaM merges dropped values into the kept ones
                assert torch.equal(lay.value[0, h], full.value[0, h, rows[h]])


@pytest.mark.parametrize("method, options, always", [
    ("streamingllm", {"keep": 20, "sink": 4}, [0, 1, 2, 3] + list(range(48, 64))),
    ("h2o", {"keep": 20, "recent": 6}, list(range(58, 64))),
    ("h2o", {"keep": 0.5}, list(range(48, 64))),  # recent defaults to half the budget
    ("keyformer", {"keep": 20, "recent": 0.125}, list(range(56, 64))),
    ("snapkv", {"keep": 20, "window": 8}, list(range(56, 64))),
    ("knorm", {"keep": 20, "sink": 2, "recent": 3}, [0, 1, 61, 62, 63]),
    ("lacache", {"cache_size": 20, "start_size": 4}, [0, 1, 2, 3, 63]),
    ("cam", {"start_ratio": 5, "recent_ratio": 0.25}, list(range(5)) + list(range(48, 64))),
])
def test_sinks_and_recent_windows_are_always_kept(cache, method, options, always):
    for seed in range(3):  # whatever the scores say
        pruned = select(method, cache, make_scores(cache, seed), **options)
        for lay in pruned.layers:
            for row in lay.positions.expand(HEADS, -1).tolist():
                assert set(always) <= set(row)


@pytest.mark.parametrize("method", METHODS)
def test_selection_is_deterministic(cache, method):
    scores = make_scores(cache)
    a, b = select(method, cache, scores), select(method, cache, scores)
    assert a.equal(b) and all(torch.equal(x.positions, y.positions) for x, y in zip(a.layers, b.layers))


def test_keyformer_noise_is_seeded_and_matters(cache):
    scores = make_scores(cache)
    chosen = [select("keyformer", cache, scores, keep=0.25, recent=4, seed=s).layers[0].positions for s in range(4)]
    assert any(not torch.equal(chosen[0], c) for c in chosen[1:])  # the noise changes the choice
    assert torch.equal(chosen[0], select("keyformer", cache, scores, keep=0.25, recent=4, seed=0).layers[0].positions)


def test_h2o_keeps_the_heavy_hitters(cache):
    scores = make_scores(cache)
    for att in scores.attention:
        att.fill_(0.1)
        att[0, 0, [5, 9, 30]] = 50.0
        att[0, 1, [7, 8]] = 50.0
    pruned = select("h2o", cache, scores, keep=6, recent=3)
    # head 1 has one heavy slot left over: ties go to the earliest token
    assert pruned.layers[2].positions.tolist() == [[5, 9, 30, 61, 62, 63], [0, 7, 8, 61, 62, 63]]


def test_knorm_keeps_the_smallest_keys(cache):
    lay = cache.layers[1]
    lay.key[0, :, [3, 17, 40]] *= 1e-3
    pruned = select("knorm", cache, keep=3)
    assert pruned.layers[1].positions.expand(HEADS, -1).tolist() == [[3, 17, 40], [3, 17, 40]]


def test_snapkv_follows_the_observation_window(cache):
    scores = make_scores(cache)
    for i, lay in enumerate(cache.layers):  # every window query points at token 20's key
        lay.key[:, :, 20] = 10 * torch.eye(16)[1]
        scores.queries[i][:] = 10 * torch.eye(16)[1]
    pruned = select("snapkv", cache, scores, keep=10, window=8, kernel=1)
    assert all(20 in row for lay in pruned.layers for row in lay.positions.expand(HEADS, -1).tolist())


def test_lacache_ladder_covers_the_context_across_layers():
    layers = 30
    kept = [ladder(1000, i, layers, 500, 16, 0, 4) for i in range(layers)]
    assert all(len(k) == 500 for k in kept)
    assert len({tuple(k.tolist()) for k in kept}) > 1  # layers keep different spans
    assert set().union(*(k.tolist() for k in kept)) == set(range(1000))  # the stack covers the context
    first_after_sinks = [int(k[4]) for k in kept]
    assert first_after_sinks == sorted(first_after_sinks)  # lower layers keep earlier tokens of each block
    assert first_after_sinks[0] < first_after_sinks[-1]  # ... and higher layers later ones: a ladder
    with pytest.raises(InputError, match="cannot hold"):
        ladder(1000, 0, layers, 4, 16, 0, 4)
    with pytest.raises(CodecError, match="overlap"):
        LaCache.from_config({"span": 4, "overlap": 4})


def test_cam_merges_dropped_values_forward(cache):
    tiny = synthetic_cache(layers=1, heads=1, tokens=5, dtype=torch.float32)
    scores = AttentionScores([torch.ones(1, 1, 5)], [torch.zeros(1, 1, 1, 16)])
    v = tiny.layers[0].value[0, 0].double()
    pruned = CaM(start_ratio=1, recent_ratio=1, merge_span=1).select(tiny, scores)
    # tokens 1, 2, 3 are dropped in turn, each adding its (already merged) value to the next one
    assert pruned.layers[0].positions.tolist() == [[0, 4]]
    expected = torch.stack([v[0], v[1] + v[2] + v[3] + v[4]]).float()
    assert torch.allclose(pruned.layers[0].value[0, 0], expected, atol=1e-6)
    quiet = AttentionScores([torch.tensor([[[1.0, 0, 0, 0, 1.0]]])], scores.queries)
    unmerged = CaM(start_ratio=1, recent_ratio=1, merge_span=1).select(tiny, quiet)  # no attention: nothing merged
    assert torch.equal(unmerged.layers[0].value[0, 0], tiny.layers[0].value[0, 0, [0, 4]])


def test_methods_without_their_scores_fail_clearly(cache):
    for method in ("h2o", "keyformer", "snapkv", "cam"):
        with pytest.raises(InputError, match="needs attention scores.*need none: knorm, streamingllm, lacache$"):
            select(method, cache)
    wrong = make_scores(synthetic_cache(layers=4, heads=HEADS, tokens=TOKENS + 1))
    with pytest.raises(InputError, match="attention scores have shape"):
        select("h2o", cache, wrong)
    with pytest.raises(InputError, match="exceed the budget"):
        select("h2o", cache, make_scores(cache), keep=10, recent=11)
    with pytest.raises(CodecError, match="keep"):
        kvcodec.selector_class("h2o").from_config({"keep": 1.5})
    with pytest.raises(CodecError, match="keep"):
        kvcodec.selector_class("knorm").from_config({"keep": True})


def test_scores_save_and_load(tmp_path, cache):
    scores = make_scores(cache)
    scores.save(tmp_path / "s.scores.safetensors")
    back = AttentionScores.load(tmp_path / "s.scores.safetensors")
    assert all(torch.equal(a, b) for a, b in zip(scores.attention + scores.queries, back.attention + back.queries))
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(InputError, match="not a readable"):
        AttentionScores.load(tmp_path / "bad.safetensors")
    cachefiles.save_cache(cache, tmp_path / "cache.safetensors")
    with pytest.raises(InputError, match="not a kvcodec scores file"):
        AttentionScores.load(tmp_path / "cache.safetensors")


# -- pipelines ----------------------------------------------------------------------------------
def test_pipeline_routes_options_to_their_stage():
    pipe = pipeline.parse("h2o+quant", {"keep": 0.25, "bits": 8, "h2o.recent": 4})
    assert pipe.selector.get_config() == {"keep": 0.25, "recent": 4} and pipe.options == {"bits": 8}
    pipe = pipeline.parse("knorm", {"keep": 0.5})
    assert pipe.codec == "raw" and pipe.selector.keep == 0.5
    assert pipeline.parse("quant", {"bits": 2}).selector is None


@pytest.mark.parametrize("spec, options, message", [
    ("cachegen+h2o", {}, "is a value codec"),
    ("h2o+snapkv", {}, "one selection stage"),
    ("h2o+quant+raw", {}, r"SELECTION\+CODEC"),
    ("h2o+", {}, r"SELECTION\+CODEC"),
    ("nope+quant", {}, "unknown selection method 'nope'"),
    ("h2o+nope", {}, "unknown codec 'nope'"),
    ("h2o+quant", {"bogus": 1}, r"no stage of 'h2o\+quant' has option 'bogus'"),
    ("h2o+quant", {"zstd.level": 1}, "names stage 'zstd'"),
])
def test_bad_pipelines_are_refused(spec, options, message):
    with pytest.raises(CodecError, match=message):
        pipeline.checked(spec, options)


def test_an_option_two_stages_share_must_be_addressed():
    class Sinky(kvcodec.Codec):  # a value codec that also has a `sink` option
        codec_id, name, lossless, max_expansion = 4001, "sinky", True, 1.0

        def __init__(self, sink: int = 0):
            self.sink = sink

    kvcodec.register_codec(Sinky)
    with pytest.raises(CodecError, match="knorm.sink or sinky.sink"):
        pipeline.parse("knorm+sinky", {"sink": 2})
    pipe = pipeline.parse("knorm+sinky", {"knorm.sink": 2, "sinky.sink": 3})
    assert pipe.selector.sink == 2 and pipe.options == {"sink": 3}


@pytest.mark.parametrize("codec", ["raw", "quant", "cachegen"])
def test_pruned_cache_round_trips_through_the_container(cache, codec):
    scores = make_scores(cache)
    data = kvcodec.encode(cache, f"h2o+{codec}", scores=scores, keep=0.25, chunk_tokens=8)
    back = kvcodec.decode(data)
    pruned = select("h2o", cache, scores, keep=0.25)
    assert back.length == TOKENS and back.next_position == TOKENS and back.selection == pruned.selection
    for a, b in zip(back.layers, pruned.layers):
        assert torch.equal(a.positions, b.positions)
        if codec == "raw":
            assert torch.equal(a.key, b.key) and torch.equal(a.value, b.value)
    assert torch.equal(back.token_ids, cache.token_ids)
    with kvcodec.open(data) as reader:
        info = reader.info()
    assert info["selection"]["name"] == "h2o" and info["length"] == TOKENS
    assert [lay["kept"] for lay in info["layers"]] == [0.25] * 4


def test_positions_cost_little(cache):
    scores = make_scores(cache)
    for method in ("streamingllm", "h2o"):
        pruned = select(method, cache, scores, keep=0.5)
        stored = sum(len(positions.encode(l.positions.numpy())) for l in pruned.layers)
        as_int64 = sum(l.positions.numel() * 8 for l in pruned.layers)
        assert stored * 4 < as_int64  # runs for windows, bitmaps for scattered heavy hitters


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sets(st.integers(0, 5000), min_size=3, max_size=3).map(sorted), min_size=1, max_size=3),
       st.integers(0, 2**40))
def test_positions_encoding_round_trips(rows, shift):
    rows = np.array(rows, dtype=np.int64) + shift
    data = positions.encode(rows)
    assert np.array_equal(positions.decode(data, len(rows), 3), rows)


def test_positions_decoder_refuses_damage():
    rows = np.array([[0, 1, 2, 90, 91], [3, 7, 8, 20, 21]])
    data = positions.encode(rows)
    for cut in range(len(data)):
        with pytest.raises(FormatError):
            positions.decode(data[:cut], 2, 5)
    with pytest.raises(FormatError):
        positions.decode(data + b"\0", 2, 5)
    with pytest.raises(FormatError):
        positions.decode(data, 2, 4)
    rng = np.random.default_rng(0)
    for _ in range(2000):  # mutated bytes: decoded exactly or refused, never another exception
        bad = bytearray(data)
        bad[rng.integers(len(bad))] = rng.integers(256)
        try:
            out = positions.decode(bytes(bad), 2, 5)
        except FormatError:
            continue
        assert out.shape == (2, 5) and bool((np.diff(out, axis=1) > 0).all())
    huge = bytes([0]) + (2**32 - 1).to_bytes(4, "little")  # claims 4 billion runs in 5 bytes
    with pytest.raises(FormatError, match="truncated"):
        positions.decode(huge, 1, 5)
    with pytest.raises(ValueError, match="strictly increasing"):
        positions.encode(np.array([[3, 2]]))


def test_reader_refuses_positions_past_the_length(cache):
    pruned = select("streamingllm", cache, keep=8)
    pruned.length = 70
    data = bytearray(kvcodec.encode(pruned))
    header = data.find(b'"length":70')
    data[header:header + 11] = b'"length":63'  # still >= tokens, but below the last position
    length = struct.unpack_from("<I", data, 12)[0]  # re-seal the header's checksum
    struct.pack_into("<I", data, 28, zlib.crc32(bytes(data[32:32 + length]), zlib.crc32(bytes(data[:28]))))
    with pytest.raises(FormatError, match="outside the cache's length"):
        kvcodec.decode(bytes(data))


# -- the command line ---------------------------------------------------------------------------
def kvc(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    return result.exit_code, result.output


def test_cli_pack_pipeline_with_scores_beside_the_cache(tmp_path, cache):
    cachefiles.save_cache(cache, tmp_path / "c.pt")
    code, out = kvc("pack", tmp_path / "c.pt", "-c", "h2o+quant", "--opt", "keep=0.5")
    assert code == 1 and "needs attention scores" in out and "c.scores.safetensors" in out
    assert "Traceback" not in out and not (tmp_path / "c.kvc").exists()
    make_scores(cache).save(tmp_path / "c.scores.safetensors")
    code, out = kvc("pack", tmp_path / "c.pt", "-c", "h2o+quant", "--opt", "h2o.keep=0.5", "--opt", "bits=8")
    assert code == 0, out
    code, out = kvc("inspect", tmp_path / "c.kvc")
    assert code == 0 and "pipeline: h2o keep=0.5" in out and "+ quant bits=8" in out and "50.0%" in out
    code, out = kvc("inspect", tmp_path / "c.kvc", "--json")
    info = json.loads(out)
    assert info["selection"]["config"]["keep"] == 0.5 and info["codecs"][0]["name"] == "quant"
    code, out = kvc("pack", tmp_path / "c.pt", "-c", "knorm", "-o", tmp_path / "k.kvc", "--opt", "keep=8")
    assert code == 0, out
    assert kvcodec.unpack(tmp_path / "k.kvc").layers[0].key.shape[2] == 8
    code, out = kvc("pack", tmp_path / "c.pt", "-c", "snapkv", "-o", tmp_path / "s.kvc",
                    "--scores", tmp_path / "missing.safetensors")
    assert code == 1 and "no such scores file" in out
    code, out = kvc("codecs", "--json")
    listed = json.loads(out)
    assert {s["name"] for s in listed["selection"]} == set(METHODS)
    assert {s["name"] for s in listed["selection"] if not s["needs_scores"]} == {"streamingllm", "lacache", "knorm"}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("tokens", [1, 3, 7])
def test_tiny_and_batched_caches(method, tokens):
    cache = synthetic_cache(layers=2, batch=2, heads=HEADS, tokens=tokens, dtype=torch.float16)
    scores = make_scores(cache, window=tokens)  # as captured: every query when there are fewer than the window
    try:
        pruned = select(method, cache, scores, **budget_options(method, 0.5))
    except InputError as exc:  # only the ladder has a floor: its start tokens plus one per block
        assert method == "lacache" and "cannot hold" in str(exc)
        return
    share = lambda f: max(round(tokens * f), 1)  # noqa: E731  (a positive ratio keeps at least one token)
    expected = share(0.5) if method != "cam" else share(0.25) + min(tokens - share(0.25), share(0.25))
    assert all(lay.key.shape == (2, HEADS, expected, 16) for lay in pruned.layers)
    assert kvcodec.decode(kvcodec.encode(pruned, "quant")).layers[1].positions.shape[1] == expected
