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
        context = [blobs[(slot, j)] for j in range(len([k for k in blobs if k[0] == slot]))]
        chunk = decode_payload(codec, payload, name, (b, h, n, d), dtype, context, layer, start)
        out[(layer, name)][:, :, start:start + n] = chunk
    return out


def read_positions(blob: bytes, rows: int, encoding: str) -> list[list[int]]:
    """A layer's positions blob (spec 3.3): int64 rows, or rows of runs / bitmaps."""
    if encoding == "int64":
        return np.frombuffer(blob, "<i8").reshape(rows, -1).tolist()
    out, at = [], 0
    for _ in range(rows):
        kind = blob[at]
        if kind == 0:
            count = struct.unpack_from("<I", blob, at + 1)[0]
            starts = struct.unpack_from(f"<{count}Q", blob, at + 5)
            lengths = struct.unpack_from(f"<{count}I", blob, at + 5 + 8 * count)
            out.append([s + j for s, n in zip(starts, lengths) for j in range(n)])
            at += 5 + 12 * count
        else:
            assert kind == 1
            base, bits = struct.unpack_from("<QI", blob, at + 1)
            flags = blob[at + 13:at + 13 + (bits + 7) // 8]
            out.append([base + j for j in range(bits) if flags[j // 8] >> (j % 8) & 1])
            at += 13 + (bits + 7) // 8
    assert at == len(blob)
    return out


def decode_payload(codec: dict, payload: bytes, tensor: str, shape, dtype: str, context=(), layer=0,
                   start=0) -> np.ndarray:
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
    elif codec["id"] == 5:
        return cachegen(codec["config"], context, payload, layer, tensor, start, shape, dtype)
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
    return to_dtype((q * s + m).astype(np.float32), dtype)


def to_dtype(y: np.ndarray, dtype: str) -> np.ndarray:
    """float32 values to the bit patterns of `dtype` (section 8): saturated at the dtype's largest
    finite magnitude (NaN stays NaN), then rounded to nearest even."""
    top = {"float32": np.finfo(np.float32).max, "float16": 65504.0, "bfloat16": 3.3895313892515355e38}[dtype]
    y = np.where(y > top, top, np.where(y < -top, -top, y)).astype(np.float32)
    if dtype == "float32":
        return y.view(np.uint32)
    if dtype == "float16":
        return y.astype(np.float16).view(np.uint16)
    u = y.view(np.uint32).astype(np.uint64)  # bfloat16: round to nearest even on the upper 16 bits
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


# -- section 8.5 and 9: cachegen tables and rANS lanes -----------------------------------------

def table_weights(counts: list[int]) -> list[int]:
    """weights_from_counts of section 9, written out."""
    n, total = len(counts), sum(counts)
    free = (1 << 24) - n
    w = [1 + (c * free // total if total else free // n) for c in counts]
    left = (1 << 24) - sum(w)
    order = sorted(range(n), key=lambda i: (-counts[i], i))
    for j in range(left):
        w[order[j % n]] += 1
    return w


def code_count(code: int) -> int:
    return code if code < 32 else (16 + (code - 32) % 16) << (1 + (code - 32) // 16)


def parse_tables(blob: bytes) -> dict:
    raw = zstandard.ZstdDecompressor().decompress(blob)
    (n_layers,), pos, out = struct.unpack_from("<I", raw), 4, {}
    for layer in range(n_layers):
        for name in ("key", "value"):
            h, d, g, k = struct.unpack_from("<IIII", raw, pos)
            c = h * d
            pos += 16
            steps = np.frombuffer(raw, "<f4", c, pos)
            modes = list(raw[pos + 4 * c:pos + 5 * c])
            pos += 5 * c
            t = c + sum(modes)
            los = struct.unpack_from(f"<{t}i", raw, pos)
            sizes = struct.unpack_from(f"<{t}H", raw, pos + 4 * t)
            pos += 6 * t
            tables = []
            for lo, n in zip(los, sizes):
                w = table_weights([code_count(x) for x in raw[pos:pos + n]])
                pos += n
                tables.append((lo, w, [sum(w[:i]) for i in range(n)]))
            out[(layer, name)] = (h, d, g, k, steps, modes, tables)
    assert pos == len(raw)
    return out


def decode_lane(words: list[int], table, count: int) -> list[int]:
    """Section 9, step by step."""
    lo, w, c = table
    assert not words or words[-1] != 0, "a lane's last word is nonzero (canonical form)"
    m, x = len(words), 0
    if m:
        x, m = words[m - 1], m - 1
    if m:
        x, m = (x << 32) | words[m - 1], m - 1
    out = []
    for _ in range(count):
        q = x & ((1 << 24) - 1)
        s = max(i for i in range(len(c)) if c[i] <= q)
        x = w[s] * (x >> 24) + q - c[s]
        if x < (1 << 32) and m:
            x, m = (x << 32) | words[m - 1], m - 1
        out.append(lo + s)
    assert x == 0 and m == 0
    return out


def cachegen(config, context, payload, layer, tensor, start, shape, dtype):
    b, h, n_tok, d = shape
    hh, dd, g, k, steps, modes, tables = parse_tables(context[0])[(layer, tensor)]
    assert (hh, dd) == (h, d)
    size = ITEMSIZE[dtype]
    s = max(0, min(config["sinks"] - start, n_tok))
    n = n_tok - s
    c, anchored = h * d, [ch for ch in range(h * d) if modes[ch]]
    out = np.zeros(shape, dtype=BITS_DTYPE[size])
    sink_bytes = b * h * s * d * size
    out[:, :, :s] = np.frombuffer(payload, BITS_DTYPE[size], b * h * s * d).reshape(b, h, s, d)
    n_lanes = b * (c + len(anchored))
    lengths = struct.unpack_from(f"<{n_lanes}I", payload, sink_bytes)
    pos = sink_bytes + 4 * n_lanes
    lanes = []
    for length in lengths:
        lanes.append(list(struct.unpack_from(f"<{length}I", payload, pos)))
        pos += 4 * length
    assert pos == len(payload)
    a = -(-n // g)
    for bi in range(b):
        for ch in range(c):
            main = lanes[bi * c + ch]
            if not modes[ch]:
                u = [float(v) for v in decode_lane(main, tables[ch], n)]
            else:
                j = anchored.index(ch)
                anchors = decode_lane(main, tables[ch], a)
                deltas = iter(decode_lane(lanes[b * c + bi * len(anchored) + j], tables[c + j], n - a))
                u = [anchors[i // g] * 2.0 ** -k + (0 if i % g == 0 else next(deltas)) for i in range(n)]
            y = (np.array(u, dtype=np.float32) * steps[ch]).astype(np.float32)
            out[bi, ch // d, s:, ch % d] = to_dtype(y, dtype)
    return out
