"""Caches at the edges: layers without tokens, caches pruned to nothing, one-token caches, and
`kvc verify --against` on them and on pruned files."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

import kvcodec
from kvcodec.tools.cli import cli

from conftest import synthetic_cache

EMPTY_LAYER = synthetic_cache(layers=3, tokens=20, token_counts=[20, 0, 7])


@pytest.mark.parametrize("codec,options", [("cachegen", {}), ("cachegen", {"sinks": 0, "group_size": 3}),
                                           ("knorm+cachegen", {"keep": 0.5}), ("quant", {"max_error": 0.05}),
                                           ("cachegen", {"max_error": 0.2}), ("zstd", {})],
                         ids=lambda v: str(v))
def test_layers_without_tokens_round_trip(codec, options):
    back = kvcodec.decode(kvcodec.encode(EMPTY_LAYER, codec, chunk_tokens=8, **options))
    assert [lay.key.shape[2] for lay in back.layers] == [10 if "knorm" in codec else 20, 0, 4 if "knorm" in codec else 7]
    assert back.layers[1].key.shape == EMPTY_LAYER.layers[1].key.shape


def test_a_positive_budget_keeps_at_least_one_token():
    one = synthetic_cache(layers=2, tokens=1)
    for spec, options in (("streamingllm", {"keep": 0.5}), ("knorm", {"keep": 0.25}), ("lacache", {"cache_size": 0.3})):
        pruned = kvcodec.decode(kvcodec.encode(one, spec, **options))
        assert all(lay.key.shape[2] == 1 for lay in pruned.layers), spec


def test_verify_against_handles_empty_layers_and_pruned_files(tmp_path):
    cache = EMPTY_LAYER
    torch.save([(lay.key, lay.value) for lay in cache.layers], tmp_path / "c.pt")
    runner = CliRunner()
    for codec, opts, lossless in (("zstd", [], True), ("quant", [], False), ("knorm+raw", ["--opt", "keep=0.5"], True),
                                  ("streamingllm", ["--opt", "keep=0.4"], True)):
        out = tmp_path / f"{codec}.kvc"
        packed = runner.invoke(cli, ["pack", str(tmp_path / "c.pt"), "-c", codec, *opts, "-o", str(out), "-q"])
        assert packed.exit_code == 0, packed.output
        result = runner.invoke(cli, ["verify", str(out), "--against", str(tmp_path / "c.pt")])
        assert result.exit_code == 0, (codec, result.output)
        assert ("identical to the original" in result.output) == lossless, (codec, result.output)


def test_verify_against_fails_on_a_value_the_original_did_not_have(tmp_path):
    """A lossless codec that differs, and a decoded infinity where the original is finite."""
    cache = synthetic_cache(layers=1, tokens=8)
    torch.save([(lay.key, lay.value) for lay in cache.layers], tmp_path / "c.pt")
    other = synthetic_cache(layers=1, tokens=8, seed=5)
    other.layers[0].value[0, 0, 3, 1] = float("inf")
    kvcodec.pack(other, tmp_path / "x.kvc", "raw")
    result = CliRunner().invoke(cli, ["verify", str(tmp_path / "x.kvc"), "--against", str(tmp_path / "c.pt")])
    assert result.exit_code == 1 and "non-finite values decoded where the original is finite: layer 0 V" in result.output


@pytest.mark.parametrize("codec", ["cachegen", "quant"])
def test_lossy_codecs_say_what_is_wrong_with_nan_or_infinity(codec):
    cache = synthetic_cache(layers=2, tokens=12)
    cache.layers[1].value[0, 1, 5, 3] = float("nan")
    with pytest.raises(kvcodec.CodecError, match="layer 1 value holds NaN"):
        kvcodec.encode(cache, codec)


def test_a_failed_write_is_one_clear_error_and_leaves_nothing(tmp_path, monkeypatch):
    """A full disk under torch.save (a RuntimeError from torch) or under the .kvc writer (an
    OSError) is an InputError naming the output; no file or temporary is left."""
    import errno

    cache = synthetic_cache(layers=1, tokens=4)
    kvcodec.pack(cache, tmp_path / "c.kvc")

    def full(*args, **kwargs):
        raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")

    monkeypatch.setattr(torch, "save", full)
    out = CliRunner().invoke(cli, ["unpack", str(tmp_path / "c.kvc"), "-o", str(tmp_path / "x.pt")])
    assert out.exit_code == 1 and "cannot write" in out.output and "x.pt" in out.output
    monkeypatch.undo()

    def no_space(self, *args):
        raise OSError(errno.ENOSPC, "No space left on device")

    from kvcodec.container.writer import KVCWriter
    monkeypatch.setattr(KVCWriter, "_write", no_space)
    with pytest.raises(kvcodec.InputError, match="cannot write .*y.kvc: No space left on device"):
        kvcodec.pack(cache, tmp_path / "y.kvc")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.kvc"]


@pytest.mark.parametrize("dtype", [[], {}, 1, None])
def test_a_header_dtype_of_another_json_type_is_a_format_error(dtype):
    import json

    from kvcodec.container import format as fmt
    from kvcodec.errors import FormatError

    tensor = {"batch": 1, "heads": 1, "tokens": 2, "head_dim": 4, "dtype": dtype}
    header = {"layers": [{"key": tensor, "value": dict(tensor, dtype="float16")}], "codecs": [{"id": 1, "name": "raw",
              "config": {}}], "chunk_tokens": 8, "layout": "legacy", "metadata": {}}
    with pytest.raises(FormatError, match="dtype must be one of"):
        fmt.Header.from_bytes(json.dumps(header).encode())
