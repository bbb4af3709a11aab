"""`kvc serve` (kvcodec.storage.serve.FileServer) against raw requests on the loopback address:
RFC 9110 byte ranges (one range 206, valid but unsatisfiable 416, malformed or multi-range
ignored), HEAD, percent-decoded paths that never leave the folder nor show dotfiles or
in-progress outputs, 400 for NUL bytes, idle connections closed, a deep listen backlog, the
bandwidth cap, and never a traceback on the server's stderr."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest

from kvcodec.storage.serve import FileServer

DATA = bytes(range(256)) * 4  # 1024 bytes, every offset distinguishable
SIZE = len(DATA)
BIG = "9" * 5000  # more digits than Python's int() takes from a string


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    base = tmp_path_factory.mktemp("serve")
    root = base / "root"
    (root / "sub").mkdir(parents=True)
    (root / ".hidden").mkdir()
    for name in ("a.kvc", "a b.kvc", "é.kvc", "sub/ok.kvc", ".secret", ".a.kvc.1234.tmp", ".hidden/x.kvc"):
        (root / name).write_bytes(DATA)
    (base / "outside.kvc").write_bytes(b"outside")
    os.symlink(base / "outside.kvc", root / "out.kvc")  # points out of the folder
    os.symlink(root / ".secret", root / "dot.kvc")  # points at a dotfile
    os.symlink(root / "a.kvc", root / "in.kvc")  # stays inside: fine
    return root


@pytest.fixture(scope="module")
def server(root):
    with FileServer(root) as server:
        yield server


def raw(address, request: bytes, timeout: float = 5.0) -> tuple[int, dict, bytes]:
    """Send one raw request (closing the connection); the status, headers and body."""
    with socket.create_connection(address, timeout=timeout) as s:
        s.sendall(request)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    reply = b"".join(chunks)
    assert reply, "no response"
    head, _, body = reply.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, body


def get(address, path: str, range_: str | None = None, method: str = "GET"):
    request = f"{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
    if range_ is not None:
        request += f"Range: {range_}\r\n"
    return raw(address, (request + "\r\n").encode("latin-1"))


@pytest.mark.parametrize("spec, status, want", [
    (None, 200, (0, SIZE)),
    ("bytes=0-9", 206, (0, 10)),
    ("bytes=1000-", 206, (1000, SIZE)),
    ("bytes=-10", 206, (SIZE - 10, SIZE)),
    ("bytes=-5000", 206, (0, SIZE)),
    ("bytes=5-100000", 206, (5, SIZE)),
    ("bytes=0-9, ", 206, (0, 10)),  # empty list elements are allowed
    ("Bytes=3-4", 206, (3, 5)),  # range units are case-insensitive
    (f"bytes=0-{BIG}", 206, (0, SIZE)),
    (f"bytes=-{BIG}", 206, (0, SIZE)),
    (f"bytes={BIG}-", 416, None),  # valid, beyond the end
    (f"bytes=0{BIG}-{BIG}", 416, None),
    (f"bytes={SIZE}-", 416, None),
    ("bytes=-0", 416, None),
    ("bytes=0-1,5-6", 200, (0, SIZE)),  # several ranges: ignored, the whole file
    ("bytes=9-5", 200, (0, SIZE)),  # invalid: last before first
    ("bytes=abc", 200, (0, SIZE)),
    ("bytes=-", 200, (0, SIZE)),
    ("items=0-5", 200, (0, SIZE)),
    (f"bytes={BIG}-1", 200, (0, SIZE)),
], ids=lambda v: v.replace(BIG, "<5000 digits>") if isinstance(v, str) else None)
def test_byte_ranges_follow_rfc_9110(server, spec, status, want):
    got, headers, body = get(server.address, "/a.kvc", spec)
    assert got == status
    if status == 416:
        assert body == b"" and headers["Content-Range"] == f"bytes */{SIZE}"
        return
    start, stop = want
    assert body == DATA[start:stop] and headers["Content-Length"] == str(stop - start)
    assert headers["Accept-Ranges"] == "bytes"
    if status == 206:
        assert headers["Content-Range"] == f"bytes {start}-{stop - 1}/{SIZE}"
    else:
        assert "Content-Range" not in headers


def test_head_sends_the_headers_only(server):
    status, headers, body = get(server.address, "/a.kvc", method="HEAD")
    assert status == 200 and headers["Content-Length"] == str(SIZE) and body == b""
    assert get(server.address, "/.secret", method="HEAD")[0] == 404


def test_paths_are_percent_decoded(server):
    for path in ("/a%20b.kvc", "/%61.kvc", "/%C3%A9.kvc", "/sub/ok.kvc", "/sub//ok.kvc", "/in.kvc", "/a.kvc?x=1"):
        status, _, body = get(server.address, path)
        assert (status, body) == (200, DATA), path


@pytest.mark.parametrize("path", [
    "/.secret", "/.a.kvc.1234.tmp", "/%2Ea.kvc.1234.tmp", "/.hidden/x.kvc", "/sub/../.secret",
    "/../outside.kvc", "/%2e%2e/outside.kvc", "/sub/%2e%2e/%2e%2e/outside.kvc", "/out.kvc", "/dot.kvc",
    "//etc/passwd", "/%2Fetc%2Fpasswd", "/sub", "/", "/missing.kvc",
])
def test_nothing_outside_the_folder_nor_dotfiles_is_served(server, path):
    assert get(server.address, path)[0] == 404


def test_counters_log_requests_and_bytes(server):
    server.log.clear()
    get(server.address, "/a.kvc", "bytes=0-99")
    get(server.address, "/missing.kvc")
    assert server.log.requests == 2 and server.log.bytes_sent == 100
    assert server.log.entries[0] == ("/a.kvc", "bytes=0-99", 100)


def test_idle_connections_are_closed(root):
    assert 1 <= FileServer.idle_timeout <= 30
    with FileServer(root, idle_timeout=0.3) as server:
        began = time.perf_counter()
        with socket.create_connection(server.address, timeout=5) as s:  # says nothing at all
            assert s.recv(1) == b""
        assert time.perf_counter() - began < 2
        with socket.create_connection(server.address, timeout=5) as s:  # idle after one request
            s.sendall(b"GET /a.kvc HTTP/1.1\r\nHost: x\r\nRange: bytes=0-3\r\n\r\n")
            reply = b""
            while not reply.endswith(DATA[:4]):
                reply += s.recv(4096)
            began = time.perf_counter()
            assert s.recv(1) == b""
            assert time.perf_counter() - began < 2


def test_the_listen_backlog_takes_bursts(root):
    server = FileServer(root)
    try:
        assert server._server.request_queue_size >= 128
    finally:
        server._server.server_close()


def test_the_bandwidth_cap_holds(root):
    with FileServer(root, rate=8 * SIZE) as server:  # 1/8 s per file
        began = time.perf_counter()
        assert get(server.address, "/a.kvc")[2] == DATA
        assert time.perf_counter() - began >= 0.1


def test_kvc_serve_answers_bad_requests_without_tracebacks(root):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "kvcodec.tools.cli", "serve", str(root), "--port", str(port)],
                            stderr=subprocess.PIPE, text=True)
    try:
        address = ("127.0.0.1", port)
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(address, timeout=1).close()
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, "kvc serve did not start"
                time.sleep(0.05)
        assert raw(address, b"GET /a\x00b.kvc HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")[0] == 400
        assert get(address, "/a%00b.kvc")[0] == 400
        assert get(address, "/a.kvc", f"bytes={BIG}-")[0] == 416
        assert get(address, "/a.kvc", f"bytes=0-{BIG}")[0] == 206
        assert get(address, "/a%20b.kvc", "bytes=0-0")[2] == DATA[:1]
        with socket.create_connection(address) as s:  # a client resetting mid-request
            s.sendall(b"GET /a.kvc HTTP/1.1\r\n")
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        assert get(address, "/a.kvc")[0] == 200  # still serving
    finally:
        proc.terminate()
        _, stderr = proc.communicate(timeout=10)
    assert "Traceback" not in stderr and "Exception" not in stderr, stderr
