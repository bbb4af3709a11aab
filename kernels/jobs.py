"""What a GPU decoder is asked to do: records whose payloads sit in one staged byte buffer,
each to be written into one flat output buffer in the `[batch, heads, tokens, head_dim]` layout."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from kvcodec.codec import ChunkInfo

ALIGN = 64  # payload offsets in a staged buffer; `.kvc` payloads are 64-byte aligned in files too


@dataclass(frozen=True)
class Job:
    """One record: its payload at `src` (bytes into the staged buffer), its decoded chunk at
    element `dst` of the output, batch and head strides `stride_b`, `stride_h`; the token
    stride is the head dim, so a chunk lands in the token rows of a `[B, H, T, D]` tensor."""

    info: ChunkInfo
    src: int
    length: int
    dst: int
    stride_b: int
    stride_h: int


def job_table(jobs: list[Job], *extra: np.ndarray) -> np.ndarray:
    """int64 [jobs, 8 + extra]: src, length, dst, stride_b, stride_h, batch, heads, tokens
    (head_dim is a launch constant), then codec-specific columns."""
    base = np.array([(j.src, j.length, j.dst, j.stride_b, j.stride_h, j.info.shape[0], j.info.shape[1],
                      j.info.shape[2]) for j in jobs], dtype=np.int64).reshape(len(jobs), 8)
    return np.ascontiguousarray(np.column_stack([base, *extra]) if extra else base)


SRC, LENGTH, DST, STRIDE_B, STRIDE_H, BATCH, HEADS, TOKENS = range(8)


def tile_programs(table: np.ndarray, tokens_col: int, block_tokens: int) -> np.ndarray:
    """int64 [programs, 3]: (job, batch*heads index, first token) for tiles of `block_tokens`
    tokens of every (job, batch, head); jobs with no tokens get no program."""
    bh = table[:, BATCH] * table[:, HEADS]
    tiles = -(-table[:, tokens_col] // block_tokens)
    per_job = bh * tiles
    job = np.repeat(np.arange(len(table)), per_job)
    k = np.arange(int(per_job.sum())) - np.repeat(np.cumsum(per_job) - per_job, per_job)
    t = tiles[job]
    return np.ascontiguousarray(np.stack([job, k // np.maximum(t, 1), (k % np.maximum(t, 1)) * block_tokens], 1))


def head_dim_of(jobs: list[Job]) -> int:
    dims = {j.info.shape[3] for j in jobs}
    if len(dims) != 1:
        raise ValueError("one launch decodes records of one head dim")
    return dims.pop()


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


def first_failure(checks: list[Check]) -> tuple[int, str] | None:
    """(job index, problem) of the first corrupt payload, or None."""
    for check in checks:
        bad = torch.nonzero(check.flags.reshape(-1)).reshape(-1)
        if bad.numel():
            return int(check.job_of_flag[int(bad[0])]), check.problem
    return None
