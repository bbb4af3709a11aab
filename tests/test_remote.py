"""Ranged reads of `.kvc` files over HTTP from a real server on the loopback address (and
through fsspec): opening costs at most two small requests, reading a layer or a token range
fetches only its records, streamed restores equal whole ones, and bad servers get clear errors."""

from __future__ import annotations

import pytest

import kvcodec
from kvcodec.container import remote
from kvcodec.errors import FormatError, InputError
from kvcodec.storage.serve import FileServer

from conftest import synthetic_cache

LAYERS, TOKENS, CHUNK = 6, 600, 64


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("served")
    cache = synthetic_cache(layers=LAYERS, heads=4, tokens=TOKENS, head_dim=64, token_ids=True)
    kvcodec.pack(cache, root / "c.kvc", "cachegen", chunk_tokens=CHUNK)
    kvcodec.pack(cache, root / "q.kvc", "quant", chunk_tokens=CHUNK)
    with FileServer(root) as server:
        yield server, root, cache


def payload_bytes(reader, layer, tokens=None) -> int:
    lo, hi = reader.token_range(layer, tokens)
    return int(reader.records["length"][reader.plan([(layer, 0, lo, hi), (layer, 1, lo, hi)]).records].sum())


def test_opening_costs_two_small_requests(served):
    server, root, _ = served
    server.log.clear()
    with kvcodec.open(server.url("c.kvc")) as reader:
        assert reader.num_layers == LAYERS
        info = reader.info()
    assert server.log.requests == 2, server.log.entries
    size = (root / "c.kvc").stat().st_size
    assert server.log.bytes_sent < 2 * remote.HEAD_WINDOW + 16384 < size / 4
    assert info["file_bytes"] == size and info["codecs"][0]["name"] == "cachegen"


@pytest.mark.parametrize("name", ["c.kvc", "q.kvc"])
def test_a_layer_or_token_range_fetches_only_its_records(served, name):
    server, root, cache = served
    local = kvcodec.open(root / name)
    with kvcodec.open(server.url(name)) as reader:
        server.log.clear()
        k, v = reader.read(3)
        assert server.log.requests == 1  # the layer's records are adjacent: one request
        need = payload_bytes(reader, 3)
        records = len(reader.plan([(3, 0, 0, TOKENS), (3, 1, 0, TOKENS)]).records)
        assert need <= server.log.bytes_sent <= need + 64 * records
        assert k.equal(local.read(3)[0]) and v.equal(local.read(3)[1])
        server.log.clear()
        k, v = reader.read(5, tokens=slice(130, 200))  # two chunks of each tensor
        need = payload_bytes(reader, 5, slice(130, 200))
        assert server.log.bytes_sent <= need + 64 * 4 + 2 * 65536  # records, padding, gap between key and value
        assert server.log.requests <= 2
        assert k.equal(local.read(5, tokens=slice(130, 200))[0])


def test_streamed_and_whole_restores_equal_the_local_file(served):
    server, root, cache = served
    want = kvcodec.unpack(root / "c.kvc")
    server.log.clear()
    with kvcodec.open(server.url("c.kvc")) as reader:
        layers = list(reader.stream())
    assert [i for i, _ in layers] == list(range(LAYERS))
    for (_, got), ref in zip(layers, want.layers):
        assert got.key.equal(ref.key) and got.value.equal(ref.value)
    size = (root / "c.kvc").stat().st_size
    assert server.log.bytes_sent <= size + 2 * remote.HEAD_WINDOW  # nothing fetched twice beyond the windows
    assert kvcodec.unpack(server.url("c.kvc")).equal(want)  # strict: every byte checked
    assert kvcodec.open(server.url("c.kvc")).token_ids().equal(want.token_ids)


def test_to_hf_builds_layer_by_layer(served):
    pytest.importorskip("transformers")
    server, root, cache = served
    hf = kvcodec.open(server.url("q.kvc")).to_hf()
    want = kvcodec.unpack(root / "q.kvc")
    assert len(hf.layers) == LAYERS
    assert hf.layers[2].keys.equal(want.layers[2].key) and hf.layers[2].values.equal(want.layers[2].value)


def test_fsspec_urls_read_alike(served):
    pytest.importorskip("fsspec")
    _, root, _ = served
    assert kvcodec.unpack(f"file://{root / 'c.kvc'}").equal(kvcodec.unpack(root / "c.kvc"))


def test_missing_files_truncated_files_and_servers_without_ranges_are_refused(served, tmp_path):
    server, root, _ = served
    with pytest.raises(InputError, match="HTTP 404"):
        kvcodec.open(server.url("missing.kvc"))
    data = (root / "c.kvc").read_bytes()
    (root / "cut.kvc").write_bytes(data[:len(data) // 2])
    with pytest.raises(FormatError, match="no end marker"):
        kvcodec.open(server.url("cut.kvc"))
    with pytest.raises(InputError, match="not an http"):
        remote.HTTPBackend("http://")
    with pytest.raises(InputError, match="Connection refused|connect"):
        kvcodec.open("http://127.0.0.1:1/c.kvc")


def test_a_server_ignoring_ranges_is_refused(tmp_path):
    import http.server
    import threading

    (tmp_path / "a.kvc").write_bytes(kvcodec.encode(synthetic_cache()))
    handler = lambda *a: http.server.SimpleHTTPRequestHandler(*a, directory=str(tmp_path))  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with pytest.raises(InputError, match="ignores Range requests"):
            kvcodec.open(f"http://127.0.0.1:{server.server_address[1]}/a.kvc")
    finally:
        server.shutdown()
        server.server_close()


def test_urls_needing_percent_encoding_reach_the_file(served):
    server, root, _ = served
    (root / "a b.kvc").write_bytes((root / "q.kvc").read_bytes())
    (root / "é 100%.kvc").write_bytes((root / "q.kvc").read_bytes())
    want = kvcodec.open(root / "q.kvc").read(1)[0]
    host, port = server.address
    server.log.clear()
    for url in (f"http://{host}:{port}/a b.kvc", f"http://{host}:{port}/a%20b.kvc",
                f"http://{host}:{port}/é 100%.kvc", f"http://{host}:{port}/%C3%A9%20100%25.kvc?v=1 2"):
        with kvcodec.open(url) as reader:
            assert reader.read(1)[0].equal(want), url
    assert {e[0] for e in server.log.entries} == {"/a%20b.kvc", "/%C3%A9%20100%25.kvc", "/%C3%A9%20100%25.kvc?v=1%202"}


@pytest.mark.parametrize("url", [
    "http://[::1/x.kvc", "http://127.0.0.1:99999/x.kvc", "http://127.0.0.1:port/x.kvc", "http://a..b/x.kvc",
    "https://bad\x00host/x.kvc", "http://[::1]:1/x\nnewline.kvc",
])
def test_malformed_urls_are_input_errors(url):
    with pytest.raises(InputError) as caught:
        kvcodec.open(url)
    message = str(caught.value)
    assert "\n" not in message and message.startswith(url.replace("\n", "\\n").replace("\x00", "\\x00"))


def scripted_server(reply: bytes):
    """A server answering every request with `reply` and closing; its port and a stop function."""
    import socket
    import threading

    listener = socket.create_server(("127.0.0.1", 0))

    def serve():
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                try:
                    conn.settimeout(2)
                    got = b""
                    while b"\r\n\r\n" not in got and (chunk := conn.recv(4096)):
                        got += chunk
                    conn.sendall(reply)
                except OSError:
                    pass

    threading.Thread(target=serve, daemon=True).start()
    return listener.getsockname()[1], listener.close


@pytest.mark.parametrize("reply, match", [
    (b"", "closed|Remote end"),  # closes at once, twice
    (b"garbage\r\n\r\n", "bad response"),
    (b"HTTP/1.1 206 Partial\r\nContent-Range: bytes 0-" + b"9" * 5000 + b"/" + b"9" * 5000 + b"\r\n\r\n",
     "no usable Content-Range"),
    (b"HTTP/1.1 206 Partial\r\nContent-Range: bytes 0-65535/10\r\nContent-Length: 65536\r\n\r\n", "server sent"),
    (b"HTTP/1.1 206 Partial\r\n" + b"X-A: b\r\n" * 101 + b"\r\n", "bad response"),
    (b"HTTP/1.1 206 Partial\r\nX-A: " + b"b" * 70000 + b"\r\n\r\n", "bad response"),
    (b"HTTP/1.1 206 Partial\r\nContent-Range: bytes 0-65535/100000\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
     "bad response"),
], ids=["closes", "garbage", "5000-digit-range", "range-past-total", "101-headers", "long-header", "bad-chunk"])
def test_misbehaving_servers_give_kvc_errors(reply, match):
    port, stop = scripted_server(reply)
    try:
        with pytest.raises(kvcodec.KVCError, match=match) as caught:
            kvcodec.open(f"http://127.0.0.1:{port}/x.kvc")
        assert str(caught.value).startswith(f"http://127.0.0.1:{port}/x.kvc: ")
    finally:
        stop()


def test_the_cli_reports_a_malformed_url_in_one_line():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "kvcodec.tools.cli", "inspect", "http://[::1/x"],
                         capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 1 and out.stdout == ""
    assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr and "internal error" not in out.stderr
    assert "http://[::1/x: not a valid URL" in out.stderr


def test_the_cli_inspects_and_unpacks_urls(served, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from kvcodec.tools.cli import cli

    server, root, cache = served
    runner = CliRunner()
    out = runner.invoke(cli, ["inspect", "--json", server.url("q.kvc")])
    assert out.exit_code == 0, out.output
    assert '"file_bytes"' in out.output
    monkeypatch.chdir(tmp_path)
    out = runner.invoke(cli, ["unpack", server.url("q.kvc"), "-q"])
    assert out.exit_code == 0, out.output
    assert kvcodec.cachefiles.load_cache(tmp_path / "q.pt").layers[1].key.equal(kvcodec.unpack(root / "q.kvc").layers[1].key)
    out = runner.invoke(cli, ["inspect", server.url("missing.kvc")])
    assert out.exit_code == 1 and "HTTP 404" in out.output and "Traceback" not in out.output


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA device")
def test_streaming_onto_the_gpu_decodes_with_the_kernels(served):
    server, root, _ = served
    want = kvcodec.unpack(root / "c.kvc")
    with kvcodec.open(server.url("c.kvc")) as reader:
        for i, layer in reader.stream(device="cuda"):
            assert layer.key.is_cuda and layer.key.cpu().equal(want.layers[i].key)
            assert layer.value.cpu().equal(want.layers[i].value)
