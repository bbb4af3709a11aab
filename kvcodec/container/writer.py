"""Streaming `.kvc` writer: header first, payloads as they come, index and trailer last.

It only ever appends, so the sink may be a pipe or a socket; files are written under a
temporary name and renamed when complete (`atomic_output`).
"""

from __future__ import annotations

import contextlib
import os
import tempfile

import numpy as np

from kvcodec.container import format as fmt
from kvcodec.dtypes import DTYPES
from kvcodec.errors import FormatError, InputError


class KVCWriter:
    def __init__(self, sink, header: fmt.Header):
        self._sink = sink
        self._pos = 0
        self._records: list[tuple] = []
        self._blobs: list[tuple] = []
        self._header = header
        head = header.to_bytes()
        if len(head) > fmt.MAX_HEADER:
            raise InputError(f"header is {len(head)} bytes; the format allows {fmt.MAX_HEADER} (too much metadata?)")
        try:  # never write a file our own reader would refuse
            fmt.Header.from_bytes(head)
        except FormatError as exc:
            raise InputError(f"cannot store this cache: {exc}") from None
        self._write(fmt.pack_preamble(head))
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


@contextlib.contextmanager
def atomic_output(path, overwrite: bool):
    """Yield a binary file that replaces `path` only if the block completes."""
    path = os.fspath(path)
    if not overwrite and os.path.exists(path):
        raise InputError(f"{path} exists (use --force to overwrite)")
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        if not overwrite and os.path.exists(path):
            raise InputError(f"{path} appeared while writing (use --force to overwrite)")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
