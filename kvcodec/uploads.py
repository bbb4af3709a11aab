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

    def upload(self, array: np.ndarray, device: torch.device) -> torch.Tensor:
        n = array.nbytes
        with self.lock:
            start = self._reserve(n)
            staged = self.buffer[start:start + n]
            staged.numpy()[:] = array.reshape(-1).view(np.uint8)
            out = staged.view(torch.from_numpy(array[:0].reshape(-1)).dtype).to(device, non_blocking=True)
            done = torch.cuda.Event()
            done.record(torch.cuda.current_stream(device))
            self.in_flight.append((start, start + n, done))
        return out.view(array.shape)


_ring = _Ring()


def to_device(array: np.ndarray, device) -> torch.Tensor:
    """`array` (any numeric numpy array) as a tensor on `device`; on a CUDA device the copy is
    queued on the current stream and the host does not wait for it."""
    array = np.ascontiguousarray(array)
    device = torch.device(device)
    if device.type != "cuda":
        return torch.from_numpy(array).to(device)
    if array.nbytes == 0 or array.nbytes > RING_BYTES // 4:
        return torch.from_numpy(array).pin_memory().to(device, non_blocking=True)
    return _ring.upload(array, device)
