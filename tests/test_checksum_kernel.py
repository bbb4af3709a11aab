"""The GPU's payload checksum (`kvcodec.kernels.checksum`) against zlib's crc32, and a GPU-style
read that verifies its payloads with it. Without a GPU the kernel runs in Triton's interpreter."""

from __future__ import annotations

import zlib

import numpy as np
import pytest
import torch

pytest.importorskip("triton")

import kvcodec  # noqa: E402
from kvcodec.codecs import device as dev  # noqa: E402
from kvcodec.container import device_read  # noqa: E402
from kvcodec.errors import ChecksumError  # noqa: E402
from kvcodec.kernels import checksum  # noqa: E402

from conftest import synthetic_cache  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def staged_payloads(lengths, seed=0):
    """Random payloads laid out as staging lays them (64-byte aligned), and their job table."""
    rng = np.random.default_rng(seed)
    offsets = np.cumsum([0] + [-(-n // 64) * 64 for n in lengths])
    data = rng.integers(0, 256, int(offsets[-1]) + 64, dtype=np.uint8)
    table = np.zeros((len(lengths), dev.COLUMNS), dtype=np.int64)
    table[:, dev.SRC], table[:, dev.LENGTH] = offsets[:-1], lengths
    crcs = np.array([zlib.crc32(data[o:o + n]) for o, n in zip(offsets, lengths)], dtype=np.uint32)
    return torch.from_numpy(data).to(DEVICE), table, crcs


def test_the_kernel_computes_zlibs_crc32():
    lengths = [4, 5, 7, 63, 64, 65, 128, 129, 1000, 4100]
    data, table, crcs = staged_payloads(lengths)
    assert checksum.crc32s(data, table).cpu().numpy().view(np.uint32).tolist() == crcs.tolist()


def test_long_payloads_use_the_high_powers():
    """Past 1024 segments an advance takes a power from the second table."""
    data, table, crcs = staged_payloads([1024 * 64 + 130, 70])
    assert (checksum.crc32s(data, table).cpu().numpy().view(np.uint32) != crcs).tolist() == [False, False]
    data[5] ^= 0x10  # the first segment: advanced the farthest
    assert (checksum.crc32s(data, table).cpu().numpy().view(np.uint32) != crcs).tolist() == [True, False]


def test_short_payloads_are_refused():
    data, table, _ = staged_payloads([3, 100])
    with pytest.raises(ValueError):
        checksum.crc32s(data, table)


def test_advancing_a_crc_is_crc32_combine():
    """The host-side powers: advancing crc32(a) over len(b) bytes, XOR crc32(b), is crc32(a + b)."""
    rng = np.random.default_rng(1)
    for n in (1, 4, 64, 200, 64 * 1024 + 3):
        a, b = rng.bytes(37), rng.bytes(n)
        power = checksum._x_to_the_power_of_two(3)  # x^8: one byte
        advance = checksum._powers(power, n + 1)[n]
        moved = int(checksum._mulmod_np(np.array([advance]), np.array([zlib.crc32(a)]))[0])
        assert moved ^ zlib.crc32(b) == zlib.crc32(a + b)


def one_element_layers_cache():
    """Layers of 1 head x 1 token x head_dim 1: raw payloads of 2 bytes, under the GPU's minimum."""
    cache = synthetic_cache(layers=1, heads=2, tokens=20, head_dim=16, dtype=torch.float16)
    cache.layers.append(kvcodec.LayerKV(torch.ones(1, 1, 1, 1, dtype=torch.float16),
                                        torch.full((1, 1, 1, 1), 2.0, dtype=torch.float16)))
    return cache


@pytest.mark.parametrize("codec", ["raw", "quant"])
def test_reads_verified_on_the_device_decode_and_refuse_corruption(monkeypatch, codec):
    monkeypatch.setattr(device_read, "checksums_on_device", lambda device: True)
    cache = one_element_layers_cache() if codec == "raw" else synthetic_cache(layers=1, heads=2, tokens=20, head_dim=16)
    data = kvcodec.encode(cache, codec, chunk_tokens=16)
    got = kvcodec.decode(data, device=DEVICE, decoder="kernels")
    want = kvcodec.decode(data, decoder="cpu")
    for g, w in zip(got.layers, want.layers):
        assert torch.equal(g.key.cpu(), w.key) and torch.equal(g.value.cpu(), w.value)
    reader = kvcodec.open(data)
    for i in (0, len(reader.records) - 1):  # a long payload, and (raw) a 2-byte one checked on the host
        r = reader.records[i]
        bad = bytearray(data)
        bad[int(r["offset"]) + int(r["length"]) - 1] ^= 0x40
        with pytest.raises(ChecksumError, match="checksum mismatch"):
            kvcodec.decode(bytes(bad), device=DEVICE, decoder="kernels")


def test_staging_fills_pinned_buffers_straight_from_the_file(tmp_path, monkeypatch):
    """A file opened by path is read into the staging buffer by positional reads, in pieces on
    threads; the bytes equal the file's and a file cut short is a FormatError."""
    from kvcodec.container.source import ByteSource
    from kvcodec.errors import FormatError

    monkeypatch.setattr(device_read, "READ_PIECE", 1000)
    data = np.random.default_rng(2).integers(0, 256, 10_000, dtype=np.uint8).tobytes()
    path = tmp_path / "bytes.bin"
    path.write_bytes(data)
    for src in (str(path), data, open(path, "rb")):
        source = ByteSource(src)
        host = np.zeros(8000, dtype=np.uint8)
        device_read.fill(source, host, [(10, 0, 3500), (6000, 3500, 4000)])
        assert host[:3500].tobytes() == data[10:3510] and host[3500:7500].tobytes() == data[6000:]
        with pytest.raises(FormatError):
            source.read_into(9000, memoryview(host)[:2000])


def test_reads_from_a_path_decode_as_from_bytes(tmp_path, monkeypatch):
    monkeypatch.setattr(device_read, "READ_PIECE", 256)  # many pieces, on several threads
    cache = synthetic_cache(layers=2, heads=2, tokens=40, head_dim=16)
    data = kvcodec.encode(cache, "quant", chunk_tokens=16, bits=4)
    path = tmp_path / "c.kvc"
    path.write_bytes(data)
    got = kvcodec.unpack(str(path), device=DEVICE, decoder="kernels")
    want = kvcodec.decode(data, decoder="cpu")
    for g, w in zip(got.layers, want.layers):
        assert torch.equal(g.key.cpu(), w.key) and torch.equal(g.value.cpu(), w.value)
