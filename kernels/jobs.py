"""The job table (`kvcodec.codecs.device`) on the Triton side: its columns as Triton constants,
which kernels and host code alike index it by, and how launches are laid out over it.

Records are rows of the int64 table (built with numpy, never per record in Python: a 32K-token
cache has thousands of records)."""

from __future__ import annotations

import numpy as np
import triton.language as tl

from kvcodec.codecs import device
from kvcodec.uploads import to_device, to_device_many  # noqa: F401  (kernels copy their small inputs with them)

SRC = tl.constexpr(device.SRC)
LENGTH = tl.constexpr(device.LENGTH)
DST = tl.constexpr(device.DST)
STRIDE_B = tl.constexpr(device.STRIDE_B)
STRIDE_H = tl.constexpr(device.STRIDE_H)
BATCH = tl.constexpr(device.BATCH)
HEADS = tl.constexpr(device.HEADS)
TOKENS = tl.constexpr(device.TOKENS)
LAYER = tl.constexpr(device.LAYER)
TENSOR = tl.constexpr(device.TENSOR)
TOKEN_START = tl.constexpr(device.TOKEN_START)
HEAD_DIM = tl.constexpr(device.HEAD_DIM)
COLUMNS = device.COLUMNS  # a decoder's own columns follow


def extra_columns(n: int) -> tuple:
    """Triton constants naming a decoder's `n` own columns, in order after the shared ones."""
    return tuple(tl.constexpr(COLUMNS + i) for i in range(n))


def with_columns(table: np.ndarray, *extra) -> np.ndarray:
    return np.ascontiguousarray(np.column_stack([table[:, :COLUMNS], *extra]).astype(np.int64))


MAX_GRID_JOBS = 65535  # the grid's second and third axes


def fits_grid(table: np.ndarray) -> np.ndarray:
    """Jobs whose batch x heads fit a grid axis (beyond it, records decode on the CPU)."""
    return table[:, BATCH] * table[:, HEADS] <= MAX_GRID_JOBS


def tile_launches(table: np.ndarray, tokens: np.ndarray, block_tokens: int) -> list[tuple[int, tuple[int, int, int]]]:
    """Grids of programs for tiles of `block_tokens` of the first `tokens[job]` tokens of every
    (job, batch, head): (first job, (tiles, batch*heads, jobs)) per launch. Programs past a
    job's tokens or heads find nothing to do; no per-program table is built or copied."""
    launches = []
    for first in range(0, len(table), MAX_GRID_JOBS):
        part = slice(first, first + MAX_GRID_JOBS)
        tiles = int((-(-tokens[part] // block_tokens)).max(initial=0))
        bh = int((table[part, BATCH] * table[part, HEADS]).max(initial=0))
        if tiles and bh:
            launches.append((first, (tiles, bh, len(table[part]))))
    return launches


def head_dim_of(table: np.ndarray) -> int:
    dims = np.unique(table[:, HEAD_DIM])
    if len(dims) != 1:
        raise ValueError("one launch decodes records of one head dim")
    return int(dims[0])


def block(n: int) -> int:
    """The power of two at least `n` (Triton block shapes are powers of two)."""
    return 1 << max(0, (int(n) - 1).bit_length())
