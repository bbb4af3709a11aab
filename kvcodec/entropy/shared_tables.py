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
from functools import cached_property

import numpy as np
import torch
import zstandard

from kvcodec.cache import MAX_LAYERS, TENSORS
from kvcodec.entropy import rans, rans32
from kvcodec.entropy.tables import INFLATE_FACTOR, MAX_SYMBOL, channel_symbols, last_values, ranges, table_counts
from kvcodec.errors import CodecError

ROUNDS = 4  # more rounds: 0.07% smaller files on SmolLM2, at twice the fitting time
NO_TABLE = 0xFFFF  # a direct channel's delta table
COST_ONE = 1024  # a bit, in the fixed point of grouping costs
OUTSIDE = 64 * COST_ONE  # a symbol outside a group's table: joining that group is never cheapest
MAX_LOOKUP_SLOTS = 1 << 25  # a file's tables' lookup slots a reader accepts, at most (256 MiB of lookup)
SLOTS_PER_BLOB_BYTE = 64  # and at most 2**20 plus this many per byte of the (compressed) blob: a small
# blob cannot make a reader build a large lookup (files here hold 7-10 slots per blob byte)
MAX_CHANNELS = 1 << 24  # H and D of a tensor set each at most this (their product cannot overflow)


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

    def placeholder(self) -> "TensorTables":
        """Tables of the same shape that code nothing useful (unit steps, every channel direct,
        one two-symbol table): what a file stores for a tensor no chunk codes with them, in a few
        bytes once compressed, so that the set list stays complete (spec 8.5)."""
        c = self.heads * self.head_dim
        half = 1 << int(rans32.precision_of(np.array([2]))[0] - 1)
        return TensorTables(self.heads, self.head_dim, self.group_size, self.anchor_bits, np.ones(c, np.float32),
                            np.zeros(c, np.int64), np.full(c, -1, np.int64), np.zeros(1, np.int64),
                            np.full(1, 2, np.int64), np.full(2, half, np.int64))


def _spans(group: np.ndarray, first: np.ndarray, last: np.ndarray):
    """Each row's group index (groups numbered in order) and every group's value span [lo, hi)."""
    groups, members = np.unique(group, return_inverse=True)
    lo = np.full(len(groups), first.max(), dtype=np.int64)
    hi = np.zeros(len(groups), dtype=np.int64)
    np.minimum.at(lo, members, first)
    np.maximum.at(hi, members, last + 1)
    return members.astype(np.int64), lo, hi


def _tables(m: np.ndarray, nonzero: np.ndarray, first: np.ndarray, last: np.ndarray, group: np.ndarray):
    """(first indices, sizes, weights back to back) of the tables shared by each group of rows
    of `m` (groups 0, 1, ...): a group's summed counts over the span of its members' value
    ranges, every value of which gets a weight. Summed by one bincount over `m`'s `nonzero`
    (flat) entries rather than a product with the groups' members: exact (`_check_exact`)."""
    members, lo, hi = _spans(group, first, last)
    _check_exact(np.bincount(members).max(), m.max())
    width = m.shape[1]
    at = members[nonzero // width] * width + nonzero % width
    summed = np.bincount(at, weights=m.reshape(-1)[nonzero], minlength=len(lo) * width).astype(np.int64)
    counts = summed[ranges(np.arange(len(lo)) * width + lo, hi - lo)]
    return lo, hi - lo, rans32.weights_from_counts_many(counts, hi - lo)


def cluster(los: np.ndarray, sizes: np.ndarray, counts: np.ndarray, k: int):
    """Group tables (value ranges `los`/`sizes`, `counts` per value back to back) into about `k`
    shared ones (more where a group would span over 4096 values). Returns (shared table of each
    input table, shared tables' los, sizes, weights back to back)."""
    n = len(sizes)
    low = int(los.min())
    first = los - low
    last = first + sizes - 1
    width = int(last.max()) + 1
    m = np.zeros(n * width, dtype=np.float64)  # integers, products computed exactly (`_exact_product`)
    m[ranges(np.arange(n) * width + first, sizes)] = counts
    m = m.reshape(n, width)
    nonzero = np.flatnonzero(m)
    k = min(k, n)
    values = np.arange(width, dtype=np.float64)
    totals = np.maximum(m.sum(1), 1)
    mean = (m @ values) / totals
    spread = (m * np.abs(values[None, :] - mean[:, None])).sum(1) / totals
    rank = np.empty(n, dtype=np.int64)
    rank[np.lexsort((np.arange(n), spread))] = np.arange(n)
    group = _split(rank * k // n, first, last)
    for _ in range(ROUNDS):
        lo, size, w = _tables(m, nonzero, first, last, group)
        bits = np.repeat(rans32.precision_of(size), size) - np.log2(w)
        cost_of = np.full((len(size), width), OUTSIDE, dtype=np.int64)
        fixed = np.rint(bits * COST_ONE).astype(np.int64)
        cost_of.reshape(-1)[ranges(np.arange(len(size)) * width + lo, size)] = fixed  # each group's row of costs
        new = _split(np.argmin(_exact_product(m, cost_of.T), axis=1), first, last)  # lowest on ties
        if np.array_equal(new, group):
            break
        group = new
    lo, size, w = _tables(m, nonzero, first, last, group)
    return group, low + lo, size, w


def _split(group: np.ndarray, first: np.ndarray, last: np.ndarray) -> np.ndarray:
    """Groups renumbered 0, 1, ... in order, each cut where needed into runs (members by first
    value) whose value ranges span at most 4096 values, so that every group has a table."""
    members, lo, hi = _spans(group, first, last)
    if (hi - lo <= rans32.MAX_ALPHABET).all():  # the usual case: no group to cut
        return members
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
    machine and thread count. Torch's BLAS, which keeps to torch's thread count: numpy's
    spreads these small products over every core, many times slower on a busy machine."""
    _check_exact(np.abs(a).sum(1).max(initial=0), np.abs(b).max(initial=0))
    return (torch.from_numpy(a) @ torch.from_numpy(b.astype(np.float64))).numpy().astype(np.int64)


def _check_exact(row_sum, entry) -> None:
    """CodecError unless integer products of rows summing to at most `row_sum` with entries up to
    `entry` stay below 2**53, so that float64 computes them exactly."""
    if row_sum * entry >= 2.0 ** 53:
        raise CodecError("a cache this large cannot have its tables fitted exactly")


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
    for _, counts in (anchors, deltas):  # a channel stays direct where anchoring would need too wide a table
        anchored &= last_values(counts) < rans32.MAX_ALPHABET
    los, sizes, counts = table_counts(direct, anchors, deltas, anchored)
    if sizes.max() > rans32.MAX_ALPHABET or np.abs(los).max() + sizes.max() >= MAX_SYMBOL:
        raise CodecError(f"{where} spans {sizes.max()} steps; use a larger step")
    main_symbols = int(sizes[:c_all].sum())  # the main tables' counts come first
    main_of, m_los, m_sizes, m_weights = cluster(los[:c_all], sizes[:c_all], counts[:main_symbols], n_tables)
    delta = np.full(c_all, -1, dtype=np.int64)
    t_los, t_sizes, t_weights = [m_los], [m_sizes], [m_weights]
    if anchored.any():
        delta_of, d_los, d_sizes, d_weights = cluster(los[c_all:], sizes[c_all:], counts[main_symbols:], n_tables)
        delta[anchored] = len(m_sizes) + delta_of
        t_los, t_sizes, t_weights = [m_los, d_los], [m_sizes, d_sizes], [m_weights, d_weights]
    return TensorTables(h, d, group_size, anchor_bits, steps, main_of, delta, np.concatenate(t_los),
                        np.concatenate(t_sizes), np.concatenate(t_weights))


@dataclass(frozen=True, eq=False)
class FlatTables:
    """Every table of a file back to back, as the coders read them: per table its first value,
    alphabet size, precision and first symbol in `weights`; per symbol w[s] and c[s]."""

    los: np.ndarray
    sizes: np.ndarray
    precision: np.ndarray
    first: np.ndarray
    weights: np.ndarray
    cumulative: np.ndarray


@dataclass(frozen=True, eq=False)
class Fields:
    """A file's tables as the blob holds them: per tensor set `head` (layer, key/value index,
    H, D, G, k, T), then every set's per-channel and per-table fields back to back."""

    head: np.ndarray  # int64 [sets, 7]
    steps: np.ndarray  # float32 [channels of all sets]
    main: np.ndarray  # int64, table index within its set
    delta: np.ndarray  # int64, -1 for a direct channel
    los: np.ndarray  # int64 [tables of all sets]
    sizes: np.ndarray
    weights: np.ndarray

    @property
    def channel_first(self) -> np.ndarray:
        return np.r_[0, np.cumsum(self.head[:, 2] * self.head[:, 3])]

    @property
    def table_first(self) -> np.ndarray:
        return np.r_[0, np.cumsum(self.head[:, 6])]

    @classmethod
    def of(cls, tensors: dict[tuple[int, str], TensorTables]) -> "Fields":
        items = list(tensors.items())
        head = np.array([(layer, TENSORS.index(name), t.heads, t.head_dim, t.group_size, t.anchor_bits, len(t.sizes))
                         for (layer, name), t in items], dtype=np.int64).reshape(-1, 7)

        def joined(field, dtype):
            return np.concatenate([getattr(t, field) for _, t in items]).astype(dtype) if items else np.zeros(0, dtype)
        return cls(head, joined("steps", np.float32), joined("main", np.int64), joined("delta", np.int64),
                   joined("los", np.int64), joined("sizes", np.int64), joined("weights", np.int64))

    def tensors(self) -> dict[tuple[int, str], TensorTables]:
        cf, tf = self.channel_first, self.table_first
        wf = np.r_[0, np.cumsum(self.sizes)][tf]
        return {(int(h[0]), TENSORS[int(h[1])]): TensorTables(
            int(h[2]), int(h[3]), int(h[4]), int(h[5]), self.steps[cf[j]:cf[j + 1]], self.main[cf[j]:cf[j + 1]],
            self.delta[cf[j]:cf[j + 1]], self.los[tf[j]:tf[j + 1]], self.sizes[tf[j]:tf[j + 1]],
            self.weights[wf[j]:wf[j + 1]]) for j, h in enumerate(self.head)}


class SharedTables:
    """Every (layer, key/value)'s tables of one file: a codec's loaded context."""

    def __init__(self, tensors: dict[tuple[int, str], TensorTables] | None = None, fields: Fields | None = None,
                 stored: np.ndarray | None = None):
        """From the tensors' tables, or from the blob's `fields` and `stored` fields (the tensors
        then made on first use: a GPU restore reads only the fields)."""
        if tensors is not None:
            self.__dict__["tensors"] = tensors
        if stored is not None:
            self.__dict__["stored"] = stored
        self.fields = Fields.of(tensors) if fields is None else fields
        keys = [(int(layer), TENSORS[int(t)]) for layer, t in self.fields.head[:, :2]]
        self.first_table = dict(zip(keys, self.fields.table_first[:-1].tolist()))  # in `flat`'s order
        self._lookups = {}
        self._flat = None

    @cached_property
    def tensors(self) -> dict[tuple[int, str], TensorTables]:
        return self.fields.tensors()

    @cached_property
    def stored(self) -> np.ndarray:
        """`fields` after the set heads as the blob stores them (`_stored`; uint8), which the GPU
        decoder reads as they are."""
        return np.frombuffer(_stored(self.fields), np.uint8)

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
            f = self.fields
            self._flat = FlatTables(f.los, f.sizes, rans32.precision_of(f.sizes), np.cumsum(f.sizes) - f.sizes,
                                    f.weights, rans.cumulative_many(f.weights, f.sizes))
        return self._flat

    def lookup(self, device=None) -> rans32.Lookup:
        """The decoding lookup of every table of the file, built on `device` (None: the CPU, as
        numpy arrays) once per device; tables in the order of `flat`."""
        key = None if device is None else str(torch.device(device))
        if key not in self._lookups:
            f = self.fields
            lookup = rans32.Lookup.build(f.weights, f.sizes, f.los, device)
            self._lookups[key] = lookup.numpy() if device is None else lookup
        return self._lookups[key]

    def narrowed(self, used: set[tuple[int, str]]) -> "SharedTables":
        """These tables with every (layer, key/value) outside `used` replaced by its placeholder."""
        return SharedTables({key: t if key in used else t.placeholder() for key, t in self.tensors.items()})

    @classmethod
    def narrowed_blob(cls, blob: bytes, used: set[tuple[int, str]], codec: str) -> bytes:
        """A stored tables blob with only the `used` tensors' tables, placeholders for the rest."""
        tables = cls.from_blob(blob, codec)
        return tables.narrowed(used).to_blob(1 + max(layer for layer, _ in tables.tensors))

    def to_blob(self, num_layers: int) -> bytes:
        """The stored form (spec 8.5, lane format 2): one zstd frame holding every layer's key then
        value set heads, then each field of all sets back to back."""
        fields = Fields.of({(i, name): self.tensors[(i, name)] for i in range(num_layers) for name in TENSORS})
        parts = [np.uint32(num_layers).tobytes(), fields.head[:, 2:].astype("<u4").tobytes(), _stored(fields)]
        return zstandard.ZstdCompressor(level=19, write_checksum=True, write_content_size=True).compress(b"".join(parts))

    @classmethod
    def from_blob(cls, blob: bytes, codec: str) -> "SharedTables":
        """Inverse of `to_blob`; CodecError naming `codec` for anything malformed."""
        blob = bytes(blob)
        try:
            fields, stored = _parse(_inflate(blob), lookup_slots(len(blob)))
        except TooManySlots as exc:
            raise CodecError(f"{codec} tables need {exc} lookup slots, more than a reader accepts for a blob of "
                             f"{len(blob)} bytes (spec 8.5)") from None
        except (zstandard.ZstdError, ValueError, CodecError) as exc:
            raise CodecError(f"{codec} tables are corrupt ({exc})") from None
        return cls(fields=fields, stored=stored)


def _stored(fields: Fields) -> bytes:
    """The fields after the set heads as spec 8.5 stores them: steps (<f4), main and delta tables
    (<u2, NO_TABLE for a direct channel), then los (<i4), sizes and weights (<u2)."""
    return b"".join([fields.steps.astype("<f4").tobytes(), fields.main.astype("<u2").tobytes(),
                     np.where(fields.delta < 0, NO_TABLE, fields.delta).astype("<u2").tobytes(),
                     fields.los.astype("<i4").tobytes(), fields.sizes.astype("<u2").tobytes(),
                     fields.weights.astype("<u2").tobytes()])


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


class TooManySlots(ValueError):
    """Tables whose lookup would pass what a reader accepts for their blob's size."""


def lookup_slots(blob_bytes: int) -> int:
    """The most lookup slots a reader builds for a tables blob of this many bytes (spec 8.5)."""
    return min(MAX_LOOKUP_SLOTS, (1 << 20) + SLOTS_PER_BLOB_BYTE * blob_bytes)


def _parse(content: bytes, max_slots: int) -> tuple[Fields, np.ndarray]:
    """The content's fields, read and checked all at once (no step per tensor set), and the
    stored fields after the set heads (`SharedTables.stored`, a view of `content`)."""
    if len(content) < 4:
        raise ValueError("they end early")
    n_layers = struct.unpack_from("<I", content)[0]
    sets = 2 * n_layers
    if n_layers > MAX_LAYERS or 4 + 20 * sets > len(content):
        raise ValueError(f"they claim {n_layers} layers" if n_layers > MAX_LAYERS else "they end early")
    h, d, g, k, t = np.frombuffer(content, "<u4", 5 * sets, 4).astype(np.int64).reshape(sets, 5).T
    if sets and not ((h >= 1).all() and (d >= 1).all() and (h <= MAX_CHANNELS).all() and (d <= MAX_CHANNELS).all()
                     and (g >= 1).all() and (g <= 1024).all() and (k <= 8).all() and (t >= 1).all()
                     and (t < NO_TABLE).all()):
        raise ValueError("a tensor set has out-of-range fields")
    c = h * d
    n_c, n_t = int(c.sum()), int(t.sum())
    pos = 4 + 20 * sets
    if pos + 8 * n_c + 6 * n_t > len(content):
        raise ValueError("they end early")
    steps = np.frombuffer(content, "<f4", n_c, pos)
    main = np.frombuffer(content, "<u2", n_c, pos + 4 * n_c)
    delta = np.frombuffer(content, "<u2", n_c, pos + 6 * n_c)  # NO_TABLE for a direct channel
    los = np.frombuffer(content, "<i4", n_t, pos + 8 * n_c).astype(np.int64)
    sizes = np.frombuffer(content, "<u2", n_t, pos + 8 * n_c + 4 * n_t).astype(np.int64)
    n_w = int(sizes.sum())
    end = pos + 8 * n_c + 6 * n_t + 2 * n_w
    if end != len(content):
        raise ValueError(f"{len(content) - end} bytes left over" if end < len(content) else "they end early")
    weights = np.frombuffer(content, "<u2", n_w, end - 2 * n_w).astype(np.int64)
    if sizes.size and (sizes.min() < 2 or sizes.max() > rans32.MAX_ALPHABET or (np.abs(los) + sizes).max() >= MAX_SYMBOL):
        raise ValueError("a table is out of range")
    rans32.check_tables(weights, sizes)
    # per tensor set, its channels' highest main table and highest delta table + 1 (uint16: a
    # direct channel's NO_TABLE + 1 is 0), checked against its table count
    starts = np.cumsum(c) - c
    top_main = np.maximum.reduceat(main, starts) if sets else np.zeros(0, np.uint16)
    top_delta = np.maximum.reduceat(delta + np.uint16(1), starts) if sets else np.zeros(0, np.uint16)
    if (not (steps.min(initial=1) > 0 and steps.max(initial=1) < np.inf) or (top_main >= t).any()
            or (top_delta > t).any() or ((g == 1) & (top_delta > 0)).any()):  # NaN fails the first test
        raise ValueError("a tensor set has out-of-range fields")
    slots = int((1 << rans32.precision_of(sizes)).sum())
    if slots > max_slots:
        raise TooManySlots(slots)
    if (delta == main).any():  # never NO_TABLE: every main table is below it
        raise ValueError("an anchored channel's delta table is its main table")
    head = np.column_stack([np.arange(sets) // 2, np.arange(sets) % 2, h, d, g, k, t]).astype(np.int64).reshape(-1, 7)
    deltas = delta.astype(np.int64)
    deltas[delta == NO_TABLE] = -1
    fields = Fields(head, steps.astype(np.float32), main.astype(np.int64), deltas, los, sizes, weights)
    return fields, np.frombuffer(content, np.uint8, end - pos, pos)
