"""A chunk's coded tokens in lane format 2 (spec 8.5): one lane per (batch entry, channel) in
that order, holding every coded token of the channel in token order; an anchored channel's
anchors use its main table and its other tokens its delta table, in the same lane. Stored as
every lane's length in 16-bit words (u32 each), then the lanes' words back to back (`rans32`).

Coders here take many chunks at once and step all their lanes together: numpy's work per step
is then spread over thousands of lanes instead of one chunk's few hundred."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from kvcodec.entropy import rans32
from kvcodec.entropy.quantizer import quantize
from kvcodec.entropy.shared_tables import FlatTables, TensorTables
from kvcodec.errors import CodecError


@dataclass(frozen=True)
class Coded:
    """One chunk's coded tokens to encode or decode: its tables, the index of its tensor's first
    table in the file's lookup, its shape [B, H, n, D], and its name for errors."""

    tables: TensorTables
    first_table: int
    shape: tuple[int, int, int, int]
    where: str


def lane_tables(item: Coded) -> tuple[np.ndarray, np.ndarray]:
    """Each lane's table at an anchor step and at any other step (file-wide table indices)."""
    b = item.shape[0]
    tt = item.tables
    main = item.first_table + tt.main
    other = np.where(tt.anchored, item.first_table + tt.delta, main)
    return np.tile(main, b), np.tile(other, b)


def step_phase(n: int, group_size: int) -> np.ndarray:
    """1 where coded token i is not an anchor (its anchored lanes use the delta table)."""
    return (np.arange(n) % group_size != 0).astype(np.int64)


def batches(items: list[Coded]) -> list[list[int]]:
    """Indices of items that step together: those of one group size, most coded tokens first
    (a batch's lanes of fewer tokens drop out of the lockstep at its end)."""
    keys: dict = {}
    for i, item in enumerate(items):
        keys.setdefault(item.tables.group_size, []).append(i)
    return [sorted(batch, key=lambda i: -items[i].shape[2]) for batch in keys.values()]


def active_lanes(tokens: list[int], widths: list[int]) -> np.ndarray:
    """Per step of a batch (items by `tokens` descending, `widths` lanes each): how many leading
    lanes code a symbol there."""
    steps = np.arange(max(tokens, default=0))
    return (np.asarray(widths)[None, :] * (np.asarray(tokens)[None, :] > steps[:, None])).sum(1)


def lane_values(x: torch.Tensor, tt: TensorTables) -> torch.Tensor:
    """int32 [n, B*C] on x's device: the value each lane codes at each step, for the coded
    tokens `x` ([B, H, n, D] float32): direct symbols, an anchored channel's anchor symbols at
    anchor steps and its deltas elsewhere."""
    b, h, n, d = x.shape
    anchored = torch.from_numpy(np.flatnonzero(tt.anchored)).to(x.device)
    direct, anchors, deltas = quantize(x, torch.from_numpy(tt.steps), anchored, tt.group_size, tt.anchor_bits)
    v = direct.permute(2, 0, 1).to(torch.int32)  # [n, B, C]
    if len(anchored):
        va = torch.empty((n, b, len(anchored)), dtype=torch.int32, device=x.device)
        va[::tt.group_size] = anchors.permute(2, 0, 1).to(torch.int32)
        va[torch.arange(n, device=x.device) % tt.group_size != 0] = deltas.permute(2, 0, 1).to(torch.int32)
        v[:, :, anchored] = va
    return v.reshape(n, b * h * d)


def encode_many(xs: list[torch.Tensor], items: list[Coded], flat: FlatTables) -> list[bytes]:
    """The lanes of each chunk's coded tokens `xs[i]` ([B, H, n, D] float32 on the CPU), with
    the file's tables `flat`."""
    out: list[bytes] = [b""] * len(items)
    for batch in batches(items):
        group = items[batch[0]].tables.group_size
        tokens = [items[i].shape[2] for i in batch]
        widths = [items[i].shape[0] * items[i].shape[1] * items[i].shape[3] for i in batch]
        phases = np.concatenate([np.stack(lane_tables(items[i])) for i in batch], 1)
        phase = step_phase(max(tokens), group)
        v = flat.los[phases].astype(np.int32)[phase]  # [steps, lanes]; steps past a lane's last hold a valid value
        for i, at, width in zip(batch, np.cumsum(widths) - widths, widths):
            v[:items[i].shape[2], at:at + width] = lane_values(xs[i], items[i].tables).numpy()
        outside = rans32.outside_tables(v, phases, group, flat)
        if outside.any():
            raise outside_error(items, batch, widths, int(np.flatnonzero(outside)[0]))
        words, counts = rans32.encode_lanes(v, phases, phase, flat, active_lanes(tokens, widths))
        for i, payload in zip(batch, pack(words, counts, widths)):
            out[i] = payload
    return out


def pack(words: np.ndarray, counts: np.ndarray, widths: list[int]) -> list[bytes]:
    """Each chunk's lane bytes from every lane's words back to back and word counts, for chunks
    of `widths` lanes each, in order: the lengths (u32), then the words (u16)."""
    ends = np.cumsum(counts)
    out, lane = [], 0
    for width in widths:
        mine = counts[lane:lane + width]
        first = int(ends[lane] - counts[lane]) if width else 0
        lane += width
        out.append(mine.astype("<u4").tobytes() + words[first:first + int(mine.sum())].astype("<u2").tobytes())
    return out


def outside_error(items: list[Coded], batch: list[int], widths: list[int], lane: int) -> CodecError:
    """The error for a value outside its tables in `lane` of a batch of chunks `widths` lanes wide."""
    bad = items[batch[int(np.searchsorted(np.cumsum(widths), lane, "right"))]]
    return CodecError(f"{bad.where} holds values outside its tables (tables are fitted on the cache being packed)")


def decode_many(payloads: list, items: list[Coded], lookup: rans32.Lookup) -> list[np.ndarray]:
    """Inverse of `encode_many`: each chunk's coded tokens, float32 [B, H, n, D], from its lane
    bytes (a payload without its exact tokens). CodecError naming the chunk if one is corrupt."""
    return [_dequantize(v, item) for v, item in zip(decode_values_many(payloads, items, lookup), items)]


def decode_values_many(payloads: list, items: list[Coded], lookup: rans32.Lookup) -> list[np.ndarray]:
    """Each chunk's decoded values [n, B*C] (int, lane (b, c) as column b*C + c), before the
    anchors and steps make coded tokens of them: for codecs whose values are not the tokens."""
    out: list[np.ndarray] = [None] * len(items)
    for batch in batches(items):
        group = items[batch[0]].tables.group_size
        tokens = [items[i].shape[2] for i in batch]
        n = max(tokens)
        words, starts, ends, main, other, at = [], [], [], [], [], 0
        for i in batch:
            b, h, _, d = items[i].shape
            lanes = b * h * d
            data = payloads[i]
            if len(data) < 4 * lanes:
                raise CodecError(f"{items[i].where} is truncated")
            lengths = np.frombuffer(data, dtype="<u4", count=lanes).astype(np.int64)
            if 4 * lanes + 2 * int(lengths.sum()) != len(data):
                raise CodecError(f"{items[i].where} has the wrong length")
            words.append(np.frombuffer(data, dtype="<u2", offset=4 * lanes))
            end = at + np.cumsum(lengths)
            starts.append(end - lengths)
            ends.append(end)
            at = int(end[-1]) if lanes else at
            m, o = lane_tables(items[i])
            main.append(m)
            other.append(o)
        flat = np.concatenate(words + [np.zeros(n + 2, np.uint16)])
        phases = np.stack([np.concatenate(main), np.concatenate(other)])
        try:
            values = rans32.decode_lanes(flat, np.concatenate(starts), np.concatenate(ends), phases,
                                         step_phase(n, group), lookup,
                                         active_lanes(tokens, [len(m) for m in main]))
        except CodecError as exc:
            if len(batch) == 1:
                raise CodecError(f"{items[batch[0]].where}: {exc}") from None
            for i in batch:  # name the corrupt chunk
                decode_values_many([payloads[i]], [items[i]], lookup)
            raise
        first = 0
        for i in batch:
            b, h, n_i, d = items[i].shape
            out[i] = values[:n_i, first:first + b * h * d]
            first += b * h * d
    return out


def _dequantize(values: np.ndarray, item: Coded) -> np.ndarray:
    """float32 [B, H, n, D] from one chunk's decoded values [n, B*C]: anchors scaled, deltas
    added to their anchors, times the channel steps."""
    tt, (b, h, n, d) = item.tables, item.shape
    u = values.astype(np.float32).reshape(n, b, h * d)
    if tt.anchored.any():
        cols = np.flatnonzero(tt.anchored)
        is_anchor = np.arange(n) % tt.group_size == 0
        ua = u[:, :, cols]
        anchor = ua[is_anchor] * np.float32(1.0 / (1 << tt.anchor_bits))
        body = anchor[np.arange(n) // tt.group_size]
        body[~is_anchor] += ua[~is_anchor]
        u[:, :, cols] = body
    u *= tt.steps[None, None, :]
    return u.reshape(n, b, h, d).transpose(1, 2, 0, 3)
