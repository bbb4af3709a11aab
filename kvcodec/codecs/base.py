"""The codec interface: one small class per codec, encoding and decoding one chunk."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Sequence

import torch

from kvcodec.errors import CodecError
from kvcodec.options import Configurable


@dataclass(frozen=True)
class ChunkInfo:
    """What a codec knows about the chunk it codes: where it sits and its exact shape."""

    layer: int
    tensor: str  # "key" or "value"
    token_start: int
    shape: tuple[int, int, int, int]  # batch, heads, tokens, head_dim
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        b, h, t, d = self.shape
        return b * h * t * d


class Codec(Configurable):
    """Base class. Subclasses set the class attributes, take their options as keyword
    arguments of `__init__` (validated there), and implement `encode` and `decode`.

    `fit` may compute shared context from the whole cache before any chunk is encoded
    (entropy tables, ...), knowing how tokens will be cut into chunks: the blobs it returns are stored once per file and handed to every
    `encode`/`decode` call as `context`.
    """

    codec_id: ClassVar[int]
    name: ClassVar[str]
    lossless: ClassVar[bool]
    description: ClassVar[str] = ""
    # Most decoded bytes one payload byte can yield. Readers refuse a record claiming more before
    # allocating anything, so a hostile file cannot make them allocate beyond a multiple of its size.
    max_expansion: ClassVar[float] = 32768.0

    def __init__(self):
        """Codecs without options keep this signature; others list their options here."""

    @classmethod
    def from_header(cls, config: dict) -> "Codec":
        """The codec a file's header describes. Like `from_config`, but for untrusted input:
        codecs whose options may name local resources refuse them here."""
        return cls.from_config(config)

    @classmethod
    def presets(cls) -> list[dict]:
        """Option sets, finest first, among which size or error targets choose per chunk."""
        return []

    def fit(self, cache, chunk_tokens: int) -> list[bytes]:
        return []

    def encode(self, chunk: torch.Tensor, info: ChunkInfo, context: Sequence[bytes]) -> bytes:
        raise NotImplementedError

    def decode(self, payload: memoryview, info: ChunkInfo, context: Sequence[bytes]) -> torch.Tensor:
        raise NotImplementedError

    def decode_to(self, payload: memoryview, info: ChunkInfo, context: Sequence[bytes], device) -> torch.Tensor:
        """Decode onto `device`. By default on the CPU, then copied; codecs whose decoding is
        mostly arithmetic a GPU does better (ae's decoder network) run it there instead."""
        return self.decode(payload, info, context).to(device)


def check_payload_length(payload, expected: int, info: ChunkInfo, codec: str) -> None:
    if len(payload) != expected:
        raise CodecError(
            f"{codec} payload of layer {info.layer} {info.tensor} tokens {info.token_start}+{info.shape[2]} "
            f"is {len(payload)} bytes; its shape needs {expected}"
        )
