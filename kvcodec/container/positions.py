"""Compact coding of a pruned layer's kept positions (format_spec/kvc-v1.md, section 3.4).

Each row (one per KV head, or one shared by all heads) is a strictly increasing list of
positions, stored in whichever of two forms is smaller:

- runs (kind 0): u32 count, then `count` u64 starts, then `count` u32 lengths; kept tokens are
  mostly runs (sinks, recent windows, ladder slices), so this is a few bytes per row;
- bitmap (kind 1): u64 base, u32 bits, then ceil(bits / 8) bytes, bit j (least significant
  first) set when position base + j is kept; scattered choices (heavy hitters) cost 1 bit per
  token spanned.

All integers little-endian. Decoding checks every field and the exact count before it
allocates anything proportional to a count the data claims.
"""

from __future__ import annotations

import struct

import numpy as np

from kvcodec.errors import FormatError

RUNS, BITMAP = 0, 1
_COUNT = struct.Struct("<BI")
_BITMAP = struct.Struct("<BQI")
MAX_POSITION = 2**62


def _runs(row: np.ndarray) -> bytes:
    breaks = np.flatnonzero(np.diff(row) != 1) + 1
    starts = row[np.concatenate(([0], breaks))] if len(row) else row[:0]
    lengths = np.diff(np.concatenate(([0], breaks, [len(row)]))) if len(row) else row[:0]
    return _COUNT.pack(RUNS, len(starts)) + starts.astype("<u8").tobytes() + lengths.astype("<u4").tobytes()


def _bitmap(row: np.ndarray) -> bytes:
    base = int(row[0]) if len(row) else 0
    bits = int(row[-1]) - base + 1 if len(row) else 0
    flags = np.zeros(bits, dtype=bool)
    flags[row - base] = True
    return _BITMAP.pack(BITMAP, base, bits) + np.packbits(flags, bitorder="little").tobytes()


def encode(positions: np.ndarray) -> bytes:
    """Bytes of an int64 [rows, tokens] array whose rows are strictly increasing and non-negative."""
    positions = np.asarray(positions, dtype=np.int64)
    if positions.size and (positions.min() < 0 or positions.max() >= MAX_POSITION):
        raise ValueError("positions must lie in [0, 2**62)")
    if positions.shape[1] > 1 and bool((np.diff(positions, axis=1) <= 0).any()):
        raise ValueError("positions must be strictly increasing within each head")
    out = []
    for row in positions:
        runs = _runs(row)
        out.append(runs if not len(row) or len(runs) <= _BITMAP.size + (int(row[-1] - row[0]) + 8) // 8 else _bitmap(row))
    return b"".join(out)


def decode(data, rows: int, tokens: int) -> np.ndarray:
    """The int64 [rows, tokens] array `encode` made; FormatError on anything else."""
    view = memoryview(data).cast("B")
    out = np.empty((rows, tokens), dtype=np.int64)
    at = 0
    for r in range(rows):
        if at >= len(view):
            raise FormatError(f"positions end after {r} of {rows} rows")
        if view[at] == RUNS:
            at, out[r] = _decode_runs(view, at, tokens)
        elif view[at] == BITMAP:
            at, out[r] = _decode_bitmap(view, at, tokens)
        else:
            raise FormatError(f"positions row {r} has unknown kind {view[at]}")
    if at != len(view):
        raise FormatError(f"positions have {len(view) - at} bytes past their last row")
    return out


def _decode_runs(view: memoryview, at: int, tokens: int) -> tuple[int, np.ndarray]:
    if at + _COUNT.size > len(view):
        raise FormatError("positions are truncated")
    _, count = _COUNT.unpack_from(view, at)
    at += _COUNT.size
    if count > (len(view) - at) // 12:
        raise FormatError("positions are truncated (more runs than bytes)")
    starts = np.frombuffer(view, dtype="<u8", count=count, offset=at).astype(np.int64)
    lengths = np.frombuffer(view, dtype="<u4", count=count, offset=at + 8 * count).astype(np.int64)
    at += 12 * count
    if bool((lengths < 1).any()) or bool(((starts < 0) | (starts >= MAX_POSITION)).any()) \
            or bool((starts[1:] < starts[:-1] + lengths[:-1]).any()):
        raise FormatError("position runs overlap, are empty or out of range")
    if int(lengths.sum()) != tokens:
        raise FormatError(f"position runs hold {int(lengths.sum())} tokens; the layer has {tokens}")
    ends = np.cumsum(lengths)
    offsets = np.arange(tokens, dtype=np.int64) - np.repeat(ends - lengths, lengths)
    return at, np.repeat(starts, lengths) + offsets


def _decode_bitmap(view: memoryview, at: int, tokens: int) -> tuple[int, np.ndarray]:
    if at + _BITMAP.size > len(view):
        raise FormatError("positions are truncated")
    _, base, bits = _BITMAP.unpack_from(view, at)
    at += _BITMAP.size
    nbytes = (bits + 7) // 8
    if nbytes > len(view) - at or base + bits > MAX_POSITION:
        raise FormatError("position bitmap is truncated or out of range")
    flags = np.unpackbits(np.frombuffer(view, dtype=np.uint8, count=nbytes, offset=at), bitorder="little")
    at += nbytes
    if bool(flags[bits:].any()):
        raise FormatError("position bitmap has bits set past its length")
    kept = np.flatnonzero(flags[:bits])
    if len(kept) != tokens:
        raise FormatError(f"position bitmap holds {len(kept)} tokens; the layer has {tokens}")
    return at, kept.astype(np.int64) + base
