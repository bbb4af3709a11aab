"""Writing a cache: its chunks encoded one at a time, in file order, into a streaming writer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from kvcodec.cache import TENSORS, KVCache
from kvcodec.codecs import device
from kvcodec.codecs.base import ChunkInfo, Chunks, Codec
from kvcodec.container.chunking import DEFAULT_CHUNK_TOKENS, cut, layer_groups
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
        """(slot, payload) of one chunk; subclasses choosing per chunk override this."""
        return 0, self.encode(0, info, chunk)

    @property
    def batched(self) -> bool:
        """Whether chunks are encoded several at a time: when every chunk goes to slot 0 and its
        codec codes many chunks at once faster (it overrides `Codec.encode_many`). Otherwise a
        chunk's payload reaches the file before the next chunk is encoded."""
        return type(self).payload is Encoding.payload and type(self.codecs[0]).encode_many is not Codec.encode_many

    def payloads(self, items: list[tuple[ChunkInfo, torch.Tensor]]) -> list[tuple[int, bytes]]:
        """(slot, payload) of each chunk: slot 0's codec encoding them together when `batched`."""
        if not self.batched:
            return [self.payload(info, chunk) for info, chunk in items]
        infos, chunks = [info for info, _ in items], [chunk for _, chunk in items]
        return [(0, p) for p in device.encode_chunks(self.codecs[0], chunks, infos, self.contexts[0])]


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
    sizes = [sum(info.numel for info, _ in layer) for layer in chunks.layers]
    for group in layer_groups(sizes, ENCODE_BATCH if encoding.batched else 0):
        items = [item for i in group for item in chunks.layers[i]]
        batches = [items] if encoding.batched else [[item] for item in items]
        for batch in batches:
            for (info, _), (slot, payload) in zip(batch, encoding.payloads(batch)):
                writer.add_record(info.layer, TENSORS.index(info.tensor), info.token_start, info.shape,
                                  dtype_name(info.dtype), slot, payload)
        if progress:
            for i in group:
                progress(i + 1)
    return writer.finish()


ENCODE_BATCH = 1 << 22  # elements of chunks encoded together (a few layers; their payloads are held until written)
