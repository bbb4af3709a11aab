"""Eager attention with hooks, for the work that needs to see inside the model's attention:
recording attention statistics during a prefill (what H2O, SnapKV, Keyformer and CaM select
by) and hiding chosen cached tokens per (layer, KV head) (the masked reference a pruned cache
is judged against).

The function is registered with transformers' attention interface under `IMPLEMENTATION` and
is switched on only inside `hooked(model, hook)`.
"""

from __future__ import annotations

import contextlib

import torch

IMPLEMENTATION = "kvcodec_eager"
_active = None


QUERY_BLOCK = 1024  # queries per block: a block's logits are [batch, heads, QUERY_BLOCK, keys]


class Hook:
    """Called by every attention layer; subclasses override what they need."""

    def queries(self, layer: int, query: torch.Tensor) -> None:
        """The layer's queries [batch, query heads, queries, head_dim], rotated."""

    def logits(self, layer: int, logits: torch.Tensor, groups: int) -> torch.Tensor:
        """Attention logits [batch, query heads, queries of a block, keys] before the softmax."""
        return logits

    def probabilities(self, layer: int, probs: torch.Tensor, groups: int) -> None:
        """Attention probabilities of a block of queries after the softmax."""


def _attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Eager attention computed a block of queries at a time, so a long prefill never holds
    the whole [queries, keys] matrix of every head at once."""
    groups, layer = module.num_key_value_groups, module.layer_idx
    key = key.repeat_interleave(groups, dim=1)
    value = value.repeat_interleave(groups, dim=1)
    if _active is not None:
        _active.queries(layer, query)
    outputs = []
    for start in range(0, query.shape[2], QUERY_BLOCK):
        block = slice(start, start + QUERY_BLOCK)
        logits = torch.matmul(query[:, :, block], key.transpose(2, 3)) * scaling
        if attention_mask is not None:
            logits = logits + attention_mask[:, :, block, : key.shape[-2]]
        if _active is not None:
            logits = _active.logits(layer, logits, groups)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32).to(query.dtype)
        if _active is not None:
            _active.probabilities(layer, probs, groups)
        outputs.append(torch.matmul(probs, value))
    return torch.cat(outputs, dim=2).transpose(1, 2).contiguous(), None


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(IMPLEMENTATION, _attention)
    AttentionMaskInterface.register(IMPLEMENTATION, eager_mask)


@contextlib.contextmanager
def hooked(model, hook: Hook):
    """Run `model` with the hooked eager attention (one hook at a time)."""
    global _active
    _register()
    previous = model.config._attn_implementation
    model.set_attn_implementation(IMPLEMENTATION)
    _active = hook
    try:
        yield hook
    finally:
        _active = None
        model.set_attn_implementation(previous)


class Statistics(Hook):
    """Accumulated attention per (layer, KV head, key token) summed over all queries and the
    query heads that share the KV head, plus the last `window` rotated queries of each layer."""

    def __init__(self, window: int):
        self.window = window
        self.attention: dict[int, torch.Tensor] = {}
        self.queries_of: dict[int, torch.Tensor] = {}

    def queries(self, layer, query):
        self.queries_of[layer] = query[:, :, -self.window:, :].float().clone()

    def probabilities(self, layer, probs, groups):
        b, qh, _, keys = probs.shape
        summed = probs.float().sum(dim=2).reshape(b, qh // groups, groups, keys).sum(dim=2)
        self.attention[layer] = self.attention.get(layer, 0) + summed


class HideTokens(Hook):
    """Hide cached tokens from every query: `hidden[layer]` is a bool [KV heads, cached tokens]
    mask, True where the token is dropped. Tokens after the cached ones stay visible."""

    def __init__(self, hidden: dict[int, torch.Tensor]):
        self.hidden = hidden

    def logits(self, layer, logits, groups):
        hide = self.hidden.get(layer)
        if hide is None:
            return logits
        mask = torch.zeros(logits.shape[-1], dtype=torch.bool).expand(hide.shape[0], -1).clone()
        mask[:, : hide.shape[1]] = hide
        mask = mask.repeat_interleave(groups, dim=0)[None, :, None, :]
        return logits.masked_fill(mask, torch.finfo(logits.dtype).min)
