"""Entropy-coded lanes: static-table rANS with a 64-bit state, 32-bit words and 24-bit
probabilities (format_spec/kvc-v1.md, section 9).

Every lane is an independent stream, so lanes decode in parallel (numpy across lanes on the
CPU, one GPU thread per lane). The fast CPU path is constriction's `AnsCoder`, whose output is
exactly this bitstream when it is given the integer weights `w - 1` as probabilities: its
quantization then reproduces `w` exactly. `decode_lanes_reference` follows the specification
step by step, vectorized over lanes; tests hold the two to the same bits.
"""

from __future__ import annotations

import numpy as np

from kvcodec.errors import CodecError

PRECISION = 24
TOTAL = 1 << PRECISION
WORD_BITS = 32
MAX_ALPHABET = 4096


def weights_from_counts(counts: np.ndarray) -> np.ndarray:
    """Integer weights >= 1 summing to 2**24, proportional to `counts` (any symbol may occur).

    Deterministic: each symbol gets 1 plus its share of the rest rounded down; what is left
    goes one by one to the symbols with the largest counts (lowest index first on ties).
    """
    counts = np.asarray(counts, dtype=np.int64)
    n = counts.size
    if not 2 <= n <= MAX_ALPHABET:
        raise CodecError(f"alphabet of {n} symbols; 2 to {MAX_ALPHABET} are supported")
    total = int(counts.sum())
    free = TOTAL - n
    if total == 0:
        share = np.full(n, free // n, dtype=np.int64)
    else:
        share = counts * free // total
    weights = share + 1
    left = TOTAL - int(weights.sum())
    order = np.lexsort((np.arange(n), -counts))  # largest count first, then lowest index
    weights[order[np.arange(left) % n]] += 1
    return weights


def weights_from_counts_many(counts: np.ndarray, sizes: np.ndarray, split: bool = True, total=TOTAL):
    """`weights_from_counts` of many tables at once: `counts` holds them back to back,
    `sizes` their alphabet sizes. Same results, vectorized (files hold thousands of tables);
    a list of arrays, or with `split=False` the weights back to back in one array. `total`
    (one, or one per table) is what each table's weights sum to, by the same rule."""
    counts, sizes = np.asarray(counts, dtype=np.int64), np.asarray(sizes, dtype=np.int64)
    if sizes.size == 0:
        return [] if split else np.zeros(0, dtype=np.int64)
    if sizes.min() < 2 or sizes.max() > MAX_ALPHABET or counts.size != int(sizes.sum()):
        raise CodecError(f"alphabets of 2 to {MAX_ALPHABET} symbols are supported")
    table = np.repeat(np.arange(sizes.size), sizes)
    start = np.cumsum(sizes) - sizes
    totals, target = np.add.reduceat(counts, start), np.broadcast_to(np.asarray(total, dtype=np.int64), sizes.shape)
    if np.any(target < sizes):
        raise CodecError("a table's total is below its alphabet size")
    free = target - sizes
    safe_total = np.maximum(totals, 1)
    share = np.where(totals[table] == 0, (free // sizes)[table], counts * free[table] // safe_total[table])
    weights = share + 1
    left = target - np.add.reduceat(weights, start)  # below the table's size: each floor loses < 1
    # per table the `left` symbols of largest count get one more, lowest index first on ties
    if counts.max() < 1 << 20:  # always so for counts rebuilt from their codes
        # no ranking of every symbol: one sort of (table, count) finds each table's threshold key;
        # symbols before it get one more, and of those tied with it the first ones by index
        key = (table << 20) | (np.int64((1 << 20) - 1) - counts)  # ascending: largest count first
        ordered = np.sort(key)
        threshold = np.where(left > 0, ordered[start + np.maximum(left, 1) - 1], -1)[table]
        above, tied = key < threshold, key == threshold
        seen = np.cumsum(tied)
        tied_rank = seen - (seen[start] - tied[start])[table]  # 1, 2, ... among a table's tied, by index
        weights += above | (tied & (tied_rank <= (left - np.add.reduceat(above, start))[table]))
    else:
        index = np.arange(counts.size) - start[table]
        order = np.lexsort((index, -counts, table))
        rank = np.empty_like(order)
        rank[order] = np.arange(counts.size) - start[table[order]]
        weights += rank < left[table]
    return np.split(weights, start[1:]) if split else weights


def cumulative_many(weights: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Each table's cumulative weights c[s] (c[0] = 0), for tables back to back in `weights`
    with alphabet `sizes`; same layout as `weights`."""
    weights, sizes = np.asarray(weights, dtype=np.int64), np.asarray(sizes, dtype=np.int64)
    before = np.cumsum(weights) - weights
    return before - np.repeat(before[np.cumsum(sizes) - sizes], sizes)


def counts_to_codes(counts: np.ndarray, sizes: np.ndarray | None = None) -> np.ndarray:
    """One byte per symbol count: exact below 32, else 5 significant bits and an exponent.

    `counts` holds one table, or several back to back with alphabet `sizes`. A table's counts
    are first divided by the smallest power of two (rounding up) that brings its largest count
    within the code range. Tables rebuilt from these codes cost under 0.01% more bits.
    """
    c = np.asarray(counts, dtype=np.int64)
    sizes = np.array([c.size]) if sizes is None else np.asarray(sizes, dtype=np.int64)
    if c.size:
        start = np.cumsum(sizes) - sizes
        top = np.maximum.reduceat(c, start)
        shift = np.zeros_like(top)
        while np.any(-(-top >> shift) > MAX_CODED_COUNT):  # ceil(top / 2**shift)
            shift += -(-top >> shift) > MAX_CODED_COUNT
        per = np.repeat(shift, sizes)
        c = -(-c >> per)
    e = np.floor(np.log2(np.maximum(c, 1))).astype(np.int64)
    m = np.rint(c / np.exp2(e - 4)).astype(np.int64)  # 16..32
    carry = m == 32
    e, m = np.where(carry, e + 1, e), np.where(carry, 16, m)
    return np.where(c < 32, c, 32 + (e - 5) * 16 + (m - 16)).astype(np.uint8)


def codes_to_counts(codes: np.ndarray) -> np.ndarray:
    """Inverse of `counts_to_codes` (up to its rounding)."""
    k = np.asarray(codes, dtype=np.int64)
    e, m = 5 + (k - 32) // 16, 16 + (k - 32) % 16
    return np.where(k < 32, k, m << np.maximum(e - 4, 0))


MAX_CODED_COUNT = 31 << 14  # the largest count code 255 stands for


def check_weights(weights: np.ndarray) -> None:
    if weights.ndim != 1 or not 2 <= weights.size <= MAX_ALPHABET or weights.min() < 1 or int(weights.sum()) != TOTAL:
        raise CodecError("an entropy table is malformed (weights must be >= 1 and sum to 2**24)")


class Table:
    """Validated weights plus the constriction model built from them (built once, used per lane)."""

    def __init__(self, weights: np.ndarray, checked: bool = True):
        """`checked=False` skips validation, for weights `weights_from_counts*` just made."""
        import constriction

        self.weights = np.asarray(weights, dtype=np.int64)
        if checked:
            check_weights(self.weights)
        self.model = constriction.stream.model.Categorical((self.weights - 1).astype(np.float64), perfect=False)

    @property
    def size(self) -> int:
        return self.weights.size


def encode_lane(symbols: np.ndarray, table: Table) -> np.ndarray:
    """The uint32 words of one lane coding `symbols` (ints in [0, table.size))."""
    import constriction

    coder = constriction.stream.stack.AnsCoder()
    if symbols.size:
        coder.encode_reverse(np.ascontiguousarray(symbols, dtype=np.int32), table.model)
    return coder.get_compressed()


def decode_lane(words: np.ndarray, table: Table, count: int) -> np.ndarray:
    """Inverse of `encode_lane`; a lane that does not end exactly where it should is corrupt."""
    import constriction

    if words.size and int(words[-1]) == 0:
        raise CodecError("an entropy-coded lane ends with a zero word: it is not in canonical form")
    if count == 0:
        if words.size:
            raise CodecError("an entropy-coded lane holds more data than its symbols need")
        return np.empty(0, dtype=np.int32)
    try:
        coder = constriction.stream.stack.AnsCoder(np.ascontiguousarray(words, dtype=np.uint32))
        out = coder.decode(table.model, count)
        clean = coder.is_empty()
    except (ValueError, RuntimeError, AssertionError) as exc:
        raise CodecError(f"an entropy-coded lane is corrupt ({exc})") from None
    if not clean:
        raise CodecError("an entropy-coded lane does not end where its symbols do: it is corrupt")
    return out


def decode_lanes_reference(lanes: list[np.ndarray], tables: list[np.ndarray], table_of_lane: np.ndarray,
                           count: int) -> np.ndarray:
    """Decode `count` symbols from each lane, vectorized across lanes, exactly as the spec says.

    Returns int32 [lanes, count]. Slow per symbol, fast in lanes: the model for GPU kernels.
    """
    if any(len(lane) and int(lane[-1]) == 0 for lane in lanes):
        raise CodecError("an entropy-coded lane ends with a zero word: it is not in canonical form")
    n = len(lanes)
    width = max((t.size for t in tables), default=2)
    cdf = np.full((len(tables), width + 1), TOTAL, dtype=np.uint64)  # padded with TOTAL
    for i, t in enumerate(tables):
        check_weights(t)
        cdf[i, 0] = 0
        cdf[i, 1:t.size + 1] = np.cumsum(t)
    lengths = np.array([len(l) for l in lanes], dtype=np.int64)
    flat = np.concatenate([np.asarray(l, dtype=np.uint64) for l in lanes] + [np.zeros(1, np.uint64)])
    end = np.cumsum(lengths)  # one past each lane's last word
    start = end - lengths
    ptr = end.copy()  # words are consumed from the end of each lane
    x = np.zeros(n, dtype=np.uint64)
    has = ptr > start
    x[has] = flat[ptr[has] - 1]
    ptr[has] -= 1
    has = ptr > start
    x[has] = (x[has] << np.uint64(32)) | flat[ptr[has] - 1]
    ptr[has] -= 1
    rows = cdf[table_of_lane]
    out = np.empty((n, count), dtype=np.int32)
    mask = np.uint64(TOTAL - 1)
    lanes_idx = np.arange(n)
    for step in range(count):
        q = x & mask
        sym = (rows <= q[:, None]).sum(axis=1) - 1  # last cdf entry <= q
        left = rows[lanes_idx, sym]
        freq = rows[lanes_idx, sym + 1] - left
        x = freq * (x >> np.uint64(PRECISION)) + q - left
        refill = (x < np.uint64(1 << WORD_BITS)) & (ptr > start)
        x[refill] = (x[refill] << np.uint64(32)) | flat[ptr[refill] - 1]
        ptr[refill] -= 1
        out[:, step] = sym
    if np.any(ptr != start) or np.any(x != 0):
        raise CodecError("an entropy-coded lane does not end where its symbols do: it is corrupt")
    return out
