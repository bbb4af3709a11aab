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


class Hook:
    """Called by every attention layer; subclasses override what they need."""

    def logits(self, layer: int, logits: torch.Tensor, groups: int) -> torch.Tensor:
        """Attention logits [batch, query heads, queries, keys] before the softmax."""
        return logits

    def probabilities(self, layer: int, probs: torch.Tensor, query: torch.Tensor, groups: int) -> None:
        """Attention probabilities after the softmax, with the layer's (rotated) queries."""


def _attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    groups = module.num_key_value_groups
    key = key.repeat_interleave(groups, dim=1)
    value = value.repeat_interleave(groups, dim=1)
    logits = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        logits = logits + attention_mask[:, :, :, : key.shape[-2]]
    if _active is not None:
        logits = _active.logits(module.layer_idx, logits, groups)
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32).to(query.dtype)
    if _active is not None:
        _active.probabilities(module.layer_idx, probs, query, groups)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), probs


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
        self.queries: dict[int, torch.Tensor] = {}

    def probabilities(self, layer, probs, query, groups):
        b, qh, _, keys = probs.shape
        summed = probs.float().sum(dim=2).reshape(b, qh // groups, groups, keys).sum(dim=2)
        self.attention[layer] = self.attention.get(layer, 0) + summed
        self.queries[layer] = query[:, :, -self.window:, :].float().clone()


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
