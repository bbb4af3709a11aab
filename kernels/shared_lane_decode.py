"""GPU decode of cachegen's lane format 2 (`kvcodec.entropy.shared_lanes`): one thread per
lane, i.e. per (record, batch entry, channel), each symbol one lookup in its table's slots
(`rans32.Lookup`, built on the device) and at most one 16-bit read, dequantized, converted and
stored straight into the output. Threads of a program are consecutive channels of one record,
so their stores at a token are contiguous. Integer steps are `rans32.decode_lanes`'s and
the float steps `shared_lanes`'s, so the output is bit-exact. With few lanes the word a
renormalization would read is loaded beside the lookup, so a step waits for one load.
"""

from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

from kvcodec.codecs.device import Check, Launch, where
from kvcodec.entropy import rans32
from kvcodec.entropy.shared_tables import SharedTables
from kvcodec.errors import CodecError
from kvcodec.kernels import jobs as J
from kvcodec.kernels import raw
from kvcodec.kernels.lane_decode import (ANCHOR_BITS, ANCHORED, BOUNDS_BLOCK, CHAN_BASE, CHANNELS, CODED,
                                         COUNTS_AT, GROUP, LANE_BASE, LANE_WORDS, N_LANES, SINKS, _bounds_kernel,
                                         on_device, tensor_entries)
from kvcodec.kernels.rounding import to_output_dtype

# the job columns are `lane_decode`'s (its `_bounds_kernel` reads them; ANCHORED is unused here),
# then each job's tensor set's first table
TABLE_BASE = J.extra_columns(12)[-1]
# Measured on an H200 (BENCHMARKS.md): with fewer lanes than the GPU holds threads each step waits
# on its loads, and reading the next word beside the lookup halves that wait (+30% at 1K tokens);
# with more, the loads' cache traffic bounds the kernel and reading the word only when it is
# needed wins (+40-90% from 8K tokens).
PREFETCH_BELOW_LANES = 1 << 18
LANES_PER_PROGRAM = {True: 128, False: 256}  # by PREFETCH; the best of 64/128/256 there
STATE_LOW = tl.constexpr(rans32.STATE_LOW)


@triton.jit
def _word(words_ptr, p, mask):
    """The 16-bit word at `p`, zero-extended."""
    return tl.load(words_ptr + p, mask=mask, other=0).to(tl.uint16, bitcast=True).to(tl.uint32)


@triton.jit
def _shared_lanes_kernel(words_ptr, out_ptr, lut_ptr, lut_off_ptr, lut_prec_ptr, chan_main_ptr, chan_delta_ptr,
                         chan_step_ptr, lane_start_ptr, lane_end_ptr, table_ptr, prog_ptr, err_ptr,
                         NCOL: tl.constexpr, D: tl.constexpr, BL: tl.constexpr, PREFETCH: tl.constexpr = False):
    pid = tl.program_id(0)
    job = tl.load(prog_ptr + 2 * pid)
    lane0 = tl.load(prog_ptr + 2 * pid + 1)
    row = table_ptr + job * NCOL
    coded = tl.load(row + CODED).to(tl.int32)
    channels = tl.load(row + CHANNELS)
    n_lanes = tl.load(row + N_LANES)
    group = tl.load(row + GROUP).to(tl.int32)
    chan_base = tl.load(row + CHAN_BASE)
    table_base = tl.load(row + TABLE_BASE)
    anchor_scale = ((127 - tl.load(row + ANCHOR_BITS)) << 23).to(tl.int32).to(tl.float32, bitcast=True)  # 2**-k
    base = tl.load(row + J.DST) + tl.load(row + SINKS) * D

    i = lane0 + tl.arange(0, BL)
    valid = i < n_lanes
    b = i // channels
    c = i % channels
    # the stored fields (uint16 table indices within the tensor set, read through int16)
    main = tl.load(chan_main_ptr + chan_base + c, mask=valid, other=0)
    delta = tl.load(chan_delta_ptr + chan_base + c, mask=valid, other=-1)
    anchored = delta != -1  # NO_TABLE (0xFFFF) for a direct channel
    main_t = table_base + main.to(tl.uint16, bitcast=True).to(tl.int64)
    other_t = tl.where(anchored, table_base + delta.to(tl.uint16, bitcast=True).to(tl.int64), main_t)
    step = tl.load(chan_step_ptr + chan_base + c, mask=valid, other=1.0)
    m_off = tl.load(lut_off_ptr + main_t)
    o_off = tl.load(lut_off_ptr + other_t)
    m_prec = tl.load(lut_prec_ptr + main_t).to(tl.uint32)
    o_prec = tl.load(lut_prec_ptr + other_t).to(tl.uint32)
    one = tl.full([BL], 1, tl.uint32)
    m_mask = (one << m_prec) - 1
    o_mask = (one << o_prec) - 1

    lane = tl.load(row + LANE_BASE) + i
    start = tl.load(lane_start_ptr + lane, mask=valid, other=0)
    end = tl.load(lane_end_ptr + lane, mask=valid, other=0)
    has = valid & (end - start >= 2)
    hi = _word(words_ptr, start, has)
    lo = _word(words_ptr, start + 1, has)
    x = (hi << 16) | lo
    p = start + 2
    out = out_ptr + base + b * tl.load(row + J.STRIDE_B) + (c // D) * tl.load(row + J.STRIDE_H) + c % D
    a = tl.zeros([BL], dtype=tl.float32)
    for t in range(0, coded):
        is_anchor = (t % group) == 0
        off = tl.where(is_anchor, m_off, o_off)
        prec = tl.where(is_anchor, m_prec, o_prec)
        mask = tl.where(is_anchor, m_mask, o_mask)
        e = tl.load(lut_ptr + off + (x & mask), mask=valid, other=0)
        if PREFETCH:
            nxt = _word(words_ptr, p, valid & (p < end))  # read beside the lookup
        ew = (e & 0xFFFFFFFF).to(tl.uint32)
        x = (ew >> 16) * (x >> prec) + (ew & 0xFFFF)
        low = x < STATE_LOW
        if not PREFETCH:
            nxt = _word(words_ptr, p, valid & low & (p < end))
        x = tl.where(low, (x << 16) | nxt, x)
        p += low.to(tl.int64)
        v = (e >> 32).to(tl.int32).to(tl.float32)
        a = tl.where(is_anchor, v * anchor_scale, a)
        u = tl.where(anchored, tl.where(is_anchor, a, a + v), v)
        tl.store(out + t * D, to_output_dtype(u * step, out_ptr), mask=valid)
    ok = (coded == 0) | ((p == end) & (x == STATE_LOW) & has)
    ok = ok & ((coded != 0) | (end == start))
    tl.store(err_ptr + pid, tl.max(tl.where(valid & ~ok, 1, 0)))


@triton.jit
def _lookup_kernel(weights_ptr, tables_ptr, cum_ptr, entry_ptr, n_tables, BN: tl.constexpr, BQ: tl.constexpr,
                   STEPS: tl.constexpr):
    """Table `program_id`'s slots of the lookup, as `rans32.Lookup.build` makes them: its weights'
    running sums into `cum_ptr`, then each slot's symbol by binary search in them. `tables_ptr`
    holds rows of `n_tables`: first slot, precision, first symbol, alphabet size, first value;
    `weights_ptr` the stored uint16 weights (through int16)."""
    t = tl.program_id(0)
    offset = tl.load(tables_ptr + t)
    slots = 1 << tl.load(tables_ptr + n_tables + t).to(tl.int32)
    first = tl.load(tables_ptr + 2 * n_tables + t)
    n = tl.load(tables_ptr + 3 * n_tables + t).to(tl.int32)
    lo = tl.load(tables_ptr + 4 * n_tables + t)
    weights, cum = weights_ptr + first, cum_ptr + first
    run = tl.zeros([], dtype=tl.int32)
    for b in range(0, n, BN):
        i = b + tl.arange(0, BN)
        w = tl.load(weights + i, mask=i < n, other=0).to(tl.uint16, bitcast=True).to(tl.int32)
        tl.store(cum + i, run + tl.cumsum(w, 0) - w, mask=i < n)
        run += tl.sum(w, 0)
    tl.debug_barrier()  # every thread of the program reads the sums the others stored
    for q0 in range(0, slots, BQ):
        q = q0 + tl.arange(0, BQ)
        a = tl.zeros([BQ], dtype=tl.int32)  # the last symbol whose running sum is at most q, in [a, z)
        z = a + n
        for _ in tl.static_range(STEPS):
            mid = (a + z) // 2
            below = tl.load(cum + mid) <= q
            a = tl.where(below, mid, a)
            z = tl.where(below, z, mid)
        w = tl.load(weights + a).to(tl.uint16, bitcast=True).to(tl.int64)
        entry = ((lo + a) << 32) | (w << 16) | (q - tl.load(cum + a)).to(tl.int64)
        tl.store(entry_ptr + offset + q, entry, mask=q < slots)


LOOKUP_BLOCK = 1024  # symbols summed, and slots filled, per step of a lookup program


class DeviceSharedTables:
    """One file's lane-format-2 tables on the device, from the blob's stored fields as they are
    (`SharedTables.stored`: one copy and no per-channel work on the host): per channel its step,
    main table and delta table (within its tensor set, NO_TABLE for a direct channel) and the
    lookup (`rans32.Lookup`, made by `_lookup_kernel`); `by_tensor` locates each (layer,
    key/value)'s channels and tables."""

    def __init__(self, tables: SharedTables, device):
        f = tables.fields
        n_c, n_t = len(f.steps), len(f.sizes)
        precision = rans32.precision_of(f.sizes)
        slots = np.ones_like(precision) << precision
        per_table = np.stack([np.cumsum(slots) - slots, precision, np.cumsum(f.sizes) - f.sizes, f.sizes, f.los])
        stored, per_table = J.to_device_many([tables.stored, per_table.astype(np.int64)], device)
        words = stored.view(torch.int16)  # steps (2 words each), main and delta tables, los (2 each), sizes, weights
        self.chan_step = stored[:4 * n_c].view(torch.float32)
        self.chan_main, self.chan_delta = words[2 * n_c:3 * n_c], words[3 * n_c:4 * n_c]
        entry = torch.empty(int(slots.sum()), dtype=torch.int64, device=device)
        if n_t:
            _lookup_kernel[(n_t,)](words[4 * n_c + 3 * n_t:], per_table, torch.empty(len(f.weights), dtype=torch.int32,
                                   device=device), entry, n_t, BN=LOOKUP_BLOCK, BQ=LOOKUP_BLOCK,
                                   STEPS=(rans32.MAX_ALPHABET - 1).bit_length(), num_warps=4)
        self.lookup = rans32.Lookup(entry, per_table[0], per_table[1])
        layers = 1 + int(f.head[:, 0].max(initial=-1))
        # row 2 * layer + key/value: first channel, group, anchor bits, first table, heads, head_dim
        self.by_tensor = np.full((2 * layers, 6), -1, dtype=np.int64)
        self.by_tensor[2 * f.head[:, 0] + f.head[:, 1]] = np.column_stack([f.channel_first[:-1], f.head[:, 4:6],
                                                                           f.table_first[:-1], f.head[:, 2:4]])


def device_tables(tables: SharedTables, device) -> DeviceSharedTables:
    """A file's tables on `device`, made once per device for as long as the file's context lives."""
    return on_device(tables, device, DeviceSharedTables)


def prepare_shared_lanes(tables: SharedTables, table: np.ndarray, sinks: np.ndarray, staged: torch.Tensor,
                         out: torch.Tensor, codec: str) -> Launch:
    """Launches decoding each job's payload: `sinks[job]` exact tokens, then its lanes."""
    device = out.device
    dev = device_tables(tables, device)
    entry = tensor_entries(dev.by_tensor, table, codec)
    batch, heads, head_dim = table[:, J.BATCH], table[:, J.HEADS], J.head_dim_of(table)
    channels = heads * head_dim
    n_lanes = batch * channels
    sink_bytes = batch * heads * sinks * head_dim * out.element_size()
    lane_bytes = table[:, J.LENGTH] - sink_bytes - 4 * n_lanes
    broken = np.flatnonzero((lane_bytes < 0) | (lane_bytes % 2 != 0))
    if broken.size:
        raise CodecError(f"{codec} payload of {where(table[broken[0]])} is truncated or has the wrong length")
    columns = {CODED: table[:, J.TOKENS] - sinks, SINKS: sinks, CHAN_BASE: entry[:, 0], CHANNELS: channels,
               ANCHORED: 0, GROUP: entry[:, 1], ANCHOR_BITS: entry[:, 2], LANE_BASE: np.cumsum(n_lanes) - n_lanes,
               COUNTS_AT: (table[:, J.SRC] + sink_bytes) // 4, N_LANES: n_lanes, LANE_WORDS: lane_bytes // 2,
               TABLE_BASE: entry[:, 3]}
    table = J.with_columns(table, *(np.broadcast_to(columns[k], len(table)) for k in sorted(columns)))
    total_lanes = int(n_lanes.sum())
    prefetch = total_lanes < PREFETCH_BELOW_LANES
    block = LANES_PER_PROGRAM[prefetch]
    per_job = -(-n_lanes // block)
    job = np.repeat(np.arange(len(table)), per_job)
    first = (np.arange(int(per_job.sum())) - np.repeat(np.cumsum(per_job) - per_job, per_job)) * block
    programs = np.stack([job, first], 1).astype(np.int64)
    both = J.to_device(np.concatenate([table.reshape(-1), programs.reshape(-1)]), device)  # one copy
    table_d, programs_d = both[:table.size], both[table.size:]
    lengths_bad = torch.empty(len(table), dtype=torch.int32, device=device)
    lane_end = torch.empty(total_lanes, dtype=torch.int64, device=device)
    lane_start = torch.empty_like(lane_end)

    def lane_bounds():
        _bounds_kernel[(len(table),)](staged.view(torch.int32), table_d, lane_start, lane_end, lengths_bad,
                                      NCOL=table.shape[1], BL=BOUNDS_BLOCK, UNIT=2)
    steps = [lane_bounds]
    copy_sinks = raw.copy_elements(staged, out, table, sinks)
    if copy_sinks:
        steps.append(copy_sinks)
    err = torch.empty(len(programs), dtype=torch.int32, device=device)  # every program stores its flag
    words = staged.view(torch.int16)
    lookup = dev.lookup
    args = (words, out, lookup.entry, lookup.offset, lookup.precision, dev.chan_main, dev.chan_delta, dev.chan_step,
            lane_start, lane_end, table_d, programs_d, err)

    def lanes():
        _shared_lanes_kernel[(len(programs),)](*args, NCOL=table.shape[1], D=head_dim, BL=block,
                                               num_warps=block // 32, PREFETCH=prefetch)
    if len(programs):
        steps.append(lanes)
    return Launch(steps, [Check(lengths_bad, np.arange(len(table)), "its lane lengths do not add up to its size"),
                          Check(err, job, "an entropy-coded lane does not end where its symbols do")])
