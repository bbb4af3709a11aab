"""The `kvc` command line: happy paths, and one clear line with a non-zero exit for bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from click.testing import CliRunner

import kvcodec
from kvcodec import cachefiles
from kvcodec.tools.cli import cli

from conftest import synthetic_cache


@pytest.fixture
def cache_pt(tmp_path):
    cache = synthetic_cache(layers=3, tokens=40, dtype=torch.bfloat16)
    path = tmp_path / "cache.pt"
    cachefiles.save_cache(cache, path, layout="legacy")
    return cache, path


def run(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    return result.exit_code, result.output


def assert_clean_error(code, output, pattern):
    assert code == 1, (code, output)
    assert "Traceback" not in output
    lines = [l for l in output.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("kvc: error:"), output
    assert pattern in lines[0], output


@pytest.mark.parametrize("codec, opts", [("raw", []), ("zstd", ["--opt", "level=9"]), ("quant", ["--opt", "bits=8"])])
def test_pack_inspect_verify_unpack(tmp_path, cache_pt, codec, opts):
    cache, path = cache_pt
    code, out = run("pack", path, "-c", codec, *opts, "--chunk-tokens", 16)
    assert code == 0, out
    kvc = tmp_path / "cache.kvc"
    assert kvc.exists()
    code, out = run("inspect", kvc, "--json")
    info = json.loads(out)
    assert code == 0 and info["codecs"][0]["name"] == codec and len(info["layers"]) == 3
    assert info["layers"][0]["key"]["chunks"] == 3
    code, out = run("inspect", kvc)
    assert code == 0 and codec in out and "layer" in out
    code, out = run("verify", kvc, "--against", path)
    assert code == 0 and ("identical" in out if codec != "quant" else "lossy" in out), out
    code, out = run("unpack", kvc, "-o", tmp_path / "back.pt")
    assert code == 0, out
    back = cachefiles.load_cache(tmp_path / "back.pt")
    assert back.layout == "legacy"
    if codec != "quant":
        assert back.equal(cache)


def test_unpack_defaults_to_the_original_layout(tmp_path):
    cache = synthetic_cache()
    cachefiles.save_cache(cache, tmp_path / "c.safetensors")
    assert run("pack", tmp_path / "c.safetensors", "-c", "shuffle-zstd")[0] == 0
    assert_clean_error(*run("unpack", tmp_path / "c.kvc"), "exists")
    (tmp_path / "c.safetensors").unlink()
    code, out = run("unpack", tmp_path / "c.kvc")
    assert code == 0 and cachefiles.load_cache(tmp_path / "c.safetensors").equal(cache)
    code, out = run("unpack", tmp_path / "c.kvc", "-o", tmp_path / "d.pt", "--layout", "stacked")
    assert code == 0 and cachefiles.load_cache(tmp_path / "d.pt").layout == "stacked"


def test_verify_fails_when_a_lossless_file_differs_from_the_original(tmp_path, cache_pt):
    cache, path = cache_pt
    run("pack", path)
    cache.layers[1].value[0, 0, 0, 0] += 1
    cachefiles.save_cache(cache, tmp_path / "other.pt", layout="legacy")
    code, out = run("verify", tmp_path / "cache.kvc", "--against", tmp_path / "other.pt")
    assert code != 0 and "did not reproduce" in out


def test_existing_output_is_refused_without_force(tmp_path, cache_pt):
    _, path = cache_pt
    assert run("pack", path)[0] == 0
    before = (tmp_path / "cache.kvc").read_bytes()
    assert_clean_error(*run("pack", path, "-c", "zstd"), "exists")
    assert (tmp_path / "cache.kvc").read_bytes() == before
    assert run("pack", path, "-c", "zstd", "--force")[0] == 0
    assert (tmp_path / "cache.kvc").read_bytes() != before


@pytest.mark.parametrize("args, pattern", [
    (["pack", "{d}/missing.pt"], "no such file"),
    (["pack", "{d}/notes.txt"], "extension"),
    (["pack", "{d}/evil.pt"], "pickled"),
    (["pack", "{d}/badshape.pt"], "--layout"),
    (["pack", "{d}/cache.pt", "-c", "nope"], "unknown codec 'nope'"),
    (["pack", "{d}/cache.pt", "-c", "quant", "--opt", "bits=5"], "bits"),
    (["pack", "{d}/cache.pt", "-c", "quant", "--opt", "colour=red"], "no option 'colour'"),
    (["pack", "{d}/cache.pt", "--opt", "noequals"], "KEY=VALUE"),
    (["unpack", "{d}/random.kvc"], "random.kvc: not a .kvc file"),
    (["unpack", "{d}/truncated.kvc"], "truncated"),
    (["inspect", "{d}/empty.kvc"], "empty.kvc: file is too short"),
    (["verify", "{d}/flipped.kvc"], "flipped.kvc: record of layer"),
    (["inspect", "--check", "{d}/flipped.kvc"], "corrupt"),
    (["pack", "{d}"], "is a directory. (kvc pack --help)"),  # click's own checks: one line and exit 1 too
    (["pack", "{d}/cache.pt", "--target-ratio", "0.5"], "0.5 is not in the range"),
    (["pack", "{d}/cache.pt", "--chunk-tokens", "0"], "0 is not in the range"),
    (["frobnicate"], "No such command 'frobnicate'. (kvc --help)"),
    (["pack", "http://127.0.0.1:9/cache.pt"], "caches are loaded from local files"),
    (["unpack", "{d}/flipped.kvc", "-o", "{d}/out.pt"], "corrupt"),
])
def test_bad_input_gives_one_clear_line(tmp_path, cache_pt, args, pattern):
    _, path = cache_pt
    d = tmp_path
    (d / "notes.txt").write_text("hi")
    _save_evil(d / "evil.pt")
    torch.save((torch.zeros(2, 3, 4, 5), torch.zeros(2, 3, 4, 5)), d / "badshape.pt")
    (d / "random.kvc").write_bytes(os.urandom(4096))
    good = kvcodec.encode(cachefiles.load_cache(path), "zstd")
    (d / "truncated.kvc").write_bytes(good[: len(good) // 2])
    (d / "empty.kvc").write_bytes(b"")
    flipped = bytearray(good)
    flipped[len(good) // 2] ^= 0x10
    (d / "flipped.kvc").write_bytes(bytes(flipped))
    before = set(os.listdir(d))
    assert_clean_error(*run(*[a.format(d=d) for a in args]), pattern)
    assert set(os.listdir(d)) == before  # no output, partial or temporary, left behind


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def _save_evil(path):
    torch.save({"keys": [_Evil()], "values": []}, path)


def test_codecs_lists_builtins():
    code, out = run("codecs", "--json")
    rows = {r["name"]: r for r in json.loads(out)["codecs"]}
    assert code == 0 and {"raw", "zstd", "shuffle-zstd", "quant"} <= set(rows)
    assert rows["quant"]["id"] == 4 and rows["quant"]["lossless"] is False
    assert rows["quant"]["defaults"] == {"bits": 4, "group_size": 64}


def test_console_script_exits_nonzero_without_traceback(tmp_path):
    """The installed `kvc` entry point, as a user's shell runs it."""
    (tmp_path / "x.kvc").write_bytes(b"\x89KVC\r\n\x1a\n" + bytes(100))
    proc = subprocess.run([sys.executable, "-m", "kvcodec.tools.cli", "unpack", str(tmp_path / "x.kvc")],
                          capture_output=True, text=True)
    assert proc.returncode == 1 and proc.stderr.startswith("kvc: error:") and "Traceback" not in proc.stderr
    assert proc.stdout == "" and len(proc.stderr.strip().splitlines()) == 1


def fresh_python(code: str) -> subprocess.CompletedProcess:
    """`code` run in a new interpreter, where nothing is imported yet."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True)


def test_help_imports_neither_torch_nor_the_codecs():
    """`kvc --help` and every `kvc COMMAND --help` answer without importing torch, transformers or
    kvcodec's codecs: they take a fraction of a second, not the seconds torch takes to load."""
    proc = fresh_python('''
        import sys
        from kvcodec.tools.cli import cli
        for args in [["--help"], ["--version"]] + [[name, "--help"] for name in cli.commands]:
            try:
                cli.main(args, prog_name="kvc")
            except SystemExit as exc:
                assert exc.code == 0, (args, exc.code)
        loaded = sorted(m for m in ("torch", "transformers", "numpy", "kvcodec.codecs", "kvcodec.api")
                        if m in sys.modules)
        print("LOADED", loaded, file=sys.stderr)
    ''')
    assert proc.returncode == 0, proc.stderr
    assert "Usage: kvc eval [OPTIONS] [FILE]" in proc.stdout and "[default: 1536; x>=1]" in proc.stdout
    assert "LOADED []" in proc.stderr, proc.stderr


def test_the_package_imports_its_names_on_first_use():
    """`import kvcodec` loads nothing heavy; every exported name resolves, and dir() lists them."""
    proc = fresh_python('''
        import sys
        import kvcodec
        assert "torch" not in sys.modules and "kvcodec.api" not in sys.modules
        assert set(kvcodec.__all__) <= set(dir(kvcodec)) and len(set(kvcodec.__all__)) == len(kvcodec.__all__)
        assert kvcodec.CodecError is kvcodec.errors.CodecError and "torch" not in sys.modules
        for name in kvcodec.__all__:
            getattr(kvcodec, name)
        try:
            kvcodec.no_such_name
        except AttributeError as exc:
            assert "no_such_name" in str(exc)
        else:
            raise AssertionError("no AttributeError")
    ''')
    assert proc.returncode == 0, proc.stderr
    star = {}
    exec("from kvcodec import *", star)
    assert set(kvcodec.__all__) <= set(star) and star["pack"] is kvcodec.api.pack


def test_the_registries_find_the_builtins_whatever_is_imported_first():
    """Nothing need import `kvcodec.codecs` or `kvcodec.selection` before a lookup: the registries
    import their built-ins on first use."""
    proc = fresh_python('''
        from kvcodec.registry import available_selectors, codec_class, selector_class
        assert codec_class("cachegen").codec_id == 5 and codec_class(1).name == "raw"
        assert selector_class("h2o").codec_id == 16 and len(available_selectors()) >= 7
    ''')
    assert proc.returncode == 0, proc.stderr
    proc = fresh_python('''
        from kvcodec.encoding import pipeline
        pipe = pipeline.checked("h2o+quant", {"keep": 0.5, "bits": 8})
        assert pipe.selector.name == "h2o" and (pipe.codec, pipe.options) == ("quant", {"bits": 8})
    ''')
    assert proc.returncode == 0, proc.stderr


PLUGIN = textwrap.dedent('''
    import torch
    from kvcodec import Codec
    from kvcodec.codecs import RawCodec

    class XorCodec(Codec):
        """Raw bytes XOR a key kept in the file's shared context (exercises blobs)."""
        codec_id = 5000
        name = "xor-test"
        lossless = True
        max_expansion = 1.0

        def __init__(self, key: int = 90):
            self.key = key

        def fit(self, chunks):
            return [bytes([self.key])]

        def encode(self, chunk, info, context):
            raw = RawCodec().encode(chunk, info, context)
            return bytes(b ^ context[0][0] for b in raw)

        def decode(self, payload, info, context):
            return RawCodec().decode(bytes(b ^ context[0][0] for b in payload), info, context)
''')


@pytest.mark.slow
def test_third_party_codec_registers_through_entry_points(tmp_path, cache_pt):
    cache, path = cache_pt
    site = tmp_path / "site"
    dist = site / "kvc_test_plugin-1.0.dist-info"
    dist.mkdir(parents=True)
    (site / "kvc_test_plugin.py").write_text(PLUGIN)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: kvc-test-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(
        "[kvcodec.codecs]\nxor = kvc_test_plugin:XorCodec\nbroken = kvc_test_plugin:NoSuchClass\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]))

    def kvc(*args):
        return subprocess.run([sys.executable, "-m", "kvcodec.tools.cli", *map(str, args)],
                              capture_output=True, text=True, env=env)

    listed = kvc("codecs", "--json")
    assert listed.returncode == 0, listed.stderr
    assert {"id": 5000, "name": "xor-test"}.items() <= {k: v for r in json.loads(listed.stdout)["codecs"]
                                                        for k, v in r.items() if r["name"] == "xor-test"}.items()
    packed = kvc("pack", path, "-c", "xor-test", "--opt", "key=7", "-o", tmp_path / "x.kvc")
    assert packed.returncode == 0, packed.stderr
    assert kvc("verify", tmp_path / "x.kvc", "--against", path).returncode == 0
    # a broken plugin does not take the others down, and is named when its codec is asked for
    missing = kvc("pack", path, "-c", "broken", "-o", tmp_path / "y.kvc")
    assert missing.returncode == 1 and "'broken'" in missing.stderr and "failed to load" in missing.stderr
    # without the plugin, the file still opens and names the missing codec
    with pytest.raises(kvcodec.CodecError, match="5000.*xor-test.*not installed"):
        kvcodec.open(tmp_path / "x.kvc").read(0)


def test_pack_to_a_target_ratio_or_error(tmp_path, cache_pt):
    cache, path = cache_pt
    code, out = run("pack", path, "-c", "quant", "--target-ratio", 1.6, "--chunk-tokens", 16, "-o", tmp_path / "r.kvc")
    assert code == 0, out
    assert cache.nbytes / os.path.getsize(tmp_path / "r.kvc") >= 1.6
    code, out = run("inspect", tmp_path / "r.kvc")
    assert code == 0 and "[0] quant" in out and "[1] quant" in out, out
    code, out = run("pack", path, "-c", "quant", "--max-error", 0.05, "-o", tmp_path / "e.kvc")
    assert code == 0, out
    for args, pattern in ((["--target-ratio", 3, "--max-error", 0.1], "not both"),
                          (["--target-ratio", 99], "cannot reach ratio 99"),
                          (["--target-ratio", 3, "--opt", "bits=4"], "chosen per chunk")):
        code, out = run("pack", path, "-c", "quant", *args, "-o", tmp_path / "x.kvc")
        assert_clean_error(code, out, pattern)
        assert not (tmp_path / "x.kvc").exists()
    code, out = run("pack", path, "-c", "raw", "--target-ratio", 2, "-o", tmp_path / "x.kvc")
    assert_clean_error(code, out, "no presets")


def test_inspect_folds_long_header_strings_and_never_reads_them_as_markup(tmp_path):
    """A header may hold 16 MiB of metadata: the table view shows each string folded (the full
    text is in --json) and prints markup-like text as it is."""
    cache = synthetic_cache(layers=1, tokens=4)
    cache.metadata.update({"big": "x" * 1_000_000, "markup": "[bold]boom[/] [/unclosed]"})
    cache.metadata.update({f"z{i:02d}": "v" for i in range(40)})  # sorted after the others
    kvcodec.pack(cache, tmp_path / "m.kvc", "raw")
    runner = CliRunner()
    out = runner.invoke(cli, ["inspect", str(tmp_path / "m.kvc")])
    assert out.exit_code == 0, out.output
    assert "(999884 more characters)" in out.output and len(out.output) < 10_000
    flat = out.output.replace("\n", "")  # the console wraps long lines
    assert "[bold]boom[/] [/unclosed]" in flat and "more (--json shows all)" in flat
    full = runner.invoke(cli, ["inspect", "--json", str(tmp_path / "m.kvc")])
    assert json.loads(full.output)["metadata"]["big"] == "x" * 1_000_000


def test_inspect_accounts_for_every_byte_and_counts_chunks_as_the_header(tmp_path):
    cache = synthetic_cache(layers=2, tokens=300, dtype=torch.float16)
    cachefiles.save_cache(cache, tmp_path / "c.pt")
    assert run("pack", tmp_path / "c.pt", "-c", "cachegen", "--chunk-tokens", "128", "-q")[0] == 0
    code, out = run("inspect", tmp_path / "c.kvc", "--json")
    info = json.loads(out)
    in_layers = sum(lay[t]["bytes"] for lay in info["layers"] for t in ("key", "value"))
    assert info["shared_bytes"] > 0
    assert in_layers + info["shared_bytes"] + info["container_blob_bytes"] + info["overhead_bytes"] == info["file_bytes"]
    code, out = run("inspect", tmp_path / "c.kvc")
    rows = [line for line in out.splitlines() if line.strip().startswith(("0 ", "1 "))]
    assert len(rows) == 2 and all(row.split()[-1] == "3" for row in rows)  # 300 tokens in chunks of 128
    assert "of tables shared by the layers" in out and "payload checksums not read" in out
    assert not any(line != line.rstrip() for line in out.splitlines())  # no padding when piped


def test_verify_reports_errors_per_layer_as_json(tmp_path, cache_pt):
    cache, path = cache_pt
    assert run("pack", path, "-c", "quant", "-o", tmp_path / "q.kvc", "-q")[0] == 0
    code, out = run("verify", tmp_path / "q.kvc", "--against", path, "--json")
    assert code == 0
    doc = json.loads(out)
    assert doc["checksums_ok"] and not doc["lossless"] and len(doc["per_layer"]) == cache.num_layers
    assert all(0 < e[t]["relative_error"] < 0.2 and not e[t]["exact"] for e in doc["per_layer"] for t in ("key", "value"))
    assert doc["largest_error"] == max(e[t]["max_abs_error"] for e in doc["per_layer"] for t in ("key", "value"))
