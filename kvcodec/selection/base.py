"""The selection-stage interface: choose which tokens each (layer, KV head) keeps.

A stage runs once over the whole cache before any value codec sees it and returns a pruned
`KVCache` whose layers carry the original positions of what they kept. Heads of one layer keep
equal counts, so the result is still a rectangular cache a model accepts. Restoring needs
nothing from the stage: the positions travel in the container. Sliding-window layers
(`LayerKV.window`) pass through as they are: they hold only their window already, all of which
the model's attention reads, and transformers' mask assumes it whole.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from kvcodec.cache import KVCache, LayerKV
from kvcodec.errors import InputError
from kvcodec.options import Configurable
from kvcodec.selection.scores import AttentionScores


def needing_no_scores() -> str:
    """The registered methods that run without attention statistics, for error messages."""
    from kvcodec.registry import available_selectors

    return ", ".join(c.name for c in available_selectors() if not c.needs_scores)


def check_count(name: str, value, low: int = 0) -> None:
    """An integer option of at least `low` (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer of at least {low}, not {value!r}")


def check_amount(name: str, value, allow_zero: bool = True) -> None:
    """A token amount is an integer count or a float ratio of the sequence (0..1)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a token count (integer) or a ratio (number with a decimal point), not {value!r}")
    low = 0 if allow_zero else (1 if isinstance(value, int) else 0)
    if isinstance(value, int) and value < low:
        raise ValueError(f"{name} must be at least {low} tokens, not {value}")
    if isinstance(value, float) and not (0.0 <= value <= 1.0 and (allow_zero or value > 0.0)):
        raise ValueError(f"{name} as a ratio must lie in {'[0, 1]' if allow_zero else '(0, 1]'}, not {value}")


def resolve(value: int | float, tokens: int) -> int:
    """Tokens meant by a count or a ratio of `tokens` (at most `tokens`); a positive ratio of a
    non-empty cache means at least one token, never none."""
    if isinstance(value, int):
        return min(tokens, value)
    return min(tokens, max(round(value * tokens), 1 if value > 0 else 0))


class Selector(Configurable):
    """Base class. Subclasses set `codec_id` and `name`, take their options as keywords (a
    budget `keep` or the paper's own names), and implement `forced`, `layer_scores` or
    `keep_indices`."""

    kind: ClassVar[str] = "selection method"
    codec_id: ClassVar[int]
    name: ClassVar[str]
    description: ClassVar[str] = ""
    needs_scores: ClassVar[bool] = False

    # -- what subclasses provide -----------------------------------------------------------
    def budget(self, tokens: int) -> int:
        """Tokens every head keeps out of `tokens`."""
        return resolve(self.keep, tokens)

    def forced(self, tokens: int) -> torch.Tensor:
        """Bool [tokens]: positions kept whatever the scores say (sinks, recent window)."""
        return torch.zeros(tokens, dtype=torch.bool)

    def layer_scores(self, layer: int, lay: LayerKV, scores: AttentionScores | None) -> torch.Tensor:
        """Float [heads, tokens]: higher is kept first. By default every token ties, for methods
        whose forced tokens are the whole budget."""
        return torch.zeros(lay.key.shape[1], lay.key.shape[2])

    def keep_indices(self, layer: int, num_layers: int, lay: LayerKV, scores: AttentionScores | None) -> torch.Tensor:
        """Long [heads, kept], ascending per head: the tokens of this layer that stay."""
        tokens, heads = lay.key.shape[2], lay.key.shape[1]
        budget = self.budget(tokens)
        forced = self.forced(tokens)
        if int(forced.sum()) > budget:
            raise InputError(f"{self.name}: the sink and recent tokens ({int(forced.sum())}) exceed the budget "
                             f"of {budget} tokens")
        score = self.layer_scores(layer, lay, scores).double().cpu()
        score = score.masked_fill(forced, float("inf")).expand(heads, tokens)
        # ties go to the earlier token, so the choice is the same on every machine
        order = torch.argsort(-score, dim=1, stable=True)
        return order[:, :budget].sort(dim=1).values

    def merge(self, layer: int, lay: LayerKV, kept: torch.Tensor, scores: AttentionScores | None) -> LayerKV:
        """The pruned layer; merging methods fold dropped tokens into the kept ones here."""
        return gather(lay, kept)

    # -- the stage ---------------------------------------------------------------------------
    def select(self, cache: KVCache, scores: AttentionScores | None = None) -> KVCache:
        """The pruned cache. Raises InputError when the method needs scores it was not given."""
        if self.needs_scores:
            if scores is None:
                raise InputError(f"{self.name} needs attention scores (kvc capture --scores, or scores=); "
                                 f"methods that need none: {needing_no_scores()}")
            scores.check(cache)
        layers = []
        for i, lay in enumerate(cache.layers):
            if lay.window is not None:
                layers.append(lay)
                continue
            kept = self.keep_indices(i, cache.num_layers, lay, scores)
            layers.append(self.merge(i, lay, kept, scores))
        return KVCache(layers, cache.token_ids, dict(cache.metadata), cache.layout, length=cache.next_position,
                       selection={"id": self.codec_id, "name": self.name, "config": self.get_config()})


def gather(lay: LayerKV, kept: torch.Tensor) -> LayerKV:
    """Keep token `kept[h, j]` of each head h (positions follow the originals)."""
    b, h, _, _ = lay.key.shape
    kept = kept.to(lay.key.device)

    def take(t: torch.Tensor) -> torch.Tensor:
        return t.gather(2, kept[None, :, :, None].expand(b, h, -1, t.shape[3]))

    old = lay.positions if lay.positions is not None else torch.arange(lay.key.shape[2]).expand(h, -1)
    positions = old.expand(h, -1).gather(1, kept.cpu())
    if bool((positions == positions[:1]).all()):
        positions = positions[:1]
    return LayerKV(take(lay.key), take(lay.value), positions.contiguous())


def summed_over_batch(t: torch.Tensor) -> torch.Tensor:
    """[batch, heads, ...] -> [heads, ...]: one choice serves every sequence of the batch."""
    return t.double().sum(dim=0)
