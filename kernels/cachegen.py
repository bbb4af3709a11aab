"""cachegen's device decoder and encoder: its exact sink tokens, then its lanes, decoded and
encoded by the shared lane kernels (`lane_decode`, `lane_encode`)."""

from __future__ import annotations

import numpy as np
import torch

from kvcodec.codecs.cachegen import sink_counts
from kvcodec.codecs.device import Launch
from kvcodec.entropy.tables import FileTables
from kvcodec.kernels import jobs as J
from kvcodec.kernels.lane_decode import prepare_lanes
from kvcodec.kernels.lane_encode import encode_lanes


def _sinks(codec, table: np.ndarray) -> np.ndarray:
    return sink_counts(codec.sinks, table[:, J.TOKEN_START], table[:, J.TOKENS])


def supports(codec, context, table: np.ndarray, itemsize: int) -> np.ndarray:
    """Lanes are read as 32-bit words: the exact sink tokens before them must fill whole words."""
    whole_words = (table[:, J.BATCH] * table[:, J.HEADS] * _sinks(codec, table) * table[:, J.HEAD_DIM] * itemsize) % 4 == 0
    return whole_words & J.fits_grid(table)


def prepare(codec, context: FileTables, table: np.ndarray, staged: torch.Tensor, out: torch.Tensor) -> Launch:
    return prepare_lanes(context, table, _sinks(codec, table), staged, out, codec.name)


def encode(codec, chunk: torch.Tensor, info, context) -> bytes:
    """cachegen's payload of a chunk on the GPU: its sink tokens' bytes, then its lanes."""
    tt = context.for_chunk(info, codec.name)
    s = codec.sink_count(info)
    body = encode_lanes(chunk.detach()[:, :, s:].to(torch.float32), tt, f"cachegen: layer {info.layer} {info.tensor}")
    return chunk.detach()[:, :, :s].contiguous().view(torch.uint8).cpu().numpy().tobytes() + body
