"""What a plugin's stored entry must be before its stack sees it: the key it was written under,
and whole layers of one shape and dtype (entries are not trusted: a store may hold truncated,
swapped or foreign bytes under a key)."""

from __future__ import annotations

import torch

from kvcodec.cache import KVCache


def entry_problem(cache: KVCache, key_meta: str, key: str, layers: int, shape: tuple[int, int, int, int],
                  dtype: torch.dtype) -> str | None:
    """Why the decoded entry `cache` is not the one stored under `key` (named in its metadata at
    `key_meta`) with `layers` unpruned layers of keys and values `shape` and `dtype`, or None."""
    if cache.metadata.get(key_meta) != key:
        return "it names another key" if key_meta in cache.metadata else "it does not name its key"
    if cache.num_layers != layers:
        return f"it has {cache.num_layers} layers, not {layers}"
    for i, lay in enumerate(cache.layers):
        if lay.positions is not None:
            return f"layer {i} is pruned"
        for name, x in (("key", lay.key), ("value", lay.value)):
            if tuple(x.shape) != shape or x.dtype != dtype:
                return f"layer {i} {name} is {x.dtype} {tuple(x.shape)}, not {dtype} {shape}"
    return None
