"""What every token-tile kernel (raw, quant, ae) does first and last: find its job's row in the
job table and its tile, and where its (batch, head) goes in the output. The grid is laid out by
`jobs.tile_launches`: (token tiles, batch x heads, jobs)."""

import triton
import triton.language as tl

from kvcodec.kernels.jobs import BATCH, DST, HEADS, STRIDE_B, STRIDE_H


@triton.jit
def tile_of(table_ptr, first_job, NCOL: tl.constexpr, BT: tl.constexpr):
    """(row pointer, first token, batch x head index, heads, whether that index is in the job)."""
    t0 = tl.program_id(0).to(tl.int64) * BT
    bh = tl.program_id(1)
    row = table_ptr + (first_job + tl.program_id(2)) * NCOL
    heads = tl.load(row + HEADS)
    return row, t0, bh, heads, bh < tl.load(row + BATCH) * heads


@triton.jit
def output_base(row, bh, heads):
    """Element offset in the output of token 0 of this program's (batch, head)."""
    return tl.load(row + DST) + (bh // heads) * tl.load(row + STRIDE_B) + (bh % heads) * tl.load(row + STRIDE_H)
