"""Attention statistics that selection methods choose tokens by, captured beside a cache.

Per layer: `attention` [batch, KV heads, tokens], the attention every key token received,
summed over all queries of the prefill and over the query heads sharing its KV head (H2O, CaM);
and `queries` [batch, query heads, window, head_dim], the last `window` queries after the
rotary embedding (SnapKV's observation window, Keyformer's logits). Stored as safetensors
(`attention.{i}`, `queries.{i}`) next to the cache: `cache.pt` -> `cache.scores.safetensors`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from kvcodec.errors import InputError

FORMAT = "kvcodec-scores-1"
SUFFIX = ".scores.safetensors"


@dataclass
class AttentionScores:
    attention: list[torch.Tensor]
    queries: list[torch.Tensor]

    @property
    def window(self) -> int:
        return self.queries[0].shape[2]

    @property
    def num_layers(self) -> int:
        return len(self.attention)

    def check(self, cache) -> None:
        """Raise InputError unless these statistics describe `cache` (same layers, heads, tokens;
        sliding-window layers, which no stage prunes, are not checked)."""
        if self.num_layers != cache.num_layers or len(self.queries) != cache.num_layers:
            raise InputError(f"the attention scores cover {self.num_layers} layers, the cache {cache.num_layers}")
        for i, (att, q, lay) in enumerate(zip(self.attention, self.queries, cache.layers)):
            b, h, t, d = lay.key.shape
            if lay.window is not None:
                continue
            if lay.positions is not None:
                raise InputError(f"layer {i} of the cache is already pruned; scores describe full caches")
            if tuple(att.shape) != (b, h, t):
                raise InputError(f"layer {i} attention scores have shape {tuple(att.shape)}; the cache needs {(b, h, t)}")
            if q.dim() != 4 or q.shape[0] != b or q.shape[1] % h or q.shape[3] != d or not 1 <= q.shape[2] <= t:
                raise InputError(f"layer {i} queries have shape {tuple(q.shape)}; the cache needs "
                                 f"[{b}, a multiple of {h}, 1..{t}, {d}]")

    def save(self, path) -> None:
        from safetensors.torch import save

        from kvcodec.files import atomic_output

        tensors = {f"attention.{i}": a.float().contiguous() for i, a in enumerate(self.attention)}
        tensors.update({f"queries.{i}": q.float().contiguous() for i, q in enumerate(self.queries)})
        with atomic_output(path, overwrite=True) as f:
            f.write(save(tensors, metadata={"format": FORMAT}))

    @classmethod
    def load(cls, path) -> "AttentionScores":
        from safetensors import SafetensorError, safe_open

        path = os.fspath(path)
        if not os.path.isfile(path):
            raise InputError(f"{path}: no such scores file")
        try:
            with safe_open(path, "pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError, ValueError) as exc:
            raise InputError(f"{path} is not a readable safetensors file ({exc})") from None
        if meta.get("format") != FORMAT:
            raise InputError(f"{path} is not a kvcodec scores file (format {meta.get('format')!r})")
        n = sum(1 for k in tensors if k.startswith("attention."))
        try:
            attention = [tensors[f"attention.{i}"] for i in range(n)]
            queries = [tensors[f"queries.{i}"] for i in range(n)]
        except KeyError as exc:
            raise InputError(f"{path} lacks tensor {exc.args[0]}") from None
        for t in attention + queries:
            if t.dtype != torch.float32 or not bool(torch.isfinite(t).all()):
                raise InputError(f"{path} holds non-float32 or non-finite scores")
        if n == 0 or any(a.dim() != 3 or bool((a < 0).any()) for a in attention):
            raise InputError(f"{path}: attention scores must be non-negative [batch, heads, tokens] tensors")
        return cls(attention, queries)


def path_beside(cache_path) -> str:
    """Where `kvc capture --scores` puts the statistics of the cache it writes to `cache_path`."""
    return os.path.splitext(os.fspath(cache_path))[0] + SUFFIX
