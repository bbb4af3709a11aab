"""Methods that rank tokens by a score per (layer, head): H2O, Keyformer, SnapKV, key norm."""

from __future__ import annotations

import math

import torch

from kvcodec.errors import InputError
from kvcodec.selection.base import Selector, check_amount, check_count, resolve, summed_over_batch


class RecentWindow(Selector):
    """Keeps `keep` tokens per head; `recent` of them are the latest (half the budget by default),
    the rest go to the best scores."""

    def __init__(self, keep: int | float = 0.5, recent: int | float | None = None):
        check_amount("keep", keep, allow_zero=False)
        if recent is not None:
            check_amount("recent", recent)
        self.keep, self.recent = keep, recent

    def recent_count(self, tokens: int) -> int:
        return self.budget(tokens) // 2 if self.recent is None else resolve(self.recent, tokens)

    def forced(self, tokens):
        mask = torch.zeros(tokens, dtype=torch.bool)
        mask[tokens - self.recent_count(tokens):] = True
        return mask


class H2O(RecentWindow):
    """Heavy hitters: the tokens that received the most attention over the prefill."""

    codec_id = 16
    name = "h2o"
    description = "heavy hitters by accumulated attention + recent window (needs scores)"
    needs_scores = True

    def layer_scores(self, layer, lay, scores):
        return summed_over_batch(scores.attention[layer])


def window_logits(layer: int, lay, scores, window: int | None) -> torch.Tensor:
    """Attention logits [batch, query heads, window, tokens] of the observation-window queries,
    with keys after each query masked out (-inf)."""
    queries = scores.queries[layer].double()
    if window is not None:
        queries = queries[:, :, -window:]
    b, qh, w, d = queries.shape
    tokens = lay.key.shape[2]
    keys = lay.key.to(queries.device, torch.float64).repeat_interleave(qh // lay.key.shape[1], dim=1)
    logits = torch.matmul(queries, keys.transpose(2, 3)) / math.sqrt(d)
    query_pos = torch.arange(tokens - w, tokens)[:, None]
    return logits.masked_fill(torch.arange(tokens)[None, :] > query_pos, float("-inf"))


def per_kv_head(t: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """[batch, query heads, tokens] -> [KV heads, tokens], summing a group's query heads."""
    b, qh, n = t.shape
    return summed_over_batch(t.reshape(b, kv_heads, qh // kv_heads, n).sum(dim=2))


class Keyformer(RecentWindow):
    """Key tokens by accumulated attention whose logits are regularized with Gumbel noise and a
    temperature rising from `tau_init` to `tau_end` across the accumulated queries (Keyformer's
    score function). The queries are the captured observation window (`window`: the last N of
    them, all by default). Noise is seeded: the same options choose the same tokens."""

    codec_id = 17
    name = "keyformer"
    description = "Gumbel-regularized accumulated attention + recent window (needs scores)"
    needs_scores = True

    def __init__(self, keep: int | float = 0.5, recent: int | float | None = None, tau_init: float = 1.0,
                 tau_end: float = 2.0, window: int | None = None, seed: int = 0):
        super().__init__(keep, recent)
        for name, tau in (("tau_init", tau_init), ("tau_end", tau_end)):
            if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not tau > 0:
                raise ValueError(f"{name} must be a positive number, not {tau!r}")
        if window is not None:
            check_count("window", window, 1)
        check_count("seed", seed)
        self.tau_init, self.tau_end, self.window, self.seed = tau_init, tau_end, window, seed

    def layer_scores(self, layer, lay, scores):
        logits = window_logits(layer, lay, scores, self.window)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + layer)
        uniform = torch.rand(logits.shape, generator=generator, dtype=torch.float64).clamp_(1e-12, 1 - 1e-12)
        gumbel = -torch.log(-torch.log(uniform))
        tau = torch.linspace(self.tau_init, self.tau_end, logits.shape[2], dtype=torch.float64)[:, None]
        probs = torch.softmax((logits + gumbel) / tau, dim=-1)
        return per_kv_head(probs.sum(dim=2), lay.key.shape[1])


class SnapKV(Selector):
    """Tokens the last `window` queries attend to, pooled over neighbouring tokens (`kernel`,
    `pooling`), summed over the query heads of a KV head; the window itself always stays."""

    codec_id = 18
    name = "snapkv"
    description = "observation-window attention, pooled, + the window (needs scores)"
    needs_scores = True

    def __init__(self, keep: int | float = 0.5, window: int = 32, kernel: int = 7, pooling: str = "max"):
        check_amount("keep", keep, allow_zero=False)
        check_count("window", window, 1)
        check_count("kernel", kernel, 1)
        if kernel % 2 == 0:
            raise ValueError(f"kernel must be odd, not {kernel}")
        if pooling not in ("max", "avg"):
            raise ValueError(f"pooling must be 'max' or 'avg', not {pooling!r}")
        self.keep, self.window, self.kernel, self.pooling = keep, window, kernel, pooling

    def forced(self, tokens):
        """The observation window (its latest tokens, if the budget is smaller)."""
        mask = torch.zeros(tokens, dtype=torch.bool)
        mask[tokens - min(self.window, self.budget(tokens)):] = True
        return mask

    def layer_scores(self, layer, lay, scores):
        window = min(self.window, lay.key.shape[2])
        if window > scores.window:
            raise InputError(f"snapkv window {window} is larger than the {scores.window} captured queries")
        probs = torch.softmax(window_logits(layer, lay, scores, window), dim=-1).sum(dim=2)
        pool = torch.nn.functional.max_pool1d if self.pooling == "max" else torch.nn.functional.avg_pool1d
        pooled = pool(probs, self.kernel, stride=1, padding=self.kernel // 2)
        return per_kv_head(pooled, lay.key.shape[1])


class KeyNorm(Selector):
    """Tokens whose keys have the smallest L2 norm (they draw the most attention); needs no
    attention statistics. Optional sink and recent tokens are always kept."""

    codec_id = 19
    name = "knorm"
    description = "lowest key norm (no scores needed)"

    def __init__(self, keep: int | float = 0.5, sink: int | float = 0, recent: int | float = 0):
        check_amount("keep", keep, allow_zero=False)
        check_amount("sink", sink)
        check_amount("recent", recent)
        self.keep, self.sink, self.recent = keep, sink, recent

    def forced(self, tokens):
        mask = torch.zeros(tokens, dtype=torch.bool)
        mask[:resolve(self.sink, tokens)] = True
        mask[tokens - resolve(self.recent, tokens):] = True
        return mask

    def layer_scores(self, layer, lay, scores):
        return -summed_over_batch(lay.key.double().norm(dim=-1))
