"""The payloads' CRC-32 (spec section 1: zlib's) computed on the GPU, so a restore verifies the
bytes it copied there without host threads reading every one of them.

A CRC-32 without its initial and final complement ("raw") is linear over GF(2): a message's
raw CRC is the XOR of every 64-byte segment's raw CRC advanced over the bytes after it, and
advancing over n bytes multiplies by x^(8n) modulo the polynomial. Each GPU thread computes one
segment's raw CRC bit by bit, advances it with two precomputed powers of x and XORs it into its
payload's word. Segments are counted from the payload's end (zero bytes in front of a message
leave its raw CRC unchanged), so every advance is a whole number of segments. zlib's register
starts at all ones, which is the same as complementing the message's first 32 bits; payloads
under 4 bytes are left to the host.
"""

from __future__ import annotations

import threading

import numpy as np
import torch
import triton
import triton.language as tl

from kvcodec.kernels import jobs as J

POLY = 0xEDB88320  # zlib's polynomial, bit-reflected
_POLY = tl.constexpr(POLY)
SEGMENT = 64  # bytes per thread
SEGMENTS_PER_PROGRAM = 256
LOW_POWERS = 1024  # advances by k segments use x^(512 (k % 1024)) and x^(512 * 1024 (k // 1024))
MIN_LENGTH = 4


@triton.jit
def _mulmod(a, b):
    """a(x) b(x) mod P, both in zlib's reflected form (bit 31 is the coefficient of x^0)."""
    p = tl.zeros_like(a)
    for i in range(32):
        p ^= tl.where(((a >> (31 - i)) & 1) != 0, b, tl.zeros_like(b))
        b = (b >> 1) ^ tl.where((b & 1) != 0, _POLY, 0).to(tl.uint32)
    return p


@triton.jit
def _xor(a, b):
    return a ^ b


@triton.jit
def _crc_kernel(data_ptr, table_ptr, low_ptr, high_ptr, out_ptr, first_job, NCOL: tl.constexpr, BS: tl.constexpr):
    row = table_ptr + (first_job + tl.program_id(1)) * NCOL
    n = tl.load(row + J.LENGTH)
    segments = (n + 63) // 64
    if tl.program_id(0).to(tl.int64) * BS >= segments:  # past this payload's end
        return
    src = tl.load(row + J.SRC)
    j = tl.program_id(0).to(tl.int64) * BS + tl.arange(0, BS)
    live = j < segments
    start = j * 64 - (segments * 64 - n)  # payload position of the segment's first byte
    crc = tl.zeros([BS], dtype=tl.uint32)
    for k in range(64):
        pos = start + k
        ok = live & (pos >= 0)
        byte = tl.load(data_ptr + src + pos, mask=ok, other=0).to(tl.uint32)
        crc ^= tl.where(ok & (pos < 4), byte ^ 0xFF, byte)
        for _ in range(8):
            crc = (crc >> 1) ^ tl.where((crc & 1) != 0, _POLY, 0).to(tl.uint32)
    after = tl.where(live, segments - 1 - j, 0)  # segments after this one
    low = tl.load(low_ptr + after % 1024, mask=live, other=0).to(tl.uint32, bitcast=True)
    high = tl.load(high_ptr + after // 1024, mask=live, other=0).to(tl.uint32, bitcast=True)
    crc = _mulmod(_mulmod(crc, low), high)
    tl.atomic_xor(out_ptr + first_job + tl.program_id(1), tl.reduce(crc, 0, _xor).to(tl.int32, bitcast=True))


def _mulmod_np(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.uint64), b.astype(np.uint64)
    p = np.zeros_like(a)
    for i in range(32):
        p ^= np.where((a >> np.uint64(31 - i)) & np.uint64(1), b, np.uint64(0))
        b = (b >> np.uint64(1)) ^ np.where(b & np.uint64(1), np.uint64(POLY), np.uint64(0))
    return p


def _x_to_the_power_of_two(k: int) -> int:
    """x^(2^k) mod P."""
    p = np.array([1 << 30], dtype=np.uint64)  # x^1
    for _ in range(k):
        p = _mulmod_np(p, p)
    return int(p[0])


def _powers(base: int, count: int) -> np.ndarray:
    """base^0 .. base^(count - 1) mod P (reflected), by doubling."""
    out, step = np.array([1 << 31], dtype=np.uint64), np.array([base], dtype=np.uint64)
    while len(out) < count:
        out = np.concatenate([out, _mulmod_np(out, np.repeat(step, len(out)))])
        step = _mulmod_np(step, step)
    return out[:count]


_lock = threading.Lock()
_host: dict[str, np.ndarray] = {}  # "low", "high": the powers as int32 (high grows as payloads need)
_device: dict[tuple, torch.Tensor] = {}


def _power_table(kind: str, count: int, device) -> torch.Tensor:
    with _lock:
        have = _host.get(kind)
        if have is None or len(have) < count:
            size = max(count, 64 if have is None else 2 * len(have))
            base = _x_to_the_power_of_two(9 if kind == "low" else 19)  # x^512: one segment; x^(512 * 1024)
            _host[kind] = have = _powers(base, size).astype(np.uint32).view(np.int32)
        key = (kind, str(device), len(have))  # a grown table is a new tensor: queued kernels keep the old one
        if key not in _device:
            _device[key] = torch.from_numpy(have).to(device)
        return _device[key]


def crc32s(staged: torch.Tensor, table: np.ndarray) -> torch.Tensor:
    """int32 per job (the uint32 bits), on `staged`'s device: the CRC-32 of its payload, LENGTH
    bytes at SRC (each at least MIN_LENGTH). Launched, not waited for; the programs XOR their
    segments into an all-ones word, which is zlib's final complement."""
    device = staged.device
    got = torch.full((len(table),), -1, dtype=torch.int32, device=device)
    if not len(table):
        return got
    if int(table[:, J.LENGTH].min()) < MIN_LENGTH:
        raise ValueError(f"payloads under {MIN_LENGTH} bytes are checked on the host")
    segments = -(-table[:, J.LENGTH] // SEGMENT)
    low = _power_table("low", LOW_POWERS, device)
    high = _power_table("high", int(segments.max()) // LOW_POWERS + 1, device)
    table_d = J.to_device(np.ascontiguousarray(table, dtype=np.int64), device)
    blocks = int(-(-segments.max() // SEGMENTS_PER_PROGRAM))
    for first in range(0, len(table), J.MAX_GRID_JOBS):
        jobs = min(J.MAX_GRID_JOBS, len(table) - first)
        _crc_kernel[(blocks, jobs)](staged, table_d, low, high, got, first, NCOL=table.shape[1],
                                    BS=SEGMENTS_PER_PROGRAM)
    return got
