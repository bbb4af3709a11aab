"""A chunk's coded tokens as independent rANS lanes (spec 8.5): per batch entry one lane per
channel (an anchored channel's lane holds its anchors), then per batch entry one delta lane per
anchored channel. Stored as every lane's length in 32-bit words, then the lanes' words back to
back. The GPU coders (`kvcodec.kernels`) keep this order and these bytes."""

from __future__ import annotations

import numpy as np
import torch

from kvcodec.entropy import rans
from kvcodec.entropy.quantizer import group_layout, quantize
from kvcodec.entropy.tables import ChannelTables
from kvcodec.errors import CodecError


def lane_count(tt: ChannelTables, batch: int) -> int:
    return batch * (tt.heads * tt.head_dim + int(tt.anchored.sum()))


def encode(x: torch.Tensor, tt: ChannelTables, where: str) -> bytes:
    """The lanes of the coded tokens `x` ([B, H, n, D] float32 on the CPU)."""
    direct, anchors, deltas = (t.numpy() for t in quantize(x, torch.from_numpy(tt.steps),
                                                          torch.from_numpy(np.flatnonzero(tt.anchored)),
                                                          tt.group_size, tt.anchor_bits))
    lanes = []
    for bi in range(direct.shape[0]):
        a = 0
        for c in range(direct.shape[1]):
            if tt.anchored[c]:
                lanes.append((anchors[bi, a], tt.tables[c]))
                a += 1
            else:
                lanes.append((direct[bi, c], tt.tables[c]))
    for bi in range(direct.shape[0]):
        lanes.extend((deltas[bi, a], tt.tables[k]) for a, k in enumerate(tt.delta_of))
    for values, index in ((direct[:, ~tt.anchored], np.flatnonzero(~tt.anchored)),
                          (anchors, np.flatnonzero(tt.anchored)), (deltas, tt.delta_of)):
        k = values - tt.los[index][None, :, None]
        if k.size and (k.min() < 0 or (k >= tt.sizes[index][None, :, None]).any()):
            raise CodecError(f"{where} holds values outside its tables (tables are fitted on the cache being packed)")
    words = [rans.encode_lane(symbols - lo, table) for symbols, (lo, table) in lanes]
    return b"".join([np.array([w.size for w in words], dtype="<u4").tobytes()] + [w.astype("<u4").tobytes()
                                                                                  for w in words])


def decode(payload, tt: ChannelTables, shape: tuple[int, int, int, int], where: str) -> np.ndarray:
    """Inverse of `encode`: float32 [B, H*D, n], the dequantized channels of `shape`'s tokens."""
    b, h, n, d = shape
    c_all, n_anchored = h * d, int(tt.anchored.sum())
    is_anchor, group = group_layout(n, tt.group_size)
    n_anchor = int(is_anchor.sum())
    n_lanes = lane_count(tt, b)
    if len(payload) < 4 * n_lanes:
        raise CodecError(f"{where} is truncated")
    counts = np.frombuffer(payload, dtype="<u4", count=n_lanes).astype(np.int64)
    if 4 * n_lanes + 4 * int(counts.sum()) != len(payload):
        raise CodecError(f"{where} has the wrong length")
    words = np.frombuffer(payload, dtype="<u4", offset=4 * n_lanes)
    ends = np.cumsum(counts)

    def lane(i: int, table_index: int, count: int) -> np.ndarray:
        lo, table = tt.tables[table_index]
        return rans.decode_lane(words[ends[i] - counts[i]:ends[i]], table, count) + lo

    u = np.empty((b, c_all, n), dtype=np.float32)
    anchored = np.flatnonzero(tt.anchored)
    for bi in range(b):
        for c in range(c_all):
            if not tt.anchored[c]:
                u[bi, c] = lane(bi * c_all + c, c, n)
        if n_anchored:
            a = np.stack([lane(bi * c_all + c, c, n_anchor) for c in anchored]).astype(np.float32)
            a *= np.float32(1.0 / (1 << tt.anchor_bits))
            first = b * c_all + bi * n_anchored
            dl = np.stack([lane(first + j, tt.delta_of[j], n - n_anchor) for j in range(n_anchored)])
            body = a[:, group]
            body[:, ~is_anchor] += dl
            u[bi, anchored] = body
    u *= tt.steps[None, :, None]
    return u
