"""Regenerate the must-reject vectors in invalid/: each breaks exactly one rule of kvc-v1.md, and
its name starts with that rule's section (and check). Every decoder must refuse every one: the
library, the spec-only reference decoder and the GPU kernels (tests/test_invalid_vectors.py).

    python format_spec/vectors/make_invalid.py
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import zstandard
import torch

import kvcodec
from kvcodec.container import format as fmt
from kvcodec.container.chunking import cut
from kvcodec.encoding.engine import Encoding, write_cache

HERE = Path(__file__).parent / "invalid"
ROOM = "." * 256  # metadata an edit may take the place of, so headers keep their length


def small_cache() -> kvcodec.KVCache:
    g = torch.Generator().manual_seed(7)
    layers = [kvcodec.LayerKV(torch.randn(1, 2, 12, 8, generator=g).half(), torch.randn(1, 2, 12, 8, generator=g).half())
              for _ in range(2)]
    return kvcodec.KVCache(layers, metadata={"vector": "invalid", "room": ROOM})


def encoded(codec: str, **options) -> bytes:
    return kvcodec.encode(small_cache(), codec, chunk_tokens=8, **options)


def header_of(data: bytes) -> tuple[int, bytes]:
    n = struct.unpack_from("<I", data, 12)[0]
    return n, data[32:32 + n]


def with_header_text(data: bytes, edit) -> bytes:
    """The header's text edited (padded with spaces to its length), its checksum resealed."""
    n, text = header_of(data)
    new = edit(text.decode().replace(f'"room":"{ROOM}"', '"room":""')).encode()
    assert len(new) <= n, "the edit must not lengthen the header"
    new += b" " * (n - len(new))
    out = bytearray(data[:32] + new + data[32 + n:])
    out[28:32] = struct.pack("<I", zlib.crc32(new, zlib.crc32(bytes(out[:28]))))
    return bytes(out)


def index_of(data: bytes):
    offset, length = struct.unpack_from("<QQ", data, len(data) - 32)
    records, blobs = fmt.parse_index(data[offset:offset + length])
    return offset, records.copy(), blobs.copy()


def with_index(data: bytes, edit) -> bytes:
    """The index edited (records and blobs as numpy tables), its checksum resealed."""
    offset, records, blobs = index_of(data)
    records, blobs = edit(records, blobs) or (records, blobs)
    index = fmt.pack_index(records, blobs)
    return data[:offset] + index + fmt.pack_trailer(offset, index)


def with_bytes(data: bytes, table: str, i: int, content: bytes) -> bytes:
    """Entry `i` of the index's `table` ("records" or "blobs") given other bytes of the same
    length, its crc resealed."""
    _, records, blobs = index_of(data)
    entries = records if table == "records" else blobs
    at, n = int(entries["offset"][i]), int(entries["length"][i])
    assert len(content) == n
    data = data[:at] + content + data[at + n:]

    def edit(r, b):
        (r if table == "records" else b)["crc32"][i] = zlib.crc32(content)
    return with_index(data, edit)


def with_payload(data: bytes, record: int, payload: bytes) -> bytes:
    """Record `record`'s payload replaced by one of the same length, its crc resealed."""
    return with_bytes(data, "records", record, payload)


def with_blob(data: bytes, blob: int, content: bytes) -> bytes:
    """Blob `blob` replaced by bytes of the same length, its crc resealed."""
    return with_bytes(data, "blobs", blob, content)


def reseal_preamble(out: bytearray) -> bytes:
    n = struct.unpack_from("<I", out, 12)[0]
    out[28:32] = struct.pack("<I", zlib.crc32(bytes(out[32:32 + n]), zlib.crc32(bytes(out[:28]))))
    return bytes(out)


class ExtraBlob(Encoding):
    """raw with a context blob it does not take."""

    @classmethod
    def make(cls, chunks):
        return cls([kvcodec.get_codec("raw")], [[b"unasked"]], [()])  # past load_context, which refuses it


class TwoFrames(Encoding):
    """zstd payloads followed by a second frame."""

    def payload(self, info, chunk):
        slot, data = super().payload(info, chunk)
        return slot, data + data


class PaddedLane(Encoding):
    """cachegen (no sinks) with a zero word appended to every payload's first lane (lane format 1:
    32-bit words, one lane per channel and per anchored channel; format 2: 16-bit words, one lane
    per channel)."""

    def payload(self, info, chunk):
        slot, data = super().payload(info, chunk)
        codec, tt = self.codecs[0], self.contexts[0].for_chunk(info, "cachegen")
        word = 4 if codec.lanes == 1 else 2
        lanes = info.shape[0] * (tt.heads * tt.head_dim + (int(tt.anchored.sum()) if codec.lanes == 1 else 0))
        counts = np.frombuffer(data, "<u4", lanes).copy()
        first = word * int(counts[0])
        counts[0] += 1
        words = data[4 * lanes:]
        return slot, counts.tobytes() + words[:first] + bytes(word) + words[first:]


class UnevenWeights(Encoding):
    """cachegen (lane format 2) whose tables blob has its last weight one too large (sealed by a
    valid zstd frame), payloads coded with the right tables."""

    @classmethod
    def make(cls, chunks):
        codec = kvcodec.get_codec("cachegen")
        good = codec.fit(chunks)[0]
        content = bytearray(zstandard.ZstdDecompressor().decompress(good))
        content[-2:] = struct.pack("<H", struct.unpack_from("<H", content, len(content) - 2)[0] + 1)
        bad = zstandard.ZstdCompressor(level=19, write_checksum=True, write_content_size=True).compress(bytes(content))
        return cls([codec], [[bad]], [codec.load_context([good])])


class HugeSets(Encoding):
    """cachegen (lane format 2) whose tables blob claims tensor sets of 2**31 heads of 2**31
    channels (H·D wraps a 64-bit product) and nothing else."""

    @classmethod
    def make(cls, chunks):
        codec = kvcodec.get_codec("cachegen")
        bad = zstandard.ZstdCompressor(write_checksum=True, write_content_size=True).compress(
            struct.pack("<I", 2) + struct.pack("<5I", 1 << 31, 1 << 31, 1, 0, 1) * 4)
        return cls([codec], [[bad]], [codec.load_context(codec.fit(chunks))])


def written(encoding_cls, codec) -> bytes:
    import io

    cache = small_cache()
    chunks = cut(cache, 8)
    encoding = encoding_cls.make(chunks) if hasattr(encoding_cls, "make") else encoding_cls.fitted(chunks, codec)
    buf = io.BytesIO()
    write_cache(cache, buf, encoding, 8)
    return buf.getvalue()


def vectors() -> dict[str, bytes]:
    raw, quant = encoded("raw"), encoded("quant", bits=4)
    out = {}
    out["4.1-too-short"] = raw[:127]
    out["4.1-bad-magic"] = b"\x89KVD" + raw[4:]
    major = bytearray(raw)
    major[8:10] = struct.pack("<H", 2)
    out["4.1-major-version-2"] = reseal_preamble(major)
    flags = bytearray(raw)
    flags[16:20] = struct.pack("<I", 1)
    out["4.1-flags-set"] = reseal_preamble(flags)
    long = bytearray(raw)
    long[12:16] = struct.pack("<I", len(raw))
    out["4.1-header-beyond-the-file"] = bytes(long)
    crc = bytearray(raw)
    crc[40] ^= 1
    out["4.1-header-checksum"] = bytes(crc)
    out["3.2-duplicate-member"] = with_header_text(raw, lambda t: t.replace('"layout":"legacy"', '"layout":"legacy","layout":"hf"'))
    out["3.2-nan"] = with_header_text(raw, lambda t: t.replace('"chunk_tokens":8', '"chunk_tokens":NaN'))
    out["3.2-long-integer"] = with_header_text(raw, lambda t: t.replace('"vector":"invalid"', '"vector":"invalid","n":' + "9" * 30))
    out["3.2-lone-surrogate"] = with_header_text(raw, lambda t: t.replace('"vector":"invalid"', '"vector":"\\ud800"'))
    out["3.2-no-layers"] = with_header_text(raw, lambda t: t[:t.index('"layers":')] + '"layers":[],' +
                                            t[t.index('"layout"'):])
    out["3.2-tokens-out-of-range"] = with_header_text(raw, lambda t: t.replace('"tokens":12', '"tokens":-12', 1))
    out["3.2-window-zero"] = with_header_text(raw, lambda t: t.replace('"positions":null', '"positions":null,"window":0', 1))
    out["4.2-no-end-magic"] = raw[:-8] + b"KVC1END?"
    index = bytearray(raw)
    index[-40] ^= 1  # inside the index (the trailer is the last 32 bytes)
    out["4.2-index-checksum"] = bytes(index)

    def misalign(r, b):
        r["offset"][1] += 8
    out["4.3-record-not-aligned"] = with_index(raw, misalign)

    def wrong_id(r, b):
        r["codec_id"][0] = 4
    out["4.3-codec-id-disagrees"] = with_index(raw, wrong_id)

    def wrong_heads(r, b):
        r["heads"][0] = 3
    out["4.3-shape-disagrees"] = with_index(raw, wrong_heads)

    def empty(r, b):
        r["length"][0] = 0
        r["crc32"][0] = 0
    out["4.3-empty-payload"] = with_index(raw, empty)

    def gap(r, b):
        r["token_start"][1] = 9
        r["tokens"][1] = 3
    out["4.4-records-leave-a-gap"] = with_index(raw, gap)

    def duplicate(r, b):
        r["token_start"][1] = 0
    out["4.4-two-records-share-a-start"] = with_index(raw, duplicate)

    def overlap(r, b):
        r["offset"][1] = r["offset"][0]
        r["crc32"][1] = r["crc32"][0]
    out["4.6-payloads-overlap"] = with_index(raw, overlap)
    bad = bytearray(raw)
    _, records, _ = index_of(raw)
    bad[int(records["offset"][2]) + 3] ^= 0x40
    out["4.7-payload-checksum"] = bytes(bad)

    def claims_more(r, b):  # a quant record claiming 64x its elements from its bytes
        r["batch"][0] = 1024
    out["4-expansion-beyond-bound"] = with_index(with_header_text(quant, lambda t: t.replace(
        '"key":{"batch":1', '"key":{"batch":1024', 1).replace('"value":{"batch":1', '"value":{"batch":1024', 1)),
        claims_more)
    out["8-unknown-config-member"] = with_header_text(raw, lambda t: t.replace('"config":{}', '"config":{"x":1}'))
    out["8-missing-config-member"] = with_header_text(encoded("zstd"), lambda t: t.replace('{"level":3}', '{}'))
    out["8.2-zstd-level-out-of-range"] = with_header_text(encoded("zstd"), lambda t: t.replace('"level":3', '"level":99'))
    out["8.1-raw-takes-no-blobs"] = written(ExtraBlob, None)
    def shorter(r, b):
        r["length"][0] -= 2
        at = int(r["offset"][0])
        r["crc32"][0] = zlib.crc32(raw[at:at + int(r["length"][0])])
    out["8.1-raw-wrong-length"] = with_index(raw, shorter)
    out["8.2-zstd-two-frames"] = written(TwoFrames, kvcodec.get_codec("zstd"))
    out["8.4-quant-bits-out-of-range"] = with_header_text(quant, lambda t: t.replace('"bits":4', '"bits":5'))
    cachegen = encoded("cachegen", lanes=1)
    _, _, blobs = index_of(cachegen)
    assert int(blobs["owner"][0]) == 0  # the tables
    at = int(blobs["offset"][0])
    tables = bytearray(cachegen[at:at + int(blobs["length"][0])])
    tables[12:16] = struct.pack("<I", struct.unpack_from("<I", tables, 12)[0] + 1)  # the first frame's length
    out["8.5-cachegen-tables-directory-disagrees"] = with_blob(cachegen, 0, bytes(tables))
    out["9-lane-not-canonical"] = written(PaddedLane, kvcodec.get_codec("cachegen", sinks=0, lanes=1))
    out["10-weights-do-not-sum"] = written(UnevenWeights, None)
    out["8.5-cachegen-tensor-set-too-large"] = written(HugeSets, None)
    out["10-lane-does-not-end"] = written(PaddedLane, kvcodec.get_codec("cachegen", sinks=0))
    return out


def main() -> None:
    HERE.mkdir(exist_ok=True)
    for old in HERE.glob("*.kvc"):
        old.unlink()
    made = vectors()
    for name, data in made.items():
        (HERE / f"{name}.kvc").write_bytes(data)
    (HERE / "README.md").write_text(
        "Must-reject vectors: every decoder refuses each file. A name starts with the rule it breaks\n"
        "(kvc-v1.md section, and check for section 4); `make_invalid.py` in the folder above makes them.\n")
    print(f"wrote {len(made)} vectors to {HERE}")


if __name__ == "__main__":
    main()
