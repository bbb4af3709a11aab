"""Caches in key-value stores: content keys, chunk bytes, and a prefix store over a real
Redis-protocol server started here (redis-server when installed, else fakeredis's TCP server)."""

from __future__ import annotations

import logging
import os
import shutil

import pytest
import torch

import kvcodec
from kvcodec.errors import InputError
from kvcodec.storage import store as store_module
from kvcodec.storage.store import cache_slice

from conftest import running_redis, synthetic_cache

CHUNK = 32


@pytest.fixture(scope="module")
def redis_client():
    for client, kind in running_redis():
        client.server_kind = kind
        yield client


def test_the_redis_tests_use_a_real_server_where_one_is_installed(redis_client):
    info = redis_client.info("server")
    if shutil.which("redis-server"):
        assert redis_client.server_kind == "redis-server" and info["redis_version"].count(".") == 2
        assert "redis_build_id" in info and info.get("executable", "").endswith("redis-server")


def prompt_cache(ids: list[int], seed=0) -> kvcodec.KVCache:
    """A cache whose every token's vectors depend on all ids before it, as a model's do."""
    cache = synthetic_cache(layers=3, heads=2, tokens=len(ids), head_dim=16, seed=seed)
    prefix = torch.cumsum(torch.tensor(ids, dtype=torch.float32), 0) % 97 / 97
    for lay in cache.layers:
        lay.key = (lay.key.float() * 0 + prefix[None, None, :, None]).half()
        lay.value = (lay.value.float() * 0 + prefix[None, None, :, None] * 2).half()
    cache.token_ids = torch.tensor([ids])
    return cache


def test_content_keys_depend_on_everything_that_makes_a_chunk():
    base = kvcodec.content_key("smollm2", [1, 2, 3], "quant", {"bits": 4}, 0)
    assert base == kvcodec.content_key("smollm2", [1, 2, 3], "quant", {"bits": 4}, 0)  # stable
    others = [kvcodec.content_key("llama", [1, 2, 3], "quant", {"bits": 4}, 0),
              kvcodec.content_key("smollm2", [1, 2, 4], "quant", {"bits": 4}, 0),
              kvcodec.content_key("smollm2", [1, 2, 3], "quant", {"bits": 2}, 0),
              kvcodec.content_key("smollm2", [1, 2, 3], "cachegen", {"bits": 4}, 0),
              kvcodec.content_key("smollm2", [1, 2, 3], "quant", {"bits": 4}, 1)]
    assert len({base, *others}) == 6 and len(base) == 64
    with pytest.raises(InputError, match="starts inside"):
        kvcodec.content_key("m", [1, 2], "raw", {}, 2)


def test_a_chunk_encodes_to_bytes_and_back():
    cache = synthetic_cache(tokens=50)
    data = kvcodec.encode_chunk(cache, 10, 30, "zstd")
    back = kvcodec.decode(data)
    assert back.layers[1].key.equal(cache.layers[1].key[:, :, 10:30])
    with pytest.raises(InputError, match="token range inside"):
        kvcodec.encode_chunk(cache, 30, 60)


def test_prefix_store_in_redis_deduplicates_and_restores_prefixes(redis_client):
    redis_client.flushdb()
    store = kvcodec.PrefixStore(kvcodec.RedisBackend(redis_client), "smollm2", "zstd", chunk_tokens=CHUNK)
    a = list(range(100))  # chunks [0,32) [32,64) [64,96) [96,100)
    b = a[:70] + [999] * 30  # shares two whole chunks with a, then differs
    assert store.put(prompt_cache(a)) == 4
    assert redis_client.dbsize() == 4
    assert store.put(prompt_cache(a)) == 0  # stored once
    assert store.put(prompt_cache(b)) == 2  # [64,96) and [96,100) of b are new
    assert redis_client.dbsize() == 6
    got, n = store.get(b + [5, 6, 7])  # a longer prompt: its whole stored chunks
    assert n == 96
    want = prompt_cache(b)
    assert got.layers[2].key.equal(want.layers[2].key[:, :, :96]) and got.token_ids.tolist() == [b[:96]]
    got, n = store.get(a)  # exactly a stored cache: its short last chunk too
    assert n == 100 and got.layers[0].value.equal(prompt_cache(a).layers[0].value)
    assert store.get([7] + a) == (None, 0)


def test_redis_entries_keep_their_namespace_and_expiry_and_survive_damage(redis_client, caplog):
    """Two stores in one server under different namespaces do not see each other's chunks; a
    `ttl` sets an expiry on every entry; an entry damaged in the server ends the prefix before it
    (a warning, no exception) and a large chunk (1 MiB and more) round-trips."""
    redis_client.flushdb()
    a = list(range(70))
    left = kvcodec.PrefixStore(kvcodec.RedisBackend(redis_client, namespace="left:"), "m", "zstd", chunk_tokens=CHUNK)
    right = kvcodec.PrefixStore(kvcodec.RedisBackend(redis_client, namespace="right:", ttl=60), "m", "zstd",
                                chunk_tokens=CHUNK)
    assert left.put(prompt_cache(a)) == 3
    assert right.get(a) == (None, 0)
    assert right.put(prompt_cache(a)) == 3
    keys = sorted(k.decode() for k in redis_client.keys("*"))
    assert len(keys) == 6 and all(k.startswith(("left:", "right:")) for k in keys)
    assert all(redis_client.ttl(k) > 0 for k in keys if k.startswith("right:"))
    assert all(redis_client.ttl(k) == -1 for k in keys if k.startswith("left:"))
    assert_prefix(left, a, 70)
    (_, _, key), = [c for c in left.chunks(a) if c[0] == 32]  # damage chunk [32, 64) in the server
    data = bytearray(redis_client.get("left:" + key))
    data[len(data) // 2] ^= 0x55
    redis_client.set("left:" + key, bytes(data))
    with caplog.at_level(logging.WARNING, logger=store_module.__name__):
        assert_prefix(left, a, 32)
    assert "[32, 64)" in caplog.text
    assert_prefix(right, a, 70)  # the other namespace is untouched
    big = kvcodec.PrefixStore(kvcodec.RedisBackend(redis_client, namespace="big:"), "m", "raw", chunk_tokens=4096)
    cache = synthetic_cache(layers=2, heads=8, tokens=1000, head_dim=64)
    assert big.put(cache, [list(range(1000))]) == 1
    got, n = big.get(list(range(1000)))
    assert n == 1000 and got.layers[1].value.equal(cache.layers[1].value)
    assert max(redis_client.strlen(k) for k in redis_client.keys("big:*")) > 1 << 20


def test_lossy_prefixes_and_refusals():
    backend = kvcodec.MemoryBackend()
    store = kvcodec.PrefixStore(backend, "m", "quant", chunk_tokens=CHUNK, bits=8)
    ids = list(range(80))
    cache = prompt_cache(ids)
    store.put(cache)
    got, n = store.get(ids[:64])
    assert n == 64
    err = (got.layers[1].key.float() - cache.layers[1].key[:, :, :64].float()).abs().max()
    assert float(err) <= 1 / 255 + 1e-3  # 8-bit groups of values within [0, 1]
    with pytest.raises(InputError, match="not a selection pipeline"):
        kvcodec.PrefixStore(backend, "m", "h2o+quant")
    with pytest.raises(InputError, match="1 sequence\\(s\\) of 80 tokens.*10 given"):
        store.put(cache, ids[:10])
    with pytest.raises(InputError, match="no token ids"):
        store.put(cache_slice(synthetic_cache(), 0, 5))


# -- entries that are not the chunk asked for ------------------------------------------------

A = list(range(100))  # chunks [0,32) [32,64) [64,96) [96,100)


def stored(ids=A, codec="zstd"):
    """A memory store holding the chunks of `prompt_cache(ids)`, and its (start, stop, key)s."""
    backend = kvcodec.MemoryBackend()
    store = kvcodec.PrefixStore(backend, "m", codec, chunk_tokens=CHUNK)
    assert store.put(prompt_cache(ids)) == len(store.chunks(ids))
    return store, backend, store.chunks(ids)


def assert_prefix(store, ids, n):
    """`store.get(ids)` is exactly the first `n` tokens of `prompt_cache(ids)`."""
    got, m = store.get(ids)
    assert m == n
    want = prompt_cache(ids)
    assert got.equal(cache_slice(want, 0, n)) and got.token_ids.tolist() == [ids[:n]]


def forged(cache, start, stop, key, ids):
    """An entry of `cache`'s tokens [start, stop) that claims to be chunk [start, stop) under `key`."""
    part = cache_slice(cache, 0, cache.layers[0].key.shape[2])
    part.token_ids = torch.tensor([ids[start:stop]])
    part.metadata.update({store_module.META_KEY: key, store_module.META_TOKENS: f"{start}:{stop}"})
    return kvcodec.encode(part, "zstd")


def test_stored_prefixes_restore_bit_exactly_from_memory():
    store, _, _ = stored()
    got, n = store.get(A)
    assert n == 100 and got.equal(prompt_cache(A)) and got.token_ids.tolist() == [A]
    assert store_module.META_KEY not in got.metadata and store_module.META_TOKENS not in got.metadata
    assert_prefix(store, A[:64] + [1, 2], 64)


def test_swapped_entries_end_the_prefix_before_the_first(caplog):
    store, backend, chunks = stored()
    (_, _, k1), (_, _, k2) = chunks[1], chunks[2]
    backend.entries[k1], backend.entries[k2] = backend.entries[k2], backend.entries[k1]
    with caplog.at_level(logging.WARNING, logger=store_module.__name__):
        assert_prefix(store, A, 32)
    assert "[32, 64)" in caplog.text and "refused" in caplog.text


def test_an_entry_shorter_than_its_chunk_is_refused():
    store, backend, chunks = stored()
    _, theirs, short = stored(A[:36])  # chunks [0,32) [32,36)
    backend.entries[chunks[1][2]] = theirs.entries[short[1][2]]
    assert_prefix(store, A, 32)  # not 64 (or 100) tokens holding 36 (or 72)
    # claiming the right key, range and token ids, but holding 4 tokens
    backend.entries[chunks[1][2]] = forged(cache_slice(prompt_cache(A), 32, 36), 32, 64, chunks[1][2], A)
    assert len(kvcodec.decode(backend.entries[chunks[1][2]]).token_ids[0]) == 32
    assert_prefix(store, A, 32)


def test_an_entry_of_another_prompt_is_refused():
    store, backend, chunks = stored()
    other = [7] + A[1:]  # every chunk differs from A's: its tokens depend on the first
    _, theirs, their_chunks = stored(other)
    backend.entries[chunks[2][2]] = theirs.entries[their_chunks[2][2]]
    assert_prefix(store, A, 64)
    # the right key and range, another prompt's token ids
    fork = A[:64] + [999] * 36
    backend.entries[chunks[2][2]] = forged(cache_slice(prompt_cache(fork), 64, 96), 64, 96, chunks[2][2], fork)
    assert_prefix(store, A, 64)
    # the right key, range and ids, but layers unlike the prefix's (another model's)
    wide = synthetic_cache(layers=3, heads=4, tokens=32, head_dim=16)
    backend.entries[chunks[2][2]] = forged(wide, 64, 96, chunks[2][2], A)
    assert_prefix(store, A, 64)
    # an entry that does not identify itself (as written before entries did) is not trusted
    backend.entries[chunks[2][2]] = kvcodec.encode_chunk(prompt_cache(A), 64, 96, "zstd")
    assert_prefix(store, A, 64)


@pytest.mark.parametrize("damage", ["flip", "truncate", "garbage"])
def test_a_corrupt_entry_ends_the_prefix_without_raising(damage, caplog):
    store, backend, chunks = stored()
    key = chunks[1][2]
    data = bytearray(backend.entries[key])
    if damage == "flip":
        mid = len(data) // 2
        data[mid:mid + 16] = bytes(b ^ 0xFF for b in data[mid:mid + 16])
    elif damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data = bytearray(b"not a kvc file")
    backend.entries[key] = bytes(data)
    with caplog.at_level(logging.WARNING, logger=store_module.__name__):
        assert_prefix(store, A, 32)
    assert "[32, 64)" in caplog.text
    assert key not in backend.entries  # deleted: storing the prompt again heals the store
    assert store.put(prompt_cache(A)) == 1
    assert_prefix(store, A, 100)
    backend.entries[chunks[0][2]] = b""
    assert store.get(A) == (None, 0)


def test_stored_looks_without_decoding_and_stops_at_a_damaged_or_missing_entry(caplog, monkeypatch):
    store, backend, chunks = stored()
    assert store.stored(A) == store.stored(A, verify=False) == 100
    assert store.stored(A[:64] + [5]) == 64 and store.stored([9] + A) == 0
    monkeypatch.setattr(store_module, "decode", None)  # a look never decodes
    key = chunks[2][2]
    data = bytearray(backend.entries[key])
    data[len(data) // 2] ^= 0x01  # one flipped bit
    backend.entries[key] = bytes(data)
    with caplog.at_level(logging.WARNING, logger=store_module.__name__):
        assert store.stored(A) == 64
    assert "[64, 96)" in caplog.text and "damaged" in caplog.text
    assert key not in backend.entries and store.stored(A, verify=False) == 64  # the damaged entry is gone
    backend.entries[key] = backend.entries[chunks[1][2]]
    assert store.stored(A) == 64  # an intact entry under another chunk's key
    del backend.entries[chunks[0][2]]
    assert store.stored(A) == store.stored(A, verify=False) == 0


@pytest.fixture(params=["memory", "redis", "folder", "fsspec"])
def any_backend(request, tmp_path, redis_client):
    if request.param == "memory":
        return store_module.MemoryBackend()
    if request.param == "fsspec":  # fsspec's in-memory filesystem, as an object store is used
        return store_module.FsspecBackend(f"memory://kvc-tests/{request.node.name}")
    if request.param == "redis":
        return store_module.RedisBackend(redis_client, namespace=f"kvc:{request.node.name}*[]:")
    return store_module.FolderBackend(tmp_path / "entries")


def test_backends_put_get_contains_and_list_keys_alike(any_backend):
    """Every backend stores an entry once (a second put of the key changes nothing), finds it,
    and lists exactly the keys it holds, whatever characters they have."""
    keys = ["plain", "model@1@0@-7c34b0f2e5c056c6@bfloat16", "with/slash and space", "ünïcode%25"]
    assert any_backend.contains(keys) == [False] * 4 and any_backend.get_many(keys) == [None] * 4
    for i, k in enumerate(keys):
        assert any_backend.put(k, bytes([i]) * 10)
    assert not any_backend.put(keys[0], b"other")
    assert any_backend.get_many(keys) == [bytes([i]) * 10 for i in range(4)]
    assert any_backend.contains(keys + ["absent"]) == [True] * 4 + [False]
    assert sorted(any_backend.keys()) == sorted(keys)
    any_backend.delete(keys[1])
    any_backend.delete("absent")
    assert any_backend.contains(keys) == [True, False, True, True] and sorted(any_backend.keys()) == sorted(
        keys[:1] + keys[2:])


def test_folder_backend_writes_whole_files_and_names_every_key_safely(tmp_path):
    backend = store_module.FolderBackend(tmp_path / "a" / "b")  # made if missing
    assert backend.put("k", b"x" * 100)
    assert [p.name for p in (tmp_path / "a" / "b").iterdir()] == ["k.kvc"]  # no temporary left behind
    long, hidden = "k" * 300, ".starts-with-a-dot"
    for key in (long, hidden, "", "#hash"):  # a digest names a long key's file; no key's file is hidden
        assert backend.put(key, key.encode() + b"!") and backend.get_many([key]) == [key.encode() + b"!"]
    assert not any(p.name.startswith(".") for p in (tmp_path / "a" / "b").iterdir())
    assert sorted(backend.keys()) == sorted(["k", hidden, "", "#hash"])  # a digest cannot be read back as a key
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(InputError, match="folder"):
        store_module.FolderBackend(tmp_path / "file")
    (tmp_path / "a" / "b" / "k.kvc").chmod(0)
    if not os.access(tmp_path / "a" / "b" / "k.kvc", os.R_OK):  # (root reads it anyway)
        with pytest.raises(InputError, match="cannot read"):
            backend.get_many(["k"])


def test_backend_for_reads_folders_and_redis_urls(tmp_path, redis_client):
    port = redis_client.connection_pool.connection_kwargs["port"]
    redis_backend = store_module.backend_for(f"redis://127.0.0.1:{port}/0", namespace="kvc:url:")
    assert isinstance(redis_backend, store_module.RedisBackend) and redis_backend.put("a", b"1")
    assert redis_client.get("kvc:url:a") == b"1"
    assert isinstance(store_module.backend_for(str(tmp_path / "x")), store_module.FolderBackend)
    assert store_module.backend_for(f"file://{tmp_path / 'y'}").path == str(tmp_path / "y")
    assert isinstance(store_module.backend_for("memory://tier"), store_module.FsspecBackend)
    with pytest.raises(InputError, match="cannot use nosuch://x as a store"):
        store_module.backend_for("nosuch://x")
    with pytest.raises(InputError, match="another host"):
        store_module.backend_for("file://elsewhere/path")
    with pytest.raises(InputError, match="not a Redis URL"):
        store_module.backend_for("redis://127.0.0.1:notaport/0")
    assert isinstance(store_module.backend_for(str(tmp_path / "cache:v2")), store_module.FolderBackend)


@pytest.fixture
def http_folder(tmp_path):
    """A folder served read-only over HTTP on a free loopback port: (folder, its URL)."""
    import functools
    import http.server
    import threading

    folder = tmp_path / "served"
    folder.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield folder, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_a_folder_served_over_http_restores_prefixes_through_fsspec(http_folder, caplog):
    folder, url = http_folder
    writer = kvcodec.PrefixStore(store_module.FolderBackend(folder), "m", "zstd", chunk_tokens=CHUNK)
    assert writer.put(prompt_cache(A)) == 4
    backend = store_module.backend_for(url)
    assert isinstance(backend, store_module.FsspecBackend)
    reader = kvcodec.PrefixStore(backend, "m", "zstd", chunk_tokens=CHUNK)
    assert reader.stored(A) == 100 and reader.stored([9] + A) == 0
    assert_prefix(reader, A, 100)
    assert_prefix(reader, A[:64] + [7], 64)
    with pytest.raises(InputError, match="cannot store"):  # a plain HTTP server takes no uploads
        backend.put("new", b"x")
    key = reader.chunks(A)[1][2]
    damaged = folder / store_module.entry_name(key)
    damaged.write_bytes(damaged.read_bytes()[:-8])
    with caplog.at_level(logging.WARNING, logger=store_module.__name__):
        assert_prefix(reader, A, 32)  # damaged: refused (and cannot be deleted over HTTP)
    assert "[32, 64)" in caplog.text and "cannot delete" in caplog.text
