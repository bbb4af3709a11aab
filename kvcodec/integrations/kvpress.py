"""kvpress interop: a cache pressed by a kvpress scorer press (KnormPress, SnapKVPress,
StreamingLLMPress, ... every `ScorerPress`) packs with the positions its press kept in each
head, and continues after a restore exactly as the pressed cache does.

A scorer press keeps, per layer and head, the `n_kept` tokens of highest score (in score
order, not position order), and the DynamicCache it leaves holds no positions. `KeptPositions`
records the scores while the press runs and repeats the press's own selection, so the file
holds each kept token's true position and the prefill length (the position of the next token).
A file holds each head's tokens in position order: the restored cache is the pressed one with
its kept tokens reordered, which attention does not depend on (continuations agree token for
token; logits to float rounding):

    press = KnormPress(compression_ratio=0.5)
    cache = DynamicCache()
    with KeptPositions(press) as kept, press(model):
        model(input_ids, past_key_values=cache)
    kvcodec.pack(pressed_cache(cache, kept, input_ids.shape[1]), "pressed.kvc", "zstd")
    ...
    restored = kvcodec.unpack("pressed.kvc")
    past = restored.to_hf()   # continue with position_ids from restored.next_position
"""

from __future__ import annotations

import torch

from kvcodec.cache import KVCache, LayerKV
from kvcodec.errors import InputError


class KeptPositions:
    """While active, records what `press` (a kvpress `ScorerPress`) scores in each layer;
    `positions(layer, n_kept)` then repeats the press's selection: [heads, n_kept] int64."""

    def __init__(self, press):
        if not callable(getattr(press, "score", None)):
            raise InputError(f"{type(press).__name__} is not a scorer press: it does not say which tokens it keeps")
        self.press, self.scores = press, {}

    def __enter__(self) -> "KeptPositions":
        press, scores = self.press, self.scores
        scorer = press.score

        def recording(module, *args, **kwargs):
            s = scorer(module, *args, **kwargs)
            scores[module.layer_idx] = s.detach()
            return s

        press.score = recording
        return self

    def __exit__(self, *exc) -> None:
        del self.press.score  # the class's own method again

    def positions(self, layer: int, n_kept: int) -> torch.Tensor:
        if layer not in self.scores:  # the press left this layer whole (compression ratio 0)
            raise KeyError(layer)
        scores = self.scores[layer]
        if scores.shape[0] != 1:
            raise InputError(f"a pressed cache of {scores.shape[0]} sequences: files hold positions of one")
        return scores[0].topk(n_kept, dim=-1).indices.to(torch.int64).cpu()  # the press's own topk


def pressed_cache(cache, kept: KeptPositions, length: int) -> KVCache:
    """A KVCache of the pressed transformers `cache` (batch 1) with each head's kept positions
    and the prefill `length`; layers the press did not touch keep positions 0..length-1."""
    pairs = KVCache.from_hf(cache).layers
    layers = []
    for i, lay in enumerate(pairs):
        b, heads, n, _ = lay.key.shape
        if b != 1:
            raise InputError(f"a pressed cache of {b} sequences: files hold positions of one")
        try:
            positions = kept.positions(i, n)
        except KeyError:
            if n != length:
                raise InputError(f"layer {i} holds {n} of {length} tokens but its press recorded no scores") from None
            positions = torch.arange(length, dtype=torch.int64).reshape(1, -1)
        if positions.shape[-1] != n or positions.shape[0] not in (1, heads):
            raise InputError(f"layer {i}: the press kept {tuple(positions.shape)} positions for {heads} x {n} tokens")
        positions, order = positions.sort(dim=-1)  # files hold each head's tokens in position order
        take = order.to(lay.key.device).unsqueeze(0).unsqueeze(-1)
        layers.append(LayerKV(lay.key.gather(2, take.expand_as(lay.key)), lay.value.gather(2, take.expand_as(lay.value)),
                              positions))
    return KVCache(layers, length=length, metadata={"kvcodec.pressed_by": type(kept.press).__name__})
