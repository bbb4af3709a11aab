"""How a cache is cut into a file's records: every layer's keys, then its values, in chunks of
`chunk_tokens` tokens (spec section 3). The writer and every codec's `fit` see this one cut."""

from __future__ import annotations

from kvcodec.cache import TENSORS, KVCache
from kvcodec.codecs.base import ChunkInfo, Chunks
from kvcodec.constants import DEFAULT_CHUNK_TOKENS
from kvcodec.container import format as fmt
from kvcodec.errors import InputError


def check_chunk_tokens(chunk_tokens) -> None:
    if not isinstance(chunk_tokens, int) or isinstance(chunk_tokens, bool) or not 1 <= chunk_tokens <= fmt.MAX_TOKENS:
        raise InputError(f"chunk_tokens must be a positive integer, not {chunk_tokens!r}")


def cut(cache: KVCache, chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> Chunks:
    """The chunks of `cache` in file order, as views of its tensors."""
    check_chunk_tokens(chunk_tokens)
    layers = []
    for layer, lay in enumerate(cache.layers):
        chunks = []
        for name, tensor in zip(TENSORS, (lay.key, lay.value)):
            for start in range(0, tensor.shape[2], chunk_tokens):
                chunk = tensor[:, :, start:start + chunk_tokens]
                at = None if lay.positions is None else lay.positions.reshape(-1, tensor.shape[2])[:, start:start + chunk_tokens]
                chunks.append((ChunkInfo(layer, name, start, tuple(chunk.shape), chunk.dtype, at), chunk))
        layers.append(tuple(chunks))
    return Chunks(tuple(layers), chunk_tokens, tuple((tuple(l.key.shape), tuple(l.value.shape)) for l in cache.layers))


def layer_groups(sizes, limit: int) -> list[list[int]]:
    """Consecutive layers in groups whose `sizes` (one per layer) reach `limit`, the last group
    perhaps less, each at least one layer: the batches writers encode and readers fetch or decode."""
    groups: list[list[int]] = []
    size = limit
    for i, n in enumerate(sizes):
        if size >= limit:
            groups.append([])
            size = 0
        groups[-1].append(i)
        size += int(n)
    return groups
