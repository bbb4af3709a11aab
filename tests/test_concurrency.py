"""One reader shared by many threads (as a serving stack shares them) returns what one thread
alone would, from every kind of source, and builds each codec's context once."""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import kvcodec

from conftest import synthetic_cache

THREADS, READS = 8, 60


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    cache = synthetic_cache(layers=6, heads=2, tokens=300, head_dim=32)
    path = tmp_path_factory.mktemp("shared") / "c.kvc"
    kvcodec.pack(cache, path, "zstd", chunk_tokens=32)
    return path, kvcodec.decode(path.read_bytes())


@pytest.mark.parametrize("kind", ["path", "file object", "bytes"])
def test_concurrent_reads_of_one_reader_agree_with_one_thread(packed, kind):
    path, want = packed
    data = path.read_bytes()
    src = {"path": path, "file object": io.BytesIO(data), "bytes": data}[kind]
    with kvcodec.open(src) as reader:
        def work(seed: int):
            g = torch.Generator().manual_seed(seed)
            for _ in range(READS):
                layer = int(torch.randint(0, 6, (1,), generator=g))
                start = int(torch.randint(0, 300, (1,), generator=g))
                k, v = reader.read(layer, tokens=slice(start, start + 40))
                assert torch.equal(k, want.layers[layer].key[:, :, start:start + 40])
                assert torch.equal(v, want.layers[layer].value[:, :, start:start + 40])
            return True

        with ThreadPoolExecutor(THREADS) as pool:
            assert all(pool.map(work, range(THREADS)))


def test_a_context_is_built_once_under_concurrency(packed, monkeypatch):
    path, _ = packed
    data = kvcodec.encode(synthetic_cache(layers=4, tokens=64), "cachegen", chunk_tokens=16)
    calls = []
    codec_class = kvcodec.codec_class("cachegen")
    original = codec_class.load_context
    monkeypatch.setattr(codec_class, "load_context", lambda self, blobs: calls.append(1) or original(self, blobs))
    with kvcodec.open(data) as reader, ThreadPoolExecutor(THREADS) as pool:
        list(pool.map(lambda i: reader.read(i % 4), range(4 * THREADS)))
    assert len(calls) == 1
