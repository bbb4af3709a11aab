"""GPU encode of cachegen's lane format 2: the same bytes as `kvcodec.entropy.shared_lanes`'s
CPU encoder. Symbols are quantized by torch where the chunk lies (`quantize`, the CPU's
arithmetic); one thread per lane runs `rans32.encode_lanes`'s integer steps in reverse,
pushing words into a scratch row of its own; the rows are then reversed and packed by torch.
"""

from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

from kvcodec.entropy import rans32
from kvcodec.entropy.shared_lanes import Coded, batches, lane_tables, lane_values, outside_error, pack
from kvcodec.entropy.shared_tables import FlatTables

LANES_PER_PROGRAM = 128
STATE_LOW = tl.constexpr(rans32.STATE_LOW)


@triton.jit
def _encode_kernel(values_ptr, base_ptr, lo_ptr, size_ptr, prec_ptr, weights_ptr, cum_ptr, scratch_ptr, count_ptr,
                   bad_ptr, n, lanes, group, BL: tl.constexpr):
    i = tl.program_id(0) * BL + tl.arange(0, BL)
    valid = i < lanes
    base0 = tl.load(base_ptr + i, mask=valid, other=0)
    base1 = tl.load(base_ptr + lanes + i, mask=valid, other=0)
    lo0 = tl.load(lo_ptr + i, mask=valid, other=0)
    lo1 = tl.load(lo_ptr + lanes + i, mask=valid, other=0)
    size0 = tl.load(size_ptr + i, mask=valid, other=2)
    size1 = tl.load(size_ptr + lanes + i, mask=valid, other=2)
    prec0 = tl.load(prec_ptr + i, mask=valid, other=1).to(tl.uint32)
    prec1 = tl.load(prec_ptr + lanes + i, mask=valid, other=1).to(tl.uint32)
    x = tl.full([BL], STATE_LOW, tl.uint32)
    count = tl.zeros([BL], dtype=tl.int64)
    bad = tl.zeros([BL], dtype=tl.int32)
    row = scratch_ptr + i.to(tl.int64) * (n + 2)
    for k in range(0, n):
        t = n - 1 - k
        other = (t % group) != 0
        v = tl.load(values_ptr + t.to(tl.int64) * lanes + i, mask=valid, other=0)
        sym = v - tl.where(other, lo1, lo0)
        inside = (sym >= 0) & (sym < tl.where(other, size1, size0))
        bad = tl.where(valid & ~inside, 1, bad)
        at = tl.where(other, base1, base0) + tl.where(inside, sym, 0)
        p = tl.where(other, prec1, prec0)
        w = tl.load(weights_ptr + at, mask=valid, other=1).to(tl.uint32)
        c = tl.load(cum_ptr + at, mask=valid, other=0).to(tl.uint32)
        full = x >= (w << (32 - p))
        tl.store(row + count, (x & 0xFFFF).to(tl.uint16).to(tl.int16, bitcast=True), mask=valid & full)
        count += full.to(tl.int64)
        x = tl.where(full, x >> 16, x)
        q = x // w
        x = (q << p) + (x - q * w) + c
    tl.store(row + count, (x & 0xFFFF).to(tl.uint16).to(tl.int16, bitcast=True), mask=valid)
    tl.store(row + count + 1, (x >> 16).to(tl.uint16).to(tl.int16, bitcast=True), mask=valid)
    tl.store(count_ptr + i, count + 2, mask=valid)
    tl.store(bad_ptr + i, bad, mask=valid)


def _by_tokens(batch: list[int], items: list[Coded]) -> list[list[int]]:
    """A batch cut where its items' coded tokens change (one launch codes lanes of one length)."""
    out: list[list[int]] = []
    for i in batch:
        if not out or items[out[-1][0]].shape[2] != items[i].shape[2]:
            out.append([])
        out[-1].append(i)
    return out


def encode_many(xs: list[torch.Tensor], items: list[Coded], flat: FlatTables) -> list[bytes]:
    """`shared_lanes.encode_many` on the chunks' CUDA device (same arguments, the same bytes)."""
    device = xs[0].device
    out: list[bytes] = [b""] * len(items)
    tables = {name: torch.from_numpy(np.ascontiguousarray(getattr(flat, name))).to(device)
              for name in ("weights", "cumulative")}
    for batch in (sub for whole in batches(items) for sub in _by_tokens(whole, items)):
        n, group = items[batch[0]].shape[2], items[batch[0]].tables.group_size
        values = [lane_values(xs[i], items[i].tables) for i in batch]
        phases = [np.stack(lane_tables(items[i])) for i in batch]
        v = torch.cat(values, 1).contiguous()
        lanes = v.shape[1]
        table = np.concatenate(phases, 1)  # [2, lanes]
        ints = torch.from_numpy(np.stack([flat.first[table], flat.los[table], flat.sizes[table],
                                          flat.precision[table]]).astype(np.int64)).to(device)
        scratch = torch.empty((lanes, n + 2), dtype=torch.int16, device=device)
        counts = torch.empty(lanes, dtype=torch.int64, device=device)
        bad = torch.empty(lanes, dtype=torch.int32, device=device)
        if n:
            _encode_kernel[(triton.cdiv(lanes, LANES_PER_PROGRAM),)](
                v, ints[0], ints[1], ints[2], ints[3], tables["weights"], tables["cumulative"], scratch, counts, bad,
                n, lanes, group, BL=LANES_PER_PROGRAM)
        else:
            counts.zero_()
            bad.zero_()
        widths = [x.shape[1] for x in values]
        if bool(bad.any()):
            raise outside_error(items, batch, widths, int(torch.nonzero(bad)[0]))
        ends = torch.cumsum(counts, 0)
        lane_of = torch.repeat_interleave(torch.arange(lanes, device=device), counts)
        j = torch.arange(len(lane_of), device=device) - (ends - counts)[lane_of]
        words = scratch.reshape(-1)[lane_of * (n + 2) + counts[lane_of] - 1 - j].cpu().numpy().view(np.uint16)
        for i, payload in zip(batch, pack(words, counts.cpu().numpy(), widths)):
            out[i] = payload
    return out
