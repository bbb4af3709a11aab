"""`zstd` and `shuffle-zstd`: lossless Zstandard, optionally on byte planes.

Splitting elements into byte planes puts the sign/exponent bytes of all elements together,
where they are highly repetitive, instead of interleaving them with noisy mantissa bytes.
"""

from __future__ import annotations

import numpy as np
import zstandard

from kvcodec.codecs.base import Codec
from kvcodec.codecs.raw import raw_length
from kvcodec.dtypes import tensor_bytes, tensor_from_bytes
from kvcodec.errors import CodecError

MAX_EXPANSION = 32768  # a Zstandard block of <= 128 KiB takes >= 4 bytes


class ZstdCodec(Codec):
    codec_id = 2
    name = "zstd"
    lossless = True
    description = "Zstandard on the raw bytes"
    max_expansion = float(MAX_EXPANSION)
    blob_count = 0

    def __init__(self, level: int = 3):
        if not isinstance(level, int) or isinstance(level, bool) or not -7 <= level <= 22:
            raise ValueError(f"level must be an integer from -7 to 22, not {level!r}")
        self.level = level

    def _arrange(self, raw: memoryview, itemsize: int):
        return raw

    def _restore(self, content: bytes, itemsize: int):
        return content

    def encode(self, chunk, info, context):
        content = self._arrange(tensor_bytes(chunk), info.dtype.itemsize)
        return zstandard.ZstdCompressor(level=self.level, write_content_size=True).compress(content)

    def decode(self, payload, info, context):
        expected = raw_length(info)
        where = f"layer {info.layer} {info.tensor} tokens {info.token_start}+{info.shape[2]}"
        if expected > MAX_EXPANSION * len(payload):
            raise CodecError(f"{self.name} payload of {where} is {len(payload)} bytes, too small for its shape")
        try:
            size = zstandard.get_frame_parameters(payload).content_size
            if size != expected:
                raise CodecError(f"{self.name} frame of {where} holds {size} bytes; its shape needs {expected}")
            frame = zstandard.ZstdDecompressor().decompressobj()
            content = frame.decompress(payload)  # the content size is checked above: output is bounded
            if not frame.eof or frame.unused_data or len(content) != expected:
                raise CodecError(f"{self.name} payload of {where} is not exactly one whole frame")
        except zstandard.ZstdError as exc:
            raise CodecError(f"{self.name} payload of {where} is corrupt: {exc}") from None
        return tensor_from_bytes(self._restore(content, info.dtype.itemsize), info.dtype, info.shape)


class ShuffleZstdCodec(ZstdCodec):
    codec_id = 3
    name = "shuffle-zstd"
    description = "byte planes split, then Zstandard"

    def _arrange(self, raw, itemsize):
        return np.frombuffer(raw, dtype=np.uint8).reshape(-1, itemsize).T.tobytes()

    def _restore(self, content, itemsize):
        return np.frombuffer(content, dtype=np.uint8).reshape(itemsize, -1).T.tobytes()
