"""GPU decode of `quant` records: unpack the codes, apply each group's minimum and scale and
write fp16/bf16/fp32 straight into the output layout, in one pass with no intermediate tensor.
Bit-exact with the CPU decoder: `code * scale` is exact in float32 (spec 8.4), so a fused
multiply-add rounds exactly as the CPU's multiply then add."""

from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

from kvcodec.errors import CodecError

from . import jobs as J
from .rounding import to_output_dtype

IS_KEY, GROUPS = 8, 9  # extra job columns


@triton.jit
def _quant_kernel(staged_ptr, params_ptr, out_ptr, table_ptr, prog_ptr, group_size, NCOL: tl.constexpr,
                  BITS: tl.constexpr, D: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr):
    pid = tl.program_id(0)
    job = tl.load(prog_ptr + 3 * pid)
    bh = tl.load(prog_ptr + 3 * pid + 1)
    t0 = tl.load(prog_ptr + 3 * pid + 2)
    row = table_ptr + job * NCOL
    src = tl.load(row + 0)
    dst = tl.load(row + 2)
    stride_b = tl.load(row + 3)
    stride_h = tl.load(row + 4)
    heads = tl.load(row + 6)
    tokens = tl.load(row + 7)
    is_key = tl.load(row + 8)
    n_groups = tl.load(row + 9)
    t = t0 + tl.arange(0, BT)[:, None]
    d = tl.arange(0, BD)[None, :]
    mask = (t < tokens) & (d < D)
    # keys: groups along tokens per channel; values: groups along channels per token
    key_group = (bh * ((tokens + group_size - 1) // group_size) + t // group_size) * D + d
    value_group = (bh * tokens + t) * ((D + group_size - 1) // group_size) + d // group_size
    g = tl.where(is_key != 0, key_group, value_group)
    lo = tl.load(params_ptr + src // 2 + g, mask=mask).to(tl.float32)
    scale = tl.load(params_ptr + src // 2 + n_groups + g, mask=mask).to(tl.float32)
    bit = ((bh * tokens + t) * D + d) * BITS
    codes = staged_ptr + src + 4 * n_groups
    word = tl.load(codes + (bit >> 3), mask=mask).to(tl.int32)
    if BITS == 3:  # a 3-bit code may straddle two bytes
        packed_len = ((tl.load(row + 5) * heads * tokens * D + 7) // 8) * 3
        nxt = tl.load(codes + (bit >> 3) + 1, mask=mask & ((bit >> 3) + 1 < packed_len), other=0).to(tl.int32)
        word = word | (nxt << 8)
    code = (word >> (bit & 7).to(tl.int32)) & ((1 << BITS) - 1)
    value = code.to(tl.float32) * scale + lo
    base = dst + (bh // heads) * stride_b + (bh % heads) * stride_h
    tl.store(out_ptr + base + t * D + d, to_output_dtype(value, out_ptr), mask=mask)


def decode(codec, context, jobs: list[J.Job], staged: torch.Tensor, out: torch.Tensor) -> list[torch.Tensor]:
    groups = np.array([int(np.prod(codec._param_shape(j.info))) for j in jobs], dtype=np.int64)
    for j in jobs:
        if j.length != codec.payload_length(j.info):
            raise CodecError(f"quant payload of layer {j.info.layer} {j.info.tensor} tokens {j.info.token_start} "
                             f"is {j.length} bytes; its shape needs {codec.payload_length(j.info)}")
    is_key = np.array([j.info.tensor == "key" for j in jobs], dtype=np.int64)
    table = J.job_table(jobs, is_key, groups)
    head_dim = J.head_dim_of(jobs)
    bt = max(1, min(J.block(int(table[:, J.TOKENS].max())), max(1, 4096 // J.block(head_dim))))
    programs = J.tile_programs(table, J.TOKENS, bt)
    if len(programs):
        _quant_kernel[(len(programs),)](staged, staged.view(torch.float16), out, J.to_device(table, out.device),
                                        J.to_device(programs, out.device), codec.group_size, NCOL=table.shape[1],
                                        BITS=codec.bits, D=head_dim, BT=bt, BD=J.block(head_dim))
    return []
