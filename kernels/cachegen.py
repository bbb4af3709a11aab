"""cachegen's device decoder and encoder: its exact sink tokens, then its lanes, decoded and
encoded by the lane kernels of its lane format (`shared_lane_decode`, `shared_lane_encode` for
format 2; `lane_decode`, `lane_encode` for format 1)."""

from __future__ import annotations

import numpy as np
import torch

from kvcodec.codecs.cachegen import sink_counts
from kvcodec.codecs.device import Launch
from kvcodec.entropy.shared_tables import SharedTables
from kvcodec.entropy.tables import FileTables
from kvcodec.kernels import jobs as J
from kvcodec.kernels.lane_decode import prepare_lanes
from kvcodec.kernels.lane_encode import encode_lanes
from kvcodec.kernels import shared_lane_encode
from kvcodec.kernels.shared_lane_decode import prepare_shared_lanes


def _sinks(codec, table: np.ndarray) -> np.ndarray:
    return sink_counts(codec.sinks, table[:, J.TOKEN_START], table[:, J.TOKENS])


def supports(codec, context, table: np.ndarray, itemsize: int) -> np.ndarray:
    """Lane lengths are read as 32-bit words: the exact sink tokens before them must fill whole words."""
    whole_words = (table[:, J.BATCH] * table[:, J.HEADS] * _sinks(codec, table) * table[:, J.HEAD_DIM] * itemsize) % 4 == 0
    return whole_words & J.fits_grid(table)


def prepare(codec, context: FileTables | SharedTables, table: np.ndarray, staged: torch.Tensor,
            out: torch.Tensor) -> Launch:
    if isinstance(context, SharedTables):
        return prepare_shared_lanes(context, table, _sinks(codec, table), staged, out, codec.name)
    return prepare_lanes(context, table, _sinks(codec, table), staged, out, codec.name)


def encode_many(codec, chunks, infos, context) -> list[bytes]:
    """cachegen's payloads of chunks on the GPU: their sink tokens' bytes, then their lanes."""
    if isinstance(context, SharedTables):
        return codec.payloads(chunks, infos, lambda xs: shared_lane_encode.encode_many(
            xs, [codec.coded(info, context) for info in infos], context.flat()))
    return codec.payloads(chunks, infos, lambda xs: [
        encode_lanes(x, context.for_chunk(info, codec.name), f"cachegen: layer {info.layer} {info.tensor}")
        for x, info in zip(xs, infos)])


def encode(codec, chunk: torch.Tensor, info, context) -> bytes:
    """cachegen's payload of a chunk on the GPU: its sink tokens' bytes, then its lanes."""
    return encode_many(codec, [chunk], [info], context)[0]
