"""The codec interface: one small immutable class per codec, encoding and decoding one chunk."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Iterator, Sequence

import torch

from kvcodec.cache import TENSORS
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
    # int64 [1 or heads, tokens]: the tokens' positions in the sequence where the layer records
    # them (pruned or sliding-window layers); None: token i of the chunk is at token_start + i
    positions: torch.Tensor | None = field(default=None, compare=False, repr=False)

    @property
    def token_positions(self) -> torch.Tensor:
        """int64 [1 or heads, tokens]: every token's position in the sequence."""
        if self.positions is not None:
            return self.positions
        return torch.arange(self.token_start, self.token_start + self.shape[2], dtype=torch.int64)[None]

    @property
    def numel(self) -> int:
        b, h, t, d = self.shape
        return b * h * t * d

    @property
    def where(self) -> str:
        """The chunk's place, for error messages."""
        return place(self.layer, self.tensor, self.token_start, self.shape[2])


def place(layer: int, tensor: str, token_start: int, tokens: int) -> str:
    """How error messages name a chunk: `layer 3 key tokens 1024+1024`."""
    return f"layer {layer} {tensor} tokens {token_start}+{tokens}"


@dataclass(frozen=True)
class Chunks:
    """A cache cut into the chunks a file stores (`kvcodec.container.chunking.cut`), in file
    order: per layer its key chunks, then its value chunks. The writer encodes exactly these and
    `Codec.fit` is given exactly these, so no codec re-cuts a cache itself."""

    layers: tuple[tuple[tuple[ChunkInfo, torch.Tensor], ...], ...]
    chunk_tokens: int
    shapes: tuple[tuple[tuple[int, int, int, int], tuple[int, int, int, int]], ...]  # per layer: key, value

    def shape(self, layer: int, tensor: str) -> tuple[int, int, int, int]:
        """The whole tensor's shape (also where it holds no tokens, hence no chunks)."""
        return self.shapes[layer][TENSORS.index(tensor)]

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def __iter__(self) -> Iterator[tuple[ChunkInfo, torch.Tensor]]:
        for layer in self.layers:
            yield from layer

    def __len__(self) -> int:
        return sum(len(layer) for layer in self.layers)

    def of(self, layer: int, tensor: str) -> list[tuple[ChunkInfo, torch.Tensor]]:
        """The chunks of one (layer, key/value), in token order."""
        return [(info, chunk) for info, chunk in self.layers[layer] if info.tensor == tensor]


class Codec(Configurable):
    """Base class. Subclasses set the class attributes, take their options as keyword
    arguments of `__init__` (validated there; the object is immutable afterwards), and
    implement `encode` and `decode`.

    Shared context: `fit` may compute blobs from every chunk before any is encoded (entropy
    tables, ...); they are stored once per file. `load_context` turns a file's blobs into what
    `encode` and `decode` are handed as `context` (parsed once per file by its reader and once
    per write by the writer; by default the blobs themselves).

    GPU paths: `device_decoder` / `device_encoder` name a module (`package.module` or
    `package.module:object`) implementing `kvcodec.codecs.device`'s decoder or encoder
    interface; readers and writers load it only when a CUDA device is used, so a plugin codec
    can ship its own kernels.
    """

    codec_id: ClassVar[int]
    name: ClassVar[str]
    lossless: ClassVar[bool]
    description: ClassVar[str] = ""
    # Most decoded bytes one payload byte can yield; every codec declares it (the registry refuses
    # one that does not). Readers refuse a record claiming more before allocating anything, so a
    # hostile file cannot make them allocate beyond a multiple of its size.
    max_expansion: ClassVar[float]
    device_decoder: ClassVar[str | None] = None
    device_encoder: ClassVar[str | None] = None
    # How many context blobs a file holds for this codec, when that is fixed (None: the codec's
    # own `load_context` decides); the default `load_context` refuses any other number.
    blob_count: ClassVar[int | None] = None
    # Options a file's header may leave out (added after files were written without them).
    optional_in_header: ClassVar[frozenset] = frozenset()

    def __init__(self):
        """Codecs without options keep this signature; others list their options here."""

    @classmethod
    def from_header(cls, config: dict) -> "Codec":
        """The codec a file's header describes. Like `from_config`, but for untrusted input: the
        header names every option (spec 8), and codecs whose options may name local resources
        refuse them here."""
        missing = sorted(set(cls.option_names()) - set(config) - cls.optional_in_header)
        if missing:
            raise CodecError(f"the file's {cls.name} config lacks {missing[0]!r} (spec 8: every option is stated)")
        return cls.from_config(config)

    @classmethod
    def presets(cls, options: dict | None = None) -> list[dict]:
        """Option sets, finest first, among which size or error targets choose per chunk (for a
        codec given `options`, which may change the ladder)."""
        return []

    def fit(self, chunks: Chunks) -> list[bytes]:
        """The shared context blobs for a file of these chunks (none by default)."""
        return []

    def narrow_context(self, blobs: Sequence[bytes], used: set[tuple[int, str]]) -> list[bytes]:
        """The context blobs for a file in which only the (layer, "key"/"value") tensors `used`
        have chunks of this codec (per-chunk presets leave a preset to a few layers): a codec
        whose context holds per-tensor parts may drop the others; unchanged by default."""
        return list(blobs)

    def load_context(self, blobs: Sequence[bytes]):
        """What `encode`/`decode` receive as `context`, from the file's blobs for this codec."""
        if self.blob_count is not None and len(blobs) != self.blob_count:
            raise CodecError(f"{self.name} takes {self.blob_count} context blob(s); the file has {len(blobs)}")
        return tuple(blobs)

    def encode(self, chunk: torch.Tensor, info: ChunkInfo, context) -> bytes:
        raise NotImplementedError

    def decode(self, payload: memoryview, info: ChunkInfo, context) -> torch.Tensor:
        raise NotImplementedError

    def encode_many(self, chunks: Sequence[torch.Tensor], infos: Sequence[ChunkInfo], context) -> list[bytes]:
        """The payloads of several chunks (the same bytes as `encode` of each). Codecs whose
        coders step many chunks together (lane format 2 of cachegen) do it faster."""
        return [self.encode(chunk, info, context) for chunk, info in zip(chunks, infos)]

    def decode_many(self, payloads: Sequence[memoryview], infos: Sequence[ChunkInfo], context) -> list[torch.Tensor]:
        """`decode` of several payloads at once, on the CPU (faster for the same codecs)."""
        return [self.decode(payload, info, context) for payload, info in zip(payloads, infos)]

    def decode_to(self, payload: memoryview, info: ChunkInfo, context, device) -> torch.Tensor:
        """Decode onto `device`. By default on the CPU, then copied; codecs whose decoding is
        mostly arithmetic a GPU does better (ae's decoder network) run it there instead."""
        return self.decode(payload, info, context).to(device)


def check_finite(x: torch.Tensor, info: ChunkInfo, codec: str) -> None:
    """CodecError naming the chunk unless every element is finite (lossy codecs quantize values
    and cannot represent NaN or infinities). From the extremes, through which NaN propagates:
    several times cheaper than a mask of every element."""
    if x.numel() and not all(bool(torch.isfinite(v)) for v in torch.aminmax(x)):
        raise CodecError(f"{codec}: layer {info.layer} {info.tensor} holds NaN or infinity, which a lossy codec "
                         "cannot store; use a lossless codec")


def check_payload_length(payload, expected: int, info: ChunkInfo, codec: str) -> None:
    if len(payload) != expected:
        raise CodecError(f"{codec} payload of {info.where} is {len(payload)} bytes; its shape needs {expected}")
