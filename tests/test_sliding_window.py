"""Sliding-window layers: a model's cache keeps only the tail of the sequence in them; their
window and positions travel in the file (spec 3.2, version 1.2) and a restored cache continues
exactly like the original. On a small randomly initialised Gemma-3 (the architecture of our
second development model: sliding layers beside full ones, MQA); the real model is in
test_real_model.py."""

from __future__ import annotations

import copy

import pytest
import torch

import kvcodec
from kvcodec import InputError, KVCache, LayerKV
from kvcodec import cachefiles
from kvcodec.registry import selector_class

transformers = pytest.importorskip("transformers")

WINDOW, PREFIX, MORE = 8, 20, 10
LAYER_TYPES = ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"]


@pytest.fixture(scope="module")
def model():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    config = Gemma3TextConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=16, sliding_window=WINDOW,
                              layer_types=LAYER_TYPES, max_position_embeddings=256)
    torch.manual_seed(0)
    return Gemma3ForCausalLM(config).eval()


@pytest.fixture(scope="module")
def prefilled(model):
    ids = torch.randint(0, 97, (1, PREFIX + MORE), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        past = model(ids[:, :PREFIX], use_cache=True).past_key_values
    return ids, past


def continued(model, ids, past) -> torch.Tensor:
    with torch.no_grad():
        return model(ids[:, PREFIX:], past_key_values=past).logits


def test_from_hf_records_windows_and_the_positions_the_layers_hold(prefilled):
    _, past = prefilled
    cache = KVCache.from_hf(past)
    assert [lay.window for lay in cache.layers] == [WINDOW, WINDOW, None, WINDOW]
    assert cache.length == PREFIX and cache.next_position == PREFIX
    tail = torch.arange(PREFIX - WINDOW + 1, PREFIX)
    for lay, kind in zip(cache.layers, LAYER_TYPES):
        if kind == "sliding_attention":
            assert lay.key.shape[2] == WINDOW - 1 and torch.equal(lay.positions[0], tail)
        else:
            assert lay.key.shape[2] == PREFIX and lay.positions is None


@pytest.mark.parametrize("codec", ["raw", "zstd"])
@pytest.mark.parametrize("with_config", [False, True])
def test_lossless_restore_continues_exactly(model, prefilled, codec, with_config):
    ids, past = prefilled
    want = continued(model, ids, copy.deepcopy(past))
    restored = kvcodec.decode(kvcodec.encode(KVCache.from_hf(past), codec))
    hf = restored.to_hf(config=model.config if with_config else None)
    assert [type(lay).__name__ for lay in hf.layers] == [type(lay).__name__ for lay in past.layers]
    assert [lay.cumulative_length for lay in hf.layers if lay.is_sliding] == [PREFIX] * 3
    assert torch.equal(continued(model, ids, hf), want)
    greedy = dict(max_new_tokens=6, do_sample=False)
    assert torch.equal(model.generate(ids[:, :PREFIX + 1], past_key_values=kvcodec.open(
        kvcodec.encode(KVCache.from_hf(past), codec)).to_hf(), **greedy),
        model.generate(ids[:, :PREFIX + 1], past_key_values=copy.deepcopy(past), **greedy))


def test_a_cache_without_windows_is_restored_by_the_models_config(model, prefilled):
    """Files written before version 1.2 keep no window: the config says which layers slide,
    and they hold the tail of the sequence."""
    ids, past = prefilled
    plain = KVCache([LayerKV(lay.key, lay.value) for lay in KVCache.from_hf(past).layers])
    assert plain.next_position == PREFIX
    assert torch.equal(continued(model, ids, plain.to_hf(config=model.config)),
                       continued(model, ids, copy.deepcopy(past)))


def test_a_window_the_config_contradicts_is_refused(model, prefilled):
    _, past = prefilled
    cache = KVCache.from_hf(past)
    cache.layers[2].window = 4  # the config says full attention
    with pytest.raises(InputError, match="layer 2 has an attention window of 4 tokens; the model's config says full"):
        cache.to_hf(config=model.config)
    cache = KVCache.from_hf(past)
    cache.layers[0].window = WINDOW + 1
    with pytest.raises(InputError, match=f"says {WINDOW}"):
        cache.to_hf(config=model.config)


def test_a_sliding_layer_that_does_not_hold_the_tail_is_refused(prefilled):
    _, past = prefilled
    cache = KVCache.from_hf(past)
    lay = cache.layers[0]
    cache.layers[0] = LayerKV(lay.key[:, :, :-1], lay.value[:, :, :-1], lay.positions[:, :-1], WINDOW)
    with pytest.raises(InputError, match="layer 0 is a sliding-window layer of 8 tokens holding 6 tokens that are not"):
        cache.to_hf()


def test_windows_are_checked_and_written_only_when_present():
    key = torch.zeros(1, 1, 3, 4, dtype=torch.float16)
    with pytest.raises(InputError, match="layer 0 window must be an integer"):
        KVCache([LayerKV(key, key, window=0)])
    with pytest.raises(InputError, match="layer 0 window must be an integer"):
        KVCache([LayerKV(key, key, window=True)])
    plain = kvcodec.encode(KVCache([LayerKV(key, key)]), "raw")
    sliding = kvcodec.encode(KVCache([LayerKV(key, key, window=4)]), "raw")
    assert (plain[10], sliding[10]) == (1, 2)  # the preamble's minor version: the lowest that holds the file
    assert b'"window"' not in plain and b'"window":4' in sliding
    assert kvcodec.open(sliding).info()["format_version"] == "1.2"


@pytest.mark.parametrize("name", ["cache.pt", "cache.safetensors"])
def test_cache_files_keep_windows(tmp_path, prefilled, name):
    _, past = prefilled
    cache = KVCache.from_hf(past)
    cachefiles.save_cache(cache, tmp_path / name)
    back = cachefiles.load_cache(tmp_path / name)
    assert [lay.window for lay in back.layers] == [lay.window for lay in cache.layers]
    assert back.length == PREFIX and torch.equal(back.layers[0].positions, cache.layers[0].positions)


def test_tensor_only_layouts_refuse_what_they_would_drop(tmp_path, prefilled):
    _, past = prefilled
    with pytest.raises(InputError, match="layout 'legacy' holds tensors only"):
        cachefiles.save_cache(KVCache.from_hf(past), tmp_path / "c.pt", layout="legacy")


def test_selection_prunes_full_layers_and_keeps_sliding_ones(model, prefilled):
    ids, past = prefilled
    cache = KVCache.from_hf(past)
    pruned = selector_class("streamingllm")(keep=10, sink=2).select(cache)
    for before, after in zip(cache.layers, pruned.layers):
        if before.window is not None:
            assert after is before
        else:
            assert after.key.shape[2] == 10 and after.positions[0].tolist() == [0, 1] + list(range(12, 20))
    restored = kvcodec.decode(kvcodec.encode(pruned, "raw"))
    assert restored.length == PREFIX
    assert continued(model, ids, restored.to_hf()).isfinite().all()


def test_a_prefix_store_refuses_sliding_layers(prefilled):
    _, past = prefilled
    store = kvcodec.PrefixStore(kvcodec.MemoryBackend(), model_id="tiny-gemma", codec="raw", chunk_tokens=8)
    with pytest.raises(InputError, match="layer 0 is a sliding-window layer"):
        store.put(KVCache.from_hf(past), token_ids=torch.arange(PREFIX))
