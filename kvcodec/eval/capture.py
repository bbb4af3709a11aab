"""Capturing a real KV cache: run a development model (`models`: SmolLM2-135M, Gemma-3-270M,
shipped in wheels) on a text. Nothing is downloaded."""

from __future__ import annotations

import hashlib

import torch

from kvcodec.cache import KVCache
from kvcodec.errors import InputError
from kvcodec.eval import models
from kvcodec.eval.texts import DEFAULT_TOKENS, DEFAULT_WINDOW, read_text


def load_model(model: str | None = None):
    """(model, tokenizer) of a development model (`models.MODELS`, default SmolLM2)."""
    return models.load(models.model_named(model).name)


def tokenize(text: str, tokens: int | None, model: str | None = None) -> torch.Tensor:
    """The first `tokens` token ids of `text` as a [1, n] tensor."""
    ids = models.tokenizer(models.model_named(model).name)(text, return_tensors="pt").input_ids
    if tokens is not None:
        if ids.shape[1] < tokens:
            raise InputError(f"the text has {ids.shape[1]} tokens, fewer than the {tokens} asked for")
        ids = ids[:, :tokens]
    return ids


@torch.no_grad()
def prefill(ids: torch.Tensor, window: int | None = None, model: str | None = None):
    """Run the model on `ids`; return (logits, DynamicCache, AttentionScores or None).

    With `window`, attention runs eagerly and records the statistics selection methods need,
    with the last `window` queries of every layer."""
    lm, _ = load_model(model)
    if window is None:
        out = lm(ids, use_cache=True)
        return out.logits, out.past_key_values, None
    from kvcodec.eval.attention import Statistics, hooked
    from kvcodec.selection.scores import AttentionScores

    with hooked(lm, Statistics(window)) as stats:
        out = lm(ids, use_cache=True)
    layers = range(len(stats.attention))
    return out.logits, out.past_key_values, AttentionScores([stats.attention[i] for i in layers],
                                                            [stats.queries_of[i] for i in layers])


def capture_with_scores(text=None, tokens: int | None = DEFAULT_TOKENS, dtype: torch.dtype = torch.float16,
                        window: int | None = DEFAULT_WINDOW, model: str | None = None):
    """(KVCache, AttentionScores or None) of a model (default SmolLM2) after reading `tokens`
    tokens of `text`."""
    name, contents = read_text(text)
    ids = tokenize(contents, tokens, model)
    _, past, scores = prefill(ids, window, model)
    meta = {
        "model": models.model_named(model).title,
        "text": name,
        "text_sha256": hashlib.sha256(contents.encode()).hexdigest(),
        "tokens": str(ids.shape[1]),
    }
    cache = KVCache.from_hf(past, metadata=meta).to(dtype=dtype)
    cache.token_ids = ids.to(torch.int64)
    cache.layout = "dict"
    return cache, scores


def capture(text=None, tokens: int | None = DEFAULT_TOKENS, dtype: torch.dtype = torch.float16,
            model: str | None = None) -> KVCache:
    """The KV cache of a model (default SmolLM2) after reading `tokens` tokens of `text`."""
    return capture_with_scores(text, tokens, dtype, window=None, model=model)[0]
