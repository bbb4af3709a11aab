"""Methods that choose by position alone, needing no scores: StreamingLLM and LaCache."""

from __future__ import annotations

import math

import torch

from kvcodec.errors import InputError
from kvcodec.selection.base import Selector, check_amount, check_count, resolve


class StreamingLLM(Selector):
    """Attention sinks (the first `sink` tokens) plus the most recent tokens, `keep` in all."""

    codec_id = 20
    name = "streamingllm"
    description = "attention sinks + recent window (no scores needed)"

    def __init__(self, keep: int | float = 0.5, sink: int | float = 4):
        check_amount("keep", keep, allow_zero=False)
        check_amount("sink", sink)
        self.keep, self.sink = keep, sink

    def forced(self, tokens):
        budget = self.budget(tokens)
        sinks = min(resolve(self.sink, tokens), budget)
        mask = torch.zeros(tokens, dtype=torch.bool)
        mask[:sinks] = True
        mask[tokens - (budget - sinks):] = True
        return mask


class LaCache(Selector):
    """The ladder: past the `start_size` sink tokens, the older context is cut into blocks and each
    layer keeps a different slice of every block, lower layers earlier tokens and higher layers
    later ones, so each token lives in about `span` consecutive layers (`overlap` of them shared
    with the next token's span) and the stack as a whole still covers the context. The most recent
    tokens stay whole. Every layer keeps `cache_size` tokens (a count or a ratio)."""

    codec_id = 21
    name = "lacache"
    description = "ladder-shaped spans across layers (no scores needed)"

    def __init__(self, cache_size: int | float = 0.5, span: int = 16, overlap: int = 0, start_size: int = 4):
        check_amount("cache_size", cache_size, allow_zero=False)
        check_count("span", span, 1)
        check_count("overlap", overlap)
        check_count("start_size", start_size)
        if overlap >= span:
            raise ValueError(f"overlap ({overlap}) must be smaller than span ({span})")
        self.cache_size, self.span, self.overlap, self.start_size = cache_size, span, overlap, start_size

    def budget(self, tokens):
        return resolve(self.cache_size, tokens)

    def keep_indices(self, layer, num_layers, lay, scores):
        heads, tokens = lay.key.shape[1], lay.key.shape[2]
        kept = ladder(tokens, layer, num_layers, self.budget(tokens), self.span, self.overlap, self.start_size)
        return kept.expand(heads, -1)


def ladder(tokens: int, layer: int, num_layers: int, budget: int, span: int, overlap: int, start: int) -> torch.Tensor:
    """Ascending positions layer `layer` of `num_layers` keeps, exactly `budget` of `tokens`."""
    if budget >= tokens:
        return torch.arange(tokens)
    step = span - overlap
    block = 1 + math.ceil(max(num_layers - span, 0) / step)  # tokens whose spans tile the layers once
    per_block = min(math.ceil(span / step), block)  # of which each layer keeps this many
    start = min(start, budget)
    if budget < start + per_block:
        raise InputError(f"lacache: a budget of {budget} tokens cannot hold the {start} start tokens and a ladder "
                         f"of {per_block} per block; raise cache_size or lower start_size")
    excess = tokens - budget
    block = max(block, per_block + 1)
    while True:  # widen the blocks until enough of them fit before the recent tokens
        blocks = math.ceil(excess / (block - per_block))
        if start + blocks * block <= tokens:
            break
        block += 1
    offset = round(layer * (block - per_block) / (num_layers - 1)) if num_layers > 1 else 0
    keep = torch.ones(tokens, dtype=torch.bool)
    ladder_part = keep[start:start + blocks * block].view(blocks, block)
    ladder_part[:] = False
    ladder_part[:, offset:offset + per_block] = True
    shortfall = budget - int(keep.sum())  # the last block dropped a few more than needed
    if shortfall > 0:
        dropped = (~keep).nonzero().flatten()
        keep[dropped[-shortfall:]] = True
    return keep.nonzero().flatten()
