"""LSB-first packing of b-bit codes (b in 2, 3, 4, 8): every 8 codes become b bytes."""

from __future__ import annotations

import numpy as np

SUPPORTED_BITS = (2, 3, 4, 8)


def packed_length(count: int, bits: int) -> int:
    return -(-count // 8) * bits


def pack(codes: np.ndarray, bits: int) -> bytes:
    """Pack a flat uint8 array of codes < 2**bits."""
    n = codes.size
    padded = np.zeros(-(-n // 8) * 8, dtype=np.uint8)
    padded[:n] = codes
    if bits == 8:
        return padded.tobytes()
    if bits == 3:  # 8 codes -> one 24-bit little-endian word
        rows = padded.reshape(-1, 8).astype(np.uint32)
        word = np.zeros(rows.shape[0], dtype=np.uint32)
        for i in range(8):
            word |= rows[:, i] << np.uint32(3 * i)
        return word.view(np.uint8).reshape(-1, 4)[:, :3].tobytes()
    per_byte = 8 // bits
    rows = padded.reshape(-1, per_byte)
    out = rows[:, 0].copy()
    for i in range(1, per_byte):
        out |= rows[:, i] << np.uint8(bits * i)
    return out.tobytes()


def unpack(data, count: int, bits: int) -> np.ndarray:
    """Inverse of `pack`: the first `count` codes as a flat uint8 array."""
    raw = np.frombuffer(data, dtype=np.uint8)
    if bits == 8:
        return raw[:count]
    mask = (1 << bits) - 1
    if bits == 3:
        words = np.zeros((raw.size // 3, 4), dtype=np.uint8)
        words[:, :3] = raw.reshape(-1, 3)
        word = words.view(np.uint32).reshape(-1)
        out = np.empty((word.size, 8), dtype=np.uint8)
        for i in range(8):
            out[:, i] = (word >> np.uint32(3 * i)) & np.uint32(mask)
    else:
        per_byte = 8 // bits
        out = np.empty((raw.size, per_byte), dtype=np.uint8)
        for i in range(per_byte):
            out[:, i] = (raw >> np.uint8(bits * i)) & np.uint8(mask)
    return out.reshape(-1)[:count]
