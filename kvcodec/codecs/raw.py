"""`raw`: the chunk's bytes as they are in memory. The reference point for every ratio."""

from __future__ import annotations

from kvcodec.codecs.base import ChunkInfo, Codec, check_payload_length
from kvcodec.dtypes import tensor_bytes, tensor_from_bytes


def raw_length(info: ChunkInfo) -> int:
    return info.numel * info.dtype.itemsize


class RawCodec(Codec):
    codec_id = 1
    name = "raw"
    lossless = True
    description = "uncompressed little-endian elements"
    max_expansion = 1.0
    blob_count = 0
    device_decoder = "kvcodec.kernels.raw"

    def encode(self, chunk, info, context):
        return bytes(tensor_bytes(chunk))

    def decode(self, payload, info, context):
        check_payload_length(payload, raw_length(info), info, self.name)
        return tensor_from_bytes(payload, info.dtype, info.shape)
