"""Golden vectors: the library and an independent spec-only decoder decode them to the stored
tensors, and re-encoding the stored inputs reproduces the files byte for byte."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import zstandard

import kvcodec
from kvcodec import cachefiles

from reference_decoder import parse_tables, parse_tables2, read_kvc, read_positions

VECTORS = Path(__file__).parent.parent / "format_spec" / "vectors"
MANIFEST = json.loads((VECTORS / "manifest.json").read_text())
NAMES = sorted(k for k in MANIFEST if not k.startswith("_"))


def expected_cache(name):
    path = VECTORS / f"{name}.expected.safetensors"
    return cachefiles.load_cache(path if path.exists() else VECTORS / f"{name}.input.safetensors")


def test_there_is_a_vector_for_every_builtin_codec():
    assert {MANIFEST[n]["codec"] for n in NAMES} >= {"raw", "zstd", "shuffle-zstd", "quant", "cachegen", "ae", "kvtc"}
    cachegen = [read_kvc((VECTORS / f"{n}.kvc").read_bytes()) for n in NAMES if MANIFEST[n]["codec"] == "cachegen"]
    assert any(len(v["header"]["codecs"]) > 1 for v in cachegen)  # per-chunk presets
    blobs = {lanes: [blob for v in cachegen for (owner, _), blob in v["blobs"].items() if owner != 0xFFFF
                     and v["header"]["codecs"][owner]["config"].get("lanes", 1) == lanes] for lanes in (1, 2)}
    tables = [parse_tables(blob) for blob in blobs[1]]
    assert any(any(t[5]) for sets in tables for t in sets.values())  # an anchored channel, lane format 1
    shared = [parse_tables2(blob) for blob in blobs[2]]
    assert any(min(t[6]) != 0xFFFF for sets in shared for t in sets.values())  # and lane format 2
    assert any(len(t[7]) > 1 for sets in shared for t in sets.values())  # channels choosing among shared tables
    assert {MANIFEST[n]["config"].get("bits") for n in NAMES if MANIFEST[n]["codec"] == "quant"} == {2, 3, 4, 8}
    pruned = read_kvc((VECTORS / "raw-f16-pruned.kvc").read_bytes())
    rows = [blob for (owner, ordinal), blob in pruned["blobs"].items() if owner == 0xFFFF and ordinal > 0]
    second_row = [blob[5 + 12 * int.from_bytes(blob[1:5], "little")] for blob in rows]  # row 0 holds runs
    assert {blob[0] for blob in rows} == {0} and set(second_row) == {1}  # both position forms
    assert pruned["header"]["length"] == 420
    sliding = read_kvc((VECTORS / "zstd-f16-sliding.kvc").read_bytes())
    assert [lay.get("window") for lay in sliding["header"]["layers"]] == [8, None, 8]
    assert (VECTORS / "zstd-f16-sliding.kvc").read_bytes()[10] == 2  # minor 2, for the windows
    files = {n: read_kvc((VECTORS / f"{n}.kvc").read_bytes()) for n in NAMES if MANIFEST[n]["codec"] == "cachegen"}
    framed = {n: blob[:4] == (0x184D2A5B).to_bytes(4, "little") for n, v in files.items()
              for (owner, _), blob in v["blobs"].items()
              if owner != 0xFFFF and v["header"]["codecs"][owner]["config"].get("lanes", 1) == 1}
    assert {"legacy" in MANIFEST[n] for n, f in framed.items() if not f} == {True} and any(framed.values())


def close(got: torch.Tensor, want: torch.Tensor) -> bool:
    """ae's reconstruction is not bit-exact across matrix-product implementations (spec 8.6): equal
    to float32 rounding and one rounding of the output dtype."""
    tolerance = 4 * torch.finfo(want.dtype).eps * float(want.float().abs().max()) + 1e-6
    return got.shape == want.shape and float((got.float() - want.float()).abs().max()) <= tolerance


@pytest.mark.parametrize("name", NAMES)
def test_library_decodes_vector(name):
    data = (VECTORS / f"{name}.kvc").read_bytes()
    got, want = kvcodec.decode(data), expected_cache(name)
    if MANIFEST[name]["codec"] == "ae":
        assert all(close(a, b) for x, y in zip(got.layers, want.layers) for a, b in ((x.key, y.key), (x.value, y.value)))
    else:
        assert got.equal(want)
    assert got.metadata == want.metadata
    assert got.length == want.length and got.selection == want.selection
    for a, b in zip(got.layers, want.layers):
        assert (a.positions is None and b.positions is None) or torch.equal(a.positions, b.positions)
        assert a.window == b.window
    assert (got.token_ids is None and want.token_ids is None) or torch.equal(got.token_ids, want.token_ids)


@pytest.mark.parametrize("name", NAMES)
def test_spec_only_decoder_agrees(name):
    decoded = read_kvc((VECTORS / f"{name}.kvc").read_bytes())
    want = expected_cache(name)
    for i, lay in enumerate(want.layers):
        for t, tensor in (("key", lay.key), ("value", lay.value)):
            bits = tensor.contiguous().view(torch.int16 if tensor.element_size() == 2 else torch.int32)
            mine = decoded[(i, t)].view(bits.numpy().dtype)
            if MANIFEST[name]["codec"] == "ae":
                assert close(torch.from_numpy(mine.copy()).view(tensor.dtype), tensor), (i, t)
            else:
                assert np.array_equal(mine, bits.numpy()), (i, t)
        if lay.positions is not None:
            spec = decoded["header"]["layers"][i]["positions"]
            stored = read_positions(decoded["blobs"][(0xFFFF, 1 + i)], spec["rows"], spec.get("encoding", "int64"))
            assert stored == lay.positions.tolist()
        assert decoded["header"]["layers"][i].get("window") == lay.window


@pytest.mark.parametrize("name", NAMES)
def test_reencoding_is_byte_identical(name):
    entry = MANIFEST[name]
    if "legacy" in entry:
        pytest.skip(f"written by an earlier writer: {entry['legacy']}")
    if entry["codec"] == "ae":
        pytest.skip("ae's encoder runs a network: its latents are fixed by the file, not by the input's bytes")
    if entry["codec"] != "raw" and entry["codec"] != "quant" and list(zstandard.ZSTD_VERSION) != MANIFEST["_zstd_library"]:
        pytest.skip(f"zstd output is fixed per library version; vectors were made with {MANIFEST['_zstd_library']}")
    cache = cachefiles.load_cache(VECTORS / f"{name}.input.safetensors")
    options = dict(entry["config"])
    if entry["codec"] == "kvtc":  # its profile beside it
        options["profile"] = str(VECTORS / f"{name}.profile.safetensors")
    data = kvcodec.encode(cache, entry["codec"], chunk_tokens=entry["chunk_tokens"], **options)
    assert data == (VECTORS / f"{name}.kvc").read_bytes()
