"""Planning a write: the cache to encode (a pipeline's selection stage applied) and what encodes
it (one codec, or with a size or error target the codec's presets chosen per chunk)."""

from __future__ import annotations

from typing import Callable

from kvcodec.cache import KVCache
from kvcodec.codecs.base import Codec
from kvcodec.container.chunking import check_chunk_tokens
from kvcodec.encoding import pipeline, presets
from kvcodec.encoding.engine import Encoding
from kvcodec.errors import CodecError, InputError
from kvcodec.registry import get_codec


def as_kvcache(cache) -> KVCache:
    """Accept a KVCache, a transformers DynamicCache or a legacy tuple of (key, value) pairs."""
    return cache if isinstance(cache, KVCache) else KVCache.from_hf(cache)


def make_codec(codec: str | Codec, options: dict) -> Codec:
    if isinstance(codec, Codec):
        if options:
            raise CodecError("pass options either to the codec object or as keywords, not both")
        return codec
    return get_codec(codec, **options)


def plan(cache, codec: str | Codec | Encoding, chunk_tokens: int, options: dict, target_ratio: float | None = None,
         max_error: float | None = None, progress: Callable[[int], None] | None = None) -> Codec | Encoding:
    """What to write with: one codec, or with a target, the codec's presets chosen per chunk."""
    if isinstance(codec, Encoding) or (target_ratio is None and max_error is None):
        return codec if isinstance(codec, Encoding) else make_codec(codec, options)
    if target_ratio is not None and max_error is not None:
        raise InputError("give a target ratio or a maximum error, not both")
    if not isinstance(codec, str):
        raise InputError("with a target ratio or maximum error, name the codec and pass its options as keywords")
    check_chunk_tokens(chunk_tokens)
    if target_ratio is not None:
        return presets.for_target_ratio(cache, codec, target_ratio, chunk_tokens, options, progress)
    return presets.for_max_error(cache, codec, max_error, chunk_tokens, options, progress)


def prepare(cache, codec, options: dict, scores, chunk_tokens: int, target_ratio=None, max_error=None, progress=None):
    """(cache to encode, what to write it with): the pipeline's selection stage applied, then `plan`."""
    pipe = pipeline.parse(codec, options)
    cache = pipe.prune(as_kvcache(cache), scores)
    return cache, plan(cache, pipe.codec, chunk_tokens, pipe.options, target_ratio, max_error, progress)
