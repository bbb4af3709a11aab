"""Copying stored elements (the `raw` codec, cachegen's exact sink tokens) from a staged
payload into the output layout, as bits: no float conversion can change them."""

from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

from . import jobs as J

_INT_OF_SIZE = {2: torch.int16, 4: torch.int32}


@triton.jit
def _copy_kernel(src_ptr, out_ptr, table_ptr, prog_ptr, NCOL: tl.constexpr, SRC_COL: tl.constexpr,
                 TOKENS_COL: tl.constexpr, D: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr):
    pid = tl.program_id(0)
    job = tl.load(prog_ptr + 3 * pid)
    bh = tl.load(prog_ptr + 3 * pid + 1)
    t0 = tl.load(prog_ptr + 3 * pid + 2)
    row = table_ptr + job * NCOL
    src = tl.load(row + SRC_COL)  # in elements of the staged buffer's integer view
    dst = tl.load(row + 2)
    stride_b = tl.load(row + 3)
    stride_h = tl.load(row + 4)
    heads = tl.load(row + 6)
    tokens = tl.load(row + TOKENS_COL)
    t = t0 + tl.arange(0, BT)[:, None]
    d = tl.arange(0, BD)[None, :]
    mask = (t < tokens) & (d < D)
    x = tl.load(src_ptr + src + (bh * tokens + t) * D + d, mask=mask)
    base = dst + (bh // heads) * stride_b + (bh % heads) * stride_h
    tl.store(out_ptr + base + t * D + d, x, mask=mask)


def copy_elements(staged: torch.Tensor, out: torch.Tensor, table: np.ndarray, src_col: int, tokens_col: int,
                  head_dim: int) -> None:
    """For each row of `table` (job_table layout), copy [B, H, table[tokens_col], D] elements
    stored from byte `table[src_col]` of `staged` to the row's place in `out`."""
    size = out.element_size()
    table = table.copy()
    table[:, src_col] //= size
    if (table[:, tokens_col] == 0).all():
        return
    bt = max(1, min(J.block(int(table[:, tokens_col].max())), max(1, 2048 // J.block(head_dim))))
    programs = J.tile_programs(table, tokens_col, bt)
    itype = _INT_OF_SIZE[size]
    _copy_kernel[(len(programs),)](staged.view(itype), out.view(itype), J.to_device(table, out.device),
                                   J.to_device(programs, out.device), NCOL=table.shape[1], SRC_COL=src_col,
                                   TOKENS_COL=tokens_col, D=head_dim, BT=bt, BD=J.block(head_dim))


def decode(codec, context, jobs: list[J.Job], staged: torch.Tensor, out: torch.Tensor) -> list[torch.Tensor]:
    for j in jobs:
        if j.length != j.info.numel * out.element_size():
            from kvcodec.errors import CodecError

            raise CodecError(f"raw payload of layer {j.info.layer} {j.info.tensor} has the wrong length")
    copy_elements(staged, out, J.job_table(jobs), J.SRC, J.TOKENS, J.head_dim_of(jobs))
    return []
