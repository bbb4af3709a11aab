"""GPU decode of entropy-coded lanes (`kvcodec.entropy.lanes`), for cachegen's records and ae's
entropy-coded latents. Every lane is decoded by one GPU thread, and the symbols go straight to
the output: dequantized, anchors and deltas recombined, converted, stored; exact tokens stored
before the lanes (cachegen's sinks) are copied by the raw copy kernel.

A thread owns one (record, batch, channel): its main lane and, for an anchored channel, its
delta lane, decoded in lockstep (a group's first token from the main lane, the others from the
delta lane). A program covers a few channels of several consecutive chunks of one (layer,
key/value), so threads of a warp often share a table and its lookups hit the same cache lines.
Symbols are found by binary search in the table's cumulative weights (spec section 9), which
`_cumulative_kernel` makes on the device from the stored count codes; the arithmetic is the CPU
decoder's, operation for operation, so the output is bit-exact.
"""

from __future__ import annotations

import weakref

import numpy as np
import torch
import triton
import triton.language as tl

from kvcodec.cache import TENSORS
from kvcodec.codecs.device import Check, Launch, where
from kvcodec.entropy.tables import FileTables
from kvcodec.errors import CodecError
from kvcodec.kernels import jobs as J
from kvcodec.kernels import raw
from kvcodec.kernels.rounding import to_output_dtype

# the job columns `prepare_lanes` adds
CODED, SINKS, CHAN_BASE, CHANNELS, ANCHORED, GROUP, ANCHOR_BITS, LANE_BASE, COUNTS_AT, N_LANES, LANE_WORDS = \
    J.extra_columns(11)
BOUNDS_BLOCK = 1024  # lane lengths a program of the bounds kernel sums at a time
LANES_PER_PROGRAM = 64  # these three: the best of a sweep on an H100 (BENCHMARKS.md)
MAX_CHUNKS_PER_PROGRAM = 4
NUM_WARPS = 2


@triton.jit
def _load_word(words_ptr, p, mask):
    return tl.load(words_ptr + p, mask=mask, other=0).to(tl.uint32, bitcast=True).to(tl.uint64)


@triton.jit
def _initial_state(words_ptr, start, end, mask):
    """The 64-bit state from a lane's last two words; returns it, the next word's end, and
    whether the lane is in canonical form (empty, or its last word nonzero: spec section 9)."""
    has = mask & (end > start)
    x = tl.where(has, _load_word(words_ptr, end - 1, has), 0)
    canonical = (~has) | (x != 0)
    p = tl.where(has, end - 1, end)
    has = mask & (p > start)
    x = tl.where(has, (x << 32) | _load_word(words_ptr, p - 1, has), x)
    return x, tl.where(has, p - 1, p), canonical


@triton.jit
def _bounds_kernel(words_ptr, table_ptr, start_ptr, end_ptr, bad_ptr, NCOL: tl.constexpr, BL: tl.constexpr,
                   UNIT: tl.constexpr = 1):
    """Each job's lane boundaries (offsets in the staged buffer, in lane words of 4 / UNIT bytes)
    from the lane lengths its payload stores (32-bit, at 32-bit word COUNTS_AT): lanes follow one
    another from the word after the lengths, clipped to the payload; flags the job when the
    lengths do not add up to its lane words."""
    job = tl.program_id(0)
    row = table_ptr + job * NCOL
    counts_at = tl.load(row + COUNTS_AT)
    n_lanes = tl.load(row + N_LANES)
    expected = tl.load(row + LANE_WORDS)
    lane_base = tl.load(row + LANE_BASE)
    first = (counts_at + n_lanes) * UNIT  # the first lane's first word
    total = tl.zeros([], dtype=tl.int64)
    for b0 in range(0, n_lanes, BL):
        i = b0 + tl.arange(0, BL)
        m = i < n_lanes
        count = tl.load(words_ptr + counts_at + i, mask=m, other=0).to(tl.uint32, bitcast=True).to(tl.int64)
        end = tl.minimum(first + total + tl.cumsum(count, 0), first + expected)
        tl.store(end_ptr + lane_base + i, end, mask=m)
        tl.store(start_ptr + lane_base + i, tl.maximum(end - count, first), mask=m)
        total += tl.sum(count, 0)
    tl.store(bad_ptr + job, (total != expected).to(tl.int32))


@triton.jit
def _lanes_kernel(words_ptr, out_ptr, cdf_ptr, tab_off_ptr, tab_lo_ptr, tab_size_ptr, chan_main_ptr,
                  chan_delta_ptr, chan_step_ptr, chan_ord_ptr, lane_start_ptr, lane_end_ptr, table_ptr,
                  prog_ptr, err_ptr, NCOL: tl.constexpr, D: tl.constexpr, BC: tl.constexpr, BR: tl.constexpr):
    pid = tl.program_id(0)
    r0 = tl.load(prog_ptr + 5 * pid)
    nr = tl.load(prog_ptr + 5 * pid + 1)
    b = tl.load(prog_ptr + 5 * pid + 2)
    c0 = tl.load(prog_ptr + 5 * pid + 3)
    iters = tl.load(prog_ptr + 5 * pid + 4).to(tl.int32)
    first = table_ptr + r0 * NCOL  # records of one program share their (layer, key/value)
    batch = tl.load(first + J.BATCH)
    chan_base = tl.load(first + CHAN_BASE)
    channels = tl.load(first + CHANNELS)
    n_anchored = tl.load(first + ANCHORED)
    group = tl.load(first + GROUP)
    anchor_scale = ((127 - tl.load(first + ANCHOR_BITS)) << 23).to(tl.int32).to(tl.float32, bitcast=True)  # 2**-bits

    ri = tl.arange(0, BR)[None, :]
    rmask = ri < nr
    rows = table_ptr + (r0 + ri) * NCOL
    coded = tl.load(rows + CODED, mask=rmask, other=0)
    base = tl.load(rows + J.DST, mask=rmask, other=0) + tl.load(rows + SINKS, mask=rmask, other=0) * D \
        + b * tl.load(rows + J.STRIDE_B, mask=rmask, other=0)
    stride_h = tl.load(rows + J.STRIDE_H, mask=rmask, other=0)
    lane_base = tl.load(rows + LANE_BASE, mask=rmask, other=0)

    c = c0 + tl.arange(0, BC)[:, None]
    cmask = c < channels
    main_tab = tl.load(chan_main_ptr + chan_base + c, mask=cmask, other=0)
    delta_tab = tl.load(chan_delta_ptr + chan_base + c, mask=cmask, other=-1)
    anchored = delta_tab >= 0
    delta_tab = tl.where(anchored, delta_tab, main_tab)
    step = tl.load(chan_step_ptr + chan_base + c, mask=cmask, other=1.0)
    m_off = tl.load(tab_off_ptr + main_tab)
    m_size = tl.load(tab_size_ptr + main_tab)
    m_lo = tl.load(tab_lo_ptr + main_tab)
    d_off = tl.load(tab_off_ptr + delta_tab)
    d_size = tl.load(tab_size_ptr + delta_tab)
    d_lo = tl.load(tab_lo_ptr + delta_tab)

    valid = cmask & rmask
    main_lane = lane_base + b * channels + c
    delta_lane = lane_base + batch * channels + b * n_anchored + tl.load(chan_ord_ptr + chan_base + c, mask=cmask,
                                                                        other=0)
    has_delta = valid & anchored
    ms = tl.load(lane_start_ptr + main_lane, mask=valid, other=0)
    ds = tl.load(lane_start_ptr + delta_lane, mask=has_delta, other=0)
    xm, pm, canon_m = _initial_state(words_ptr, ms, tl.load(lane_end_ptr + main_lane, mask=valid, other=0), valid)
    xd, pd, canon_d = _initial_state(words_ptr, ds, tl.load(lane_end_ptr + delta_lane, mask=has_delta, other=0),
                                     has_delta)
    out = out_ptr + base + (c // D) * stride_h + c % D
    a = tl.zeros([BC, BR], dtype=tl.float32)
    n_max = tl.max(tl.where(rmask, coded, 0))
    for t in range(0, n_max):
        active = valid & (t < coded)
        use_main = (~anchored) | ((t % group) == 0)
        x = tl.where(use_main, xm, xd)
        p = tl.where(use_main, pm, pd)
        start = tl.where(use_main, ms, ds)
        off = tl.where(use_main, m_off, d_off)
        q = (x & 0xFFFFFF).to(tl.int32)
        lo_i = tl.zeros([BC, BR], dtype=tl.int32)
        hi_i = tl.where(use_main, m_size, d_size) + lo_i
        left = lo_i
        right = lo_i + (1 << 24)
        for _ in range(iters):  # last cumulative weight <= q (iters: enough for this program's tables)
            mid = (lo_i + hi_i) >> 1
            cum = tl.load(cdf_ptr + off + mid, mask=active, other=0)
            go = cum <= q
            lo_i = tl.where(go, mid, lo_i)
            hi_i = tl.where(go, hi_i, mid)
            left = tl.where(go, cum, left)
            right = tl.where(go, right, cum)
        xn = (right - left).to(tl.uint64) * (x >> 24) + (q - left).to(tl.uint64)
        refill = active & ((xn >> 32) == 0) & (p > start)
        xn = tl.where(refill, (xn << 32) | _load_word(words_ptr, p - 1, refill), xn)
        pn = tl.where(refill, p - 1, p)
        xn = tl.where(active, xn, x)
        xm = tl.where(use_main, xn, xm)
        xd = tl.where(use_main, xd, xn)
        pm = tl.where(use_main, pn, pm)
        pd = tl.where(use_main, pd, pn)
        v = (lo_i + tl.where(use_main, m_lo, d_lo)).to(tl.float32)
        a = tl.where(use_main, v * anchor_scale, a)
        u = tl.where(anchored, tl.where(use_main, a, a + v), v)
        tl.store(out + t * D, to_output_dtype(u * step, out_ptr), mask=active)
    ok = (pm == ms) & (xm == 0) & canon_m & ((~anchored) | ((pd == ds) & (xd == 0) & canon_d))
    tl.store(err_ptr + pid, tl.max(tl.where(valid & ~ok, 1, 0)))


class DeviceTables:
    """One file's tables on the device: every table's cumulative weights back to back (each
    followed by 2**24), and per channel of the file its tables, step, delta-lane ordinal and the
    binary-search steps its tables need; `by_tensor` locates each (layer, key/value)'s channels."""

    def __init__(self, file_tables: FileTables, device):
        flat = file_tables.flat_fields()
        layers = 1 + max((layer for layer, _ in flat.keys), default=-1)
        # row 2 * layer + key/value: first channel, anchored channels, group, anchor bits, heads, head_dim
        self.by_tensor = np.full((2 * layers, 6), -1, dtype=np.int64)
        chan_first, tab_first = flat.channel_first[:-1], flat.table_first[:-1]
        c = np.diff(flat.channel_first)
        sizes, anchored = flat.sizes, flat.anchored
        tensor = np.repeat(np.arange(len(c)), c)  # of each channel
        seen = np.r_[0, np.cumsum(anchored)]  # anchored channels before each channel
        rows = np.array([2 * layer + TENSORS.index(name) for layer, name in flat.keys], dtype=np.int64)
        self.by_tensor[rows] = np.column_stack([chan_first, seen[flat.channel_first[1:]] - seen[chan_first],
                                                flat.head[:, 2], flat.head[:, 3], flat.head[:, 0], flat.head[:, 1]])
        # per channel: its main table, its delta table (-1 when direct), its ordinal among anchored ones
        mains = tab_first[tensor] + np.arange(len(tensor)) - chan_first[tensor]
        ordinals = np.where(anchored, seen[:-1] - seen[chan_first][tensor], 0)
        deltas = np.where(anchored, tab_first[tensor] + c[tensor] + ordinals, -1)
        ends = np.cumsum(sizes)
        # three copies to the device, none waited for: the integers, the steps, the count codes
        ints = J.to_device(np.concatenate([sizes, ends - sizes + np.arange(len(sizes)), flat.los, mains, deltas,
                                           ordinals]).astype(np.int64), device)
        n_tab, n_chan = len(sizes), len(mains)
        size_d, offset_d, lo_d = ints[:n_tab], ints[n_tab:2 * n_tab], ints[2 * n_tab:3 * n_tab]
        self.chan_main, self.chan_delta, self.chan_ordinal = (ints[3 * n_tab + k * n_chan:3 * n_tab + (k + 1) * n_chan]
                                                              for k in range(3))
        self.cdf = cumulative_with_ends(J.to_device(flat.codes, device), sizes)
        self.table_offset = offset_d
        self.table_size = size_d.to(torch.int32)
        self.table_lo = lo_d.to(torch.int32)
        self.chan_step = J.to_device(np.ascontiguousarray(flat.steps, dtype=np.float32), device)
        table_steps = np.ceil(np.log2(np.maximum(sizes, 2))).astype(np.int64)
        self.search_steps = np.maximum(table_steps[mains], np.where(deltas >= 0, table_steps[deltas], 0)) \
            if len(sizes) else np.zeros(0, dtype=np.int64)


@triton.jit
def _cumulative_kernel(codes_ptr, tables_ptr, code_first_ptr, size_ptr, cdf_ptr, BN: tl.constexpr, BJ: tl.constexpr):
    """One table's cumulative weights from its count codes (spec 8.5 and 9, `rans`): counts, each
    symbol's share of 2**24, one more to the symbols of largest count (lowest index on ties)
    while the sum falls short; then the running sum, and 2**24 after it."""
    t = tl.load(tables_ptr + tl.program_id(0))
    first = tl.load(code_first_ptr + t)
    n = tl.load(size_ptr + t)
    i = tl.arange(0, BN)
    live = i < n
    c = _counts(codes_ptr, first, i, live)
    total = tl.sum(c, 0)
    free = (1 << 24) - n
    share = tl.where(total == 0, free // n, c * free // tl.maximum(total, 1))
    w = tl.where(live, share + 1, 0)
    left = (1 << 24) - tl.sum(w, 0)
    rank = tl.zeros([BN], dtype=tl.int64)  # symbols before this one: larger count, or equal and lower index
    for j0 in range(0, n, BJ):
        j = j0 + tl.arange(0, BJ)
        cj = _counts(codes_ptr, first, j, j < n)
        before = (cj[None, :] > c[:, None]) | ((cj[None, :] == c[:, None]) & (j[None, :] < i[:, None]))
        rank += tl.sum((before & (j < n)[None, :]).to(tl.int64), 1)
    w += (live & (rank < left)).to(tl.int64)
    out = cdf_ptr + first + t  # each table's entries are followed by its end
    tl.store(out + i, (tl.cumsum(w, 0) - w).to(tl.int32), mask=live)
    tl.store(out + n, (1 << 24) + tl.zeros([], dtype=tl.int32))


@triton.jit
def _counts(codes_ptr, first, i, mask):
    """Symbol counts from one-byte count codes: exact below 32, else 5 significant bits and an exponent."""
    k = tl.load(codes_ptr + first + i, mask=mask, other=0).to(tl.int64)
    high = tl.maximum(k - 32, 0)
    count = tl.where(k < 32, k, (16 + high % 16) << tl.maximum(1 + high // 16, 0))
    return tl.where(mask, count, 0)


CUMULATIVE_CLASSES = (64, 512, 4096)  # alphabet sizes up to these share a launch


def cumulative_with_ends(codes: torch.Tensor, sizes: np.ndarray) -> torch.Tensor:
    """int32 on the codes' device: every table's cumulative weights, each followed by 2**24, made
    from the stored count codes (`sizes`: the tables' alphabet sizes; the weights of
    `kvcodec.entropy.rans`, the same integers). One program per table."""
    device = codes.device
    sizes = np.asarray(sizes, dtype=np.int64)
    cdf = torch.empty(int(sizes.sum()) + len(sizes), dtype=torch.int32, device=device)
    if not len(sizes):
        return cdf
    first = J.to_device(np.cumsum(sizes) - sizes, device)
    sizes_d = J.to_device(sizes, device)
    low = 0
    for top in CUMULATIVE_CLASSES:
        tables = np.flatnonzero((sizes > low) & (sizes <= top))
        low = top
        if len(tables):
            _cumulative_kernel[(len(tables),)](codes, J.to_device(tables, device), first, sizes_d, cdf, BN=top,
                                               BJ=min(top, 64), num_warps=4 if top <= 512 else 8)
    return cdf


_ON_DEVICE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # a context -> {device: its device tables}


def on_device(context, device, make):
    """`make(context, device)`, made once per device for as long as the file's context lives
    (each lane format's device tables)."""
    per_device = _ON_DEVICE.setdefault(context, {})
    if device not in per_device:
        per_device[device] = make(context, device)
    return per_device[device]


def device_tables(file_tables: FileTables, device) -> DeviceTables:
    """A file's tables on `device`, made once per device for as long as the file's context lives."""
    return on_device(file_tables, device, DeviceTables)


def tensor_entries(by_tensor: np.ndarray, table: np.ndarray, codec: str) -> np.ndarray:
    """Each job's row of `by_tensor` (indexed by 2 * layer + key/value; its last two columns
    heads and head_dim), CodecError naming the first job whose tensor the tables lack or whose
    shape they do not fit."""
    key = 2 * table[:, J.LAYER] + table[:, J.TENSOR]
    known = key < len(by_tensor)  # rows of (layer, key/value)s the blob lacks hold -1
    entry = np.vstack([by_tensor, np.full((1, by_tensor.shape[1]), -1)])[np.where(known, key, -1)]
    covered = (entry[:, -2] == table[:, J.HEADS]) & (entry[:, -1] == table[:, J.HEAD_DIM])
    if not np.all(covered):
        bad = table[np.flatnonzero(~covered)[0]]
        raise CodecError(f"{codec} tables do not cover {where(bad)} of {int(bad[J.HEADS])} heads x "
                         f"{int(bad[J.HEAD_DIM])}")
    return entry


def _programs(table: np.ndarray, search_steps: np.ndarray) -> tuple[np.ndarray, int, int]:
    """int64 [programs, 5]: (first job, jobs, batch index, first channel, binary-search steps
    its channels' tables need), and the block's channels and chunks. A program's jobs are
    consecutive chunks of one (layer, key/value); `search_steps` is per channel of the file."""
    same = np.r_[False, table[1:, CHAN_BASE] == table[:-1, CHAN_BASE]]
    runs = np.flatnonzero(~same)
    run_len = np.diff(np.r_[runs, len(table)])
    br = min(MAX_CHUNKS_PER_PROGRAM, J.block(int(run_len.max())))
    bc = max(1, LANES_PER_PROGRAM // br)
    batch, channels, base = (table[runs, col] for col in (J.BATCH, CHANNELS, CHAN_BASE))
    n_r, n_cb = -(-run_len // br), -(-channels // bc)  # chunk groups and channel blocks per run

    def within(counts):  # for items counted per run: each one's run, and its index within it
        first = np.cumsum(counts) - counts
        run = np.repeat(np.arange(len(counts)), counts)
        return run, np.arange(int(counts.sum())) - first[run]

    block_run, cb = within(n_cb)  # per channel block: the steps its tables need
    lo = base[block_run] + cb * bc
    width = np.minimum(bc, channels[block_run] - cb * bc)
    gather = np.repeat(lo - (np.cumsum(width) - width), width) + np.arange(int(width.sum()))
    steps = np.maximum.reduceat(search_steps[gather], np.cumsum(width) - width)
    run, local = within(batch * n_cb * n_r)  # programs, per run ordered by (batch, channel block, chunks)
    r, c, b = local % n_r[run], (local // n_r[run]) % n_cb[run], local // (n_r[run] * n_cb[run])
    r0 = runs[run] + r * br
    nr = np.minimum(br, runs[run] + run_len[run] - r0)
    progs = np.stack([r0, nr, b, c * bc, steps[(np.cumsum(n_cb) - n_cb)[run] + c]], 1)
    return progs.astype(np.int64), bc, br


def prepare_lanes(file_tables: FileTables, table: np.ndarray, sinks: np.ndarray, staged: torch.Tensor,
                  out: torch.Tensor, codec: str) -> Launch:
    """Launches decoding each job's payload: `sinks[job]` exact tokens, then the lanes of the
    others (`kvcodec.entropy.lanes`), coded with `file_tables`."""
    device = out.device
    tables = device_tables(file_tables, device)
    entry = tensor_entries(tables.by_tensor, table, codec)
    batch, heads, head_dim = table[:, J.BATCH], table[:, J.HEADS], J.head_dim_of(table)
    channels, n_anchored = heads * head_dim, entry[:, 1]
    n_lanes = batch * (channels + n_anchored)
    sink_bytes = batch * heads * sinks * head_dim * out.element_size()
    lane_bytes = table[:, J.LENGTH] - sink_bytes - 4 * n_lanes
    broken = np.flatnonzero((lane_bytes < 0) | (lane_bytes % 4 != 0))
    if broken.size:
        raise CodecError(f"{codec} payload of {where(table[broken[0]])} is truncated or has the wrong length")
    table = J.with_columns(table, table[:, J.TOKENS] - sinks, sinks, entry[:, 0], channels, n_anchored, entry[:, 2],
                           entry[:, 3], np.cumsum(n_lanes) - n_lanes, (table[:, J.SRC] + sink_bytes) // 4, n_lanes,
                           lane_bytes // 4)
    words = staged.view(torch.int32)
    table_d = J.to_device(table, device)
    total_lanes = int(n_lanes.sum())
    lengths_bad = torch.empty(len(table), dtype=torch.int32, device=device)
    lane_end = torch.empty(total_lanes, dtype=torch.int64, device=device)
    lane_start = torch.empty_like(lane_end)

    def lane_bounds():
        _bounds_kernel[(len(table),)](words, table_d, lane_start, lane_end, lengths_bad, NCOL=table.shape[1],
                                      BL=BOUNDS_BLOCK)
    steps = [lane_bounds]
    copy_sinks = raw.copy_elements(staged, out, table, sinks)
    if copy_sinks:
        steps.append(copy_sinks)
    programs, bc, br = _programs(table, tables.search_steps)
    err = torch.zeros(len(programs), dtype=torch.int32, device=device)
    args = (words, out, tables.cdf, tables.table_offset, tables.table_lo, tables.table_size, tables.chan_main,
            tables.chan_delta, tables.chan_step, tables.chan_ordinal, lane_start, lane_end, table_d,
            J.to_device(programs, device), err)

    def lanes():
        _lanes_kernel[(len(programs),)](*args, NCOL=table.shape[1], D=head_dim, BC=bc, BR=br, num_warps=NUM_WARPS)
    if len(programs):
        steps.append(lanes)
    return Launch(steps, [Check(lengths_bad, np.arange(len(table)), "its lane lengths do not add up to its size"),
                          Check(err, programs[:, 0], "an entropy-coded lane does not end where its symbols do")])
