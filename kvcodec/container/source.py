"""Random access to a file's bytes, wherever they are: in memory (bytes, a uint8 tensor, which
when pinned lets GPU reads copy payloads to the device without a host copy), a local or
seekable file, or a URL (http(s) with Range requests, or any fsspec filesystem).

Safe to share between threads: a file opened by path is read with positional reads (no shared
file offset), a file object given by the caller under a lock around its seek and read."""

from __future__ import annotations

import io
import os
import threading

import torch

from kvcodec.container import remote
from kvcodec.errors import FormatError


class ByteSource:
    """Random access to bytes that never reads past the end or allocates beyond the request."""

    def __init__(self, src):
        self._own = False
        self._fd = None  # a file opened here, read with os.pread
        self._lock = threading.Lock()
        self.tensor = None  # a CPU uint8 tensor holding the file, when given one (may be pinned)
        self.remote = None  # a remote.RangedFile for URLs
        self.name = os.fspath(src) if isinstance(src, (str, os.PathLike)) else None  # a path or URL, for errors
        if remote.is_url(src):
            self.remote, self._own = remote.RangedFile(remote.backend_for(src)), True
            self._buf = self._file = None
            self.size = self.remote.size
            return
        if isinstance(src, torch.Tensor):
            if src.dtype != torch.uint8 or src.dim() != 1 or src.device.type != "cpu" or not src.is_contiguous():
                raise FormatError("a tensor source must be a contiguous 1-D uint8 CPU tensor")
            self.tensor, src = src, memoryview(src.numpy())
        if isinstance(src, (bytes, bytearray, memoryview)):
            self._buf, self._file = memoryview(src).cast("B"), None
            self.size = len(self._buf)
            return
        if isinstance(src, (str, os.PathLike)):
            if os.path.isdir(src):
                raise FormatError(f"{os.fspath(src)} is a directory")
            src, self._own = open(src, "rb"), True
            if hasattr(os, "pread"):
                self._fd = src.fileno()
        if not (hasattr(src, "seekable") and src.seekable()):
            self._buf, self._file = memoryview(src.read()).cast("B"), None
            self.size = len(self._buf)
            return
        self._buf, self._file = None, src
        self.size = src.seek(0, io.SEEK_END)

    def _check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise FormatError("a read reaches past the end of the file: it is truncated or corrupt")

    def read(self, offset: int, length: int) -> bytes | memoryview:
        self._check_range(offset, length)
        if self._buf is not None:
            return self._buf[offset:offset + length]
        if self.remote is not None:
            return self.remote.read(offset, length)
        if self._fd is not None:
            data = os.pread(self._fd, length, offset)
            while 0 < len(data) < length:  # a short read only where the file ends (or shrank)
                more = os.pread(self._fd, length - len(data), offset + len(data))
                if not more:
                    break
                data += more
        else:
            with self._lock:
                self._file.seek(offset)
                data = self._file.read(length)
        if len(data) != length:
            raise FormatError("the file ended early (changed while reading?)")
        return data

    def read_into(self, offset: int, out: memoryview) -> None:
        """Fill the writable buffer `out` with the bytes from `offset` on (`read`'s checks):
        straight from the file into `out` when opened by path, so a pinned buffer is filled
        without an intermediate copy."""
        out = memoryview(out).cast("B")
        length = len(out)
        if self._fd is None:
            out[:] = self.read(offset, length)
            return
        self._check_range(offset, length)
        done = 0
        while done < length:
            n = os.preadv(self._fd, [out[done:]], offset + done)
            if n == 0:
                raise FormatError("the file ended early (changed while reading?)")
            done += n

    def prefetch(self, extents) -> None:
        """Announce the (offset, length) extents about to be read: a remote file fetches them in
        as few requests as they allow; local sources need nothing."""
        if self.remote is not None:
            self.remote.prefetch(extents)

    def forget(self, start: int, stop: int) -> None:
        if self.remote is not None:
            self.remote.forget(start, stop)

    def expect_tail(self, length: int) -> None:
        if self.remote is not None:
            self.remote.tail_window = max(self.remote.tail_window, length)

    def close(self):
        if self._own:
            (self.remote or self._file).close()
