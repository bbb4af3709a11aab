"""Small host arrays to a CUDA device without the host waiting and without pinning memory per
copy: they pass through one pinned buffer reused as a ring. Pinning a fresh buffer for each
small copy costs far more than the copy (tenths of a millisecond on an H200 host, several per
restore); a copy from pageable memory makes the host wait for the work queued before it.

A region of the ring is written again only after the copy that last read it has completed
(an event per copy); arrays larger than a quarter of the ring are pinned on their own.
"""

from __future__ import annotations

import threading
from collections import deque
from functools import cache

import numpy as np
import torch

RING_BYTES = 16 << 20
ALIGN = 256


class _Ring:
    def __init__(self):
        self.lock = threading.Lock()
        self.buffer: torch.Tensor | None = None
        self.at = 0
        self.in_flight: deque[tuple[int, int, torch.cuda.Event]] = deque()  # (start, end, copy done)

    def _reserve(self, n: int) -> int:
        if self.buffer is None:
            self.buffer = torch.empty(RING_BYTES, dtype=torch.uint8, pin_memory=True)
        if self.at + n > RING_BYTES:  # wrap: the regions past this point belong to the lap before
            while self.in_flight and self.in_flight[0][0] >= self.at:
                self._retire()
            self.at = 0
        start, end = self.at, self.at + n
        # the lap before's regions all start at or after `at` (this lap's lie before it): retire
        # those this one will overwrite, oldest first
        while self.in_flight and start <= self.in_flight[0][0] < end:
            self._retire()
        self.at = -(-end // ALIGN) * ALIGN
        return start

    def _retire(self) -> None:
        """Forget the oldest region once the copy that reads it has run."""
        self.in_flight.popleft()[2].synchronize()

    def upload(self, arrays: list[np.ndarray], starts: list[int], n: int, device: torch.device) -> torch.Tensor:
        """uint8 [n] on `device`: each array's bytes at its start."""
        with self.lock:
            start = self._reserve(n)
            staged = self.buffer[start:start + n]
            _pack(staged, arrays, starts)
            out = staged.to(device, non_blocking=True)
            done = torch.cuda.Event()
            done.record(torch.cuda.current_stream(device))
            self.in_flight.append((start, start + n, done))
        return out


_ring = _Ring()


def _pack(buffer: torch.Tensor, arrays: list[np.ndarray], starts: list[int]) -> torch.Tensor:
    """`buffer` (a host uint8 tensor) holding each array's bytes at its start."""
    host = buffer.numpy()
    for array, at in zip(arrays, starts):
        host[at:at + array.nbytes] = array.reshape(-1).view(np.uint8)
    return buffer


def to_device(array: np.ndarray, device) -> torch.Tensor:
    """`array` (any numeric numpy array) as a tensor on `device`; on a CUDA device the copy is
    queued on the current stream and the host does not wait for it."""
    return to_device_many([array], device)[0]


def to_device_many(arrays, device) -> list[torch.Tensor]:
    """`to_device` of each of `arrays` in one copy: on a CUDA device they travel one after
    another (at multiples of 16 bytes) and come back as views of what arrived."""
    arrays = [np.ascontiguousarray(a) for a in arrays]
    device = torch.device(device)
    sizes = [-(-a.nbytes // 16) * 16 for a in arrays]
    starts = np.cumsum([0] + sizes[:-1]).tolist()
    n = sum(sizes)
    if device.type == "cuda" and 0 < n <= RING_BYTES // 4:
        flat = _ring.upload(arrays, starts, n, device)
    else:
        joined = torch.empty(n, dtype=torch.uint8, pin_memory=device.type == "cuda")
        flat = _pack(joined, arrays, starts).to(device, non_blocking=True)
    return [flat[at:at + a.nbytes].view(_torch_dtype(a.dtype)).view(a.shape) for a, at in zip(arrays, starts)]


@cache
def _torch_dtype(dtype: np.dtype) -> torch.dtype:
    return torch.from_numpy(np.empty(0, dtype)).dtype
