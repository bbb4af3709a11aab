"""Entropy-coded lanes of the second kind (format_spec/kvc-v1.md, section 10): static-table rANS
with a 32-bit state, 16-bit words and small tables, decoded by direct lookup.

Built for decoders that run thousands of lanes at once: a GPU thread per lane, or numpy
stepping every lane of many chunks in lockstep. A decoding step is one table lookup (a slot of
`2**P` gives the symbol, its weight and its offset within the weight), a multiply and at most
one 16-bit read; there is no search and no 64-bit arithmetic. Both coders here are vectorized
across lanes; the GPU kernels (`kvcodec.kernels`) repeat the decoder's integer steps exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from kvcodec.entropy import rans
from kvcodec.errors import CodecError
from kvcodec.uploads import to_device

STATE_LOW = 1 << 16  # the state stays in [2**16, 2**32) between symbols
MAX_PRECISION = 14
MAX_ALPHABET = rans.MAX_ALPHABET


def precision_of(sizes):
    """A table's precision P (weights sum to 2**P), fixed by its alphabet size n: the bit length
    of n - 1 plus 3, at most 14. Every symbol gets a weight >= 1, so the rarest cost at most
    log2(8 n) bits; the lookup table has 2**P slots, fewer than 16 n. Measured on SmolLM2 with
    16 tables per tensor: +3.8% bits over per-channel entropy (+3.3% with one more bit, for
    twice the lookup; +5.4% with one fewer). An int64 numpy array or torch tensor of sizes
    (anything else is read as numpy) gives the same kind back."""
    if isinstance(sizes, torch.Tensor):  # frexp's exponent is the bit length, exact below 2**53
        return (torch.frexp((sizes - 1).double())[1].long() + 3).clamp(max=MAX_PRECISION)
    bits = np.frexp(np.asarray(sizes, dtype=np.float64) - 1)[1]
    return (bits.astype(np.int64) + 3).clip(max=MAX_PRECISION)


def weights_from_counts_many(counts: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Every table's weights back to back, summing to 2**precision_of(size) each: the rule of
    `rans.weights_from_counts_many` at these totals."""
    return rans.weights_from_counts_many(counts, sizes, split=False, total=1 << precision_of(sizes))


def check_tables(weights: np.ndarray, sizes: np.ndarray) -> None:
    """CodecError unless every table (weights back to back) has weights >= 1 summing to
    2**precision_of(its size), with 2 to 4096 symbols."""
    sizes = np.asarray(sizes, dtype=np.int64)
    if sizes.size == 0:
        if np.asarray(weights).size:
            raise CodecError("an entropy table is malformed (weights without a table)")
        return
    if sizes.min() < 2 or sizes.max() > MAX_ALPHABET or int(sizes.sum()) != len(weights):
        raise CodecError(f"an entropy table is malformed (2 to {MAX_ALPHABET} symbols per table)")
    w = np.asarray(weights, dtype=np.int64)
    sums = np.add.reduceat(w, np.cumsum(sizes) - sizes)
    if w.min() < 1 or np.any(sums != 1 << precision_of(sizes)):
        raise CodecError("an entropy table is malformed (weights must be >= 1 and sum to 2**P)")


@dataclass(frozen=True)
class Lookup:
    """Decoding tables of many coding tables, back to back (torch, on any device): slot `q` of
    table `t` is `entry[offset[t] + q]`, holding `w[s] << 16 | (q - c[s])` in its low 32 bits
    and the symbol's value `lo[t] + s` (int32) in its high 32 bits: one load per decoded
    symbol. The CPU decoder reads them as numpy arrays, the GPU kernels on the device."""

    entry: torch.Tensor  # int64 [slots]
    offset: torch.Tensor  # int64 [tables]
    precision: torch.Tensor  # int64 [tables]

    @classmethod
    def build(cls, weights: np.ndarray, sizes: np.ndarray, los: np.ndarray, device=None) -> "Lookup":
        """From every table's weights back to back (checked by `check_tables`), alphabet sizes
        and first values (host arrays), built with torch on `device` (default the CPU). The
        inputs travel in one copy and every result's size is known on the host, so building on a
        GPU never waits for it."""
        n_symbols, n_tables = len(weights), len(sizes)
        sizes_host = np.asarray(sizes, dtype=np.int64)
        slots_total = int((1 << precision_of(sizes_host)).sum()) if n_tables else 0
        sums = int(sizes_host.sum()), int(np.asarray(weights, dtype=np.int64).sum())
        if sums != (n_symbols, slots_total):  # check_tables' rule, as far as the sizes below need it
            raise CodecError("an entropy table is malformed (its weights do not fill its slots)")
        packed = to_device(np.concatenate([weights, sizes, los]).astype(np.int64), device or "cpu")
        weights, sizes, los = packed[:n_symbols], packed[n_symbols:n_symbols + n_tables], packed[n_symbols + n_tables:]
        precision = precision_of(sizes)
        slots = torch.ones_like(precision) << precision
        offset = torch.cumsum(slots, 0) - slots
        first = torch.cumsum(sizes, 0) - sizes  # each table's first symbol in `weights`
        before = torch.cumsum(weights, 0) - weights
        table = torch.repeat_interleave(torch.arange(n_tables, device=packed.device, dtype=torch.int32), sizes,
                                        output_size=n_symbols)
        # per symbol: its value, and what a slot's entry holds beside the slot itself
        value = los[table] + torch.arange(n_symbols, device=packed.device) - first[table]
        head = (value << 32) | (weights << 16)
        bias = before - before[first][table] + offset[table]  # c[s], less the table's first slot
        symbol = torch.repeat_interleave(torch.arange(n_symbols, device=packed.device, dtype=torch.int32), weights,
                                         output_size=slots_total)
        entry = torch.arange(slots_total, device=packed.device, dtype=torch.int64)  # the global slot
        entry -= bias[symbol]  # slot - c[s] within its table
        entry |= head[symbol]
        return cls(entry, offset, precision)

    def numpy(self) -> "Lookup":
        return Lookup(*(t.cpu().numpy() for t in (self.entry, self.offset, self.precision)))


def encode_lanes(values: np.ndarray, phases: np.ndarray, phase_of_step: np.ndarray, tables,
                 active: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Every lane's uint16 words back to back, and each lane's word count. `values[t, i]` (int32)
    is the value lane i codes at step t, with table `phases[k, i]` at a step of phase
    `phase_of_step[t]`; `tables` holds every table back to back (numpy: per table its first
    value `los`, `first` symbol and `precision`; per symbol `weights` and `cumulative`).
    `active[t]`, when given, is how many leading lanes code a symbol at step t (lanes of fewer
    symbols last): lanes of different lengths step together. Values must lie in their tables
    (`outside_tables` checks). Vectorized across lanes."""
    steps, lanes = values.shape
    if steps == 0:
        return np.zeros(0, np.uint16), np.zeros(lanes, np.int64)
    active = np.full(steps, lanes) if active is None else active
    first = (tables.first - tables.los)[phases].astype(np.int32)  # a value's symbol index in `weights`
    shift = (32 - tables.precision[phases]).astype(np.uint32)
    precision = tables.precision[phases].astype(np.uint32)
    weights, cumulative = tables.weights.astype(np.uint32), tables.cumulative.astype(np.uint32)
    x = np.full(lanes, STATE_LOW, dtype=np.uint32)
    word = np.empty((steps, lanes), dtype=np.uint16)  # the word a step pushes, where `pushes` says so
    pushes = np.zeros((steps, lanes), dtype=bool)
    for t in range(steps - 1, -1, -1):
        k, m = int(phase_of_step[t]), int(active[t])
        whole = m == lanes  # most steps: no views
        xm = x if whole else x[:m]
        base, sh, prec = (first[k], shift[k], precision[k]) if whole else (first[k, :m], shift[k, :m],
                                                                           precision[k, :m])
        at = base + (values[t] if whole else values[t, :m])
        w = weights[at]
        pushes[t, :m] = full = xm >= (w << sh)
        word[t, :m] = xm
        xm = np.where(full, xm >> np.uint32(16), xm)
        q = (xm / w).astype(np.uint32)  # exact: float64 quotient of integers below 2**32, truncated
        xm = (q << prec) + (xm - q * w) + cumulative[at]
        if whole:
            x = xm
        else:
            x[:m] = xm
    # a lane's words: its final state (high word, then low), then the pushed words in the order
    # the decoder reads them back, i.e. by ascending step; a lane of no symbols has none
    keep = np.concatenate([np.repeat((np.arange(lanes) < active[0])[:, None], 2, 1), pushes.T], 1)
    words = np.concatenate([(x >> np.uint32(16)).astype(np.uint16)[:, None], x.astype(np.uint16)[:, None], word.T], 1)
    return words[keep], keep.sum(1)


def outside_tables(values: np.ndarray, phases: np.ndarray, group: int, tables) -> np.ndarray:
    """Which lanes hold a value outside its table, for `encode_lanes`'s arguments whose phases
    are anchors (phase 0, every `group`-th step from 0) and the other steps (phase 1)."""
    los, his = tables.los[phases], (tables.los + tables.sizes)[phases]
    anchors = values[::group]
    bad = (anchors.min(0, initial=los.max()) < los[0]) | (anchors.max(0, initial=los.min()) >= his[0])
    if group > 1 and len(values) > 1:
        n = len(values)
        padded = np.concatenate([values, np.repeat(values[1:2], -n % group, 0)])  # row 1 is not an anchor
        padded = padded.reshape(-1, group, values.shape[1])
        others = padded[:, 1:]
        bad |= (others.min((0, 1)) < los[1]) | (others.max((0, 1)) >= his[1])
    return bad


def decode_lanes(words: np.ndarray, start: np.ndarray, end: np.ndarray, phases: np.ndarray,
                 phase_of_step: np.ndarray, lookup: Lookup, active: np.ndarray | None = None) -> np.ndarray:
    """Decode `len(phase_of_step)` symbols from each lane, all lanes in lockstep (section 10).

    `words` is uint16 holding the lanes at [start, end) each and at least as many words after
    the last end as there are steps (reads past a corrupt lane's end stay inside `words`);
    `phases[k, i]` is lane i's table at a step of phase k, `phase_of_step[t]` the phase of step
    t; `active[t]`, when given, how many leading lanes decode a symbol at step t (as in
    `encode_lanes`). `lookup` holds numpy arrays. Returns int32 [steps, lanes] of the symbols'
    values (rows past a lane's last symbol undefined); CodecError if a lane is corrupt."""
    start, end = np.asarray(start, np.int64), np.asarray(end, np.int64)
    steps, lanes = len(phase_of_step), start.size
    active = np.full(steps, lanes) if active is None else active
    coded = np.searchsorted(-np.asarray(active), -np.arange(lanes), side="left") if steps else np.zeros(lanes, int)
    out = np.empty((steps, lanes), dtype=np.int32)
    empty = coded == 0
    if np.any(end[empty] != start[empty]):
        raise CodecError("an entropy-coded lane holds more data than its symbols need")
    if np.any(end[~empty] - start[~empty] < 2):
        raise CodecError("an entropy-coded lane is too short to hold its state")
    if steps == 0 or lanes == 0:
        return out
    w = words.astype(np.uint32)
    x = np.where(empty, STATE_LOW, (w[start] << np.uint32(16)) | w[np.minimum(start + 1, len(w) - 1)]).astype(np.uint32)
    ptr = np.where(empty, start, start + 2)
    entry = lookup.entry.view(np.uint64)
    offsets = lookup.offset[phases]
    precisions = lookup.precision[phases].astype(np.uint32)
    masks = (np.uint32(1) << precisions) - np.uint32(1)
    for t, (k, m) in enumerate(zip(phase_of_step.tolist(), np.asarray(active).tolist())):
        whole = m == lanes  # most steps: no views
        xm, pm = (x, ptr) if whole else (x[:m], ptr[:m])
        off, mask, prec = (offsets[k], masks[k], precisions[k]) if whole else (offsets[k, :m], masks[k, :m],
                                                                               precisions[k, :m])
        e = entry[off + (xm & mask)]
        out[t, :m] = e >> np.uint64(32)
        e = e.astype(np.uint32)
        xm = (e >> np.uint32(16)) * (xm >> prec) + (e & np.uint32(0xFFFF))
        need = xm < STATE_LOW
        low = need.nonzero()[0]  # about one lane in four: cheaper than a full `where`
        xm[low] = (xm[low] << np.uint32(16)) | w[pm[low]]
        pm += need
        if whole:
            x = xm
        else:
            x[:m] = xm
    if np.any(ptr != end) or np.any(x != STATE_LOW):
        raise CodecError("an entropy-coded lane does not end where its symbols do: it is corrupt")
    return out
