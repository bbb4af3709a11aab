"""Input layouts on disk: detection, conversion both ways, and refusal of unsafe or odd files."""

from __future__ import annotations

import pytest
import torch

from kvcodec import cachefiles
from kvcodec.errors import InputError

from conftest import synthetic_cache


@pytest.mark.parametrize("layout", ["legacy", "dict", "stacked", "cachegen"])
def test_pt_layouts_roundtrip_and_are_detected(tmp_path, layout):
    cache = synthetic_cache(heads=3, tokens=12)
    path = tmp_path / "c.pt"
    cachefiles.save_cache(cache, path, layout=layout)
    heads = 3 if layout == "cachegen" else None
    back = cachefiles.load_cache(path, heads=heads)
    assert back.layout == layout and back.equal(cache)


def test_dict_layout_keeps_positions_ids_and_metadata(tmp_path):
    cache = synthetic_cache(positions=True, token_ids=True)
    cachefiles.save_cache(cache, tmp_path / "c.pt", layout="dict")
    back = cachefiles.load_cache(tmp_path / "c.pt")
    assert back.metadata == cache.metadata and torch.equal(back.token_ids, cache.token_ids)
    assert torch.equal(back.layers[0].positions, cache.layers[0].positions)
    assert cachefiles.load_cache(tmp_path / "c.pt").layout == "dict"
    torch.save({"key_cache": [l.key for l in cache.layers], "value_cache": [l.value for l in cache.layers]},
               tmp_path / "hf.pt")
    assert cachefiles.load_cache(tmp_path / "hf.pt").equal(cache)


def test_safetensors_roundtrip_with_metadata(tmp_path):
    cache = synthetic_cache(positions=True, token_ids=True, dtype=torch.bfloat16)
    cachefiles.save_cache(cache, tmp_path / "c.safetensors")
    back = cachefiles.load_cache(tmp_path / "c.safetensors")
    assert back.equal(cache) and back.metadata == cache.metadata and back.layout == "safetensors"
    assert torch.equal(back.token_ids, cache.token_ids)


def test_pickled_objects_are_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"keys": [Evil()], "values": []}, tmp_path / "evil.pt")
    with pytest.raises(InputError, match="pickled"):
        cachefiles.load_cache(tmp_path / "evil.pt")


@pytest.mark.parametrize("obj, message", [
    ((torch.zeros(2, 3, 4, 5), torch.zeros(2, 3, 4, 5)), "--layout"),
    (torch.zeros(3, 2, 4, 5), "--layout"),
    ({"foo": 1}, "keys"),
    ([], "--layout"),
])
def test_ambiguous_or_unknown_structures_ask_for_layout(tmp_path, obj, message):
    torch.save(obj, tmp_path / "x.pt")
    with pytest.raises(InputError, match=message):
        cachefiles.load_cache(tmp_path / "x.pt")


def test_explicit_layout_and_cachegen_heads(tmp_path):
    k = torch.randn(2, 7, 12)
    torch.save((k, k.clone()), tmp_path / "cg.pt")
    with pytest.raises(InputError, match="--heads"):
        cachefiles.load_cache(tmp_path / "cg.pt")
    with pytest.raises(InputError, match="split into 5 heads"):
        cachefiles.load_cache(tmp_path / "cg.pt", heads=5)
    cache = cachefiles.load_cache(tmp_path / "cg.pt", heads=3)
    assert cache.layers[1].key.shape == (1, 3, 7, 4)
    assert torch.equal(cache.layers[1].key[0, 2, 5], k[1, 5, 8:12])
    with pytest.raises(InputError, match="stacked"):
        cachefiles.load_cache(tmp_path / "cg.pt", layout="stacked")


@pytest.mark.parametrize("bad, message", [
    ([(torch.zeros(1, 2, 3), torch.zeros(1, 2, 3))], "--layout"),
    ([(torch.zeros(1, 2, 3, 4, dtype=torch.int32), torch.zeros(1, 2, 3, 4, dtype=torch.int32))], "dtype int32"),
    ([(torch.zeros(1, 2, 3, 4), torch.zeros(1, 3, 3, 4))], "differ"),
])
def test_wrong_shapes_and_dtypes(tmp_path, bad, message):
    torch.save(bad, tmp_path / "x.pt")
    with pytest.raises(InputError, match=message):
        cachefiles.load_cache(tmp_path / "x.pt")


def test_unreadable_inputs(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        cachefiles.load_cache(tmp_path / "missing.pt")
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(InputError, match="extension"):
        cachefiles.load_cache(tmp_path / "x.txt")
    (tmp_path / "junk.pt").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(InputError, match="is not a PyTorch file .torch.save output. or is damaged"):
        cachefiles.load_cache(tmp_path / "junk.pt")
    (tmp_path / "junk.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(InputError, match="safetensors"):
        cachefiles.load_cache(tmp_path / "junk.safetensors")


def test_layouts_that_cannot_hold_a_cache_say_so(tmp_path):
    cache = synthetic_cache(layers=2, token_counts=[5, 3])
    with pytest.raises(InputError, match="one shape"):
        cachefiles.save_cache(cache, tmp_path / "x.pt", layout="stacked")
    assert not (tmp_path / "x.pt").exists()
