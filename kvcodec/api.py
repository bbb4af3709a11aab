"""Library entry points: pack/unpack files, encode/decode bytes, open lazily."""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch

from kvcodec.container import format as fmt
from kvcodec.encoding import pipeline
from kvcodec.container import positions
from kvcodec.cache import KVCache
from kvcodec.codecs.base import ChunkInfo, Codec
from kvcodec.dtypes import dtype_name, tensor_bytes
from kvcodec.errors import CodecError, InputError, KVCError
from kvcodec.container.reader import KVCReader
from kvcodec.registry import get_codec
from kvcodec.container.writer import KVCWriter, atomic_output

DEFAULT_CHUNK_TOKENS = 1024


def as_kvcache(cache) -> KVCache:
    """Accept a KVCache, a transformers DynamicCache or a legacy tuple of (key, value) pairs."""
    return cache if isinstance(cache, KVCache) else KVCache.from_hf(cache)


def make_codec(codec: str | Codec, options: dict) -> Codec:
    if isinstance(codec, Codec):
        if options:
            raise CodecError("pass options either to the codec object or as keywords, not both")
        return codec
    return get_codec(codec, **options)


def _header(cache: KVCache, codecs: Sequence[Codec], chunk_tokens: int) -> fmt.Header:
    def spec(t: torch.Tensor) -> fmt.TensorSpec:
        b, h, n, d = t.shape
        return fmt.TensorSpec(b, h, n, d, dtype_name(t.dtype))

    for i, lay in enumerate(cache.layers):
        b, h, n, d = lay.key.shape
        if max(b, h, d, lay.value.shape[3]) > fmt.MAX_DIM or n > fmt.MAX_TOKENS:
            raise InputError(f"layer {i} shape {tuple(lay.key.shape)} exceeds the format's bounds")
    return fmt.Header(
        layers=[fmt.LayerSpec(spec(l.key), spec(l.value), None if l.positions is None else l.positions.shape[0])
                for l in cache.layers],
        length=cache.length,
        selection=None if cache.selection is None else
        fmt.CodecEntry(cache.selection["id"], cache.selection["name"], cache.selection["config"]),
        codecs=[fmt.CodecEntry(c.codec_id, c.name, c.get_config()) for c in codecs],
        chunk_tokens=chunk_tokens,
        layout=cache.layout,
        token_ids_shape=None if cache.token_ids is None else tuple(cache.token_ids.shape),
        metadata=dict(cache.metadata),
    )


def encode_positions(layer: int, rows: torch.Tensor) -> bytes:
    try:
        return positions.encode(rows.cpu().numpy())
    except ValueError as exc:
        raise InputError(f"layer {layer}: {exc}") from None


def check_chunk_tokens(chunk_tokens) -> None:
    if not isinstance(chunk_tokens, int) or isinstance(chunk_tokens, bool) or not 1 <= chunk_tokens <= fmt.MAX_TOKENS:
        raise InputError(f"chunk_tokens must be a positive integer, not {chunk_tokens!r}")


def layer_chunks(layer: int, lay, chunk_tokens: int) -> Iterator[tuple[ChunkInfo, torch.Tensor]]:
    """The key, then the value chunks of one layer, in file order, with their descriptions."""
    for name, tensor in zip(fmt.TENSORS, (lay.key, lay.value)):
        for start in range(0, tensor.shape[2], chunk_tokens):
            chunk = tensor[:, :, start:start + chunk_tokens]
            yield ChunkInfo(layer, name, start, tuple(chunk.shape), chunk.dtype), chunk


@dataclass
class Encoding:
    """The codecs a file's records refer to by slot, their fitted contexts, and the rule that
    encodes a chunk: slot 0 for every chunk unless a subclass chooses per chunk."""

    codecs: list[Codec]
    contexts: list[list[bytes]]

    @classmethod
    def fitted(cls, cache: KVCache, codec: Codec, chunk_tokens: int) -> "Encoding":
        return cls([codec], [[bytes(b) for b in codec.fit(cache, chunk_tokens)]])

    def payload(self, info: ChunkInfo, chunk: torch.Tensor) -> tuple[int, bytes]:
        return 0, self.codecs[0].encode(chunk, info, self.contexts[0])


def write_cache(cache: KVCache, sink, codec: Codec | Encoding, chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
                progress: Callable[[int], None] | None = None) -> int:
    """Encode `cache` into the binary stream `sink`, one chunk at a time; return bytes written."""
    check_chunk_tokens(chunk_tokens)
    encoding = codec if isinstance(codec, Encoding) else Encoding.fitted(cache, codec, chunk_tokens)
    writer = KVCWriter(sink, _header(cache, encoding.codecs, chunk_tokens))
    for slot, context in enumerate(encoding.contexts):
        for ordinal, blob in enumerate(context):
            writer.add_blob(slot, ordinal, blob)
    if cache.token_ids is not None:
        writer.add_blob(fmt.CONTAINER_OWNER, 0, tensor_bytes(cache.token_ids))
    for i, lay in enumerate(cache.layers):
        if lay.positions is not None:
            writer.add_blob(fmt.CONTAINER_OWNER, 1 + i, encode_positions(i, lay.positions))
    for i, lay in enumerate(cache.layers):
        for info, chunk in layer_chunks(i, lay, chunk_tokens):
            slot, payload = encoding.payload(info, chunk)
            writer.add_record(i, fmt.TENSORS.index(info.tensor), info.token_start, info.shape,
                              dtype_name(info.dtype), slot, payload)
        if progress:
            progress(i + 1)
    return writer.finish()


def plan(cache, codec: str | Codec | Encoding, chunk_tokens: int, options: dict, target_ratio: float | None = None,
         max_error: float | None = None, progress: Callable[[int], None] | None = None) -> Codec | Encoding:
    """What to write with: one codec, or with a target, the codec's presets chosen per chunk."""
    if isinstance(codec, Encoding) or (target_ratio is None and max_error is None):
        return codec if isinstance(codec, Encoding) else make_codec(codec, options)
    from kvcodec.encoding import presets as adapt

    if target_ratio is not None and max_error is not None:
        raise InputError("give a target ratio or a maximum error, not both")
    if not isinstance(codec, str):
        raise InputError("with a target ratio or maximum error, name the codec and pass its options as keywords")
    check_chunk_tokens(chunk_tokens)
    if target_ratio is not None:
        return adapt.for_target_ratio(cache, codec, target_ratio, chunk_tokens, options, progress)
    return adapt.for_max_error(cache, codec, max_error, chunk_tokens, options, progress)


def prepare(cache, codec, options: dict, scores, chunk_tokens: int, target_ratio=None, max_error=None, progress=None):
    """(cache to encode, what to write it with): the pipeline's selection stage applied, then `plan`."""
    pipe = pipeline.parse(codec, options)
    cache = pipe.prune(as_kvcache(cache), scores)
    return cache, plan(cache, pipe.codec, chunk_tokens, pipe.options, target_ratio, max_error, progress)


def pack(cache, dest, /, codec: str | Codec | Encoding = "raw", *, chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
         overwrite: bool = True, progress: Callable[[int], None] | None = None, target_ratio: float | None = None,
         max_error: float | None = None, scores=None, **options) -> int:
    """Write `cache` to `dest` (a path or a binary file object) as `.kvc`; return its size.

    `codec` is a codec name or object, or a pipeline `SELECTION+CODEC` (`h2o+cachegen`) whose
    selection stage prunes tokens first; `scores` (AttentionScores) feed the stages that need
    them. Options go to the stage that has them (`stage.option` to name one). With
    `target_ratio` (file at most `cache.nbytes / target_ratio` bytes) or `max_error` (every
    chunk within that relative RMS error), each chunk gets one of the codec's presets.
    A path is written under a temporary name and renamed when complete.
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


__all__ = ["pack", "unpack", "open", "encode", "decode", "write_cache", "as_kvcache", "KVCError"]
