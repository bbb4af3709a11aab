"""A second `.kvc` decoder written from kvc-v1.md alone (beside it, as zstd keeps its educational
decoder by its format doc): struct, json, numpy and zstandard, no kvcodec. It decodes the golden
vectors to the same bits as the library, and refuses every file of vectors/invalid/ with a
`Reject` naming the rule (section and check) the file breaks."""

from __future__ import annotations

import hashlib
import json
import math
import re
import struct
import zlib

import numpy as np
import zstandard

ITEMSIZE = {"float16": 2, "bfloat16": 2, "float32": 4}
BITS_DTYPE = {2: np.uint16, 4: np.uint32}  # element bit patterns are compared, not values


class Reject(Exception):
    """The file breaks `rule` (e.g. "4.3" or "8.2") of kvc-v1.md."""

    def __init__(self, rule: str, why: str):
        super().__init__(f"{rule}: {why}")
        self.rule = rule


def need(ok: bool, rule: str, why: str) -> None:
    if not ok:
        raise Reject(rule, why)


def strict_json(text: bytes):
    """Section 3.2's dialect: UTF-8 RFC 8259, no duplicate members, no NaN/Infinity, finite
    numbers, integers of at most 20 digits, no lone surrogates."""
    def members(pairs):
        keys = [k for k, _ in pairs]
        need(len(keys) == len(set(keys)), "3.2", "duplicate member")
        return dict(pairs)

    def constant(name):
        raise Reject("3.2", f"{name} is not JSON")

    def integer(t):
        need(len(t.lstrip("-")) <= 20, "3.2", "integer of more than 20 digits")
        return int(t)

    def number(t):
        need(abs(float(t)) < float("inf"), "3.2", "number beyond float range")
        return float(t)

    try:
        doc = json.loads(text.decode("utf-8"), object_pairs_hook=members, parse_constant=constant,
                         parse_int=integer, parse_float=number)
        json.dumps(doc, ensure_ascii=False).encode("utf-8")
    except (UnicodeError, ValueError, RecursionError) as exc:
        raise Reject("3.2", f"not UTF-8 JSON of the dialect ({type(exc).__name__})") from None
    return doc


def is_int(v, lo: int, hi: int) -> bool:
    return type(v) is int and lo <= v <= hi


def check_header(doc) -> None:
    """Section 3.2's members and bounds."""
    need(type(doc) is dict, "3.2", "not an object")
    layers, codecs = doc.get("layers"), doc.get("codecs")
    need(type(layers) is list and 1 <= len(layers) <= 4096, "3.2", "layers")
    need(type(codecs) is list and 1 <= len(codecs) <= 256, "3.2", "codecs")
    need(is_int(doc.get("chunk_tokens"), 1, 2**31 - 1), "3.2", "chunk_tokens")
    layout = doc.get("layout", "legacy")
    need(type(layout) is str and len(layout) <= 64, "3.2", "layout")
    meta = doc.get("metadata", {})
    need(type(meta) is dict and len(meta) <= 1024 and all(type(v) is str for v in meta.values()), "3.2", "metadata")
    ids = doc.get("token_ids")
    need(ids is None or (type(ids) is dict and is_int(ids.get("batch"), 1, 65536)
                         and is_int(ids.get("tokens"), 0, 2**31 - 1)), "3.2", "token_ids")
    for lay in layers:
        need(type(lay) is dict, "3.2", "layer")
        for name in ("key", "value"):
            t = lay.get(name)
            need(type(t) is dict and all(is_int(t.get(k), 1, 65536) for k in ("batch", "heads", "head_dim"))
                 and is_int(t.get("tokens"), 0, 2**31 - 1) and t.get("dtype") in ITEMSIZE, "3.2", "tensor")
        need(all(lay["key"][k] == lay["value"][k] for k in ("batch", "heads", "tokens")), "3.2", "key and value differ")
        pos = lay.get("positions")
        need(pos is None or (type(pos) is dict and pos.get("rows") in (1, lay["key"]["heads"])
                             and pos.get("encoding", "int64") in ("runs", "int64")), "3.2", "positions")
        need(lay.get("window") is None or is_int(lay["window"], 1, 2**31 - 1), "3.2", "window")
    length = doc.get("length")
    need(length is None or (is_int(length, 0, 2**31 - 1) and all(l["key"]["tokens"] <= length for l in layers)),
         "3.2", "length")
    for c in codecs + ([doc["selection"]] if doc.get("selection") is not None else []):
        need(type(c) is dict and is_int(c.get("id"), 1, 2**32 - 1) and type(c.get("name")) is str
             and len(c["name"]) <= 64 and type(c.get("config")) is dict, "3.2", "codec entry")


def check_config(codec: dict, blobs: int) -> None:
    """Section 8: every member of a built-in codec's config, and its context blobs."""
    cid, cfg = codec["id"], codec["config"]
    rule = {1: "8.1", 2: "8.2", 3: "8.3", 4: "8.4", 5: "8.5", 6: "8.6", 7: "8.7"}.get(cid, "8")

    def exactly(allowed: dict):
        need(set(cfg) <= set(allowed) and all(k in cfg or allowed[k][1] for k in allowed), rule, "config members")
        for k, (ok, _optional) in allowed.items():
            need(k not in cfg or ok(cfg[k]), rule, f"config {k}")

    number = lambda lo, hi: lambda v: type(v) in (int, float) and lo <= v <= hi  # noqa: E731
    if cid == 1:
        exactly({})
    elif cid in (2, 3):
        exactly({"level": (lambda v: is_int(v, -7, 22), False)})
    elif cid == 4:
        exactly({"bits": (lambda v: v in (2, 3, 4, 8) and type(v) is int, False),
                 "group_size": (lambda v: is_int(v, 1, 65536), False)})
    elif cid == 5:
        step = lambda v: v is None or number(1e-4, 100)(v)  # noqa: E731
        exactly({"quality": (lambda v: v in ("high", "medium", "low"), False), "key_step": (step, False),
                 "value_step": (step, False), "key_emphasis": (number(0, 2), False),
                 "value_emphasis": (number(0, 2), False), "shallow_layers": (number(0, 1), False),
                 "sinks": (lambda v: is_int(v, 0, 1024), False), "group_size": (lambda v: is_int(v, 1, 1024), False),
                 "anchor_bits": (lambda v: is_int(v, 0, 8), False), "lanes": (lambda v: v in (1, 2) and type(v) is int,
                                                                               True),
                 "tables": (lambda v: is_int(v, 1, 256), True),
                 "profile": (lambda v: type(v) is str and re.fullmatch("sha256:[0-9a-f]{64}", v) is not None, True),
                 "target_kl": (lambda v: v is None or number(1e-7, 10)(v), True)})
    elif cid == 6:
        flag = lambda v: type(v) is bool  # noqa: E731
        exactly({"weights": (lambda v: type(v) is str and re.fullmatch("sha256:[0-9a-f]{64}", v) is not None, False),
                 "embed": (flag, False), "bits": (lambda v: v in (2, 3, 4, 8) and type(v) is int, False),
                 "group_size": (lambda v: is_int(v, 1, 65536), False), "entropy": (flag, True),
                 "step": (number(1e-4, 100), True)})
        need(blobs == int(cfg["embed"]) + int(cfg.get("entropy", False)), rule, "ae's context blobs")
    elif cid == 7:
        exactly({"profile": (lambda v: type(v) is str and re.fullmatch("sha256:[0-9a-f]{64}", v) is not None, False),
                 "target_kl": (number(1e-7, 10), False), "sinks": (lambda v: is_int(v, 0, 1024), False),
                 "tables": (lambda v: is_int(v, 1, 256), False), "embed": (lambda v: type(v) is bool, False)})
        need(blobs == 1 + int(cfg["embed"]), rule, "kvtc's context blobs")
    need(cid not in (1, 2, 3, 4) or blobs == 0, rule, "this codec takes no context blobs")
    need(cid != 5 or blobs == 1, "8.5", "cachegen takes one context blob")


MAX_EXPANSION = {1: 1, 2: 32768, 3: 32768, 4: 16, 5: 4096, 6: 32768, 7: 4096}


def validate(data: bytes) -> tuple[dict, list, dict]:
    """Section 4's checks 1 to 7 (and the bounds of sections 3 and 8) on a whole file: the header,
    the records [(offset, length, crc, layer, tensor, dtype, slot, codec id, start, b, h, n, d)]
    and the blobs {(owner, ordinal): bytes}, each checksum verified."""
    need(len(data) >= 128, "4.1", "shorter than the smallest file")
    need(data[:8] == b"\x89KVC\r\n\x1a\n", "4.1", "magic")
    major, _minor, header_len, flags = struct.unpack_from("<HHII", data, 8)
    need(major == 1, "4.1", "major version")
    need(flags == 0, "4.1", "flags")
    need(2 <= header_len <= 16 << 20 and 32 + header_len <= len(data) - 32, "4.1", "header length")
    header = data[32:32 + header_len]
    need(zlib.crc32(header, zlib.crc32(data[:28])) == struct.unpack_from("<I", data, 28)[0], "4.1", "header crc")
    doc = strict_json(header)
    check_header(doc)
    data_start = -(-(32 + header_len) // 64) * 64
    trailer = data[-32:]
    need(trailer[24:] == b"KVC1END\n", "4.2", "end magic")
    index_offset, index_len = struct.unpack_from("<QQ", trailer)
    need(index_offset % 64 == 0 and index_offset >= data_start and index_offset + index_len + 32 == len(data),
         "4.2", "index place")
    index = data[index_offset:index_offset + index_len]
    need(zlib.crc32(index, zlib.crc32(trailer[:20])) == struct.unpack_from("<I", trailer, 20)[0], "4.2", "index crc")
    need(len(index) >= 32 and index[:4] == b"KVCX", "4.2", "index magic")
    n_rec, n_blob, rec_size, blob_size = struct.unpack_from("<IIII", index, 4)
    need(rec_size >= 64 and blob_size >= 32 and 32 + n_rec * rec_size + n_blob * blob_size == len(index),
         "4.2", "index counts")
    layers, codecs = doc["layers"], doc["codecs"]
    dtypes = {"float16": 1, "bfloat16": 2, "float32": 3}
    records, spans = [], []
    for i in range(n_rec):
        r = struct.unpack_from("<QQIIBBHIIIIII", index, 32 + i * rec_size)
        off, length, _crc, layer, tensor, dtype, slot, cid, start, b, h, n, d = r
        need(off % 64 == 0 and off >= data_start and off + length <= index_offset, "4.3", "record place")
        need(layer < len(layers) and tensor <= 1 and slot < len(codecs) and codecs[slot]["id"] == cid, "4.3", "record")
        t = layers[layer][("key", "value")[tensor]]
        need((dtype, b, h, d) == (dtypes[t["dtype"]], t["batch"], t["heads"], t["head_dim"]), "4.3", "record shape")
        need(n >= 1 and length >= 1, "4.3", "empty record")
        need(b * h * n * d * ITEMSIZE[t["dtype"]] <= MAX_EXPANSION.get(cid, 32768) * length + 4096, "4", "expansion")
        records.append(r)
        spans.append((off, length))
    for layer, lay in enumerate(layers):
        for tensor, name in enumerate(("key", "value")):
            mine = sorted((r[8], r[11]) for r in records if r[3] == layer and r[4] == tensor)
            ends = [0] + [s + n for s, n in mine]
            need([s for s, _ in mine] == ends[:-1] and ends[-1] == lay[name]["tokens"], "4.4", "records tile")
    blobs = {}
    for i in range(n_blob):
        off, length, crc, owner, ordinal = struct.unpack_from("<QQIH2xI", index, 32 + n_rec * rec_size + i * blob_size)
        need(off % 64 == 0 and off >= data_start and off + length <= index_offset, "4.5", "blob place")
        need((owner, ordinal) not in blobs and (owner == 0xFFFF or owner < len(codecs)), "4.5", "blob owner")
        blob = data[off:off + length]
        need(zlib.crc32(blob) == crc, "4.7", "blob crc")
        blobs[(owner, ordinal)] = blob
        spans.append((off, length))
    for slot in range(len(codecs)):
        ords = sorted(o for w, o in blobs if w == slot)
        need(ords == list(range(len(ords))), "4.5", "blob ordinals")
        check_config(codecs[slot], len(ords))
    required = {0} if doc.get("token_ids") else set()
    required |= {1 + i for i, lay in enumerate(layers) if lay.get("positions")}
    need({o for w, o in blobs if w == 0xFFFF} == required, "4.5", "container blobs")
    spans.sort()
    need(all(a + n <= b for (a, n), (b, _) in zip(spans, spans[1:])), "4.6", "overlap")
    for off, length, crc, *_ in records:
        need(zlib.crc32(data[off:off + length]) == crc, "4.7", "record crc")
    return doc, records, blobs


def read_kvc(data: bytes) -> dict:
    """{(layer, 'key'|'value'): uint bit-pattern array [B,H,T,D]}, plus 'header'."""
    validate(data)
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
        spec = doc["layers"][layer].get("positions")
        rows = ([row[start:start + n] for row in read_positions(blobs[(0xFFFF, 1 + layer)], spec["rows"],
                                                                 spec.get("encoding", "int64"))]
                if spec else [list(range(start, start + n))])
        chunk = decode_payload(codec, payload, name, (b, h, n, d), dtype, context, layer, start, rows)
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
                   start=0, positions=None) -> np.ndarray:
    size = ITEMSIZE[dtype]
    numel = int(np.prod(shape))
    if codec["id"] == 1:
        raw = payload
    elif codec["id"] in (2, 3):
        rule = f"8.{codec['id']}"
        try:
            need(zstandard.get_frame_parameters(payload).content_size == numel * size, rule, "frame content size")
            frame = zstandard.ZstdDecompressor().decompressobj()
            raw = frame.decompress(payload)
        except zstandard.ZstdError:
            raise Reject(rule, "not a Zstandard frame") from None
        need(frame.eof and not frame.unused_data, rule, "not exactly one frame")
        if codec["id"] == 3:  # content[j*n + i] = raw[i*s + j]
            raw = np.frombuffer(raw, np.uint8).reshape(size, numel).T.tobytes()
    elif codec["id"] == 4:
        return dequantize(codec["config"], payload, tensor, shape, dtype)
    elif codec["id"] == 5:
        return cachegen(codec["config"], context, payload, layer, tensor, start, shape, dtype)
    elif codec["id"] == 6:
        return ae(codec["config"], context, payload, layer, tensor, start, shape, dtype)
    elif codec["id"] == 7:
        return kvtc(codec["config"], context, payload, layer, tensor, shape, dtype,
                    positions or [list(range(start, start + shape[2]))])
    else:
        raise ValueError(f"codec {codec['id']}")
    need(len(raw) == numel * size, "8.1", "payload length")
    return np.frombuffer(raw, dtype=BITS_DTYPE[size]).reshape(shape)


def dequantize(config: dict, payload: bytes, tensor: str, shape, dtype: str) -> np.ndarray:
    bits, g = config["bits"], config["group_size"]
    b, h, n, d = shape
    axis = 2 if tensor == "key" else 3
    pshape = list(shape)
    pshape[axis] = -(-shape[axis] // g)
    groups = int(np.prod(pshape))
    numel = b * h * n * d
    need(len(payload) == 4 * groups + -(-numel // 8) * bits, "8.4", "payload length")
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


def inflate_tables(blob: bytes) -> bytes:
    """Section 8.5: the framed form (a directory in a skippable frame, then its frames), or one frame."""
    limit = min(256 << 20, (1 << 20) + 4096 * len(blob))
    if blob[:4] != (0x184D2A5B).to_bytes(4, "little"):
        need(zstandard.get_frame_parameters(blob).has_checksum, "8.5", "a tables frame without a checksum")
        raw = zstandard.ZstdDecompressor().decompress(blob)
        need(len(raw) <= limit, "8.5", "tables expand past their bound")
        return raw
    need(len(blob) >= 12, "8.5", "tables directory truncated")
    size, count = struct.unpack_from("<II", blob, 4)
    need(size == 4 * (1 + count) and count >= 1 and 8 + size <= len(blob), "8.5", "tables directory malformed")
    lengths = struct.unpack_from(f"<{count}I", blob, 12)
    need(8 + size + sum(lengths) == len(blob), "8.5", "tables directory disagrees with the blob")
    pos, parts = 8 + size, []
    for n in lengths:
        frame = blob[pos:pos + n]
        declared = zstandard.frame_content_size(frame)
        need(0 <= declared and sum(map(len, parts)) + declared <= limit, "8.5", "a tables frame's size")
        need(zstandard.get_frame_parameters(frame).has_checksum, "8.5", "a tables frame without a checksum")
        inflater = zstandard.ZstdDecompressor().decompressobj()
        parts.append(inflater.decompress(frame))
        need(inflater.eof and not inflater.unused_data, "8.5", "a directory entry that is not exactly one frame")
        need(len(parts[-1]) == declared, "8.5", "a tables frame differs from its declared size")
        pos += n
    return b"".join(parts)


def parse_tables(blob: bytes) -> dict:
    try:
        raw = inflate_tables(blob)
    except zstandard.ZstdError as exc:
        raise Reject("8.5", f"tables do not inflate ({exc})") from None
    (n_layers,), pos, out = struct.unpack_from("<I", raw), 4, {}
    need(n_layers <= 4096, "8.5", "tables of more than 4096 layers")
    for layer in range(n_layers):
        for name in ("key", "value"):
            h, d, g, k = struct.unpack_from("<IIII", raw, pos)
            need(h >= 1 and d >= 1 and 1 <= g <= 1024 and k <= 8, "8.5", "a tensor table set's fields")
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
    need(not words or words[-1] != 0, "9", "a lane's last word is nonzero (canonical form)")
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
    need(x == 0 and m == 0, "9", "the lane does not end where its symbols do")
    return out


def cachegen(config, context, payload, layer, tensor, start, shape, dtype, as_values=False):
    """The record's bit patterns (or, `as_values`, its float32 values before `to_dtype`)."""
    if config.get("lanes", 1) == 2:
        return cachegen_format2(config, context, payload, layer, tensor, start, shape, dtype)
    b, h, n_tok, d = shape
    hh, dd, g, k, steps, modes, tables = parse_tables(context[0])[(layer, tensor)]
    assert (hh, dd) == (h, d)
    size = ITEMSIZE[dtype]
    s = max(0, min(config["sinks"] - start, n_tok))
    n = n_tok - s
    c, anchored = h * d, [ch for ch in range(h * d) if modes[ch]]
    out = np.zeros(shape, dtype=BITS_DTYPE[size])
    values = np.zeros(shape, dtype=np.float32)
    sink_bytes = b * h * s * d * size
    n_lanes = b * (c + len(anchored))
    need(len(payload) >= sink_bytes + 4 * n_lanes, "8.5", "the payload holds its lane lengths")
    out[:, :, :s] = np.frombuffer(payload, BITS_DTYPE[size], b * h * s * d).reshape(b, h, s, d)
    lengths = struct.unpack_from(f"<{n_lanes}I", payload, sink_bytes)
    pos = sink_bytes + 4 * n_lanes
    need(len(payload) == pos + 4 * sum(lengths), "8.5", "the payload's length")
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
            if as_values:
                values[bi, ch // d, s:, ch % d] = y
            else:
                out[bi, ch // d, s:, ch % d] = to_dtype(y, dtype)
    return values if as_values else out


# -- section 8.6: ae ---------------------------------------------------------------------------

# -- section 8.5 (lane format 2) and 10: shared tables and 16-bit-word rANS lanes ------------------

def precision(n: int) -> int:
    return min((n - 1).bit_length() + 3, 14)


def parse_tables2(blob: bytes) -> dict:
    try:
        params = zstandard.get_frame_parameters(blob)
        need(params.has_checksum, "8.5", "a tables frame without a checksum")
        need(0 <= params.content_size <= min(256 << 20, (1 << 20) + 4096 * len(blob)), "8.5", "the tables' size")
        inflater = zstandard.ZstdDecompressor().decompressobj()
        raw = inflater.decompress(blob)
    except zstandard.ZstdError as exc:
        raise Reject("8.5", f"tables do not inflate ({exc})") from None
    need(inflater.eof and not inflater.unused_data and len(raw) == params.content_size, "8.5", "one whole frame")
    need(len(raw) >= 4, "8.5", "tables end early")
    (n_layers,), pos, out, slots = struct.unpack_from("<I", raw), 4, {}, 0
    need(n_layers <= 4096, "8.5", "tables of more than 4096 layers")

    def take(fmt, count):
        nonlocal pos
        need(count <= len(raw), "8.5", "tables end early")
        size = struct.calcsize(f"<{count}{fmt}")
        need(pos + size <= len(raw), "8.5", "tables end early")
        values = struct.unpack_from(f"<{count}{fmt}", raw, pos)
        pos += size
        return values
    heads = [take("I", 5) for _ in range(2 * n_layers)]
    for h, d, g, k, t in heads:
        need(1 <= h <= 1 << 24 and 1 <= d <= 1 << 24 and 1 <= g <= 1024 and k <= 8 and 1 <= t <= 65534, "8.5",
             "a tensor set's fields")
    counts = [h * d for h, d, *_ in heads]
    steps = take("f", sum(counts))
    main, delta = take("H", sum(counts)), take("H", sum(counts))
    los, sizes = take("i", sum(h[4] for h in heads)), take("H", sum(h[4] for h in heads))
    c0 = t0 = 0
    for j, (h, d, g, k, t) in enumerate(heads):
        c = h * d
        st = np.array(steps[c0:c0 + c], dtype=np.float32)
        mn, dl = main[c0:c0 + c], delta[c0:c0 + c]
        need(all(np.isfinite(st)) and min(st) > 0, "8.5", "steps finite and positive")
        need(max(mn) < t and all(x == 0xFFFF or (x < t and g > 1 and x != m) for x, m in zip(dl, mn)), "8.5",
             "table indices")
        tables = []
        for lo, n in zip(los[t0:t0 + t], sizes[t0:t0 + t]):
            need(2 <= n <= 4096 and abs(lo) + n < 2 ** 20, "8.5", "a table's range")
            tables.append((lo, n))
        out[(j // 2, ("key", "value")[j % 2])] = (h, d, g, k, st, mn, dl, tables)
        c0, t0 = c0 + c, t0 + t
    for key, (h, d, g, k, st, mn, dl, tables) in out.items():  # the weights, set after set
        full = []
        for lo, n in tables:
            w = take("H", n)
            need(min(w) >= 1 and sum(w) == 1 << precision(n), "10", "weights >= 1 summing to 2**P")
            full.append((lo, w, [sum(w[:i]) for i in range(n)], precision(n)))
            slots += 1 << precision(n)
        out[key] = (h, d, g, k, st, mn, dl, full)
    need(slots <= min(1 << 25, (1 << 20) + 64 * len(blob)), "8.5", "the tables' lookup slots")
    need(pos == len(raw), "8.5", "bytes after the last field")
    return out


def decode_lane2(words: list[int], symbols: list) -> list[int]:
    """Section 10, step by step: `symbols` is the table of each symbol in turn."""
    if not symbols:
        need(not words, "10", "a lane of no symbols has no words")
        return []
    need(len(words) >= 2, "10", "a lane holds its state")
    x, m, out = (words[0] << 16) | words[1], 2, []
    for lo, w, c, p in symbols:
        q = x % (1 << p)
        s = max(i for i in range(len(c)) if c[i] <= q)
        x = w[s] * (x >> p) + q - c[s]
        if x < 1 << 16:
            need(m < len(words), "10", "the lane ends early")
            x, m = (x << 16) | words[m], m + 1
        out.append(lo + s)
    need(x == 1 << 16 and m == len(words), "10", "the lane does not end where its symbols do")
    return out


def sinks_and_lanes(payload: bytes, shape, s: int, dtype: str, count: int, rule: str):
    """(the record's output holding its `s` exact sink tokens, the words of each of its `count`
    lanes) of a payload laid out as in 8.5's lane format 2: raw sinks, u32 lengths, the words."""
    b, h, _, d = shape
    size = ITEMSIZE[dtype]
    out = np.zeros(shape, dtype=BITS_DTYPE[size])
    sink_bytes = b * h * s * d * size
    need(len(payload) >= sink_bytes + 4 * count, rule, "the payload holds its lane lengths")
    out[:, :, :s] = np.frombuffer(payload, BITS_DTYPE[size], b * h * s * d).reshape(b, h, s, d)
    lengths = struct.unpack_from(f"<{count}I", payload, sink_bytes)
    pos = sink_bytes + 4 * count
    need(len(payload) == pos + 2 * sum(lengths), rule, "the payload's length")
    lanes = []
    for length in lengths:
        lanes.append(list(struct.unpack_from(f"<{length}H", payload, pos)))
        pos += 2 * length
    return out, lanes


def cachegen_format2(config, context, payload, layer, tensor, start, shape, dtype):
    b, h, n_tok, d = shape
    hh, dd, g, k, steps, main, delta, tables = parse_tables2(context[0])[(layer, tensor)]
    need((hh, dd) == (h, d), "8.5", "tables of the record's shape")
    s = max(0, min(config["sinks"] - start, n_tok))
    n = n_tok - s
    c = h * d
    out, lanes = sinks_and_lanes(payload, shape, s, dtype, b * c, "8.5")
    for bi in range(b):
        for ch in range(c):
            words = lanes[bi * c + ch]
            anchored = delta[ch] != 0xFFFF
            use = [tables[main[ch]] if i % g == 0 or not anchored else tables[delta[ch]] for i in range(n)]
            v = decode_lane2(words, use)
            u = v if not anchored else [v[i - i % g] * 2.0 ** -k + (0 if i % g == 0 else v[i]) for i in range(n)]
            y = (np.array(u, dtype=np.float32) * steps[ch]).astype(np.float32)
            out[bi, ch // d, s:, ch % d] = to_dtype(y, dtype)
    return out


def read_safetensors(blob: bytes) -> tuple[dict, dict]:
    """(float32 tensors by name, metadata) of a safetensors file."""
    n = struct.unpack_from("<Q", blob)[0]
    head = json.loads(blob[8:8 + n])
    meta = head.pop("__metadata__", {})
    body = blob[8 + n:]
    tensors = {}
    for name, t in head.items():
        need(t["dtype"] == "F32", "8.6", "weights are float32")
        lo, hi = t["data_offsets"]
        tensors[name] = np.frombuffer(body[lo:hi], "<f4").reshape(t["shape"])
    return tensors, meta


def ae(config, context, payload, layer, tensor, start, shape, dtype):
    b, h, n, d = shape
    need(len(context) == int(config["embed"]) + int(config.get("entropy", False)), "8.6", "context blobs")
    need(config["embed"], "8.6", "this reader finds weights only embedded in the file")
    weights = context[0]
    need("sha256:" + hashlib.sha256(weights).hexdigest() == config["weights"], "8.6", "weights hash")
    tensors, meta = read_safetensors(weights)
    net = json.loads(meta["kvcodec_ae"])["config"]
    z_dim = net["latent_dim"]
    if config.get("entropy", False):
        z = cachegen({"sinks": 0}, context[-1:], payload, layer, tensor, start, (b, h, n, z_dim), "float32",
                     as_values=True)
    else:
        z = dequantize(config, payload, "value", (b, h, n, z_dim), "float32").view(np.float32)
    k = f"nets.{tensor}."
    s = 0 if net["shared"] else layer
    e_up = tensors[k + "embed_up"][layer] if net["shared"] else 0
    hidden = z.astype(np.float32) @ tensors[k + "w_up"][s] + tensors[k + "b_up"][s] + e_up
    hidden = hidden / (1 + np.exp(-hidden))  # silu
    x = (hidden @ tensors[k + "w_out"][s] + tensors[k + "b_out"][s]) * tensors[k + "std"][layer] + tensors[k + "mean"][layer]
    return to_dtype(x.astype(np.float32), dtype)


# -- section 8.7: kvtc ----------------------------------------------------------------------------

def kvtc(config, context, payload, layer, tensor, shape, dtype, positions):
    b, h, n_tok, d = shape
    c = h * d
    need(config["embed"], "8.7", "this reader finds profiles only embedded in the file")
    profile = context[1]
    need("sha256:" + hashlib.sha256(profile).hexdigest() == config["profile"], "8.7", "profile hash")
    arrays, meta = read_safetensors(profile)
    need(meta.get("format") == "kvcodec-kvtc-profile" and meta.get("version") == "1", "8.7", "a kvtc profile")
    need(layer < int(meta["layers"]) and h == int(meta["heads"]) and d == int(meta[f"{tensor}_dim"]), "8.7",
         "a record of the profile's shape")
    hh, dd, g, k, steps, main, delta, tables = parse_tables2(context[0])[(layer, tensor)]
    need((hh, dd, g, k) == (1, c, 1, 0), "8.7", "tables of one direct channel per component")
    top = [max(row[i] for row in positions) for i in range(n_tok)]
    s = next((i for i, p in enumerate(top) if p >= config["sinks"]), n_tok)
    n = n_tok - s
    out, lanes = sinks_and_lanes(payload, shape, s, dtype, b * c, "8.7")
    v = np.zeros((b, c, n), dtype=np.int64)
    for bi in range(b):
        for j in range(c):
            v[bi, j] = decode_lane2(lanes[bi * c + j], [tables[main[j]]] * n)
    m = arrays[f"{layer}.{tensor}.decoder"]
    mean = arrays[f"{layer}.{tensor}.mean"]
    a = [[float(m[ch, j]) * float(steps[j]) for j in range(c)] for ch in range(c)]
    beta = max(sum(abs(x) for x in row) for row in a)
    f = 32 - (math.frexp(beta)[1] if beta > 0 else 0)
    w = [[round(math.ldexp(x, f)) for x in row] for row in a]  # Python's round: half to even
    rope = arrays.get(f"{layer}.rope.inv_freq") if tensor == "key" else None
    for bi in range(b):
        for i in range(n):
            y = [math.ldexp(sum(int(v[bi, j, i]) * w[ch][j] for j in range(c)), -f) + float(mean[ch]) for ch in range(c)]
            for hd in range(h):
                row = y[hd * d:(hd + 1) * d]
                if rope is not None:
                    p_ = positions[hd if len(positions) > 1 else 0][s + i]
                    scale, half = float(arrays[f"{layer}.rope.scale"][0]), len(rope)
                    turned = list(row)
                    for j in range(half):
                        theta = float(p_) * float(rope[j])
                        cs, sn = float(np.float32(math.cos(theta))), float(np.float32(math.sin(theta)))
                        turned[j] = (row[j] * cs - row[j + half] * sn) * scale
                        turned[j + half] = (row[j + half] * cs + row[j] * sn) * scale
                    row = turned
                out[bi, hd, s + i] = to_dtype(np.array(row, dtype=np.float64).astype(np.float32), dtype)
    return out
