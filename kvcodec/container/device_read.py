"""Reading a file's records onto a device with the codecs' device decoders (`kvcodec.kernels`
for the built-in ones), through the reader's public seam only.

Payloads are copied to the device batch by batch on a side stream, each batch's checksums
computed there right after its copy (`codecs.device.checksum_kernel`; on host threads off a
GPU), and each batch's decode waits only for its own batch. A file in pinned memory is copied as
it lies, in at most PINNED_BATCHES batches all queued at once; other sources are read into
pinned staging buffers of BATCH_BYTES, one batch ahead of its decode. Each codec's records in a
batch decode in one launch, straight into the output tensors (views of one buffer per dtype,
laid out by the reader's `ReadPlan`). Checksum mismatches and corruption the kernels detect are
read back once at the end, before anything is returned: decoding never waits for the host.
Records whose codec has no device decoder (or that it declines) decode on the CPU and are
copied into place.
"""

from __future__ import annotations

import os
import zlib
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from functools import cache

import numpy as np
import torch

from kvcodec.codecs import device as dev
from kvcodec.container import format as fmt
from kvcodec.dtypes import itemsize, torch_dtype
from kvcodec.errors import ChecksumError, CodecError

BATCH_BYTES = 64 << 20  # compressed bytes staged per batch
PINNED_BATCHES = 4  # batches a file in pinned memory is cut into (each at least BATCH_BYTES)
AHEAD_BYTES = 1 << 30  # staged on the device ahead of decoding at most
CRC_THREADS = min(16, os.cpu_count() or 1)


def job_table(reader, plan) -> np.ndarray:
    """One job-table row per record of `plan` (every column but SRC, which staging fills in)."""
    rec = reader.records[plan.records]
    table = np.zeros((len(plan.records), dev.COLUMNS), dtype=np.int64)
    if not len(plan.records):
        return table
    per_output = np.array([(o.offset, *o.shape[1:]) for o in plan.outputs], dtype=np.int64)[plan.output_of]
    base, heads, tokens, dims = per_output.T
    table[:, dev.LENGTH] = rec["length"]
    table[:, dev.DST] = base + plan.token_offset * dims
    table[:, dev.STRIDE_B], table[:, dev.STRIDE_H] = heads * tokens * dims, tokens * dims
    for col, field in ((dev.BATCH, "batch"), (dev.HEADS, "heads"), (dev.TOKENS, "tokens"), (dev.LAYER, "layer"),
                       (dev.TENSOR, "tensor"), (dev.TOKEN_START, "token_start"), (dev.HEAD_DIM, "head_dim")):
        table[:, col] = rec[field]
    return table


def batches(lengths: np.ndarray, size: int = BATCH_BYTES) -> list[slice]:
    """Consecutive records in groups of about `size` bytes."""
    ends = np.cumsum(-(-lengths // dev.STAGE_ALIGN) * dev.STAGE_ALIGN)
    cuts = np.searchsorted(ends, np.arange(size, int(ends[-1]) if len(ends) else 0, size), "right")
    bounds = [0, *sorted(set(int(c) for c in cuts) - {0, len(lengths)}), len(lengths)]
    return [slice(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]


def decoder_groups(reader, plan, table: np.ndarray, rows: np.ndarray):
    """Split rows of the job table by launch, (slot, dtype code, head_dim), for those whose codec
    has a device decoder; the others decode on the CPU: ({key: rows}, cpu rows)."""
    rec = reader.records
    idx = plan.records[rows]
    slot, dtype = rec["codec_slot"][idx].astype(np.int64), rec["dtype"][idx].astype(np.int64)
    head_dim = table[rows, dev.HEAD_DIM]
    keys, which = np.unique((slot << 40) | (dtype << 32) | head_dim, return_inverse=True)  # head_dim < 2**32
    groups, cpu = {}, []
    for k, key in enumerate(keys.tolist()):
        members = rows[which == k]
        if dev.decoder_for(reader.codec(key >> 40)) is None:
            cpu.extend(members.tolist())
        else:
            groups[(key >> 40, (key >> 32) & 0xFF, key & 0xFFFFFFFF)] = members
    return groups, cpu


def read_tensors(reader, wanted, device, progress=None) -> list[torch.Tensor]:
    """Decode the (layer, tensor index, start, stop) reads in `wanted` onto `device`.
    `progress(records_done)` is called after each batch is launched."""
    device = torch.device(device if device is not None else "cpu")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    plan = reader.plan(wanted)
    reader.check_expansion(plan.records)  # before allocating the outputs
    table = job_table(reader, plan)
    buffers = plan.allocate(device)
    copy_stream = side_stream(device) if device.type == "cuda" else None
    launches = []
    all_groups, all_cpu = decoder_groups(reader, plan, table, np.arange(len(table)))
    lengths = table[:, dev.LENGTH]
    pinned = reader.source.tensor is not None and reader.source.tensor.is_pinned() and copy_stream is not None
    # a pinned file is copied as it lies, so a few large batches (less host work per byte); other
    # sources are read into staging buffers of BATCH_BYTES
    size = max(BATCH_BYTES, -(-int(lengths.sum()) // PINNED_BATCHES)) if pinned else BATCH_BYTES
    parts = batches(lengths, size)
    # batches staged before the first decodes (their copies overlap loading contexts), up to AHEAD_BYTES
    ahead = max(1, min(len(parts), AHEAD_BYTES // size)) if pinned else 1
    with Checksums(reader, plan, table, on_device=checksums_on_device(device)) as checksums:
        def staged_part(part):
            groups = {key: m[(m >= part.start) & (m < part.stop)] for key, m in all_groups.items()}
            groups = {key: m for key, m in groups.items() if len(m)}
            cpu = [row for row in all_cpu if part.start <= row < part.stop]
            rows = np.concatenate(list(groups.values())) if groups else np.zeros(0, np.int64)
            return (part, groups, cpu) + stage(reader, plan, table, rows, device, copy_stream, checksums)

        pending = deque(staged_part(part) for part in parts[:ahead])
        for k in range(len(parts)):
            part, groups, cpu, staged, ready = pending.popleft()
            if ready is not None:
                torch.cuda.current_stream(device).wait_event(ready)
            for (slot, dtype_code, _), members in groups.items():
                codec, context = reader.codec(slot), reader.context(slot)
                decoder = dev.decoder_for(codec)
                ok = decoder.supports(codec, context, table[members], itemsize(fmt.record_dtype_name(dtype_code)))
                cpu.extend(members[~ok].tolist())  # declined: staged for nothing, decoded on the CPU
                if ok.any():
                    dtype = torch_dtype(fmt.record_dtype_name(dtype_code))
                    launch = decoder.prepare(codec, context, table[members[ok]], staged, buffers[dtype])
                    launches.append((launch(), members[ok], codec))
            for row in cpu:
                chunk = reader.decode_record(int(plan.records[row]), device)
                at, out = int(plan.token_offset[row]), plan.view(buffers, int(plan.output_of[row]))
                out[:, :, at:at + chunk.shape[2]].copy_(chunk, non_blocking=True)
            if progress:
                progress(part.stop)
            if k + ahead < len(parts):
                pending.append(staged_part(parts[k + ahead]))
        if copy_stream is not None:  # the checksums ran on the copy stream
            torch.cuda.current_stream(device).wait_stream(copy_stream)
        checks = [(check, members, codec) for launch, members, codec in launches for check in launch.checks]
        found = checksums.verify([check.flags for check, _, _ in checks])  # one wait for the device
    for (check, members, codec), flags in zip(checks, found):
        bad = np.flatnonzero(flags)
        if bad.size:
            row = table[members[check.job_of_flag[bad[0]]]]
            raise CodecError(f"{codec.name} record of {dev.where(row)} is corrupt: {check.problem}")
    return [plan.result(buffers, k) for k in range(len(wanted))]


def checksums_on_device(device: torch.device) -> bool:
    """Whether payload checksums are computed where the payloads are decoded (on a GPU)."""
    return device.type == "cuda"


class Checksums:
    """Verifying the staged payloads' crc32: computed on the GPU after each batch's copy, or on
    host threads; `verify`, or leaving the `with` block, raises ChecksumError for the first
    mismatch."""

    def __init__(self, reader, plan, table: np.ndarray, on_device: bool):
        self.expected = reader.records["crc32"][plan.records]
        self.table, self.on_device = table, on_device
        self.pool = None if on_device else ThreadPoolExecutor(max_workers=CRC_THREADS)
        self.pending = []  # futures giving a bad row or None
        self.computed = []  # (rows, their crc32s on the device, an event after them or None)
        self.verified = False

    def host(self, view: np.ndarray, rows: np.ndarray):
        """Check `rows` in the host buffer `view` (their payloads at column SRC)."""
        if self.pool is None:  # the few payloads too short for the GPU's checksum: here and now
            self._raise_for(self._first_bad(view, rows))
            return
        step = -(-len(rows) // CRC_THREADS) if len(rows) else 1
        self.pending.extend(self.pool.submit(self._first_bad, view, rows[a:a + step])
                            for a in range(0, len(rows), step))

    def _first_bad(self, view: np.ndarray, rows: np.ndarray):
        for row, at, n in zip(rows.tolist(), self.table[rows, dev.SRC].tolist(), self.table[rows, dev.LENGTH].tolist()):
            if zlib.crc32(view[at:at + n]) != int(self.expected[row]):
                return row
        return None

    def _raise_for(self, bad):
        if bad is not None:
            raise ChecksumError(f"record of {dev.where(self.table[bad])} checksum mismatch: the file is corrupt")

    def check(self, staged: torch.Tensor, view: np.ndarray, rows: np.ndarray):
        """Check `rows`: in `staged` on its device, or in the host buffer `view`."""
        if self.on_device:
            self.device(staged, view, rows)
        else:
            self.host(view, rows)

    def device(self, staged: torch.Tensor, view: np.ndarray, rows: np.ndarray):
        """Check `rows` in `staged` on its device (the few payloads too short for it on the host)."""
        short = self.table[rows, dev.LENGTH] < dev.checksum_kernel().MIN_LENGTH
        self.host(view, rows[short])
        rows = rows[~short]
        if len(rows):
            crcs = dev.checksum_kernel().crc32s(staged, self.table[rows])
            done = torch.cuda.Event() if crcs.is_cuda else None
            if done is not None:
                done.record()  # on the stream the checksums were launched on (the copy stream)
            self.computed.append((rows, crcs, done))

    def verify(self, flags=()) -> list[np.ndarray]:
        """ChecksumError for the first mismatch; `flags` (device tensors: the launches' corruption
        flags) come back on the host, read in the same copy as the GPU's checksums."""
        self.verified = True
        if self.pool is not None:
            self.pool.shutdown(wait=True)
        for _, crcs, done in self.computed:
            if done is not None:  # whichever stream the caller is on
                torch.cuda.current_stream(crcs.device).wait_event(done)
        found = dev.read_back([crcs for _, crcs, _ in self.computed] + list(flags))
        for (rows, _, _), crcs in zip(self.computed, found):
            bad = np.flatnonzero(crcs.view(np.uint32) != self.expected[rows])
            self._raise_for(int(rows[bad[0]]) if bad.size else None)
        for future in self.pending:
            self._raise_for(future.result())
        return found[len(self.computed):]

    def __enter__(self):
        return self

    def __exit__(self, kind, *_):
        if kind is not None:
            if self.pool is not None:
                self.pool.shutdown(wait=True, cancel_futures=True)
        elif not self.verified:
            self.verify()
        return False


@cache
def side_stream(device: torch.device) -> torch.cuda.Stream:
    """The stream payloads are copied and checked on, one per device: the caching allocator
    keeps its blocks per stream, so a fresh stream per read found none to reuse and allocated
    the read's device memory anew."""
    return torch.cuda.Stream(device)


READ_PIECE = 4 << 20  # bytes per thread when staging reads a file


@cache
def _readers() -> ThreadPoolExecutor:
    """Threads reading files into staging buffers (reads from the page cache scale with them)."""
    return ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1), thread_name_prefix="kvcodec-stage")


def fill(source, host: np.ndarray, pieces) -> None:
    """Copy the (file offset, buffer offset, length) `pieces` of `source` into `host`, large
    ones split across threads."""
    parts = [(at + k, to + k, min(READ_PIECE, n - k)) for at, to, n in pieces for k in range(0, n, READ_PIECE)]
    if len(parts) == 1 or source.remote is not None:  # a remote source fetches its own way
        for at, to, n in parts:
            source.read_into(at, host[to:to + n])
        return
    list(_readers().map(lambda part: source.read_into(part[0], host[part[1]:part[1] + part[2]]), parts))


def stage(reader, plan, table: np.ndarray, rows: np.ndarray, device, copy_stream,
          checksums: Checksums) -> tuple[torch.Tensor, torch.cuda.Event | None]:
    """Put the payloads of `rows` in one host buffer, setting their SRC column; move the buffer to
    the device on `copy_stream` and have `checksums` verify them: (staged bytes, an event marking
    both done, None without a copy stream).

    Records that lie together in the file move as one span. The span is taken as it is when the
    file is a pinned tensor, else read into pinned memory (`fill`, on several threads)."""
    rec = reader.records
    idx = plan.records[rows]
    lengths = rec["length"][idx].astype(np.int64)
    file_at = rec["offset"][idx].astype(np.int64)
    lo = int(file_at.min()) if len(rows) else 0
    hi = int((file_at + lengths).max()) if len(rows) else 0
    align = dev.STAGE_ALIGN
    if hi - lo <= 2 * int(lengths.sum()) + (1 << 20):  # one span of the file
        offsets = file_at - lo
        total = hi - lo
        pieces = [(lo, 0, total)]
    else:  # records far apart in the file: gather them
        padded = -(-lengths // align) * align
        offsets = np.cumsum(padded) - padded
        total = int(padded.sum())
        pieces = list(zip(file_at.tolist(), offsets.tolist(), lengths.tolist()))
    table[rows, dev.SRC] = offsets
    size = max(-(-total // align) * align, align)
    source = reader.source.tensor
    if (len(pieces) == 1 and source is not None and copy_stream is not None and source.is_pinned()
            and lo % align == 0 and lo + size <= source.numel()):
        host = source[lo:lo + size]
    else:
        host = torch.empty(size, dtype=torch.uint8, pin_memory=copy_stream is not None)
        fill(reader.source, host.numpy(), pieces)
    view = host.numpy()
    if copy_stream is None:
        checksums.check(host, view, rows)
        return host, None
    with torch.cuda.stream(copy_stream):  # the copy, then its checksums, then an event decoding waits for
        staged = host.to(device, non_blocking=True)
        checksums.check(staged, view, rows)
        ready = torch.cuda.Event()
        ready.record(copy_stream)
    staged.record_stream(torch.cuda.current_stream(device))
    return staged, ready
