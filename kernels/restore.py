"""Reading a file's records onto the GPU with the kernels.

Payloads are gathered into pinned host memory batch by batch and copied to the device on a side
stream, so one batch's copy overlaps the previous batch's decode; each codec's records in a batch
decode in one launch, straight into the output tensors (views of one buffer per dtype). The
checksums are verified on host threads meanwhile, and corruption the kernels detect is read back
once at the end: decoding never waits for the host.
"""

from __future__ import annotations

import zlib
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from kvcodec import format as fmt
from kvcodec.codec import ChunkInfo
from kvcodec.dtypes import torch_dtype
from kvcodec.errors import ChecksumError, CodecError

from . import jobs as J
from . import kernel_module

BATCH_BYTES = 64 << 20  # compressed bytes staged per batch


def _where(info: ChunkInfo) -> str:
    return f"layer {info.layer} {info.tensor} tokens {info.token_start}+{info.shape[2]}"


class _Plan:
    """Output tensors of the requested reads and, per record, where its chunk goes."""

    def __init__(self, reader, wanted, device):
        self.reader = reader
        sizes: dict[torch.dtype, int] = defaultdict(int)
        self.outputs = []  # (dtype, element offset, shape, token range to return)
        self.records = []  # (record index, ChunkInfo, output number)
        for layer, t, start, stop in wanted:
            spec = getattr(reader.header.layers[layer], fmt.TENSORS[t])
            needed = reader._records_for(layer, t, start, stop)
            first = min([int(reader.records["token_start"][i]) for i in needed], default=start)
            last = max([int(reader.records["token_start"][i] + reader.records["tokens"][i]) for i in needed],
                       default=stop)
            dtype = torch_dtype(spec.dtype)
            shape = (spec.batch, spec.heads, last - first, spec.head_dim)
            self.outputs.append((dtype, sizes[dtype], shape, first, start, stop))
            sizes[dtype] += int(np.prod(shape))
            for i in needed:
                r = reader.records[i]
                info = ChunkInfo(layer, fmt.TENSORS[t], int(r["token_start"]),
                                 (int(r["batch"]), int(r["heads"]), int(r["tokens"]), int(r["head_dim"])), dtype)
                self.records.append((i, info, len(self.outputs) - 1))
        self.buffers = {dt: torch.empty(n, dtype=dt, device=device) for dt, n in sizes.items()}

    def job(self, info: ChunkInfo, output: int, src: int, length: int) -> J.Job:
        dtype, base, (b, h, t, d), first, _, _ = self.outputs[output]
        return J.Job(info, src, length, base + (info.token_start - first) * d, h * t * d, t * d)

    def view(self, output: int) -> torch.Tensor:
        dtype, base, shape, _, _, _ = self.outputs[output]
        return self.buffers[dtype][base:base + int(np.prod(shape))].view(shape)

    def result(self, output: int) -> torch.Tensor:
        _, _, shape, first, start, stop = self.outputs[output]
        full = self.view(output)
        if (first, first + shape[2]) == (start, stop):
            return full
        return full[:, :, start - first:stop - first].clone()


def _batches(records, lengths):
    batch, size = [], 0
    for rec in records:
        n = fmt.align(int(lengths[rec[0]]))
        if batch and size + n > BATCH_BYTES:
            yield batch
            batch, size = [], 0
        batch.append(rec)
        size += n
    if batch:
        yield batch


def read_tensors(reader, wanted, device, progress=None) -> list[torch.Tensor]:
    """Decode the (layer, tensor index, start, stop) reads in `wanted` onto `device`.
    `progress(records_done)` is called after each batch is launched."""
    device = torch.device(device if device is not None else "cpu")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    plan = _Plan(reader, wanted, device)
    lengths = reader.records["length"]
    for i, _, _ in plan.records:
        reader._check_expansion(i)
    on_gpu = device.type == "cuda"
    copy_stream = torch.cuda.Stream(device) if on_gpu else None
    checks, crc_jobs, done = [], [], 0
    with ThreadPoolExecutor(max_workers=4) as pool:
        for batch in _batches(plan.records, lengths):
            kernel_recs, cpu_recs = [], []
            for rec in batch:
                i, info, _ = rec
                codec = reader._codec(int(reader.records["codec_slot"][i]))
                module = kernel_module(codec)
                ok = module is not None and (not hasattr(module, "supports")
                                             or module.supports(codec, info, info.dtype.itemsize))
                (kernel_recs if ok else cpu_recs).append(rec)
            staged, host = _stage(reader, kernel_recs, device, copy_stream, pool, crc_jobs)
            groups = defaultdict(list)
            for (i, info, out), src in zip(kernel_recs, host):
                key = (int(reader.records["codec_slot"][i]), info.dtype, info.shape[3])
                groups[key].append((i, plan.job(info, out, src, int(lengths[i]))))
            for (slot, dtype, _), members in groups.items():
                codec = reader._codec(slot)
                jobs = [job for _, job in members]
                for check in kernel_module(codec).decode(codec, reader._context(slot), jobs, staged,
                                                         plan.buffers[dtype]):
                    checks.append((check, [i for i, _ in members], jobs))
            for i, info, out in cpu_recs:
                chunk = reader.decode_record(i)
                view = plan.view(out)
                t0 = info.token_start - plan.outputs[out][3]
                view[:, :, t0:t0 + info.shape[2]].copy_(chunk, non_blocking=True)
            done += len(batch)
            if progress:
                progress(done)
        for future, where in crc_jobs:
            if not future.result():
                raise ChecksumError(f"record of {where} checksum mismatch: the file is corrupt")
    for check, record_ids, jobs in checks:
        failure = J.first_failure([check])
        if failure is not None:
            job, problem = failure
            codec = reader._codec(int(reader.records["codec_slot"][record_ids[job]]))
            raise CodecError(f"{codec.name} record of {_where(jobs[job].info)} is corrupt: {problem}")
    return [plan.result(k) for k in range(len(wanted))]


def _stage(reader, recs, device, copy_stream, pool, crc_jobs):
    """Gather the payloads of `recs` into one (pinned) host buffer, start checking their
    checksums, and move the buffer to the device. Returns it and each payload's offset."""
    offsets, pos = [], 0
    for i, _, _ in recs:
        offsets.append(pos)
        pos += fmt.align(int(reader.records["length"][i]))
    host = torch.empty(max(pos, J.ALIGN), dtype=torch.uint8, pin_memory=copy_stream is not None)
    view = host.numpy()
    for (i, info, _), at in zip(recs, offsets):
        r = reader.records[i]
        data = reader._src.read(int(r["offset"]), int(r["length"]))
        view[at:at + len(data)] = np.frombuffer(data, dtype=np.uint8)
        crc_jobs.append((pool.submit(lambda d, c: zlib.crc32(d) == c, view[at:at + len(data)], int(r["crc32"])),
                         _where(info)))
    if copy_stream is None:
        return host, offsets
    with torch.cuda.stream(copy_stream):
        staged = host.to(device, non_blocking=True)
    torch.cuda.current_stream(device).wait_stream(copy_stream)
    staged.record_stream(torch.cuda.current_stream(device))
    return staged, offsets
