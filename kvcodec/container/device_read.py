"""Reading a file's records onto the GPU with the kernels.

Payloads are gathered into pinned host memory batch by batch and copied to the device on a side
stream, so one batch's copy overlaps the previous batch's decode; each codec's records in a batch
decode in one launch, straight into the output tensors (views of one buffer per dtype). The
checksums are verified on host threads meanwhile, and corruption the kernels detect is read back
once at the end: decoding never waits for the host.
"""

from __future__ import annotations

import os
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from kvcodec.container import format as fmt
from kvcodec.dtypes import itemsize, torch_dtype
from kvcodec.errors import ChecksumError, CodecError

from kvcodec.kernels import jobs as J
from kvcodec.kernels import kernel_module

BATCH_BYTES = 64 << 20  # compressed bytes staged per batch
CRC_THREADS = min(16, os.cpu_count() or 1)


class Plan:
    """The output tensors of the requested reads and, per record, a job-table row saying where
    its chunk goes (every column but SRC, which staging fills in)."""

    def __init__(self, reader, wanted, device):
        rec = reader.records
        self.outputs = []  # (dtype, element offset, shape, first token held, start, stop)
        sizes: dict[torch.dtype, int] = {}
        parts = []
        for k, (layer, t, start, stop) in enumerate(wanted):
            spec = getattr(reader.header.layers[layer], fmt.TENSORS[t])
            idx = np.asarray(reader._records_for(layer, t, start, stop), dtype=np.int64)
            first = int(rec["token_start"][idx].min()) if idx.size else start
            last = int((rec["token_start"][idx] + rec["tokens"][idx]).max()) if idx.size else stop
            dtype = torch_dtype(spec.dtype)
            shape = (spec.batch, spec.heads, last - first, spec.head_dim)
            base = sizes.get(dtype, 0)
            sizes[dtype] = base + int(np.prod(shape))
            self.outputs.append((dtype, base, shape, first, start, stop))
            n = shape[2] * shape[3]
            rows = np.zeros((idx.size, J.COLUMNS), dtype=np.int64)
            rows[:, J.LENGTH] = rec["length"][idx]
            rows[:, J.DST] = base + (rec["token_start"][idx].astype(np.int64) - first) * shape[3]
            rows[:, J.STRIDE_B], rows[:, J.STRIDE_H] = shape[1] * n, n
            for col, field in ((J.BATCH, "batch"), (J.HEADS, "heads"), (J.TOKENS, "tokens"), (J.LAYER, "layer"),
                               (J.TENSOR, "tensor"), (J.TOKEN_START, "token_start"), (J.HEAD_DIM, "head_dim")):
                rows[:, col] = rec[field][idx]
            parts.append((idx, rows, np.full(idx.size, k)))
        self.record = np.concatenate([p[0] for p in parts]) if parts else np.zeros(0, np.int64)
        self.table = np.concatenate([p[1] for p in parts]) if parts else np.zeros((0, J.COLUMNS), np.int64)
        self.output_of = np.concatenate([p[2] for p in parts]) if parts else np.zeros(0, np.int64)
        self.buffers = {dt: torch.empty(n, dtype=dt, device=device) for dt, n in sizes.items()}

    def view(self, output: int) -> torch.Tensor:
        dtype, base, shape, _, _, _ = self.outputs[output]
        return self.buffers[dtype][base:base + int(np.prod(shape))].view(shape)

    def result(self, output: int) -> torch.Tensor:
        _, _, shape, first, start, stop = self.outputs[output]
        full = self.view(output)
        if (first, first + shape[2]) == (start, stop):
            return full
        return full[:, :, start - first:stop - first].clone()


def batches(lengths: np.ndarray) -> list[slice]:
    """Consecutive records in groups of about BATCH_BYTES."""
    ends = np.cumsum(-(-lengths // J.ALIGN) * J.ALIGN)
    cuts = np.searchsorted(ends, np.arange(BATCH_BYTES, int(ends[-1]) if len(ends) else 0, BATCH_BYTES), "right")
    bounds = [0, *sorted(set(int(c) for c in cuts) - {0, len(lengths)}), len(lengths)]
    return [slice(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]


def kernel_groups(reader, plan: Plan, rows: np.ndarray):
    """Split record rows (indices into the plan) into kernel launches and CPU leftovers:
    ({(slot, dtype code, head_dim): rows}, cpu rows)."""
    rec = reader.records
    idx = plan.record[rows]
    keys = np.stack([rec["codec_slot"][idx].astype(np.int64), rec["dtype"][idx].astype(np.int64),
                     plan.table[rows, J.HEAD_DIM]], 1)
    groups, cpu = {}, []
    for key in np.unique(keys, axis=0):
        members = rows[np.all(keys == key, axis=1)]
        codec = reader._codec(int(key[0]))
        module = kernel_module(codec)
        ok = np.zeros(len(members), dtype=bool)
        if module is not None:
            ok = module.supports(codec, reader._context(int(key[0])), plan.table[members],
                                 itemsize(fmt.record_dtype_name(int(key[1]))))
        if ok.any():
            groups[tuple(int(k) for k in key)] = members[ok]
        cpu.extend(members[~ok].tolist())
    return groups, cpu


def read_tensors(reader, wanted, device, progress=None) -> list[torch.Tensor]:
    """Decode the (layer, tensor index, start, stop) reads in `wanted` onto `device`.
    `progress(records_done)` is called after each batch is launched."""
    device = torch.device(device if device is not None else "cpu")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    plan = Plan(reader, wanted, device)
    for i in plan.record:
        reader._check_expansion(int(i))
    copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
    launches, crc_checks = [], []
    with ThreadPoolExecutor(max_workers=CRC_THREADS) as pool:
        for part in batches(plan.table[:, J.LENGTH]):
            rows = np.arange(part.start, part.stop)
            groups, cpu = kernel_groups(reader, plan, rows)
            staged_rows = np.concatenate(list(groups.values())) if groups else np.zeros(0, np.int64)
            staged = stage(reader, plan, staged_rows, device, copy_stream, pool, crc_checks)
            for (slot, dtype_code, _), members in groups.items():
                codec = reader._codec(slot)
                dtype = torch_dtype(fmt.record_dtype_name(dtype_code))
                launch = kernel_module(codec).prepare(codec, reader._context(slot), plan.table[members], staged,
                                                      plan.buffers[dtype])
                launches.append((launch(), members, codec))
            for row in cpu:
                chunk = reader.decode_record(int(plan.record[row]), device)
                out = int(plan.output_of[row])
                t0 = int(plan.table[row, J.TOKEN_START]) - plan.outputs[out][3]
                plan.view(out)[:, :, t0:t0 + chunk.shape[2]].copy_(chunk, non_blocking=True)
            if progress:
                progress(part.stop)
        for future in crc_checks:
            bad = future.result()
            if bad is not None:
                raise ChecksumError(f"record of {J.where(plan.table[bad])} checksum mismatch: the file is corrupt")
    for launch, members, codec in launches:
        failure = J.first_failure(launch.checks)
        if failure is not None:
            job, problem = failure
            raise CodecError(f"{codec.name} record of {J.where(plan.table[members[job]])} is corrupt: {problem}")
    return [plan.result(k) for k in range(len(wanted))]


def stage(reader, plan: Plan, rows: np.ndarray, device, copy_stream, pool, crc_checks) -> torch.Tensor:
    """Put the payloads of `rows` in one host buffer, setting their SRC column; check their
    checksums on `pool`; move the buffer to the device on `copy_stream`.

    Records that lie together in the file move as one span. The span is taken as it is when the
    file is a pinned tensor, else copied into pinned memory (by torch, on several threads)."""
    rec = reader.records
    idx = plan.record[rows]
    lengths = rec["length"][idx].astype(np.int64)
    file_at = rec["offset"][idx].astype(np.int64)
    lo = int(file_at.min()) if len(rows) else 0
    hi = int((file_at + lengths).max()) if len(rows) else 0
    if hi - lo <= 2 * int(lengths.sum()) + (1 << 20):  # one span of the file
        offsets = file_at - lo
        total = hi - lo
        pieces = [(lo, 0, total)]
    else:  # records far apart in the file: gather them
        padded = -(-lengths // J.ALIGN) * J.ALIGN
        offsets = np.cumsum(padded) - padded
        total = int(padded.sum())
        pieces = list(zip(file_at.tolist(), offsets.tolist(), lengths.tolist()))
    plan.table[rows, J.SRC] = offsets
    size = max(-(-total // J.ALIGN) * J.ALIGN, J.ALIGN)
    source = reader._src.tensor
    if (len(pieces) == 1 and source is not None and copy_stream is not None and source.is_pinned()
            and lo % J.ALIGN == 0 and lo + size <= source.numel()):
        host = source[lo:lo + size]
    else:
        host = torch.empty(size, dtype=torch.uint8, pin_memory=copy_stream is not None)
        with warnings.catch_warnings():  # read-only source buffers: frombuffer only reads them here
            warnings.simplefilter("ignore", UserWarning)
            for at, to, n in pieces:
                if n:
                    host[to:to + n].copy_(torch.frombuffer(reader._src.read(at, n), dtype=torch.uint8))
    view = host.numpy()

    def check(part: slice):
        for row, at, n, i in zip(rows[part].tolist(), offsets[part].tolist(), lengths[part].tolist(),
                                 idx[part].tolist()):
            if zlib.crc32(view[at:at + n]) != int(rec["crc32"][i]):
                return row
        return None

    step = -(-len(rows) // CRC_THREADS) if len(rows) else 1
    crc_checks.extend(pool.submit(check, slice(a, a + step)) for a in range(0, len(rows), step))
    if copy_stream is None:
        return host
    with torch.cuda.stream(copy_stream):
        staged = host.to(device, non_blocking=True)
    torch.cuda.current_stream(device).wait_stream(copy_stream)
    staged.record_stream(torch.cuda.current_stream(device))
    return staged
