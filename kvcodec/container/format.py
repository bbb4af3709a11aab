"""Byte layout of the `.kvc` container (format_spec/kvc-v1.md): preamble, header, index,
trailer, and their validation. Knows nothing of any codec's payload."""

from __future__ import annotations

import json
import math
import re
import struct
import zlib
from dataclasses import asdict, dataclass, field

import numpy as np

from kvcodec.cache import MAX_LAYERS, TENSORS
from kvcodec.dtypes import CODE_TO_NAME, DTYPES
from kvcodec.errors import ChecksumError, FormatError

MAGIC = b"\x89KVC\r\n\x1a\n"
END_MAGIC = b"KVC1END\n"
INDEX_MAGIC = b"KVCX"
MAJOR, MINOR = 1, 2  # the newest minor version written; a file says the lowest that holds it (`Header.minor`)
ALIGN = 64
MIN_FILE = 128  # preamble and the shortest header padded to ALIGN (64), an empty index (32), the trailer (32)
PREAMBLE = struct.Struct("<8sHHII8sI")  # magic, major, minor, header_length, flags, reserved, crc
TRAILER = struct.Struct("<QQII8s")  # index_offset, index_length, reserved, crc, end magic
INDEX_HEAD = struct.Struct("<4sIIII12s")
MAX_HEADER = 16 << 20
MAX_CODECS = 256
MAX_DIM = 65536
MAX_TOKENS = 2**31 - 1
MAX_METADATA = 1024
CONTAINER_OWNER = 0xFFFF

RECORD_DTYPE = np.dtype([
    ("offset", "<u8"), ("length", "<u8"), ("crc32", "<u4"), ("layer", "<u4"),
    ("tensor", "u1"), ("dtype", "u1"), ("codec_slot", "<u2"), ("codec_id", "<u4"),
    ("token_start", "<u4"), ("batch", "<u4"), ("heads", "<u4"), ("tokens", "<u4"),
    ("head_dim", "<u4"), ("reserved", "V12"),
])
BLOB_DTYPE = np.dtype([
    ("offset", "<u8"), ("length", "<u8"), ("crc32", "<u4"), ("owner", "<u2"),
    ("reserved0", "<u2"), ("ordinal", "<u4"), ("reserved1", "<u4"),
])
assert RECORD_DTYPE.itemsize == 64 and BLOB_DTYPE.itemsize == 32


def crc32(*parts) -> int:
    value = 0
    for part in parts:
        value = zlib.crc32(part, value)
    return value


def align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


# -- header ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class TensorSpec:
    batch: int
    heads: int
    tokens: int
    head_dim: int
    dtype: str

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (self.batch, self.heads, self.tokens, self.head_dim)


POSITION_ENCODINGS = ("runs", "int64")  # compact runs/bitmaps (kvcodec.positions); plain int64 (version 1.0)


@dataclass(frozen=True)
class LayerSpec:
    key: TensorSpec
    value: TensorSpec
    position_rows: int | None = None  # None: positions not stored
    position_encoding: str = "runs"
    window: int | None = None  # a sliding-window layer's attention window (1.2); None: full attention


@dataclass(frozen=True)
class CodecEntry:
    id: int
    name: str
    config: dict


@dataclass
class Header:
    layers: list[LayerSpec]
    codecs: list[CodecEntry]
    chunk_tokens: int
    layout: str = "legacy"
    token_ids_shape: tuple[int, int] | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    length: int | None = None  # sequence length a pruned cache continues from
    selection: CodecEntry | None = None  # the stage that chose the kept tokens (informative)

    def to_bytes(self) -> bytes:
        doc = {
            "layers": [{"key": asdict(l.key), "value": asdict(l.value),
                        "positions": None if l.position_rows is None else
                        {"rows": l.position_rows, "encoding": l.position_encoding},
                        **({} if l.window is None else {"window": l.window})}
                       for l in self.layers],
            "codecs": [asdict(c) for c in self.codecs],
            "chunk_tokens": self.chunk_tokens,
            "layout": self.layout,
            "token_ids": None if self.token_ids_shape is None else
            {"batch": self.token_ids_shape[0], "tokens": self.token_ids_shape[1]},
            "metadata": self.metadata,
        }
        if self.length is not None:
            doc["length"] = self.length
        if self.selection is not None:
            doc["selection"] = asdict(self.selection)
        return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()

    @property
    def minor(self) -> int:
        """The minor version of a file holding this header: 2 if a layer records its window
        (the member 1.2 adds), else 1."""
        return 2 if any(l.window is not None for l in self.layers) else 1

    @classmethod
    def from_bytes(cls, data: bytes) -> "Header":
        return cls.from_dict(parse_json(data))

    @classmethod
    def from_dict(cls, doc) -> "Header":
        _check(isinstance(doc, dict), "header is not a JSON object")
        layers = doc.get("layers")
        _check(isinstance(layers, list) and 1 <= len(layers) <= MAX_LAYERS,
               f"header needs 1 to {MAX_LAYERS} layers")
        codecs = doc.get("codecs")
        _check(isinstance(codecs, list) and 1 <= len(codecs) <= MAX_CODECS,
               f"header needs 1 to {MAX_CODECS} codecs")
        meta = doc.get("metadata", {})
        _check(isinstance(meta, dict) and len(meta) <= MAX_METADATA and
               all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()),
               "header metadata must be an object of strings")
        layout = doc.get("layout", "legacy")
        _check(isinstance(layout, str) and len(layout) <= 64, "header layout must be a short string")
        chunk = doc.get("chunk_tokens")
        _check(_is_int(chunk, 1, MAX_TOKENS), "header chunk_tokens must be a positive integer")
        ids = doc.get("token_ids")
        if ids is not None:
            _check(isinstance(ids, dict) and _is_int(ids.get("batch"), 1, MAX_DIM)
                   and _is_int(ids.get("tokens"), 0, MAX_TOKENS), "header token_ids must be {batch, tokens}")
            ids = (ids["batch"], ids["tokens"])
        length = doc.get("length")
        _check(length is None or _is_int(length, 0, MAX_TOKENS), "header length must be a token count")
        selection = doc.get("selection")
        header = cls(
            layers=[_layer(i, lay) for i, lay in enumerate(layers)],
            codecs=[_codec(f"codec {i}", c) for i, c in enumerate(codecs)],
            chunk_tokens=chunk, layout=layout, token_ids_shape=ids, metadata=meta, length=length,
            selection=None if selection is None else _codec("selection", selection),
        )
        _check(length is None or all(l.key.tokens <= length for l in header.layers),
               "header length is smaller than a layer's token count")
        return header


MAX_INT_DIGITS = 20  # a u64 has 20 digits; longer integers are refused before they are converted
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89abcdefABCDEF]")  # only escapes can put surrogates in decoded text


def parse_json(data: bytes):
    """The header's JSON, strictly (spec 3.2): RFC 8259 in UTF-8, no duplicate member names, no
    NaN or infinities, integers of at most 20 digits, strings of Unicode scalar values only."""
    def members(pairs):
        obj = dict(pairs)
        if len(obj) != len(pairs):
            seen = set()
            twice = next(key for key, _ in pairs if key in seen or seen.add(key))
            raise FormatError(f"header has the member {twice!r} twice")
        return obj

    def constant(name):
        raise FormatError(f"header holds {name}, which JSON does not have")

    def integer(text: str) -> int:
        if len(text) > MAX_INT_DIGITS and len(text.lstrip("-")) > MAX_INT_DIGITS:
            raise FormatError(f"header holds an integer of more than {MAX_INT_DIGITS} digits")
        return int(text)

    def number(text: str) -> float:
        value = float(text)
        _check(math.isfinite(value), f"header holds a number beyond float range ({text[:40]})")
        return value

    try:
        text = data.decode("utf-8")
        doc = json.loads(text, object_pairs_hook=members, parse_constant=constant, parse_int=integer,
                         parse_float=number)
        if _SURROGATE_ESCAPE.search(text):  # a lone one (\ud800 escapes) does not encode
            json.dumps(doc, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise FormatError("header holds a string that is not valid Unicode (a lone surrogate escape)") from None
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise FormatError(f"header is not valid UTF-8 JSON: {exc}") from None
    return doc


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise FormatError(message)


def _is_int(v, lo: int, hi: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


def _tensor(where: str, t) -> TensorSpec:
    if type(t) is dict:  # the common case, checked at once
        b, h, n, d, dtype = t.get("batch"), t.get("heads"), t.get("tokens"), t.get("head_dim"), t.get("dtype")
        if (type(b) is int and type(h) is int and type(n) is int and type(d) is int and 1 <= b <= MAX_DIM
                and 1 <= h <= MAX_DIM and 1 <= d <= MAX_DIM and 0 <= n <= MAX_TOKENS and type(dtype) is str
                and dtype in DTYPES):
            return TensorSpec(b, h, n, d, dtype)
    _check(isinstance(t, dict), f"header {where} is not an object")
    for k in ("batch", "heads", "head_dim"):
        _check(_is_int(t.get(k), 1, MAX_DIM), f"header {where}.{k} must be an integer from 1 to {MAX_DIM}")
    _check(_is_int(t.get("tokens"), 0, MAX_TOKENS), f"header {where}.tokens is out of range")
    _check(isinstance(t.get("dtype"), str) and t["dtype"] in DTYPES, f"header {where}.dtype must be one of "
           f"{', '.join(DTYPES)}")
    return TensorSpec(t["batch"], t["heads"], t["tokens"], t["head_dim"], t["dtype"])


def _layer(i: int, lay) -> LayerSpec:
    _check(isinstance(lay, dict), f"header layer {i} is not an object")
    k, v = _tensor(f"layer {i} key", lay.get("key")), _tensor(f"layer {i} value", lay.get("value"))
    _check(k.shape[:3] == v.shape[:3], f"header layer {i}: key and value differ in batch, heads or tokens")
    window = lay.get("window")
    _check(window is None or _is_int(window, 1, MAX_TOKENS), f"header layer {i} window must be a token count")
    pos = lay.get("positions")
    if pos is None:
        return LayerSpec(k, v, window=window)
    _check(isinstance(pos, dict) and pos.get("rows") in (1, k.heads) and _is_int(pos.get("rows"), 1, MAX_DIM),
           f"header layer {i} positions.rows must be 1 or the head count")
    encoding = pos.get("encoding", "int64")
    _check(encoding in POSITION_ENCODINGS, f"header layer {i} positions.encoding must be one of {POSITION_ENCODINGS}")
    return LayerSpec(k, v, pos["rows"], encoding, window)


def _codec(where: str, c) -> CodecEntry:
    _check(isinstance(c, dict) and _is_int(c.get("id"), 1, 0xFFFFFFFF) and isinstance(c.get("name"), str)
           and len(c["name"]) <= 64 and isinstance(c.get("config"), dict), f"header {where} is malformed")
    return CodecEntry(c["id"], c["name"], c["config"])


# -- preamble and trailer --------------------------------------------------------------------
def pack_preamble(header: bytes, minor: int = MINOR) -> bytes:
    head = PREAMBLE.pack(MAGIC, MAJOR, minor, len(header), 0, bytes(8), 0)[:28]
    return head + struct.pack("<I", crc32(head, header))


def parse_preamble(data: bytes) -> int:
    """Validate the fixed preamble; return the header length."""
    if len(data) < PREAMBLE.size:
        raise FormatError("file is too short to be a .kvc file")
    magic, major, _minor, length, flags, _reserved, _crc = PREAMBLE.unpack(data[:PREAMBLE.size])
    if magic != MAGIC:
        raise FormatError("not a .kvc file (bad magic)")
    if major != MAJOR:
        raise FormatError(f"unsupported .kvc major version {major} (this reader supports {MAJOR})")
    if not 2 <= length <= MAX_HEADER:
        raise FormatError(f"header length {length} is out of bounds")
    if flags:
        raise FormatError(f"preamble flags {flags:#x} name features this reader does not have (version 1 has none)")
    return length


def check_header_crc(preamble: bytes, header: bytes) -> None:
    stored = struct.unpack("<I", preamble[28:32])[0]
    if crc32(preamble[:28], header) != stored:
        raise ChecksumError("header checksum mismatch: the file is corrupt")


def pack_trailer(index_offset: int, index: bytes) -> bytes:
    head = struct.pack("<QQI", index_offset, len(index), 0)
    return head + struct.pack("<I", crc32(head, index)) + END_MAGIC


def parse_trailer(data: bytes, file_size: int, data_start: int) -> tuple[int, int]:
    """Validate the trailer; return (index_offset, index_length)."""
    offset, length, _reserved, _crc, end = TRAILER.unpack(data)
    if end != END_MAGIC:
        raise FormatError("file has no end marker: it is truncated or still being written")
    if offset % ALIGN or offset < data_start or offset + length + TRAILER.size != file_size:
        raise FormatError("trailer points outside the file: the file is truncated or corrupt")
    return offset, length


def check_index_crc(trailer: bytes, index: bytes) -> None:
    if crc32(trailer[:20], index) != struct.unpack("<I", trailer[20:24])[0]:
        raise ChecksumError("index checksum mismatch: the file is corrupt")


# -- index -----------------------------------------------------------------------------------
def pack_index(records: np.ndarray, blobs: np.ndarray) -> bytes:
    head = INDEX_HEAD.pack(INDEX_MAGIC, len(records), len(blobs), RECORD_DTYPE.itemsize, BLOB_DTYPE.itemsize, bytes(12))
    return head + records.tobytes() + blobs.tobytes()


def parse_index(data: bytes) -> tuple[np.ndarray, np.ndarray]:
    if len(data) < INDEX_HEAD.size:
        raise FormatError("index is too short")
    magic, n_rec, n_blob, rec_size, blob_size, _ = INDEX_HEAD.unpack(data[:INDEX_HEAD.size])
    _check(magic == INDEX_MAGIC, "index has a bad magic")
    _check(rec_size >= RECORD_DTYPE.itemsize and blob_size >= BLOB_DTYPE.itemsize, "index entry sizes are too small")
    _check(INDEX_HEAD.size + n_rec * rec_size + n_blob * blob_size == len(data), "index length disagrees with its counts")
    body = np.frombuffer(data, dtype=np.uint8, offset=INDEX_HEAD.size)
    rec = body[: n_rec * rec_size].reshape(n_rec, rec_size)[:, :RECORD_DTYPE.itemsize]
    blob = body[n_rec * rec_size:].reshape(n_blob, blob_size)[:, :BLOB_DTYPE.itemsize]
    return (np.ascontiguousarray(rec).view(RECORD_DTYPE).reshape(-1),
            np.ascontiguousarray(blob).view(BLOB_DTYPE).reshape(-1))


def validate_index(header: Header, records: np.ndarray, blobs: np.ndarray, data_start: int,
                   data_end: int) -> dict[tuple[int, int], np.ndarray]:
    """Spec section 4, checks 3 to 6: every entry consistent with the header and in bounds.
    Returns the record indices per (layer, tensor), in token order (`group_records`)."""
    for what, table in (("record", records), ("blob", blobs)):
        off, length = table["offset"].astype(np.uint64), table["length"].astype(np.uint64)
        _check(not np.any(off % ALIGN), f"a {what} is not aligned")
        _check(not np.any((off < data_start) | (off > data_end) | (length > np.uint64(data_end) - off)),
               f"a {what} lies outside the payload region")
    n_layers = len(header.layers)
    _check(not np.any(records["layer"] >= n_layers), "a record names a layer the header does not have")
    _check(not np.any(records["tensor"] > 1), "a record has an invalid tensor kind")
    _check(not np.any(records["codec_slot"] >= len(header.codecs)), "a record names a codec slot the header does not have")
    ids = np.array([c.id for c in header.codecs], dtype=np.uint32)
    _check(np.array_equal(ids[records["codec_slot"]], records["codec_id"]), "a record's codec id disagrees with the header")
    _check(not np.any(records["tokens"] == 0), "a record holds zero tokens")
    _check(not np.any(records["length"] == 0), "a record has an empty payload")
    groups = group_records(records)
    if len(records):  # per record, against its (layer, tensor)'s entry: all at once
        specs = [getattr(lay, name) for lay in header.layers for name in TENSORS]
        expect = np.array([(DTYPES[t.dtype][0], t.batch, t.heads, t.head_dim, t.tokens) for t in specs], dtype=np.int64)
        key = records["layer"].astype(np.int64) * 2 + records["tensor"]
        spec = expect[key]
        fields = np.stack([records[f].astype(np.int64) for f in ("dtype", "batch", "heads", "head_dim")], 1)
        def place(at: int) -> tuple[int, str]:
            return int(records["layer"][at]), TENSORS[int(records["tensor"][at])]
        wrong = np.flatnonzero(np.any(fields != spec[:, :4], axis=1))
        if wrong.size:
            layer, name = place(wrong[0])
            raise FormatError(f"records of layer {layer} {name} disagree with the header's shape or dtype")
        order = np.concatenate(list(groups.values()))  # by (layer, tensor), then token start
        k, starts = key[order], records["token_start"][order].astype(np.int64)
        ends = starts + records["tokens"][order]
        first = np.r_[True, k[1:] != k[:-1]]
        last = np.r_[k[1:] != k[:-1], True]
        broken = (first & (starts != 0)) | (~first & (starts != np.r_[0, ends[:-1]])) | (last & (ends != spec[order, 4]))
        if broken.any():
            layer, name = place(order[np.flatnonzero(broken)[0]])
            raise FormatError(f"records of layer {layer} {name} do not tile its "
                              f"{getattr(header.layers[layer], name).tokens} tokens")
    for layer, spec in enumerate(header.layers):
        for tensor in (0, 1):
            if getattr(spec, TENSORS[tensor]).tokens and (layer, tensor) not in groups:
                raise FormatError(f"layer {layer} {TENSORS[tensor]} has no records")
    _validate_blobs(header, blobs)
    spans = extents(records, blobs)
    for (o1, n1), (o2, _) in zip(spans, spans[1:]):
        _check(o1 + n1 <= o2, "payloads overlap")
    return groups


def index_bound(header: "Header") -> int:
    """Bytes of index and trailer a writer produces for `header` (with up to 8 context blobs
    per codec): how much of a remote file's tail to fetch at once."""
    records = sum(-(-getattr(lay, t).tokens // header.chunk_tokens) for lay in header.layers for t in TENSORS)
    blobs = 8 * len(header.codecs) + 1 + len(header.layers)
    return INDEX_HEAD.size + records * RECORD_DTYPE.itemsize + blobs * BLOB_DTYPE.itemsize + TRAILER.size


def extents(records: np.ndarray, blobs: np.ndarray) -> list[tuple[int, int]]:
    """(offset, length) of every payload and blob, in file order."""
    return sorted(zip(records["offset"].tolist() + blobs["offset"].tolist(),
                      records["length"].tolist() + blobs["length"].tolist()))


def _validate_blobs(header: Header, blobs: np.ndarray) -> None:
    keys = set()
    for owner, ordinal in zip(blobs["owner"].tolist(), blobs["ordinal"].tolist()):
        _check((owner, ordinal) not in keys, "two blobs share an owner and ordinal")
        _check(owner == CONTAINER_OWNER or owner < len(header.codecs), "a blob names an unknown owner")
        keys.add((owner, ordinal))
    for slot in range(len(header.codecs)):
        ords = sorted(o for w, o in keys if w == slot)
        _check(ords == list(range(len(ords))), f"blobs of codec slot {slot} are not numbered 0..n-1")
    required = container_blob_sizes(header)
    present = {o: int(n) for w, o, n in zip(blobs["owner"].tolist(), blobs["ordinal"].tolist(), blobs["length"].tolist())
               if w == CONTAINER_OWNER}
    _check(present.keys() == required.keys() and all(lo <= present[o] <= hi for o, (lo, hi) in required.items()),
           "container blobs (token ids, positions) disagree with the header")


def container_blob_sizes(header: Header) -> dict[int, tuple[int, int]]:
    """Smallest and largest size each required container blob may have."""
    sizes = {}
    if header.token_ids_shape is not None:
        n = 8 * header.token_ids_shape[0] * header.token_ids_shape[1]
        sizes[0] = (n, n)
    for i, lay in enumerate(header.layers):
        if lay.position_rows is None:
            continue
        rows, tokens = lay.position_rows, lay.key.tokens
        if lay.position_encoding == "int64":
            sizes[1 + i] = (8 * rows * tokens, 8 * rows * tokens)
        else:  # a row is at least a run count, and never larger than one run per token
            sizes[1 + i] = (5 * rows, rows * (5 + 12 * tokens))
    return sizes


def group_records(records: np.ndarray) -> dict[tuple[int, int], np.ndarray]:
    """Record indices per (layer, tensor), in token order; duplicates of a start are an error."""
    if not len(records):
        return {}
    layer, tensor, start = (records[f].astype(np.int64) for f in ("layer", "tensor", "token_start"))
    order = np.lexsort((start, tensor, layer))
    key = (layer * 2 + tensor)[order]
    twice = np.flatnonzero((key[1:] == key[:-1]) & (start[order][1:] == start[order][:-1]))
    _check(not twice.size, f"two records of layer {int(layer[order][twice[0]]) if twice.size else 0} share a token start")
    cuts = np.flatnonzero(key[1:] != key[:-1]) + 1
    return {(int(k) // 2, int(k) % 2): idx for k, idx in zip(key[np.r_[0, cuts]].tolist(), np.split(order, cuts))}


def record_dtype_name(code: int) -> str:
    return CODE_TO_NAME[code]
