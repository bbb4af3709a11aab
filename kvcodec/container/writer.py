"""Streaming `.kvc` writer: header first, payloads as they come, index and trailer last.

It only ever appends, so the sink may be a pipe or a socket; files are written under a
temporary name and renamed when complete (`kvcodec.files.atomic_output`).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from kvcodec.cache import KVCache
from kvcodec.codecs.base import Codec
from kvcodec.container import format as fmt
from kvcodec.container import positions
from kvcodec.dtypes import DTYPES, dtype_name, tensor_bytes
from kvcodec.errors import FormatError, InputError


def header_for(cache: KVCache, codecs: Sequence[Codec], chunk_tokens: int) -> fmt.Header:
    """The header of a file holding `cache` in chunks of `chunk_tokens`, its records coded by
    `codecs` (slot by slot)."""
    def spec(t: torch.Tensor) -> fmt.TensorSpec:
        b, h, n, d = t.shape
        return fmt.TensorSpec(b, h, n, d, dtype_name(t.dtype))

    for i, lay in enumerate(cache.layers):
        b, h, n, d = lay.key.shape
        if max(b, h, d, lay.value.shape[3]) > fmt.MAX_DIM or n > fmt.MAX_TOKENS:
            raise InputError(f"layer {i} shape {tuple(lay.key.shape)} exceeds the format's bounds")
    return fmt.Header(
        layers=[fmt.LayerSpec(spec(l.key), spec(l.value), None if l.positions is None else l.positions.shape[0],
                              window=l.window) for l in cache.layers],
        length=cache.length,
        selection=None if cache.selection is None else
        fmt.CodecEntry(cache.selection["id"], cache.selection["name"], cache.selection["config"]),
        codecs=[fmt.CodecEntry(c.codec_id, c.name, c.get_config()) for c in codecs],
        chunk_tokens=chunk_tokens,
        layout=cache.layout,
        token_ids_shape=None if cache.token_ids is None else tuple(cache.token_ids.shape),
        metadata=dict(cache.metadata),
    )


def positions_blob(layer: int, rows: torch.Tensor) -> bytes:
    """A layer's kept positions as the container blob that stores them."""
    try:
        return positions.encode(rows.cpu().numpy())
    except ValueError as exc:
        raise InputError(f"layer {layer}: {exc}") from None


class KVCWriter:
    def __init__(self, sink, header: fmt.Header):
        self._sink = sink
        self._pos = 0
        self._records: list[tuple] = []
        self._blobs: list[tuple] = []
        self._header = header
        try:
            head = header.to_bytes()
        except UnicodeEncodeError:
            raise InputError("cannot store this cache: a header string is not valid Unicode (a lone surrogate)") from None
        if len(head) > fmt.MAX_HEADER:
            raise InputError(f"header is {len(head)} bytes; the format allows {fmt.MAX_HEADER} (too much metadata?)")
        try:  # never write a file our own reader would refuse
            fmt.Header.from_bytes(head)
        except FormatError as exc:
            raise InputError(f"cannot store this cache: {exc}") from None
        self._write(fmt.pack_preamble(head, header.minor))
        self._write(head)
        self._pad()

    def _write(self, data) -> None:
        self._sink.write(data)
        self._pos += len(data)

    def _pad(self) -> None:
        self._write(bytes(fmt.align(self._pos) - self._pos))

    def _put(self, data) -> tuple[int, int, int]:
        offset = self._pos
        self._write(data)
        self._pad()
        return offset, len(data), fmt.crc32(data)

    def add_blob(self, owner: int, ordinal: int, data) -> None:
        self._blobs.append(self._put(data) + (owner, 0, ordinal, 0))

    def add_cache_blobs(self, cache: KVCache) -> None:
        """The container's own blobs: the prompt's token ids and each pruned layer's positions."""
        if cache.token_ids is not None:
            self.add_blob(fmt.CONTAINER_OWNER, 0, tensor_bytes(cache.token_ids))
        for i, lay in enumerate(cache.layers):
            if lay.positions is not None:
                self.add_blob(fmt.CONTAINER_OWNER, 1 + i, positions_blob(i, lay.positions))

    def add_record(self, layer: int, tensor: int, token_start: int, shape, dtype: str, codec_slot: int, payload) -> None:
        codec_id = self._header.codecs[codec_slot].id
        b, h, t, d = shape
        self._records.append(self._put(payload) + (layer, tensor, DTYPES[dtype][0], codec_slot, codec_id,
                                                   token_start, b, h, t, d, bytes(12)))

    def finish(self) -> int:
        """Write index and trailer; return the total number of bytes written."""
        records = np.array(self._records, dtype=fmt.RECORD_DTYPE)
        blobs = np.array(self._blobs, dtype=fmt.BLOB_DTYPE)
        index = fmt.pack_index(records, blobs)
        offset = self._pos
        self._write(index)
        self._write(fmt.pack_trailer(offset, index))
        return self._pos
