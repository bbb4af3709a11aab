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
        n = len(wanted)
        asked = np.array(wanted, dtype=np.int64).reshape(n, 4)
        members = [np.asarray(groups.get((int(layer), int(t)), ()), dtype=np.int64) for layer, t, _, _ in wanted]
        idx = np.concatenate(members) if n else np.zeros(0, np.int64)
        read_of = np.repeat(np.arange(n), [len(m) for m in members])
        begins = records["token_start"][idx].astype(np.int64)
        ends = begins + records["tokens"][idx]
        keep = (begins < asked[read_of, 3]) & (ends > asked[read_of, 2])  # records overlapping the read
        idx, read_of, begins, ends = idx[keep], read_of[keep], begins[keep], ends[keep]
        first, last = asked[:, 2].copy(), asked[:, 3].copy()
        held = np.bincount(read_of, minlength=n) > 0
        first[held], last[held] = np.iinfo(np.int64).max, -1  # reads with records hold their whole chunks
        np.minimum.at(first, read_of, begins)
        np.maximum.at(last, read_of, ends)
        for k, (layer, t, start, stop) in enumerate(wanted):
            spec = getattr(header.layers[layer], TENSORS[t])
            dtype = torch_dtype(spec.dtype)
            shape = (spec.batch, spec.heads, int(last[k] - first[k]), spec.head_dim)
            base = self.sizes.get(dtype, 0)
            self.sizes[dtype] = base + shape[0] * shape[1] * shape[2] * shape[3]
            self.outputs.append(Output(dtype, base, shape, int(first[k]), start, stop))
        order = np.argsort(read_of, kind="stable")  # read by read, in token order
        self.records, self.output_of = idx[order], read_of[order]
        self.token_offset = begins[order] - first[self.output_of]

    def allocate(self, device) -> dict[torch.dtype, torch.Tensor]:
        """One flat buffer per dtype for all outputs."""
        return {dt: torch.empty(n, dtype=dt, device=device) for dt, n in self.sizes.items()}

    def view(self, buffers: dict[torch.dtype, torch.Tensor], k: int) -> torch.Tensor:
        """Output `k` in `buffers`, every token it holds."""
        out = self.outputs[k]
        buffer = buffers[out.dtype]
        b, h, t, d = out.shape  # contiguous, as a view of a slice would be (as_strided is the cheap way)
        return buffer.as_strided(out.shape, (h * t * d, t * d, d, 1), buffer.storage_offset() + out.offset)

    def result(self, buffers: dict[torch.dtype, torch.Tensor], k: int) -> torch.Tensor:
        """Output `k` cut to the tokens asked for (a copy when that is not all it holds)."""
        out = self.outputs[k]
        full = self.view(buffers, k)
        if (out.first, out.first + out.shape[2]) == (out.start, out.stop):
            return full
        return full[:, :, out.start - out.first:out.stop - out.first].clone()
