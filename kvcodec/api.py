"""Library entry points: pack/unpack files, encode/decode bytes, open lazily."""

from __future__ import annotations

import io
import os
from typing import Callable

from kvcodec.cache import KVCache
from kvcodec.codecs.base import Codec
from kvcodec.container.chunking import DEFAULT_CHUNK_TOKENS
from kvcodec.container.reader import KVCReader
from kvcodec.encoding.engine import Encoding, write_cache
from kvcodec.encoding.plan import prepare
from kvcodec.errors import KVCError
from kvcodec.files import atomic_output


def pack(cache, dest, /, codec: str | Codec | Encoding = "raw", *, chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
         overwrite: bool = False, progress: Callable[[int], None] | None = None, target_ratio: float | None = None,
         max_error: float | None = None, scores=None, **options) -> int:
    """Write `cache` to `dest` (a path or a binary file object) as `.kvc`; return its size.

    `codec` is a codec name or object, or a pipeline `SELECTION+CODEC` (`h2o+cachegen`) whose
    selection stage prunes tokens first; `scores` (AttentionScores) feed the stages that need
    them. Options go to the stage that has them (`stage.option` to name one). With
    `target_ratio` (file at most `cache.nbytes / target_ratio` bytes) or `max_error` (every
    layer's key and value within that relative RMS error), each chunk gets one of the codec's
    presets.
    A path is written under a temporary name and renamed when complete; an existing file is
    replaced only with `overwrite=True` (as `kvc pack --force`).
    """
    cache, how = prepare(cache, codec, options, scores, chunk_tokens, target_ratio, max_error, progress)
    if isinstance(how, Encoding):  # planning already reported progress, layer by layer
        progress = None
    if isinstance(dest, (str, os.PathLike)):
        with atomic_output(dest, overwrite) as f:
            return write_cache(cache, f, how, chunk_tokens, progress)
    return write_cache(cache, dest, how, chunk_tokens, progress)


def encode(cache, /, codec: str | Codec | Encoding = "raw", *, chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
           target_ratio: float | None = None, max_error: float | None = None, scores=None, **options) -> bytes:
    """The `.kvc` bytes of `cache`, for key-value stores (pipelines and targets as in `pack`)."""
    buf = io.BytesIO()
    cache, how = prepare(cache, codec, options, scores, chunk_tokens, target_ratio, max_error)
    write_cache(cache, buf, how, chunk_tokens)
    return buf.getvalue()


def open(src) -> KVCReader:  # noqa: A001 - mirrors the built-in on purpose
    """A lazy reader over a path, a binary file object, bytes, a uint8 tensor or a URL (http(s)
    with Range requests, or any fsspec filesystem)."""
    return KVCReader(src)


def unpack(src, device=None, *, strict: bool = True, progress: Callable[[int], None] | None = None,
           decoder: str = "auto") -> KVCache:
    """Decode a whole `.kvc` (path, file object or bytes). `strict` also checks that every byte
    of the file is accounted for, so any corruption is reported. On a CUDA `device` the GPU
    kernels decode (`decoder` as in `KVCReader.read`)."""
    with KVCReader(src) as reader:
        if strict:
            reader.check_layout()
        return reader.read_cache(device=device, progress=progress, decoder=decoder)


def decode(data, device=None, *, decoder: str = "auto") -> KVCache:
    """Inverse of `encode`."""
    return unpack(data, device=device, decoder=decoder)


__all__ = ["pack", "unpack", "open", "encode", "decode", "DEFAULT_CHUNK_TOKENS", "KVCError"]
