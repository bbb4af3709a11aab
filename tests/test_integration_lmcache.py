"""kvcodec as LMCache's remote storage (`kvcodec.integrations.lmcache`), tested with the real
LMCache 0.5.6 in an environment of its own (`tests/stacks.py`): a standalone LMCacheEngine on
the CPU stores a 600-token cache, a second engine with an empty local tier finds and retrieves
it through the plugin, from a folder and from a real Redis server."""

from __future__ import annotations

from pathlib import Path

import pytest

import kvcodec
from kvcodec.storage.store import FolderBackend

from conftest import running_redis
from stacks import run_script, stack_python

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def lmcache_python():
    return stack_python("lmcache")


@pytest.fixture(scope="module")
def redis_url():
    for client, _ in running_redis():
        yield f"redis://127.0.0.1:{client.connection_pool.connection_kwargs['port']}/0", client


def engine_run(python, url, codec="zstd", options="{}", damage=None):
    results, log = run_script(python, "lmcache_engine.py", url, codec, options, *([damage] if damage else []))
    return results[0], log


def test_lossless_entries_in_a_folder_are_found_and_retrieved_bit_exact(lmcache_python, tmp_path):
    folder = tmp_path / "tier"
    got, _ = engine_run(lmcache_python, str(folder))
    assert got["lookup"] == 600 and got["retrieved"] == 600 and got["exact"]
    assert len(got["keys"]) == 3 and all(k.startswith("kvcodec-test@") for k in got["keys"])
    entries = sorted(Path(folder).glob("*.kvc"))
    assert len(entries) == 3
    for path in entries:  # ordinary .kvc files, readable by kvcodec itself
        with kvcodec.open(path) as reader:
            reader.verify()
            assert reader.info()["codecs"][0]["name"] == "zstd"
            assert reader.num_layers == 4
    assert sorted(FolderBackend(folder).keys()) == got["keys"]
    assert max(got["entry_bytes"]) < got["raw_chunk_bytes"]  # zstd packs bf16 a little


def test_entries_in_redis_are_found_and_retrieved_bit_exact(lmcache_python, redis_url):
    url, client = redis_url
    got, _ = engine_run(lmcache_python, url)
    assert got["lookup"] == 600 and got["retrieved"] == 600 and got["exact"]
    stored = sorted(k.decode() for k in client.keys("kvc:lmcache:*"))
    assert stored == sorted("kvc:lmcache:" + k for k in got["keys"])
    assert kvcodec.decode(client.get(stored[0])).num_layers == 4


def test_a_lossy_codec_retrieves_within_its_error_bound(lmcache_python, tmp_path):
    got, _ = engine_run(lmcache_python, str(tmp_path / "q"), "quant", '{"bits": 8}')
    assert got["retrieved"] == 600 and not got["exact"]
    assert 0 < got["max_error"] <= 0.01 * got["scale"]  # 8-bit groups: under 1 % of the largest value
    assert max(got["entry_bytes"]) < 0.65 * got["raw_chunk_bytes"]


@pytest.mark.parametrize("damage, why", [("corrupt", "does not decode"), ("foreign", "names another key")])
def test_a_damaged_entry_is_a_logged_miss_and_the_prefix_before_it_still_loads(lmcache_python, tmp_path, damage, why):
    got, log = engine_run(lmcache_python, str(tmp_path / damage), damage=damage)
    assert got["retrieved"] == 256 and got["exact"]  # the first chunk; recompute from the damaged one on
    assert why in log and "treated as a miss" in log
    assert len(got["keys_after"]) == 2  # the refused entry is deleted, so the chunk is stored again


def test_a_misconfigured_plugin_is_reported_in_one_line_and_stores_nothing(lmcache_python, tmp_path):
    results, log = run_script(lmcache_python, "lmcache_config_error.py", str(tmp_path / "never"))
    assert results[0] == {"remote_tier": False}
    assert "kvcodec LMCache plugin: unknown codec 'nosuchcodec'" in log
    assert not list((tmp_path / "never").glob("*.kvc"))


@pytest.mark.parametrize("codec, options", [("zstd", "{}"), ("quant", '{"bits": 8}')])
def test_the_serde_for_lmcache_multiprocess_storage_round_trips_through_lmcache_s_registry(lmcache_python, codec,
                                                                                           options):
    (got,), _ = run_script(lmcache_python, "lmcache_serde.py", codec, options)
    assert got["registered"] and got["stored_ok"] and got["loaded_ok"]
    assert got["frame"] == "KVCS" and got["entry_codec"] == codec
    assert got["stored_bytes"] < got["raw_bytes"] < got["capacity"]  # LMCache keeps only what was written
    if codec == "zstd":
        assert got["exact"]
    else:
        assert got["stored_bytes"] < got["raw_bytes"] / 1.6 and got["max_error"] <= 0.01 * got["scale"]
    # another key's object, a flipped bit, a cut or a forged frame: a failed load, never data
    assert not (got["other_key_ok"] or got["flipped_ok"] or got["truncated_ok"] or got["garbage_ok"])
