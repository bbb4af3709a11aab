"""CaM: cache merging. Tokens leaving the window are merged into the tokens that stay instead
of being discarded."""

from __future__ import annotations

import torch

from kvcodec.cache import LayerKV
from kvcodec.selection.base import Selector, check_amount, check_count, gather, resolve, summed_over_batch


class CaM(Selector):
    """Keeps the first `start_ratio` and the last `recent_ratio` of the tokens (StreamingLLM's
    pattern) and, walking the dropped tokens in the order a streaming cache evicts them, adds
    each one's value, divided by `merge_span`, to the `merge_span` tokens after it, with the
    probability its accumulated attention bears to the largest a kept token received (CaM's
    sampling by attention prominence). Merged values carry on when those tokens are evicted in
    turn, so the final recent window holds what the dropped tokens contributed. Keys are
    untouched. The sampling is seeded."""

    codec_id = 22
    name = "cam"
    description = "start + recent tokens, dropped values merged by attention (needs scores)"
    needs_scores = True

    def __init__(self, start_ratio: int | float = 0.1, recent_ratio: int | float = 0.1, merge_span: int | None = None,
                 seed: int = 0):
        check_amount("start_ratio", start_ratio)
        check_amount("recent_ratio", recent_ratio, allow_zero=False)
        if merge_span is not None:
            check_count("merge_span", merge_span, 1)
        check_count("seed", seed)
        self.start_ratio, self.recent_ratio, self.merge_span, self.seed = start_ratio, recent_ratio, merge_span, seed

    def counts(self, tokens: int) -> tuple[int, int]:
        start = resolve(self.start_ratio, tokens)
        return start, min(tokens - start, resolve(self.recent_ratio, tokens))

    def budget(self, tokens):
        return sum(self.counts(tokens))

    def forced(self, tokens):
        start, recent = self.counts(tokens)
        mask = torch.zeros(tokens, dtype=torch.bool)
        mask[:start] = True
        mask[tokens - recent:] = True
        return mask

    def merge(self, layer, lay, kept, scores):
        tokens = lay.key.shape[2]
        start, recent = self.counts(tokens)
        span = self.merge_span or recent
        kept_mask = self.forced(tokens)
        dropped = range(start, tokens - recent)
        if not len(dropped) or not bool(kept_mask.any()):
            return gather(lay, kept)
        attention = summed_over_batch(scores.attention[layer])  # [heads, tokens]
        prominence = attention[:, kept_mask].max(dim=1).values.clamp_min(1e-300)
        probability = (attention[:, start:tokens - recent] / prominence[:, None]).clamp(0, 1)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + layer)
        values = lay.value.double().clone()
        chosen = torch.bernoulli(probability, generator=generator).to(values.device)  # [heads, dropped]
        for j, t in enumerate(dropped):
            share = values[:, :, t, :] * (chosen[:, j] / span)[None, :, None]
            values[:, :, t + 1:t + 1 + span, :] += share[:, :, None, :]
        merged = LayerKV(lay.key, values.to(lay.value.dtype), lay.positions)
        return gather(merged, kept)
