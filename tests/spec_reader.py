"""A second `.kvc` decoder written from format_spec/kvc-v1.md alone: struct, json, numpy and
zstandard, no kvcodec. It decodes the golden vectors to the same bits as the library."""

from __future__ import annotations

import json
import struct
import zlib

import numpy as np
import zstandard

ITEMSIZE = {"float16": 2, "bfloat16": 2, "float32": 4}
BITS_DTYPE = {2: np.uint16, 4: np.uint32}  # element bit patterns are compared, not values


def read_kvc(data: bytes) -> dict:
    """{(layer, 'key'|'value'): uint bit-pattern array [B,H,T,D]}, plus 'header'."""
    assert data[:8] == b"\x89KVC\r\n\x1a\n" and struct.unpack_from("<H", data, 8)[0] == 1
    header_len = struct.unpack_from("<I", data, 12)[0]
    header = data[32:32 + header_len]
    assert zlib.crc32(header, zlib.crc32(data[:28])) == struct.unpack_from("<I", data, 28)[0]
    doc = json.loads(header)
    trailer = data[-32:]
    assert trailer[24:] == b"KVC1END\n"
    index_offset, index_len = struct.unpack_from("<QQ", trailer)
    index = data[index_offset:index_offset + index_len]
    assert zlib.crc32(index, zlib.crc32(trailer[:20])) == struct.unpack_from("<I", trailer, 20)[0]
    assert index[:4] == b"KVCX"
    n_rec, n_blob, rec_size, blob_size = struct.unpack_from("<IIII", index, 4)
    out = {"header": doc}
    blobs = {}
    for i in range(n_blob):
        off, length, crc, owner, ordinal = struct.unpack_from("<QQIH2xI", index, 32 + n_rec * rec_size + i * blob_size)
        blob = data[off:off + length]
        assert zlib.crc32(blob) == crc
        blobs[(owner, ordinal)] = blob
    out["blobs"] = blobs
    for layer, lay in enumerate(doc["layers"]):
        for name in ("key", "value"):
            t = lay[name]
            out[(layer, name)] = np.zeros((t["batch"], t["heads"], t["tokens"], t["head_dim"]),
                                          dtype=BITS_DTYPE[ITEMSIZE[t["dtype"]]])
    for i in range(n_rec):
        (off, length, crc, layer, tensor, _dtype, slot, codec_id, start,
         b, h, n, d) = struct.unpack_from("<QQIIBBHIIIIII", index, 32 + i * rec_size)
        payload = data[off:off + length]
        assert zlib.crc32(payload) == crc and off % 64 == 0
        codec = doc["codecs"][slot]
        assert codec["id"] == codec_id
        name = ("key", "value")[tensor]
        dtype = doc["layers"][layer][name]["dtype"]
        chunk = decode_payload(codec, payload, name, (b, h, n, d), dtype)
        out[(layer, name)][:, :, start:start + n] = chunk
    return out


def decode_payload(codec: dict, payload: bytes, tensor: str, shape, dtype: str) -> np.ndarray:
    size = ITEMSIZE[dtype]
    numel = int(np.prod(shape))
    if codec["id"] == 1:
        raw = payload
    elif codec["id"] in (2, 3):
        raw = zstandard.ZstdDecompressor().decompress(payload)
        if codec["id"] == 3:  # content[j*n + i] = raw[i*s + j]
            raw = np.frombuffer(raw, np.uint8).reshape(size, numel).T.tobytes()
    elif codec["id"] == 4:
        return dequantize(codec["config"], payload, tensor, shape, dtype)
    else:
        raise ValueError(f"codec {codec['id']}")
    assert len(raw) == numel * size
    return np.frombuffer(raw, dtype=BITS_DTYPE[size]).reshape(shape)


def dequantize(config: dict, payload: bytes, tensor: str, shape, dtype: str) -> np.ndarray:
    bits, g = config["bits"], config["group_size"]
    b, h, n, d = shape
    axis = 2 if tensor == "key" else 3
    pshape = list(shape)
    pshape[axis] = -(-shape[axis] // g)
    groups = int(np.prod(pshape))
    numel = b * h * n * d
    assert len(payload) == 4 * groups + -(-numel // 8) * bits
    mins = np.frombuffer(payload, np.float16, groups).astype(np.float32).reshape(pshape)
    scales = np.frombuffer(payload, np.float16, groups, 2 * groups).astype(np.float32).reshape(pshape)
    # codes: each run of 8 codes is the little-endian integer sum(q_i << (bits*i)) in `bits` bytes
    packed = np.frombuffer(payload, np.uint8, offset=4 * groups).reshape(-1, bits)
    words = np.zeros(packed.shape[0], dtype=np.uint64)
    for j in range(bits):
        words |= packed[:, j].astype(np.uint64) << np.uint64(8 * j)
    codes = np.stack([(words >> np.uint64(bits * i)) & np.uint64((1 << bits) - 1) for i in range(8)], 1)
    q = codes.reshape(-1)[:numel].astype(np.float32).reshape(shape)
    idx = np.arange(shape[axis]) // g
    m, s = np.take(mins, idx, axis), np.take(scales, idx, axis)
    y = (q * s + m).astype(np.float32)
    if dtype == "float32":
        return y.view(np.uint32)
    if dtype == "float16":
        return y.astype(np.float16).view(np.uint16)
    u = y.view(np.uint32).astype(np.uint64)  # bfloat16: round to nearest even on the upper 16 bits
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
