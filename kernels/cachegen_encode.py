"""`cachegen` chunk encoding on the GPU: quantization, anchors and deltas in torch on the chunk's
device, lanes coded by `lane_encode` one per thread. The payload is byte-identical to the CPU
encoder's (same float operations, same rounding, same coder). `CacheGenCodec.fit` runs on the
cache's device too: its sums in a fixed order, its counts exact, its logarithms on the CPU."""

from __future__ import annotations

import numpy as np
import torch

from kvcodec.entropy import rans as ans
from kvcodec.codecs.cachegen import quantize
from kvcodec.errors import CodecError

from kvcodec.kernels.lane_encode import encode_lanes


def _device_tables(tt, device):
    """(cumulative weights, weights, first index of each table) of one (layer, key/value)."""
    cache = tt.__dict__.setdefault("_encode_tables", {})
    if device not in cache:
        starts = np.cumsum(tt.sizes) - tt.sizes
        cache[device] = tuple(torch.from_numpy(a.astype(np.int32)).to(device)
                              for a in (ans.cumulative_many(tt.flat_weights, tt.sizes), tt.flat_weights, starts))
    return cache[device]


def encode_chunk(codec, chunk: torch.Tensor, info, context) -> bytes:
    tt = codec.tables_for(context, info)
    device = chunk.device
    s = codec._sink_count(info)
    body = chunk.detach()[:, :, s:].to(torch.float32)
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
        raise CodecError(f"cachegen: layer {info.layer} {info.tensor} holds values outside its tables "
                         "(tables are fitted on the cache being packed)")
    cum, weights, starts = _device_tables(tt, device)
    words, lengths = encode_lanes(torch.where(used, symbols, 0).to(torch.int32), counts, starts[table], cum, weights)
    sink = chunk.detach()[:, :, :s].contiguous().view(torch.uint8).cpu().numpy().tobytes()
    return b"".join([sink, lengths.cpu().numpy().astype("<u4").tobytes(), words.cpu().numpy().tobytes()])
