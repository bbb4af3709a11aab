"""The seam between readers/writers and GPU code: how a codec's device decoder and encoder are
found, what a device decoder is asked to do, and when the kernels are used.

A device decoder is a module (or object) with two functions:

- `supports(codec, context, jobs, itemsize) -> bool array`: which of the records (rows of the
  job table `jobs`) it decodes; the others decode on the CPU and are copied over;
- `prepare(codec, context, jobs, staged, out) -> Launch`: host work done and inputs moved,
  the launches that decode those records from `staged` (uint8, the payloads on the device, at
  the offsets in column SRC) into `out` (one flat tensor of the output dtype).

A device encoder has `encode(codec, chunk, info, context) -> bytes`, the same bytes as
`codec.encode`, and may have `encode_many(codec, chunks, infos, context)` (as
`codec.encode_many`). A codec names them in its class attributes `device_decoder` and
`device_encoder`; `context` is what the codec's `load_context` returned.

The job table is int64, one row per record, the columns below (kernels read them by these
names, as Triton constants); a decoder may append columns of its own after COLUMNS.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from functools import cache

import numpy as np
import torch

from kvcodec.cache import TENSORS
from kvcodec.codecs.base import ChunkInfo, Codec, place
from kvcodec.errors import CodecError

DECODER_ENV = "KVCODEC_DECODER"
DECODERS = ("auto", "cpu", "kernels")

# SRC: payload's byte offset in the staged buffer; LENGTH: its bytes; DST: element offset in the
# output of the chunk's first element; STRIDE_B, STRIDE_H: element strides (the token stride is
# HEAD_DIM); then the record's shape and place.
SRC, LENGTH, DST, STRIDE_B, STRIDE_H, BATCH, HEADS, TOKENS, LAYER, TENSOR, TOKEN_START, HEAD_DIM = range(12)
COLUMNS = 12
STAGE_ALIGN = 64  # payload offsets in a staged buffer (file payloads are 64-byte aligned too)


def where(row: np.ndarray) -> str:
    """A job's record place, for error messages (as `ChunkInfo.where`)."""
    return place(int(row[LAYER]), TENSORS[int(row[TENSOR])], int(row[TOKEN_START]), int(row[TOKENS]))


@dataclass
class Check:
    """Corruption found on the device: `flags` (one per launch item, nonzero where the payload
    it decoded proved corrupt) and the job each item belongs to. Read after the launches, so
    decoding never waits for the host."""

    flags: torch.Tensor
    job_of_flag: np.ndarray
    problem: str


class Launch:
    """Prepared kernel launches (host work done, inputs on the device): call to run them."""

    def __init__(self, steps, checks: list[Check]):
        self._steps = steps
        self.checks = checks

    def __call__(self) -> "Launch":
        for step in self._steps:
            step()
        return self


def read_back(tensors) -> list[np.ndarray]:
    """The tensors, each read as int32 and flattened, on the host in one copy: a read waits for
    the device once however many flags its launches left."""
    flat = [t.reshape(-1).to(torch.int32) for t in tensors]
    if not flat:
        return []
    host = (flat[0] if len(flat) == 1 else torch.cat(flat)).cpu().numpy()
    return np.split(host, np.cumsum([len(t) for t in flat])[:-1])


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def use_kernels(device, decoder: str = "auto") -> bool:
    """Whether a read onto `device` decodes with the kernels: `decoder` is "auto" (on a CUDA
    device when Triton is installed, unless KVCODEC_DECODER=cpu), "cpu" or "kernels"."""
    if decoder not in DECODERS:
        raise ValueError(f"decoder must be one of {', '.join(DECODERS)}, not {decoder!r}")
    if decoder == "auto":
        decoder = os.environ.get(DECODER_ENV, "auto")
        if decoder not in DECODERS:
            raise ValueError(f"{DECODER_ENV} must be one of {', '.join(DECODERS)}, not {decoder!r}")
    if decoder == "cpu":
        return False
    on_gpu = device is not None and torch.device(device).type == "cuda"
    if decoder == "auto":
        return on_gpu and torch.cuda.is_available() and triton_available()
    if not triton_available():
        raise RuntimeError("decoder='kernels' needs Triton (pip install triton)")
    if not on_gpu and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("decoder='kernels' runs on CUDA devices, or on the CPU under TRITON_INTERPRET=1")
    return True


@cache
def _load(target: str):
    module, _, attr = target.partition(":")
    found = importlib.import_module(module)
    return getattr(found, attr) if attr else found


def _declared(codec: Codec, target: str | None, what: str):
    if target is None:
        return None
    try:
        return _load(target)
    except Exception as exc:  # a plugin's module that is missing or broken
        raise CodecError(f"codec {codec.name!r}: its {what} {target!r} cannot be loaded ({type(exc).__name__}: "
                         f"{exc})") from None


CHECKSUM_KERNEL = "kvcodec.kernels.checksum"  # `crc32s(staged, jobs)`: crc32 on the GPU


def checksum_kernel():
    """The GPU's payload checksum (`kvcodec.kernels.checksum`), for CUDA reads."""
    return _load(CHECKSUM_KERNEL)


def decoder_for(codec: Codec):
    """The codec's device decoder, or None (its records decode on the CPU)."""
    return _declared(codec, codec.device_decoder, "device decoder")


def encoder_for(codec: Codec):
    """The codec's device encoder, or None."""
    return _declared(codec, codec.device_encoder, "device encoder")


def encode_chunk(codec: Codec, chunk: torch.Tensor, info: ChunkInfo, context) -> bytes:
    """`codec.encode`, run by the codec's device encoder when the chunk lies on a CUDA device
    and Triton is installed (the same bytes either way)."""
    return encode_chunks(codec, [chunk], [info], context)[0]


def encode_chunks(codec: Codec, chunks, infos, context) -> list[bytes]:
    """`codec.encode_many`, or the codec's device encoder chunk by chunk when the chunks lie on a
    CUDA device and Triton is installed (the same bytes either way)."""
    if chunks and chunks[0].is_cuda and codec.device_encoder is not None and triton_available():
        encoder = encoder_for(codec)
        if hasattr(encoder, "encode_many"):
            return encoder.encode_many(codec, chunks, infos, context)
        return [encoder.encode(codec, chunk, info, context) for chunk, info in zip(chunks, infos)]
    return codec.encode_many(chunks, infos, context)
