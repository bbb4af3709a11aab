"""Which records a set of reads needs and where each decodes to: the one place a reader's CPU
path and its device path (`device_read`) agree on output tensors and their slicing.

A read is (layer, key/value, first token, stop token). Its output covers the whole chunks of
the records it needs, so every record decodes into it in one piece; `result` then cuts the
asked range out. Outputs of one dtype lie in one flat buffer (kernels address them by element
offset)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from kvcodec.cache import TENSORS
from kvcodec.dtypes import torch_dtype


@dataclass(frozen=True)
class Output:
    dtype: torch.dtype
    offset: int  # element offset in its dtype's buffer
    shape: tuple[int, int, int, int]  # batch, heads, tokens held, head_dim
    first: int  # the first token held
    start: int  # the tokens asked for: [start, stop)
    stop: int


class ReadPlan:
    """`records`: indices into the file's index of every record needed, read by read;
    `output_of`: the read each belongs to; `token_offset`: its first token within that output."""

    def __init__(self, header, records: np.ndarray, groups: dict, wanted):
        self.outputs: list[Output] = []
        self.sizes: dict[torch.dtype, int] = {}
        parts = []
        for k, (layer, t, start, stop) in enumerate(wanted):
            spec = getattr(header.layers[layer], TENSORS[t])
            idx = np.asarray([i for i in groups.get((layer, t), [])
                              if records["token_start"][i] < stop
                              and records["token_start"][i] + records["tokens"][i] > start], dtype=np.int64)
            begins = records["token_start"][idx].astype(np.int64)
            first = int(begins.min()) if idx.size else start
            last = int((begins + records["tokens"][idx]).max()) if idx.size else stop
            dtype = torch_dtype(spec.dtype)
            shape = (spec.batch, spec.heads, last - first, spec.head_dim)
            base = self.sizes.get(dtype, 0)
            self.sizes[dtype] = base + int(np.prod(shape))
            self.outputs.append(Output(dtype, base, shape, first, start, stop))
            parts.append((idx, np.full(idx.size, k), begins - first))
        self.records, self.output_of, self.token_offset = (
            np.concatenate([p[j] for p in parts]) if parts else np.zeros(0, np.int64) for j in range(3))

    def allocate(self, device) -> dict[torch.dtype, torch.Tensor]:
        """One flat buffer per dtype for all outputs."""
        return {dt: torch.empty(n, dtype=dt, device=device) for dt, n in self.sizes.items()}

    def view(self, buffers: dict[torch.dtype, torch.Tensor], k: int) -> torch.Tensor:
        """Output `k` in `buffers`, every token it holds."""
        out = self.outputs[k]
        return buffers[out.dtype][out.offset:out.offset + int(np.prod(out.shape))].view(out.shape)

    def result(self, buffers: dict[torch.dtype, torch.Tensor], k: int) -> torch.Tensor:
        """Output `k` cut to the tokens asked for (a copy when that is not all it holds)."""
        out = self.outputs[k]
        full = self.view(buffers, k)
        if (out.first, out.first + out.shape[2]) == (out.start, out.stop):
            return full
        return full[:, :, out.start - out.first:out.stop - out.first].clone()
