"""Entropy-coded lanes encoded on the GPU (`kvcodec.entropy.lanes`): quantization, anchors and
deltas in torch on the tokens' device, then rANS coding one lane per thread, producing exactly
the words of `kvcodec.entropy.rans.encode_lane` (constriction's coder; spec section 9,
"Encoding"): the bytes are the CPU encoder's."""

from __future__ import annotations

import weakref

import numpy as np
import torch
import triton
import triton.language as tl

from kvcodec.entropy import rans
from kvcodec.entropy.quantizer import quantize
from kvcodec.entropy.tables import ChannelTables
from kvcodec.errors import CodecError


@triton.jit
def _encode_kernel(sym_ptr, count_ptr, table_ptr, cdf_ptr, weight_ptr, out_ptr, length_ptr, n_lanes, width,
                   BL: tl.constexpr):
    lane = tl.program_id(0) * BL + tl.arange(0, BL)
    valid = lane < n_lanes
    count = tl.load(count_ptr + lane, mask=valid, other=0)
    base = tl.load(table_ptr + lane, mask=valid, other=0)
    row = lane.to(tl.int64) * width  # symbols of a lane: sym[lane, 0..count)
    out = lane.to(tl.int64) * (width + 2)  # room for one word per symbol and the final two
    x = tl.zeros([BL], dtype=tl.uint64)
    k = tl.zeros([BL], dtype=tl.int64)
    n_max = tl.max(count)
    for i in range(0, n_max):
        t = n_max - 1 - i
        active = valid & (t < count)
        s = tl.load(sym_ptr + row + t, mask=active, other=0)
        w = tl.load(weight_ptr + base + s, mask=active, other=1).to(tl.uint64)
        c = tl.load(cdf_ptr + base + s, mask=active, other=0).to(tl.uint64)
        push = active & ((x >> 40) >= w)
        tl.store(out_ptr + out + k, (x & 0xFFFFFFFF).to(tl.uint32).to(tl.int32, bitcast=True), mask=push)
        k = tl.where(push, k + 1, k)
        x = tl.where(push, x >> 32, x)
        x = tl.where(active, ((x // w) << 24) | (x % w + c), x)
    high = x >> 32
    low = x & 0xFFFFFFFF
    has_low = valid & ((high != 0) | (low != 0))
    tl.store(out_ptr + out + k, low.to(tl.uint32).to(tl.int32, bitcast=True), mask=has_low)
    k = tl.where(has_low, k + 1, k)
    has_high = valid & (high != 0)
    tl.store(out_ptr + out + k, high.to(tl.uint32).to(tl.int32, bitcast=True), mask=has_high)
    k = tl.where(has_high, k + 1, k)
    tl.store(length_ptr + lane, k, mask=valid)


def _lane_words(symbols: torch.Tensor, counts: torch.Tensor, table_base: torch.Tensor, cdf: torch.Tensor,
                 weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode lane `i`'s first `counts[i]` symbols of `symbols[i]` (int32, [lanes, width], each
    below its table's size) with the table whose cumulative weights and weights start at
    `table_base[i]` of `cdf` and `weights` (int32). Returns (words, lengths): the lanes' words
    back to back (int32 bit patterns of the uint32 words) and each lane's word count."""
    lanes, width = symbols.shape
    out = torch.empty(lanes * (width + 2), dtype=torch.int32, device=symbols.device)
    lengths = torch.empty(lanes, dtype=torch.int64, device=symbols.device)
    if lanes:
        block = 64
        _encode_kernel[(triton.cdiv(lanes, block),)](symbols.contiguous(), counts, table_base, cdf, weights, out,
                                                     lengths, lanes, width, BL=block)
    keep = torch.arange(width + 2, device=symbols.device)[None, :] < lengths[:, None]
    return out.view(lanes, width + 2)[keep], lengths


_ON_DEVICE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # ChannelTables -> {device: tensors}


def _device_tables(tt: ChannelTables, device):
    """(cumulative weights, weights, first index of each table) of one (layer, key/value)."""
    per_device = _ON_DEVICE.setdefault(tt, {})
    if device not in per_device:
        starts = np.cumsum(tt.sizes) - tt.sizes
        per_device[device] = tuple(torch.from_numpy(a.astype(np.int32)).to(device)
                                   for a in (rans.cumulative_many(tt.flat_weights, tt.sizes), tt.flat_weights, starts))
    return per_device[device]


def encode_lanes(body: torch.Tensor, tt: ChannelTables, where: str) -> bytes:
    """`kvcodec.entropy.lanes.encode` of the coded tokens `body` ([B, H, n, D] float32 on a GPU)."""
    device = body.device
    b, h, n, d = body.shape
    channels = h * d
    anchored = torch.from_numpy(np.flatnonzero(tt.anchored)).to(device)
    main, anchors, deltas_body = quantize(body, torch.from_numpy(tt.steps), anchored, tt.group_size, tt.anchor_bits)
    n_anchored, n_anchor = anchors.shape[1], anchors.shape[2]
    pos = torch.arange(n, device=device)
    main_count = torch.full((b, channels), n, dtype=torch.int64, device=device)
    deltas = torch.zeros((b, n_anchored, n), dtype=torch.int64, device=device)
    if n_anchored:
        deltas[:, :, :n - n_anchor] = deltas_body
        main[:, anchored, :n_anchor] = anchors
        main[:, anchored, n_anchor:] = 0
        main_count[:, anchored] = n_anchor
    delta_tables = torch.from_numpy(tt.delta_of).to(device)
    table = torch.cat([torch.arange(channels, device=device).expand(b, channels).reshape(-1),
                       delta_tables.expand(b, n_anchored).reshape(-1)])
    symbols = torch.cat([main.reshape(b * channels, n), deltas.reshape(b * n_anchored, n)])
    counts = torch.cat([main_count.reshape(-1),
                        torch.full((b * n_anchored,), n - n_anchor, dtype=torch.int64, device=device)])
    los = torch.from_numpy(tt.los).to(device)[table]
    sizes = torch.from_numpy(tt.sizes).to(device)[table]
    symbols = symbols - los[:, None]
    used = pos[None, :] < counts[:, None]
    if bool(((symbols < 0) & used).any()) or bool(((symbols >= sizes[:, None]) & used).any()):
        raise CodecError(f"{where} holds values outside its tables (tables are fitted on the cache being packed)")
    cum, weights, starts = _device_tables(tt, device)
    words, lengths = _lane_words(torch.where(used, symbols, 0).to(torch.int32), counts, starts[table], cum,
                                       weights)
    return lengths.cpu().numpy().astype("<u4").tobytes() + words.cpu().numpy().tobytes()
