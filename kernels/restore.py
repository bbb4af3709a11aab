"""Reading a file's records onto the GPU with the kernels.

Payloads are gathered into pinned host memory batch by batch and copied to the device on a side
stream, so one batch's copy overlaps the previous batch's decode; each codec's records in a batch
decode in one launch, straight into the output tensors (views of one buffer per dtype). The
checksums are verified on host threads meanwhile, and corruption the kernels detect is read back
once at the end: decoding never waits for the host.
"""

from __future__ import annotations

import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from kvcodec import format as fmt
from kvcodec.dtypes import torch_dtype
from kvcodec.errors import ChecksumError, CodecError

from . import jobs as J
from . import kernel_module

BATCH_BYTES = 64 << 20  # compressed bytes staged per batch
CRC_THREADS = 4


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
            itemsize = torch.empty((), dtype=torch_dtype(fmt.record_dtype_name(int(key[1])))).element_size()
            ok = module.supports(codec, plan.table[members], itemsize) if hasattr(module, "supports") else ~ok
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
                chunk = reader.decode_record(int(plan.record[row]))
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
    """Gather the payloads of `rows` into one (pinned) host buffer, setting their SRC column;
    check their checksums on `pool`; move the buffer to the device on `copy_stream`."""
    rec = reader.records
    idx = plan.record[rows]
    lengths = rec["length"][idx].astype(np.int64)
    offsets = np.cumsum(-(-lengths // J.ALIGN) * J.ALIGN) - -(-lengths // J.ALIGN) * J.ALIGN
    plan.table[rows, J.SRC] = offsets
    total = int(offsets[-1] + lengths[-1]) if len(rows) else 0
    host = torch.empty(max(-(-total // J.ALIGN) * J.ALIGN, J.ALIGN), dtype=torch.uint8,
                       pin_memory=copy_stream is not None)
    view = host.numpy()
    for at, i, n in zip(offsets.tolist(), idx.tolist(), lengths.tolist()):
        view[at:at + n] = np.frombuffer(reader._src.read(int(rec["offset"][i]), n), dtype=np.uint8)

    def check(lo: int, hi: int):
        for row, at, n, i in zip(rows[lo:hi].tolist(), offsets[lo:hi].tolist(), lengths[lo:hi].tolist(),
                                 idx[lo:hi].tolist()):
            if zlib.crc32(view[at:at + n]) != int(rec["crc32"][i]):
                return row
        return None

    step = -(-len(rows) // CRC_THREADS) if len(rows) else 1
    crc_checks.extend(pool.submit(check, lo, lo + step) for lo in range(0, len(rows), step))
    if copy_stream is None:
        return host
    with torch.cuda.stream(copy_stream):
        staged = host.to(device, non_blocking=True)
    torch.cuda.current_stream(device).wait_stream(copy_stream)
    staged.record_stream(torch.cuda.current_stream(device))
    return staged
