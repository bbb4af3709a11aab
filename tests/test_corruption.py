"""Hostile and damaged inputs: every one is a KVCError with a clear message, never a crash,
a hang or an allocation beyond the file's size."""

from __future__ import annotations

import json
import random
import struct

import pytest
import torch

import kvcodec
from kvcodec.container import format as fmt
from kvcodec.errors import ChecksumError, CodecError, FormatError, KVCError

from conftest import synthetic_cache

CODECS = ("raw", "zstd", "shuffle-zstd", "quant", "cachegen")


@pytest.fixture(scope="module")
def files():
    cache = synthetic_cache(layers=2, tokens=20, head_dim=8, positions=True, token_ids=True)
    cache.metadata["room"] = "x" * 10000  # dropped by rewrite_header to make room for edits
    return {c: (cache, kvcodec.encode(cache, c, chunk_tokens=8)) for c in CODECS}


def rewrite_header(data: bytes, edit) -> bytes:
    """Apply `edit` to the header JSON and fix the checksums, so only validation can object."""
    def as_json(text: str) -> str:
        doc = json.loads(text)
        doc["metadata"].pop("room")
        edit(doc)
        return json.dumps(doc, sort_keys=True, separators=(",", ":"))
    return reseal_header(data, as_json)


def reseal_header(data: bytes, edit) -> bytes:
    """The header's text through `edit`, padded with spaces to its length, checksum resealed."""
    header_len = struct.unpack("<I", data[12:16])[0]
    new = edit(data[32:32 + header_len].decode()).encode()
    assert len(new) <= header_len
    new = new + b" " * (header_len - len(new))
    out = bytearray(data)
    out[32:32 + header_len] = new
    out[28:32] = struct.pack("<I", fmt.crc32(bytes(out[:28]), new))
    return bytes(out)


def rewrite_index(data: bytes, edit) -> bytes:
    """Apply `edit` to the parsed record table and fix the index checksum."""
    trailer = data[-32:]
    offset, length = struct.unpack("<QQ", trailer[:16])
    records, blobs = fmt.parse_index(data[offset:offset + length])
    records = records.copy()
    edit(records)
    index = fmt.pack_index(records, blobs)
    return data[:offset] + index + fmt.pack_trailer(offset, index)


@pytest.mark.parametrize("codec", CODECS)
def test_every_truncation_is_detected(files, codec):
    _, data = files[codec]
    for cut in range(0, len(data), 7):
        with pytest.raises(FormatError):
            kvcodec.decode(data[:cut])


@pytest.mark.slow
@pytest.mark.parametrize("codec", CODECS)
def test_a_flipped_bit_anywhere_is_detected(files, codec):
    _, data = files[codec]
    rnd = random.Random(codec)
    for pos in range(len(data)):  # every byte, one random bit each
        bad = bytearray(data)
        bad[pos] ^= 1 << rnd.randrange(8)
        with pytest.raises(KVCError):
            kvcodec.decode(bytes(bad))


def test_random_bytes_and_other_files_are_not_kvc():
    rnd = random.Random(0)
    for n in (0, 10, 100, 5000):
        with pytest.raises(FormatError):
            kvcodec.decode(bytes(rnd.randrange(256) for _ in range(n)))
    with pytest.raises(FormatError, match="magic"):
        kvcodec.decode(b"PK\x03\x04" + bytes(200))


def test_unknown_major_version_is_rejected_and_minor_accepted(files):
    cache, data = files["raw"]
    major = bytearray(data)
    major[8:10] = struct.pack("<H", 2)
    with pytest.raises(FormatError, match="major version 2"):
        kvcodec.decode(bytes(major))
    minor = bytearray(data)
    minor[10:12] = struct.pack("<H", 7)
    minor[28:32] = struct.pack("<I", fmt.crc32(bytes(minor[:28]), bytes(minor[32:32 + struct.unpack("<I", data[12:16])[0]])))
    assert kvcodec.decode(bytes(minor)).equal(cache)


def test_unknown_header_members_are_ignored(files):
    cache, data = files["raw"]
    doc = json.loads(data[32:32 + struct.unpack("<I", data[12:16])[0]])
    doc["future_field"] = 1
    # re-encode with a longer header: build a new file from the parts
    header = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    hdr = fmt.Header.from_bytes(header)
    assert hdr.layers == fmt.Header.from_bytes(data[32:32 + struct.unpack("<I", data[12:16])[0]]).layers


@pytest.mark.parametrize("edit, message", [
    (lambda d: [d["layers"][0][t].update(tokens=2**31 - 1, heads=65536, head_dim=65536) for t in ("key", "value")],
     "disagree"),
    (lambda d: d["layers"][0]["value"].update(tokens=10**12), "tokens"),
    (lambda d: d["layers"][0]["key"].update(dtype="int8"), "dtype"),
    (lambda d: d.update(layers=[]), "layers"),
    (lambda d: d.update(layers=[0] * 4097), "layers"),
    (lambda d: d["codecs"][0].update(id=0), "codec"),
    (lambda d: d.update(metadata={"a": 1}), "metadata"),
    (lambda d: d.update(token_ids={"batch": 1, "tokens": 10**9}), "token ids|container"),
    (lambda d: d["layers"][0].update(positions={"rows": 99}), "positions"),
    (lambda d: d["layers"][0].update(positions={"rows": 1, "encoding": "zip"}), "encoding"),
    (lambda d: d["layers"][0].update(positions={"rows": 1, "encoding": "int64"}), "container blobs"),
    (lambda d: d.update(length=5), "length is smaller"),
    (lambda d: d.update(length=-1), "length must be"),
    (lambda d: d.update(length=1.5), "length must be"),
    (lambda d: d.update(selection={"id": 16, "name": "h2o"}), "selection is malformed"),
])
def test_hostile_header_values_are_refused(files, edit, message):
    _, data = files["raw"]
    with pytest.raises(FormatError, match=message):
        kvcodec.decode(rewrite_header(data, edit))


def test_header_length_beyond_file_or_bound(files):
    _, data = files["raw"]
    for length in (2**31, fmt.MAX_HEADER + 1, len(data)):
        bad = bytearray(data)
        bad[12:16] = struct.pack("<I", length)
        with pytest.raises(FormatError):
            kvcodec.decode(bytes(bad))


@pytest.mark.parametrize("field, value, message", [
    ("tokens", 2**32 - 1, "tile"),
    ("length", 2**63, "outside"),
    ("offset", 2**40, "outside"),
    ("offset", 65, "aligned"),
    ("layer", 7, "layer"),
    ("tensor", 9, "tensor"),
    ("codec_slot", 3, "slot"),
    ("codec_id", 99, "codec id"),
    ("heads", 10**6, "disagree"),
])
def test_hostile_index_values_are_refused(files, field, value, message):
    _, data = files["raw"]

    def edit(records):
        records[field][0] = value

    with pytest.raises(FormatError, match=message):
        kvcodec.decode(rewrite_index(data, edit))


def test_index_counts_claiming_huge_tables(files):
    _, data = files["raw"]
    offset, length = struct.unpack("<QQ", data[-32:-16])
    index = bytearray(data[offset:offset + length])
    index[4:8] = struct.pack("<I", 2**32 - 1)
    with pytest.raises(FormatError, match="counts"):
        kvcodec.decode(data[:offset] + bytes(index) + fmt.pack_trailer(offset, bytes(index)))


@pytest.mark.parametrize("codec", ["zstd", "shuffle-zstd", "quant", "raw"])
def test_codec_payload_inconsistent_with_shape(files, codec):
    """A record whose shape claims more than its payload can hold fails before allocating."""
    cache, data = files[codec]

    def grow(doc):
        for name in ("key", "value"):
            doc["layers"][0][name]["head_dim"] = 65536

    def edit(records):
        records["head_dim"][records["layer"] == 0] = 65536

    bad = rewrite_index(rewrite_header(data, grow), edit)
    with pytest.raises((CodecError, FormatError), match="bytes|small"):
        kvcodec.decode(bad)


def test_unknown_codec_id_names_the_codec(files):
    _, data = files["raw"]

    def header(doc):
        doc["codecs"][0].update(id=4242, name="fancy")

    def index(records):
        records["codec_id"][:] = 4242

    reader = kvcodec.open(rewrite_index(rewrite_header(data, header), index))
    with pytest.raises(CodecError, match="4242.*fancy.*not installed"):
        reader.read(0)


def test_a_file_still_being_written_is_reported(files):
    _, data = files["raw"]
    with pytest.raises(FormatError, match="truncated or still being written"):
        kvcodec.decode(data[:-40] + bytes(40))


def test_checksum_errors_name_the_damage(files):
    _, data = files["raw"]
    reader = kvcodec.open(data)
    rec = reader.record_infos()[1]
    bad = bytearray(data)
    bad[rec.offset] ^= 0xFF
    with pytest.raises(ChecksumError, match=f"layer {rec.layer} {rec.tensor}"):
        kvcodec.open(bytes(bad)).read(rec.layer)


def test_lazy_reader_still_reads_undamaged_layers(files):
    cache, data = files["raw"]
    reader = kvcodec.open(data)
    rec = [r for r in reader.record_infos() if r.layer == 1][0]
    bad = bytearray(data)
    bad[rec.offset] ^= 1
    damaged = kvcodec.open(bytes(bad))
    assert torch.equal(damaged.read(0)[0], cache.layers[0].key)
    with pytest.raises(ChecksumError):
        damaged.read(1)


@pytest.mark.parametrize("codec", CODECS)
def test_a_record_claiming_a_huge_tensor_is_refused_before_allocation(codec):
    """Header and index agree on an enormous layer backed by a tiny payload: refused up front."""
    cache = synthetic_cache(layers=1, tokens=20, head_dim=8)
    cache.metadata["room"] = "x" * 100
    data = kvcodec.encode(cache, codec, chunk_tokens=64)  # one record per tensor
    huge = dict(tokens=2**31 - 1, heads=65536, head_dim=65536)

    def header(doc):
        for t in ("key", "value"):
            doc["layers"][0][t].update(huge)

    def index(records):
        for k, v in huge.items():
            records[k][:] = v

    with pytest.raises(FormatError, match="claims .* bytes from a"):
        kvcodec.decode(rewrite_index(rewrite_header(data, header), index))


def rewrite_header_text(data: bytes, edit) -> bytes:
    """Apply `edit` to the header's raw text (for what json.dumps would never write)."""
    return reseal_header(data, lambda text: edit(text.replace('"room":"' + "x" * 10000 + '"', '"room":""')))


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.replace('"layout":"legacy"', '"layout":"legacy","layout":"hf"'), "member 'layout' twice"),
    (lambda t: t.replace('"room":""', '"room":"","room":"again"'), "member 'room' twice"),
    (lambda t: t.replace('"chunk_tokens":8', '"chunk_tokens":NaN'), "NaN"),
    (lambda t: t.replace('"chunk_tokens":8', '"chunk_tokens":Infinity'), "Infinity"),
    (lambda t: t.replace('"chunk_tokens":8', '"chunk_tokens":-Infinity'), "Infinity"),
    (lambda t: t.replace('"chunk_tokens":8', '"chunk_tokens":1e999'), "beyond float range"),
    (lambda t: t.replace('"chunk_tokens":8', '"chunk_tokens":' + "9" * 5000), "more than 20 digits"),
    (lambda t: t.replace('"room":""', '"room":"\\ud800"'), "lone surrogate"),
    (lambda t: t.replace('"room":""', '"\\udfff":""'), "lone surrogate"),
])
def test_the_header_json_dialect_is_strict(files, edit, message):
    """RFC 8259 only: duplicate members, NaN and infinities, numbers no float holds, integers of
    thousands of digits and lone surrogates are refused, each with a FormatError (spec 3.2)."""
    _, data = files["raw"]
    with pytest.raises(FormatError, match=message):
        kvcodec.open(rewrite_header_text(data, edit))


def test_a_lone_surrogate_in_metadata_is_refused_before_writing(tmp_path):
    cache = synthetic_cache(layers=1, tokens=4)
    cache.metadata["bad"] = "\ud800"
    with pytest.raises(kvcodec.InputError, match="lone surrogate"):
        kvcodec.pack(cache, tmp_path / "x.kvc")
    assert not list(tmp_path.iterdir())
