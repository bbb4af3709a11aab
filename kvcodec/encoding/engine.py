"""Writing a cache: its chunks encoded one at a time, in file order, into a streaming writer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from kvcodec.cache import TENSORS, KVCache
from kvcodec.codecs import device
from kvcodec.codecs.base import ChunkInfo, Chunks, Codec
from kvcodec.container.chunking import DEFAULT_CHUNK_TOKENS, cut
from kvcodec.container.writer import KVCWriter, header_for
from kvcodec.dtypes import dtype_name


@dataclass
class Encoding:
    """The codecs a file's records refer to by slot, their context blobs (stored in the file)
    and those loaded (handed to `encode`), and the rule that encodes a chunk: slot 0 for every
    chunk unless a subclass chooses per chunk."""

    codecs: list[Codec]
    blobs: list[list[bytes]]
    contexts: list

    @classmethod
    def of(cls, codecs: list[Codec], blobs: list[list[bytes]]) -> "Encoding":
        blobs = [[bytes(b) for b in slot] for slot in blobs]
        return cls(codecs, blobs, [c.load_context(b) for c, b in zip(codecs, blobs)])

    @classmethod
    def fitted(cls, chunks: Chunks, codec: Codec) -> "Encoding":
        return cls.of([codec], [codec.fit(chunks)])

    def encode(self, slot: int, info: ChunkInfo, chunk: torch.Tensor) -> bytes:
        """The payload of `chunk` in slot `slot`'s codec (on the GPU where the chunk lies there
        and the codec has a device encoder)."""
        return device.encode_chunk(self.codecs[slot], chunk, info, self.contexts[slot])

    def payload(self, info: ChunkInfo, chunk: torch.Tensor) -> tuple[int, bytes]:
        return 0, self.encode(0, info, chunk)


def write_cache(cache: KVCache, sink, codec: Codec | Encoding, chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
                progress: Callable[[int], None] | None = None) -> int:
    """Encode `cache` into the binary stream `sink`, one chunk at a time; return bytes written."""
    chunks = cut(cache, chunk_tokens)
    encoding = codec if isinstance(codec, Encoding) else Encoding.fitted(chunks, codec)
    writer = KVCWriter(sink, header_for(cache, encoding.codecs, chunk_tokens))
    for slot, blobs in enumerate(encoding.blobs):
        for ordinal, blob in enumerate(blobs):
            writer.add_blob(slot, ordinal, blob)
    writer.add_cache_blobs(cache)
    for i, layer in enumerate(chunks.layers):
        for info, chunk in layer:
            slot, payload = encoding.payload(info, chunk)
            writer.add_record(i, TENSORS.index(info.tensor), info.token_start, info.shape, dtype_name(info.dtype),
                              slot, payload)
        if progress:
            progress(i + 1)
    return writer.finish()
