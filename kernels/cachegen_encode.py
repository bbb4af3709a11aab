"""Entropy-coded lanes encoded on the GPU (`kvcodec.entropy.lanes`): quantization, anchors and
deltas in torch on the tokens' device, lanes coded by `lane_encode` one per thread. The bytes
are the CPU encoder's (same float operations, same rounding, same coder). Here: cachegen's
device encoder (`encode`), and `encode_lanes` shared with ae's."""

from __future__ import annotations

import weakref

import numpy as np
import torch

from kvcodec.entropy import rans
from kvcodec.entropy.quantizer import quantize
from kvcodec.entropy.tables import ChannelTables
from kvcodec.errors import CodecError
from kvcodec.kernels.lane_encode import encode_lanes as encode_lane_words

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
    words, lengths = encode_lane_words(torch.where(used, symbols, 0).to(torch.int32), counts, starts[table], cum,
                                       weights)
    return lengths.cpu().numpy().astype("<u4").tobytes() + words.cpu().numpy().tobytes()


def encode(codec, chunk: torch.Tensor, info, context) -> bytes:
    """cachegen's payload of a chunk on the GPU: its sink tokens' bytes, then its lanes."""
    tt = context.for_chunk(info, codec.name)
    s = codec.sink_count(info)
    body = encode_lanes(chunk.detach()[:, :, s:].to(torch.float32), tt, f"cachegen: layer {info.layer} {info.tensor}")
    return chunk.detach()[:, :, :s].contiguous().view(torch.uint8).cpu().numpy().tobytes() + body
