"""The entropy model: one probability table per channel of every (layer, key/value), plus one
for the deltas of each anchored channel, fitted on the symbols of a whole file and stored in
one zstd-compressed blob (spec 8.5). Counts are stored as one-byte codes; every coder (CPU,
GPU, encoder, decoder) works from the weights those codes give back."""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache, cached_property

import numpy as np
import torch
import zstandard

from kvcodec.cache import MAX_LAYERS, TENSORS
from kvcodec.entropy import rans
from kvcodec.entropy.quantizer import counts_entropy_bits, quantize, value_counts
from kvcodec.errors import CodecError

MAX_SYMBOL = 1 << 20  # |lo| and lo + n stay below this, so decoded values are exact in float32
INFLATE_FACTOR = 4096  # decompressed blob bytes per compressed byte a reader accepts
FRAME_BYTES = 256 << 10  # table bytes per zstd frame a writer aims at
DIRECTORY_MAGIC = (0x184D2A5B).to_bytes(4, "little")  # a zstd skippable frame: the blob's frame lengths
TENSOR_HEAD = np.dtype([("heads", "<u4"), ("head_dim", "<u4"), ("group_size", "<u4"), ("anchor_bits", "<u4")])


@dataclass(frozen=True, eq=False)
class ChannelTables:
    """What coding one (layer, key/value) needs: steps, modes and tables of its channels."""

    heads: int
    head_dim: int
    group_size: int
    anchor_bits: int
    steps: np.ndarray  # float32 [H*D]
    anchored: np.ndarray  # bool [H*D]
    los: np.ndarray  # int64 [tables]: each table's first value
    sizes: np.ndarray  # int64 [tables]: each table's alphabet size
    codes: np.ndarray  # uint8: every table's count codes, back to back

    @cached_property
    def flat_weights(self) -> np.ndarray:
        """int64: H*D main tables, then one delta table per anchored channel, back to back (made on
        first use: a GPU restore makes them on the device instead, `kernels.lane_decode`)."""
        return weights_of(self.codes, self.sizes)

    @property
    def weights(self) -> list[np.ndarray]:
        return np.split(self.flat_weights, np.cumsum(self.sizes)[:-1])

    @cached_property
    def tables(self) -> list:
        """(lo, rans.Table) per table, built on first use: the CPU coder's models cost ~10 us
        each, and the GPU coders need only the weights."""
        return [(int(lo), rans.Table(w, checked=False)) for lo, w in zip(self.los, self.weights)]

    @property
    def delta_of(self) -> np.ndarray:
        """Index into `tables` of each anchored channel's delta table."""
        return self.heads * self.head_dim + np.arange(int(self.anchored.sum()))


def table_counts(direct, anchors, deltas, anchored: np.ndarray):
    """First value, alphabet size and symbol counts of every table of one (layer, key/value):
    per channel its direct or (anchored) anchor symbols, then the anchored channels' deltas.
    From the `value_counts` of each kind of symbol over every channel (all three of [H*D] rows);
    numpy int64 arrays, counts back to back."""
    kinds = (direct, anchors, deltas)
    marked = np.flatnonzero(anchored)
    kind = np.r_[anchored.astype(np.int64), np.full(len(marked), 2)]  # of each table's symbols
    row = np.r_[np.arange(len(anchored)), marked]
    lo = np.stack([low for low, _ in kinds])[kind, row]
    sizes = np.maximum(np.stack([last_values(c) for _, c in kinds])[kind, row] + 1, 2)  # at least 2 values
    padded = [np.pad(c, ((0, 0), (0, 1))) for _, c in kinds]  # room for a table's second value
    width = np.array([p.shape[1] for p in padded])
    at = np.cumsum([0] + [p.size for p in padded])[kind] + row * width[kind]
    return lo, sizes, np.concatenate([p.reshape(-1) for p in padded])[ranges(at, sizes)]


def last_values(counts: np.ndarray) -> np.ndarray:
    """Each row's largest counted value above its first (its span; 0 for a row of no counts)."""
    return counts.shape[1] - 1 - np.argmax(counts[:, ::-1] > 0, axis=1)


def ranges(starts: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """The indices start, start + 1, ... of each run (`sizes` long), back to back."""
    return np.repeat(starts - (np.cumsum(sizes) - sizes), sizes) + np.arange(int(sizes.sum()))


def channel_symbols(bodies: list[torch.Tensor], steps: np.ndarray, group_size: int, anchor_bits: int, extra_bits):
    """The `value_counts` of every channel's direct, anchor and delta symbols over the chunks
    `bodies` ([H*D, tokens of all chunks] each, counted on the bodies' device), and which
    channels are anchored: those whose anchors and deltas cost fewer bits than their direct
    symbols, counting `extra_bits(spans)` (numpy, per channel from its deltas' span) for what
    anchoring adds to a file."""
    b, h, _, d = bodies[0].shape
    c_all = h * d
    parts = [quantize(body, torch.from_numpy(steps), torch.arange(c_all), group_size, anchor_bits) for body in bodies]
    direct, anchors, deltas = (value_counts(_joined([p[k].transpose(0, 1).reshape(c_all, -1) for p in parts]))
                               for k in range(3))  # of [H*D, tokens of all chunks]
    anchored = np.zeros(c_all, dtype=bool)
    if group_size > 1 and deltas[1].any():  # there are deltas
        cost = counts_entropy_bits(anchors[1]) + counts_entropy_bits(deltas[1]) + extra_bits(last_values(deltas[1]))
        anchored = cost < counts_entropy_bits(direct[1])
    return direct, anchors, deltas, anchored


def _joined(rows: list[torch.Tensor]) -> torch.Tensor:
    """The chunks' rows side by side (a single chunk's as they are: no copy)."""
    return rows[0] if len(rows) == 1 else torch.cat(rows, 1)


def fit(bodies: list[torch.Tensor], steps: np.ndarray, group_size: int, anchor_bits: int, where: str) -> ChannelTables:
    """The tables of one (layer, key/value) from the coded tokens of its chunks (`bodies`, each
    [B, H, n, D] float32 on any device: the same tables wherever they lie), and the channel
    modes: a channel is anchored where anchors and deltas cost fewer bits than direct symbols,
    counting the second table and the delta lanes' overhead."""
    b, h, _, d = bodies[0].shape
    lane_bits = len(bodies) * b * (32 + 48)  # a delta lane's length and final state per chunk
    direct, anchors, deltas, anchored = channel_symbols(bodies, steps, group_size, anchor_bits,
                                                        lambda spans: 8 * (spans + 7) + lane_bits)
    los, sizes, counts = table_counts(direct, anchors, deltas, anchored)
    if sizes.max() > rans.MAX_ALPHABET or np.abs(los).max() + sizes.max() >= MAX_SYMBOL:
        raise CodecError(f"{where} spans {sizes.max()} steps; use a larger step")
    return ChannelTables(h, d, group_size, anchor_bits, steps, anchored, los.astype(np.int64), sizes.astype(np.int64),
                         rans.counts_to_codes(counts, sizes))


def weights_of(codes: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Every table's weights, back to back, from its stored count codes (what all coders use)."""
    return rans.weights_from_counts_many(rans.codes_to_counts(codes), sizes, split=False)


class FileTables:
    """Every (layer, key/value)'s tables of one file: a codec's loaded context."""

    def __init__(self, tensors: dict[tuple[int, str], ChannelTables]):
        self.tensors = tensors
        self.flat = None  # the fields back to back, when read from a blob (`_FlatTables`)
        self._weighed = threading.Lock()
        self._weights_ready = False

    def flat_fields(self) -> "_FlatTables":
        """Every tensor's fields back to back (as read from the blob; joined when fitted here)."""
        if self.flat is None:
            items = list(self.tensors.items())
            head = np.array([(t.heads, t.head_dim, t.group_size, t.anchor_bits) for _, t in items], np.int64).reshape(-1, 4)

            def joined(field, dtype):
                parts = [getattr(t, field) for _, t in items]
                return np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype)
            self.flat = _FlatTables([k for k, _ in items], head, _starts([t.heads * t.head_dim for _, t in items]),
                                    _starts([len(t.sizes) for _, t in items]), _starts([len(t.codes) for _, t in items]),
                                    joined("steps", np.float32), joined("anchored", bool), joined("los", np.int64),
                                    joined("sizes", np.int64), joined("codes", np.uint8))
        return self.flat

    def with_weights(self) -> "FileTables":
        """Every tensor's weights made at once, tensors in parallel threads (numpy lets go of the
        GIL; it is most of the work of reading tables on the CPU)."""
        with self._weighed:
            if not self._weights_ready:
                todo = [tt for tt in self.tensors.values() if "flat_weights" not in tt.__dict__]
                weights = list(_pool().map(lambda tt: weights_of(tt.codes, tt.sizes), todo))
                for tt, w in zip(todo, weights):
                    tt.__dict__["flat_weights"] = w  # what the cached property would store
                self._weights_ready = True
        return self

    def for_chunk(self, info, codec: str) -> ChannelTables:
        """The tables of the (layer, key/value) of `info` (a `ChunkInfo`), checked to fit its shape,
        with their weights (the CPU coders need them)."""
        if not self._weights_ready:
            self.with_weights()
        entry = self.tensors.get((info.layer, info.tensor))
        b, h, t, d = info.shape
        if entry is None or (entry.heads, entry.head_dim) != (h, d):
            raise CodecError(f"{codec} tables do not cover layer {info.layer} {info.tensor} of shape {info.shape}")
        return entry

    def to_blob(self, num_layers: int) -> bytes:
        """The stored form (spec 8.5): every layer's key then value tables, in zstd frames of
        whole layers after a skippable frame listing the frames' lengths (readers inflate them
        in parallel)."""
        layers = []
        for i in range(num_layers):
            parts = [np.uint32(num_layers).tobytes()] if i == 0 else []
            for name in TENSORS:
                tt = self.tensors[(i, name)]
                parts += [np.array([(tt.heads, tt.head_dim, tt.group_size, tt.anchor_bits)], TENSOR_HEAD).tobytes(),
                          tt.steps.astype("<f4").tobytes(), tt.anchored.astype(np.uint8).tobytes(),
                          tt.los.astype("<i4").tobytes(), tt.sizes.astype("<u2").tobytes(), tt.codes.tobytes()]
            layers.append(b"".join(parts))
        groups = [b""]  # whole layers per frame, about FRAME_BYTES each
        for part in layers:
            if len(groups[-1]) >= FRAME_BYTES:
                groups.append(b"")
            groups[-1] += part
        compress = zstandard.ZstdCompressor(level=19, write_checksum=True, write_content_size=True).compress
        frames = [compress(group) for group in groups] if layers else [compress(np.uint32(0).tobytes())]
        directory = np.array([len(frames)] + [len(f) for f in frames], dtype="<u4").tobytes()
        return b"".join([DIRECTORY_MAGIC, np.uint32(len(directory)).tobytes(), directory] + frames)

    @classmethod
    def from_blob(cls, blob: bytes, codec: str) -> "FileTables":
        """Inverse of `to_blob`; CodecError naming `codec` for anything malformed. One pass finds
        where each tensor's fields lie; they are then read and checked all at once."""
        try:
            content = _inflate(blob)
            flat = _FlatTables.parse(content)
        except (zstandard.ZstdError, ValueError, CodecError) as exc:
            raise CodecError(f"{codec} tables are corrupt ({exc})") from None
        tables = cls({key: flat.tensor(k) for k, key in enumerate(flat.keys)})
        tables.flat = flat
        return tables


def _starts(counts) -> np.ndarray:
    """int64 [n + 1]: where each of n runs of `counts` items starts, then their total."""
    return np.r_[0, np.cumsum(counts, dtype=np.int64)]


@dataclass(frozen=True, eq=False)
class _FlatTables:
    """Every tensor's fields back to back, as the blob holds them: `keys` ((layer, name) in
    order), per tensor `head` (heads, head_dim, group_size, anchor_bits) and its first channel,
    table and code; per channel `steps` and `anchored`; per table `los` and `sizes`; `codes`."""

    keys: list
    head: np.ndarray  # int64 [tensors, 4]
    channel_first: np.ndarray  # int64 [tensors + 1]
    table_first: np.ndarray
    code_first: np.ndarray
    steps: np.ndarray
    anchored: np.ndarray
    los: np.ndarray
    sizes: np.ndarray
    codes: np.ndarray

    @classmethod
    def parse(cls, content: bytes) -> "_FlatTables":
        if len(content) < 4:
            raise ValueError("they end early")
        n_layers = int(np.frombuffer(content, "<u4", 1)[0])
        if n_layers > MAX_LAYERS:
            raise ValueError(f"they claim {n_layers} layers (at most {MAX_LAYERS})")
        if n_layers > len(content) // 32:  # a tensor set takes at least 16 bytes
            raise ValueError("they end early")
        keys, heads, at = [], [], []  # at: offsets of steps, modes, los, sizes, codes
        pos = 4
        for i in range(n_layers):
            for name in TENSORS:
                if pos + 16 > len(content):
                    raise ValueError("they end early")
                h, d, g, k = (int(v) for v in np.frombuffer(content, "<u4", 4, pos))
                if not (1 <= h and 1 <= d and 1 <= g <= 1024 and k <= 8):
                    raise ValueError(f"layer {i} {name} has out-of-range fields")
                c = h * d
                modes = pos + 16 + 4 * c
                if modes + c > len(content):
                    raise ValueError("they end early")
                t = c + int(np.count_nonzero(np.frombuffer(content, np.uint8, c, modes)))
                sizes = modes + c + 4 * t
                if sizes + 2 * t > len(content):
                    raise ValueError("they end early")
                codes = sizes + 2 * t
                n = int(np.frombuffer(content, "<u2", t, sizes).sum(dtype=np.int64))
                pos = codes + n
                keys.append((i, name))
                heads.append((h, d, g, k, c, t, n))
                at.append((modes - 4 * c, modes, modes + c, sizes, codes))
        if pos != len(content):
            raise ValueError(f"{len(content) - pos} bytes left over" if pos < len(content) else "they end early")
        head = np.array(heads, dtype=np.int64).reshape(-1, 7)
        at = np.array(at, dtype=np.int64).reshape(-1, 5)

        def gather(column, dtype, counts):
            parts = [np.frombuffer(content, dtype, int(n), int(o)) for o, n in zip(at[:, column], counts)]
            return np.concatenate(parts) if parts else np.zeros(0, dtype)
        c, t, n = head[:, 4], head[:, 5], head[:, 6]
        steps = gather(0, "<f4", c).astype(np.float32)
        modes = gather(1, np.uint8, c)
        los = gather(2, "<i4", t).astype(np.int64)
        sizes = gather(3, "<u2", t).astype(np.int64)
        codes = gather(4, np.uint8, n)
        group = np.repeat(head[:, 2], c)
        if (modes.max(initial=0) > 1 or ((group == 1) & (modes != 0)).any() or not np.all(np.isfinite(steps))
                or steps.min(initial=1) <= 0 or sizes.min(initial=2) < 2 or sizes.max(initial=2) > rans.MAX_ALPHABET
                or (np.abs(los) + sizes).max(initial=0) >= MAX_SYMBOL):
            raise ValueError("a table has out-of-range fields")
        return cls(keys, head[:, :4], _starts(c), _starts(t), _starts(n), steps, modes.astype(bool), los, sizes, codes)

    def tensor(self, k: int) -> ChannelTables:
        c, t, n = (slice(int(f[k]), int(f[k + 1])) for f in (self.channel_first, self.table_first, self.code_first))
        h, d, g, bits = (int(v) for v in self.head[k])
        return ChannelTables(h, d, g, bits, self.steps[c], self.anchored[c], self.los[t], self.sizes[t], self.codes[n])


def _inflate(blob) -> bytes:
    """The tables blob decompressed, never past a bounded multiple of its size (a hostile blob
    cannot make a reader reserve more): its frames in parallel when a directory lists them, a
    single frame piece by piece."""
    blob = bytes(blob)
    limit = min(256 << 20, (1 << 20) + INFLATE_FACTOR * len(blob))
    if blob[:4] != DIRECTORY_MAGIC:
        return _inflate_stream(blob, limit)
    frames = _frames(blob)
    sizes = [zstandard.frame_content_size(f) for f in frames]
    if any(n < 0 for n in sizes):
        raise ValueError("a frame does not declare its size")
    if not all(zstandard.get_frame_parameters(f).has_checksum for f in frames):
        raise ValueError("a frame has no content checksum")
    if sum(sizes) > limit:
        raise ValueError(f"they expand beyond {limit} bytes")
    parts = list(_pool().map(_one_frame, frames))
    if [len(p) for p in parts] != sizes:
        raise ValueError("a frame's content differs from its declared size")
    return b"".join(parts)


def _one_frame(frame: bytes) -> bytes:
    """The content of `frame`, which must be exactly one whole zstd frame."""
    inflater = zstandard.ZstdDecompressor().decompressobj()
    out = inflater.decompress(frame)
    if not inflater.eof or inflater.unused_data:
        raise ValueError("a directory entry is not exactly one frame")
    return out


def _frames(blob: bytes) -> list[bytes]:
    """The frames a directory (a zstd skippable frame) lists; they must fill the blob exactly."""
    if len(blob) < 12:
        raise ValueError("their directory is truncated")
    size, count = (int(v) for v in np.frombuffer(blob, "<u4", 2, 4))
    if size != 4 * (1 + count) or 8 + size > len(blob):
        raise ValueError("their directory is malformed")
    lengths = np.frombuffer(blob, "<u4", count, 12).astype(np.int64)
    if count == 0 or 8 + size + int(lengths.sum()) != len(blob):
        raise ValueError("their directory disagrees with the frames after it")
    ends = 8 + size + np.cumsum(lengths)
    return [blob[int(e - n):int(e)] for e, n in zip(ends, lengths)]


def _inflate_stream(blob: bytes, limit: int) -> bytes:
    if not zstandard.get_frame_parameters(blob).has_checksum:
        raise ValueError("the frame has no content checksum")
    out = bytearray()
    with zstandard.ZstdDecompressor().stream_reader(blob) as reader:
        while piece := reader.read(1 << 20):
            out += piece
            if len(out) > limit:
                raise ValueError(f"they expand beyond {limit} bytes")
    return bytes(out)


@cache
def _pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1), thread_name_prefix="kvcodec-tables")
