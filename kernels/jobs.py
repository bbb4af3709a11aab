"""What a GPU decoder is asked to do: records whose payloads sit in one staged byte buffer, each
to be written into one flat output buffer in the `[batch, heads, tokens, head_dim]` layout.

Records are rows of an int64 job table (built with numpy, never per record in Python: a 32K-token
cache has thousands of records). Kernels read the columns below by number."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

ALIGN = 64  # payload offsets in a staged buffer; `.kvc` payloads are 64-byte aligned in files too

# SRC: payload's byte offset in the staged buffer; DST: element offset in the output of the
# chunk's first element; STRIDE_B, STRIDE_H: element strides (the token stride is HEAD_DIM).
SRC, LENGTH, DST, STRIDE_B, STRIDE_H, BATCH, HEADS, TOKENS, LAYER, TENSOR, TOKEN_START, HEAD_DIM = range(12)
COLUMNS = 12  # codec-specific columns follow


def with_columns(table: np.ndarray, *extra) -> np.ndarray:
    return np.ascontiguousarray(np.column_stack([table[:, :COLUMNS], *extra]).astype(np.int64))


def where(row: np.ndarray) -> str:
    """A record's place, for error messages."""
    return (f"layer {int(row[LAYER])} {('key', 'value')[int(row[TENSOR])]} "
            f"tokens {int(row[TOKEN_START])}+{int(row[TOKENS])}")


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


def to_device(array: np.ndarray, device) -> torch.Tensor:
    """A small host array on the device, copied from pinned memory so the host never waits."""
    t = torch.from_numpy(np.ascontiguousarray(array))
    if torch.device(device).type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t


@dataclass
class Check:
    """Corruption found on the device: `flags` (one per launch item, nonzero where the payload
    it decoded proved corrupt) and the job each item belongs to. Read after the launches, so
    decoding never waits for the host."""

    flags: torch.Tensor
    job_of_flag: np.ndarray
    problem: str


class Launch:
    """Prepared kernel launches (host work done, inputs on the device): call to run them."""

    def __init__(self, steps, checks: list[Check]):
        self._steps = steps
        self.checks = checks

    def __call__(self) -> "Launch":
        for step in self._steps:
            step()
        return self


def first_failure(checks: list[Check]) -> tuple[int, str] | None:
    """(job index, problem) of the first corrupt payload, or None."""
    for check in checks:
        bad = torch.nonzero(check.flags.reshape(-1)).reshape(-1)
        if bad.numel():
            return int(check.job_of_flag[int(bad[0])]), check.problem
    return None
