"""The tensor element types the format stores, and exact tensor <-> bytes conversion."""

from __future__ import annotations

import sys

import numpy as np
import torch

from kvcodec.errors import InputError

if sys.byteorder != "little":  # the format is little-endian; so is every platform torch ships for
    raise ImportError("kvcodec needs a little-endian platform")

# name -> (format code, torch dtype)
DTYPES: dict[str, tuple[int, torch.dtype]] = {
    "float16": (1, torch.float16),
    "bfloat16": (2, torch.bfloat16),
    "float32": (3, torch.float32),
}
CODE_TO_NAME = {code: name for name, (code, _) in DTYPES.items()}
TORCH_TO_NAME = {dt: name for name, (_, dt) in DTYPES.items()}


def dtype_name(dtype: torch.dtype) -> str:
    try:
        return TORCH_TO_NAME[dtype]
    except KeyError:
        raise InputError(
            f"unsupported dtype {str(dtype).replace('torch.', '')}: kvcodec stores float16, bfloat16 and float32"
        ) from None


def torch_dtype(name: str) -> torch.dtype:
    return DTYPES[name][1]


def itemsize(name: str) -> int:
    return torch.empty((), dtype=DTYPES[name][1]).element_size()


ITEMSIZE_OF_CODE = np.zeros(1 + max(CODE_TO_NAME), dtype=np.int64)  # index: format code (0 where none)
ITEMSIZE_OF_CODE[list(CODE_TO_NAME)] = [itemsize(name) for name in CODE_TO_NAME.values()]


def to_dtype(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float32 values -> `dtype` as every lossy decoder converts (spec 8): round to nearest even,
    saturating at the dtype's largest finite magnitude (NaN stays NaN). A finite input thus never
    decodes to an infinity, even where a rounded-up step lands past the end of the range."""
    top = torch.finfo(dtype).max
    return x.clamp(-top, top).to(dtype)


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a CPU tensor in row-major order (no copy if contiguous)."""
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


def tensor_from_bytes(data, dtype: torch.dtype, shape) -> torch.Tensor:
    """A writable tensor of `shape` and `dtype` holding a copy of `data`."""
    arr = np.frombuffer(data, dtype=np.uint8).copy()
    return torch.from_numpy(arr).view(dtype).reshape(tuple(shape))
