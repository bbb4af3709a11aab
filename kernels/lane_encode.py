"""rANS lane encoding on the GPU, one lane per thread, producing exactly the words of
`kvcodec.entropy.rans.encode_lane` (constriction's coder; spec section 9, "Encoding")."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _encode_kernel(sym_ptr, count_ptr, table_ptr, cdf_ptr, weight_ptr, out_ptr, length_ptr, n_lanes, width,
                   BL: tl.constexpr):
    lane = tl.program_id(0) * BL + tl.arange(0, BL)
    valid = lane < n_lanes
    count = tl.load(count_ptr + lane, mask=valid, other=0)
    base = tl.load(table_ptr + lane, mask=valid, other=0)
    row = lane.to(tl.int64) * width  # symbols of a lane: sym[lane, 0..count)
    out = lane.to(tl.int64) * (width + 2)  # room for one word per symbol and the final two
    x = tl.zeros([BL], dtype=tl.uint64)
    k = tl.zeros([BL], dtype=tl.int64)
    n_max = tl.max(count)
    for i in range(0, n_max):
        t = n_max - 1 - i
        active = valid & (t < count)
        s = tl.load(sym_ptr + row + t, mask=active, other=0)
        w = tl.load(weight_ptr + base + s, mask=active, other=1).to(tl.uint64)
        c = tl.load(cdf_ptr + base + s, mask=active, other=0).to(tl.uint64)
        push = active & ((x >> 40) >= w)
        tl.store(out_ptr + out + k, (x & 0xFFFFFFFF).to(tl.uint32).to(tl.int32, bitcast=True), mask=push)
        k = tl.where(push, k + 1, k)
        x = tl.where(push, x >> 32, x)
        x = tl.where(active, ((x // w) << 24) | (x % w + c), x)
    high = x >> 32
    low = x & 0xFFFFFFFF
    has_low = valid & ((high != 0) | (low != 0))
    tl.store(out_ptr + out + k, low.to(tl.uint32).to(tl.int32, bitcast=True), mask=has_low)
    k = tl.where(has_low, k + 1, k)
    has_high = valid & (high != 0)
    tl.store(out_ptr + out + k, high.to(tl.uint32).to(tl.int32, bitcast=True), mask=has_high)
    k = tl.where(has_high, k + 1, k)
    tl.store(length_ptr + lane, k, mask=valid)


def encode_lanes(symbols: torch.Tensor, counts: torch.Tensor, table_base: torch.Tensor, cdf: torch.Tensor,
                 weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode lane `i`'s first `counts[i]` symbols of `symbols[i]` (int32, [lanes, width], each
    below its table's size) with the table whose cumulative weights and weights start at
    `table_base[i]` of `cdf` and `weights` (int32). Returns (words, lengths): the lanes' words
    back to back (int32 bit patterns of the uint32 words) and each lane's word count."""
    lanes, width = symbols.shape
    out = torch.empty(lanes * (width + 2), dtype=torch.int32, device=symbols.device)
    lengths = torch.empty(lanes, dtype=torch.int64, device=symbols.device)
    if lanes:
        block = 64
        _encode_kernel[(triton.cdiv(lanes, block),)](symbols.contiguous(), counts, table_base, cdf, weights, out,
                                                     lengths, lanes, width, BL=block)
    keep = torch.arange(width + 2, device=symbols.device)[None, :] < lengths[:, None]
    return out.view(lanes, width + 2)[keep], lengths
