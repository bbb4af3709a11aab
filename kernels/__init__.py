"""Triton GPU decoders: the records of a `.kvc` file decode on the GPU straight into the
cache tensors, bit-exact with the CPU decoders (`kvcodec.kernels`).

`KVCReader.read(..., device="cuda")` and `read_cache` use them when Triton and a GPU are
present; `KVCODEC_DECODER=cpu` in the environment forces the CPU decoders. Under
`TRITON_INTERPRET=1` the same kernels run on CPU tensors (`decoder="kernels"`), which is how
they are tested without a GPU.
"""

from __future__ import annotations

import importlib
import os

DECODER_ENV = "KVCODEC_DECODER"
DECODERS = ("auto", "cpu", "kernels")
_MODULES = {"raw": "raw", "quant": "quant", "cachegen": "cachegen", "ae": "ae"}  # codec name -> kernel module


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def use_kernels(device, decoder: str = "auto") -> bool:
    """Whether a read onto `device` decodes with the kernels: `decoder` is "auto" (on a CUDA
    device when Triton is installed, unless KVCODEC_DECODER=cpu), "cpu" or "kernels"."""
    import torch

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


def kernel_module(codec):
    """The module decoding `codec`'s records on the device, or None (those decode on the CPU).
    Each has `supports(codec, context, job_table, itemsize)` (which records it can take) and
    `prepare(codec, context, job_table, staged, out)` (a `jobs.Launch`)."""
    name = _MODULES.get(codec.name)
    return None if name is None else importlib.import_module(f"{__name__}.{name}")
