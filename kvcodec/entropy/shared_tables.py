"""The entropy model of lane format 2 (spec 8.5): per (layer, key/value) a few tables shared by
its channels, one set for the main symbols and one for anchored channels' deltas, each with
weights summing to 2**P for a small P (`rans32`). A decoder looks symbols up directly in a
table of 2**P slots, which only stays cheap when a tensor has a few tables rather than one per
channel; measured on SmolLM2, 16 shared tables cost about 3.5% more bits than per-channel ones
(BENCHMARKS.md).

Channels are grouped by the bits their symbols cost under each group's table: start from the
channels ranked by spread, then move each channel to the group that codes it in fewest bits,
for a fixed number of rounds. Costs are integers (log2 in fixed point), so the grouping is the
same wherever the counts were made."""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np
import torch
import zstandard

from kvcodec.cache import MAX_LAYERS, TENSORS
from kvcodec.entropy import rans, rans32
from kvcodec.entropy.tables import INFLATE_FACTOR, MAX_SYMBOL, channel_symbols, table_counts
from kvcodec.errors import CodecError

ROUNDS = 4  # more rounds: 0.07% smaller files on SmolLM2, at twice the fitting time
NO_TABLE = 0xFFFF  # a direct channel's delta table
COST_ONE = 1024  # a bit, in the fixed point of grouping costs
OUTSIDE = 64 * COST_ONE  # a symbol outside a group's table: joining that group is never cheapest
MAX_LOOKUP_SLOTS = 1 << 25  # a file's tables' lookup slots a reader accepts (256 MiB of lookup tables)
HEAD = np.dtype([("heads", "<u4"), ("head_dim", "<u4"), ("group_size", "<u4"), ("anchor_bits", "<u4"),
                 ("tables", "<u4")])


@dataclass(frozen=True, eq=False)
class TensorTables:
    """What coding one (layer, key/value) needs: steps and modes of its channels, the shared
    tables and which one each channel's main and delta symbols use."""

    heads: int
    head_dim: int
    group_size: int
    anchor_bits: int
    steps: np.ndarray  # float32 [C]
    main: np.ndarray  # int64 [C]: table of each channel's direct or anchor symbols
    delta: np.ndarray  # int64 [C]: table of an anchored channel's deltas; -1 for a direct channel
    los: np.ndarray  # int64 [T]: each table's first value
    sizes: np.ndarray  # int64 [T]
    weights: np.ndarray  # int64 [sum of sizes]: every table's weights, back to back

    @property
    def anchored(self) -> np.ndarray:
        return self.delta >= 0


def _tables(m: np.ndarray, first: np.ndarray, last: np.ndarray, group: np.ndarray):
    """(groups, first indices, sizes, weights back to back) of the tables shared by each group of
    rows of `m`: a group's summed counts over the span of its members' value ranges, every value
    of which gets a weight."""
    groups, members = np.unique(group, return_inverse=True)
    lo = np.full(len(groups), first.max(), dtype=np.int64)
    hi = np.zeros(len(groups), dtype=np.int64)
    np.minimum.at(lo, members, first)
    np.maximum.at(hi, members, last + 1)
    summed = _exact_product((members[None, :] == np.arange(len(groups))[:, None]).astype(np.float64), m)
    counts = np.concatenate([summed[g, lo[g]:hi[g]] for g in range(len(groups))])
    return groups, lo, hi - lo, rans32.weights_from_counts_many(counts, hi - lo)


def cluster(los: np.ndarray, sizes: np.ndarray, counts: list[np.ndarray], k: int):
    """Group tables (value ranges `los`/`sizes`, `counts` per value) into about `k` shared ones
    (more where a group would span over 4096 values). Returns (shared table of each input
    table, shared tables' los, sizes, weights back to back)."""
    n = len(sizes)
    low = int(los.min())
    first = los - low
    last = first + sizes - 1
    width = int(last.max()) + 1
    m = np.zeros((n, width), dtype=np.int64)
    for i in range(n):
        m[i, first[i]:last[i] + 1] = counts[i]
    k = min(k, n)
    m = m.astype(np.float64)  # integers, products computed exactly (`_exact_product`)
    values = np.arange(width, dtype=np.float64)
    totals = np.maximum(m.sum(1), 1)
    mean = (m @ values) / totals
    spread = (m * np.abs(values[None, :] - mean[:, None])).sum(1) / totals
    rank = np.empty(n, dtype=np.int64)
    rank[np.lexsort((np.arange(n), spread))] = np.arange(n)
    group = _split(rank * k // n, first, last)
    for _ in range(ROUNDS):
        _, lo, size, w = _tables(m, first, last, group)
        bits = np.repeat(rans32.precision_of(size), size) - np.log2(w)
        cost_of = np.full((len(size), width), OUTSIDE, dtype=np.int64)
        at = np.cumsum(size) - size
        fixed = np.rint(bits * COST_ONE).astype(np.int64)
        for g, (lo_g, size_g, at_g) in enumerate(zip(lo.tolist(), size.tolist(), at.tolist())):
            cost_of[g, lo_g:lo_g + size_g] = fixed[at_g:at_g + size_g]
        new = _split(np.argmin(_exact_product(m, cost_of.T), axis=1), first, last)  # lowest on ties
        if np.array_equal(new, group):
            break
        group = new
    _, lo, size, w = _tables(m, first, last, group)
    return group, low + lo, size, w


def _split(group: np.ndarray, first: np.ndarray, last: np.ndarray) -> np.ndarray:
    """Groups renumbered 0, 1, ... in order, each cut where needed into runs (members by first
    value) whose value ranges span at most 4096 values, so that every group has a table."""
    out = np.empty(len(group), dtype=np.int64)
    t = 0
    for g in np.unique(group):
        members = np.flatnonzero(group == g)
        for run in _runs(members[np.lexsort((members, first[members]))], first, last):
            out[run] = t
            t += 1
    return out


def _exact_product(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The integer matrix product of integer-valued float64 `a` and `b`, by BLAS: exact (every
    partial sum is an integer below 2**53, whatever order BLAS adds in), so the same on every
    machine and thread count."""
    if np.abs(a).sum(1).max(initial=0) * np.abs(b).max(initial=0) >= 2.0 ** 53:
        raise CodecError("a cache this large cannot have its tables fitted exactly")
    return (a @ b).astype(np.int64)


def _runs(members: np.ndarray, first: np.ndarray, last: np.ndarray) -> list[np.ndarray]:
    """`members` (sorted by first value) cut into runs whose value ranges span at most 4096."""
    runs, start, top = [[]], int(first[members[0]]), -1
    for i in members.tolist():
        top = max(top, int(last[i]))
        if top - start + 1 > rans32.MAX_ALPHABET:
            runs.append([])
            start, top = int(first[i]), int(last[i])
        runs[-1].append(i)
    return [np.array(r, dtype=np.int64) for r in runs]


def fit(bodies: list[torch.Tensor], steps: np.ndarray, group_size: int, anchor_bits: int, n_tables: int,
        where: str) -> TensorTables:
    """The tables of one (layer, key/value) from the coded tokens of its chunks ([B, H, n, D]
    float32 each, on any device: the counts are exact integers and everything after them runs
    on the host, so every device gets the same tables)."""
    b, h, _, d = bodies[0].shape
    c_all = h * d
    direct, anchors, deltas, anchored = channel_symbols(bodies, steps, group_size, anchor_bits,
                                                        lambda spans: np.zeros(len(spans)))
    for symbols in (anchors, deltas):  # a channel stays direct where anchoring would need too wide a table
        if symbols.shape[1]:
            anchored &= (symbols.max(dim=1).values - symbols.min(dim=1).values).cpu().numpy() < rans32.MAX_ALPHABET
    los, sizes, counts = table_counts(direct, anchors, deltas, torch.from_numpy(anchored).to(direct.device))
    if sizes.max() > rans32.MAX_ALPHABET or np.abs(los).max() + sizes.max() >= MAX_SYMBOL:
        raise CodecError(f"{where} spans {sizes.max()} steps; use a larger step")
    per_table = np.split(counts, np.cumsum(sizes)[:-1])
    main_of, m_los, m_sizes, m_weights = cluster(los[:c_all], sizes[:c_all], per_table[:c_all], n_tables)
    delta = np.full(c_all, -1, dtype=np.int64)
    t_los, t_sizes, t_weights = [m_los], [m_sizes], [m_weights]
    if anchored.any():
        delta_of, d_los, d_sizes, d_weights = cluster(los[c_all:], sizes[c_all:], per_table[c_all:], n_tables)
        delta[anchored] = len(m_sizes) + delta_of
        t_los, t_sizes, t_weights = [m_los, d_los], [m_sizes, d_sizes], [m_weights, d_weights]
    return TensorTables(h, d, group_size, anchor_bits, steps, main_of, delta, np.concatenate(t_los),
                        np.concatenate(t_sizes), np.concatenate(t_weights))


@dataclass(frozen=True, eq=False)
class FlatTables:
    """Every table of a file back to back, as the CPU encoder reads them: per table its first
    value, alphabet size, precision and first symbol in `weights`; per symbol w[s] and c[s]."""

    los: np.ndarray
    sizes: np.ndarray
    precision: np.ndarray
    first: np.ndarray
    weights: np.ndarray
    cumulative: np.ndarray


class SharedTables:
    """Every (layer, key/value)'s tables of one file: a codec's loaded context."""

    def __init__(self, tensors: dict[tuple[int, str], TensorTables]):
        self.tensors = tensors
        counts = [len(t.sizes) for t in tensors.values()]
        self.first_table = dict(zip(tensors, np.cumsum([0] + counts[:-1]).tolist()))  # in `flat`'s order
        self._lookups = {}
        self._flat = None

    def for_chunk(self, info, codec: str) -> TensorTables:
        """The tables of the (layer, key/value) of `info` (a `ChunkInfo`), checked to fit its shape."""
        entry = self.tensors.get((info.layer, info.tensor))
        b, h, t, d = info.shape
        if entry is None or (entry.heads, entry.head_dim) != (h, d):
            raise CodecError(f"{codec} tables do not cover layer {info.layer} {info.tensor} of shape {info.shape}")
        return entry

    def flat(self) -> FlatTables:
        """The file's tables back to back (built once), in the order of `lookup`'s tables."""
        if self._flat is None:
            items = list(self.tensors.values())
            los, sizes, weights = (np.concatenate([getattr(t, f) for t in items]) if items else np.zeros(0, np.int64)
                                   for f in ("los", "sizes", "weights"))
            self._flat = FlatTables(los, sizes, rans32.precision_of(sizes), np.cumsum(sizes) - sizes, weights,
                                    rans.cumulative_many(weights, sizes))
        return self._flat

    def lookup(self, device=None) -> rans32.Lookup:
        """The decoding lookup of every table of the file, built on `device` (None: the CPU, as
        numpy arrays) once per device; tables in the order of `flat`."""
        key = None if device is None else str(torch.device(device))
        if key not in self._lookups:
            flat = self.flat()
            lookup = rans32.Lookup.build(*(torch.from_numpy(a).to(device or "cpu")
                                           for a in (flat.weights, flat.sizes, flat.los)))
            self._lookups[key] = lookup.numpy() if device is None else lookup
        return self._lookups[key]

    def to_blob(self, num_layers: int) -> bytes:
        """The stored form (spec 8.5, lane format 2): one zstd frame of every layer's key then
        value tables."""
        parts = [np.uint32(num_layers).tobytes()]
        for i in range(num_layers):
            for name in TENSORS:
                tt = self.tensors[(i, name)]
                parts += [np.array([(tt.heads, tt.head_dim, tt.group_size, tt.anchor_bits, len(tt.sizes))],
                                   HEAD).tobytes(),
                          tt.steps.astype("<f4").tobytes(), tt.main.astype("<u2").tobytes(),
                          np.where(tt.delta < 0, NO_TABLE, tt.delta).astype("<u2").tobytes(),
                          tt.los.astype("<i4").tobytes(), tt.sizes.astype("<u2").tobytes(),
                          tt.weights.astype("<u2").tobytes()]
        return zstandard.ZstdCompressor(level=19, write_checksum=True, write_content_size=True).compress(b"".join(parts))

    @classmethod
    def from_blob(cls, blob: bytes, codec: str) -> "SharedTables":
        """Inverse of `to_blob`; CodecError naming `codec` for anything malformed."""
        try:
            return cls(_parse(_inflate(bytes(blob))))
        except (zstandard.ZstdError, ValueError, CodecError) as exc:
            raise CodecError(f"{codec} tables are corrupt ({exc})") from None


def _inflate(blob: bytes) -> bytes:
    limit = min(256 << 20, (1 << 20) + INFLATE_FACTOR * len(blob))
    params = zstandard.get_frame_parameters(blob)
    if not params.has_checksum:
        raise ValueError("the frame has no content checksum")
    if params.content_size < 0 or params.content_size > limit:
        raise ValueError("the frame does not declare its size within the limit")
    inflater = zstandard.ZstdDecompressor().decompressobj()
    out = inflater.decompress(blob)
    if not inflater.eof or inflater.unused_data or len(out) != params.content_size:
        raise ValueError("the blob is not exactly one frame of its declared size")
    return out


def _parse(content: bytes) -> dict:
    """Every tensor set of the content: one pass finds where each set's fields lie, then they are
    read and checked all at once (a file holds tens to thousands of sets)."""
    if len(content) < 4:
        raise ValueError("they end early")
    n_layers = struct.unpack_from("<I", content)[0]
    if n_layers > MAX_LAYERS or n_layers > len(content) // 40:  # a tensor set takes at least 20 bytes
        raise ValueError(f"they claim {n_layers} layers")
    heads, at, pos = [], [], 4
    for i in range(n_layers):
        for name in TENSORS:
            if pos + HEAD.itemsize > len(content):
                raise ValueError("they end early")
            h, d, g, k, t = struct.unpack_from("<5I", content, pos)
            if not (1 <= h and 1 <= d and 1 <= g <= 1024 and k <= 8 and 1 <= t < NO_TABLE):
                raise ValueError(f"layer {i} {name} has out-of-range fields")
            c = h * d
            sizes = pos + HEAD.itemsize + 8 * c + 4 * t
            if sizes + 2 * t > len(content):
                raise ValueError("they end early")
            n = int(np.frombuffer(content, "<u2", t, sizes).sum(dtype=np.int64))
            heads.append((i, TENSORS.index(name), h, d, g, k, t, c, n))
            at.append(pos + HEAD.itemsize)
            pos = sizes + 2 * t + 2 * n
    if pos != len(content):
        raise ValueError(f"{len(content) - pos} bytes left over" if pos < len(content) else "they end early")
    head = np.array(heads, dtype=np.int64).reshape(-1, 9)
    start = np.array(at, dtype=np.int64)
    c, t, n = head[:, 7], head[:, 6], head[:, 8]

    def gather(dtype, offsets, counts):
        parts = [np.frombuffer(content, dtype, int(k), int(o)) for o, k in zip(offsets, counts)]
        return np.concatenate(parts).astype(np.float32 if dtype == "<f4" else np.int64) if parts else \
            np.zeros(0, np.float32 if dtype == "<f4" else np.int64)
    steps = gather("<f4", start, c)
    main = gather("<u2", start + 4 * c, c)
    delta = gather("<u2", start + 6 * c, c)
    los = gather("<i4", start + 8 * c, t)
    sizes = gather("<u2", start + 8 * c + 4 * t, t)
    weights = gather("<u2", start + 8 * c + 6 * t, n)
    tensor_of_channel = np.repeat(np.arange(len(head)), c)
    if sizes.size and (sizes.min() < 2 or sizes.max() > rans32.MAX_ALPHABET or (np.abs(los) + sizes).max() >= MAX_SYMBOL):
        raise ValueError("a table is out of range")
    rans32.check_tables(weights, sizes)
    delta = np.where(delta == NO_TABLE, -1, delta)
    if (not np.all(np.isfinite(steps)) or steps.min(initial=1) <= 0 or (main >= t[tensor_of_channel]).any()
            or (delta >= t[tensor_of_channel]).any() or ((head[tensor_of_channel, 4] == 1) & (delta >= 0)).any()):
        raise ValueError("a tensor set has out-of-range fields")
    if int((1 << rans32.precision_of(sizes)).sum()) > MAX_LOOKUP_SLOTS:
        raise ValueError(f"their lookup tables pass {MAX_LOOKUP_SLOTS} slots")
    cf, tf, nf = (np.r_[0, np.cumsum(x)] for x in (c, t, n))
    return {(int(h[0]), TENSORS[int(h[1])]): TensorTables(int(h[2]), int(h[3]), int(h[4]), int(h[5]),
                                                          steps[cf[j]:cf[j + 1]], main[cf[j]:cf[j + 1]],
                                                          delta[cf[j]:cf[j + 1]], los[tf[j]:tf[j + 1]],
                                                          sizes[tf[j]:tf[j + 1]], weights[nf[j]:nf[j + 1]])
            for j, h in enumerate(head)}
