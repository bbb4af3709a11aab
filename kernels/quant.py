"""GPU decode of `quant` records: unpack the codes, apply each group's minimum and scale and
write fp16/bf16/fp32 straight into the output layout, in one pass with no intermediate tensor.
Bit-exact with the CPU decoder: `code * scale` is exact in float32 (spec 8.4), so a fused
multiply-add rounds exactly as the CPU's multiply then add."""

from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

from kvcodec.codecs import quant
from kvcodec.codecs.device import Launch, where
from kvcodec.errors import CodecError
from kvcodec.kernels import jobs as J
from kvcodec.kernels.rounding import to_output_dtype
from kvcodec.kernels.tiles import output_base, tile_of

IS_KEY, N_GROUPS = J.extra_columns(2)  # the columns `prepare` adds
TILE_ELEMENTS = 1024  # elements per program; with NUM_WARPS, the best of a sweep on an H100
NUM_WARPS = 2


@triton.jit
def _unpacked_tile(codes, rows, BITS: tl.constexpr, D: tl.constexpr, BT: tl.constexpr):
    """Codes [BT, D] from whole packed rows of D codes starting at byte `codes`: loaded as
    contiguous bytes, split by shifts and interleaved back into place (LSB first)."""
    per: tl.constexpr = 8 // BITS
    j = tl.arange(0, D // per)[None, :]
    ti = tl.arange(0, BT)[:, None]
    packed = tl.load(codes + ti * (D // per) + j, mask=(ti < rows) & (j < D // per), other=0).to(tl.int32)
    mask: tl.constexpr = (1 << BITS) - 1
    if BITS == 8:
        return packed
    elif BITS == 4:
        return tl.interleave(packed & mask, packed >> 4)
    else:
        return tl.interleave(tl.interleave(packed & mask, (packed >> 4) & mask),
                             tl.interleave((packed >> 2) & mask, packed >> 6))


@triton.jit
def _quant_kernel(staged_ptr, params_ptr, out_ptr, table_ptr, first_job, NCOL: tl.constexpr, BITS: tl.constexpr,
                  GROUP: tl.constexpr, D: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr, WHOLE_ROWS: tl.constexpr):
    row, t0, bh, heads, in_job = tile_of(table_ptr, first_job, NCOL, BT)
    src = tl.load(row + J.SRC)
    tokens = tl.load(row + J.TOKENS)
    is_key = tl.load(row + IS_KEY)
    n_groups = tl.load(row + N_GROUPS)
    rows = tl.where(in_job, tokens - t0, 0)  # tokens of this tile
    ti = tl.arange(0, BT)[:, None]
    d = tl.arange(0, BD)[None, :]
    mask = (ti < rows) & (d < D)
    # keys: groups along tokens per channel; values: groups along channels per token
    params = params_ptr + src // 2
    if is_key != 0:
        params += (bh * ((tokens + GROUP - 1) // GROUP) + t0 // GROUP) * D
        g = (((t0 % GROUP).to(tl.int32) + ti) // GROUP) * D + d
    else:
        params += (bh * tokens + t0) * ((D + GROUP - 1) // GROUP)
        g = ti * ((D + GROUP - 1) // GROUP) + d // GROUP
    lo = tl.load(params + g, mask=mask).to(tl.float32)
    scale = tl.load(params + n_groups + g, mask=mask).to(tl.float32)
    first_bit = (bh * tokens + t0) * D * BITS  # of the tile, in the packed codes
    codes = staged_ptr + src + 4 * n_groups + (first_bit >> 3)
    if WHOLE_ROWS:  # every token's codes fill whole bytes, and BD == D
        code = _unpacked_tile(codes, rows, BITS, D, BT)
    else:
        bit = (first_bit & 7) + (ti * D + d) * BITS
        word = tl.load(codes + (bit >> 3), mask=mask).to(tl.int32)
        if BITS == 3:  # a 3-bit code may straddle two bytes
            packed_end = ((tl.load(row + J.BATCH) * heads * tokens * D + 7) // 8) * 3 - (first_bit >> 3)
            nxt = tl.load(codes + (bit >> 3) + 1, mask=mask & ((bit >> 3) + 1 < packed_end), other=0).to(tl.int32)
            word = word | (nxt << 8)
        code = (word >> (bit & 7).to(tl.int32)) & ((1 << BITS) - 1)
    value = code.to(tl.float32) * scale + lo
    base = output_base(row, bh, heads) + t0 * D
    if D % 16 == 0:
        base = tl.multiple_of(base, 16)
    tl.store(out_ptr + base + ti * D + d, to_output_dtype(value, out_ptr), mask=mask)


def supports(codec, context, table: np.ndarray, itemsize: int) -> np.ndarray:
    return J.fits_grid(table)


def prepare(codec, context, table: np.ndarray, staged: torch.Tensor, out: torch.Tensor) -> Launch:
    b, h, t, d = (table[:, c] for c in (J.BATCH, J.HEADS, J.TOKENS, J.HEAD_DIM))
    g = codec.group_size
    is_key = table[:, J.TENSOR] == 0
    groups = quant.group_count(is_key, b, h, t, d, g)
    expected = quant.payload_length(is_key, b, h, t, d, g, codec.bits)
    bad = np.flatnonzero(table[:, J.LENGTH] != expected)
    if bad.size:
        raise CodecError(f"quant payload of {where(table[bad[0]])} is {int(table[bad[0], J.LENGTH])} bytes; "
                         f"its shape needs {int(expected[bad[0]])}")
    table = J.with_columns(table, is_key, groups)
    head_dim = J.head_dim_of(table)
    bt = max(1, min(J.block(int(t.max())), max(1, TILE_ELEMENTS // J.block(head_dim))))
    launches = J.tile_launches(table, t, bt)
    whole_rows = codec.bits != 3 and J.block(head_dim) == head_dim and head_dim * codec.bits % 8 == 0 \
        and head_dim * codec.bits >= 8 * (8 // codec.bits)
    args = (staged, staged.view(torch.float16), out, J.to_device(table, out.device))

    def run():
        for first, grid in launches:
            _quant_kernel[grid](*args, first, NCOL=table.shape[1], BITS=codec.bits, GROUP=g, D=head_dim, BT=bt,
                                BD=J.block(head_dim), WHOLE_ROWS=whole_rows, num_warps=NUM_WARPS)
    return Launch([run], [])
