"""Copying stored elements (the `raw` codec, cachegen's exact sink tokens) from a staged
payload into the output layout, as bits: no float conversion can change them."""

from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

from kvcodec.codecs.device import Launch, where
from kvcodec.errors import CodecError
from kvcodec.kernels import jobs as J
from kvcodec.kernels.tiles import output_base, tile_of

_INT_OF_SIZE = {2: torch.int16, 4: torch.int32}
SRC_ELEMENT, COPY_TOKENS = J.extra_columns(2)  # the columns `copy_elements` adds


@triton.jit
def _copy_kernel(src_ptr, out_ptr, table_ptr, first_job, NCOL: tl.constexpr, D: tl.constexpr, BT: tl.constexpr,
                 BD: tl.constexpr):
    row, t0, bh, heads, in_job = tile_of(table_ptr, first_job, NCOL, BT)
    src = tl.load(row + SRC_ELEMENT)  # element offset in the staged buffer's integer view
    tokens = tl.where(in_job, tl.load(row + COPY_TOKENS), 0)  # tokens to copy
    t = t0 + tl.arange(0, BT)[:, None]
    d = tl.arange(0, BD)[None, :]
    mask = (t < tokens) & (d < D)
    x = tl.load(src_ptr + src + (bh * tokens + t) * D + d, mask=mask)
    base = output_base(row, bh, heads)
    tl.store(out_ptr + base + t * D + d, x, mask=mask)


def copy_elements(staged: torch.Tensor, out: torch.Tensor, table: np.ndarray, tokens: np.ndarray):
    """A launch copying, for each job, `[B, H, tokens[job], D]` elements stored from the start
    of its payload to its place in `out`; None when there is nothing to copy."""
    if not tokens.any():
        return None
    size = out.element_size()
    table = J.with_columns(table, table[:, J.SRC] // size, tokens)
    head_dim = J.head_dim_of(table)
    bt = max(1, min(J.block(int(tokens.max())), max(1, 4096 // J.block(head_dim))))
    itype = _INT_OF_SIZE[size]
    args = (staged.view(itype), out.view(itype), J.to_device(table, out.device))
    launches = J.tile_launches(table, tokens, bt)

    def run():
        for first, grid in launches:
            _copy_kernel[grid](*args, first, NCOL=table.shape[1], D=head_dim, BT=bt, BD=J.block(head_dim))
    return run


def supports(codec, context, table: np.ndarray, itemsize: int) -> np.ndarray:
    return J.fits_grid(table)


def prepare(codec, context, table: np.ndarray, staged: torch.Tensor, out: torch.Tensor) -> Launch:
    numel = table[:, J.BATCH] * table[:, J.HEADS] * table[:, J.TOKENS] * table[:, J.HEAD_DIM]
    bad = np.flatnonzero(table[:, J.LENGTH] != numel * out.element_size())
    if bad.size:
        raise CodecError(f"raw payload of {where(table[bad[0]])} has the wrong length")
    run = copy_elements(staged, out, table, table[:, J.TOKENS])
    return Launch([run] if run else [], [])
