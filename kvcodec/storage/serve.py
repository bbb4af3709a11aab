"""A small HTTP file server that honours Range requests, optionally throttled to a bandwidth:
to try ranged reads and streaming restores on one machine (`kvc serve`), and what the tests
and benchmarks fetch from. It logs every request and the bytes it sent. Not for production:
serve files to real clients from nginx, S3 or a CDN, all of which honour Range.

Only regular files inside the served folder are served: paths are percent-decoded, and a path
with a component starting with '.' (`..`, dotfiles, the `.NAME.*.tmp` files kvcodec writes
before renaming them into place) or resolving outside the folder (a symlink pointing out) is
answered 404. Range follows RFC 9110: one byte range gets 206, or 416 when it is valid but
unsatisfiable; a Range header that is malformed, names another unit or asks for several ranges
is ignored (200 with the whole file).
"""

from __future__ import annotations

import os
import re
import socket
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

_RANGE_SPEC = re.compile(r"([0-9]*)-([0-9]*)")
_HUGE = 10 ** 18  # stands for any position beyond every file (numbers are never converted whole)
PIECE = 256 << 10  # bytes written between throttling pauses
IDLE_TIMEOUT = 5.0  # seconds a connection may stay silent (idle keep-alive, or a stalled client)
BACKLOG = 128  # connections the kernel queues before the server accepts them


@dataclass
class Log:
    """Requests served: (path, Range header, bytes sent) each."""

    entries: list = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, path: str, spec: str | None, sent: int) -> int:
        """Log a response before its body goes out (a client that has read it may look at the
        log at once); returns the entry's index for `correct`."""
        with self.lock:
            self.entries.append((path, spec, sent))
            return len(self.entries) - 1

    def correct(self, entry: int, sent: int) -> None:
        """A response cut short: record what was really sent."""
        with self.lock:
            if entry < len(self.entries):
                self.entries[entry] = self.entries[entry][:2] + (sent,)

    @property
    def requests(self) -> int:
        return len(self.entries)

    @property
    def bytes_sent(self) -> int:
        return sum(e[2] for e in self.entries)

    def clear(self) -> None:
        with self.lock:
            self.entries.clear()


def _position(digits: str) -> tuple[int, tuple[int, str]]:
    """A decimal position as an int capped at _HUGE, and a key ordering the exact values."""
    digits = digits.lstrip("0") or "0"
    return (int(digits) if len(digits) < 18 else _HUGE), (len(digits), digits)


def byte_range(header: str | None, size: int) -> tuple[int, int] | str | None:
    """What a Range header asks of a file of `size` bytes (RFC 9110, 14.1-14.2): (start, stop)
    for one satisfiable byte range, "unsatisfiable" for a valid one that is not, and None when
    the header is absent, malformed, in another unit or names several ranges (then ignored)."""
    if header is None:
        return None
    unit, eq, ranges = header.strip().partition("=")
    if not eq or unit.lower() != "bytes":
        return None
    specs = [s.strip() for s in ranges.split(",") if s.strip()]  # a list may have empty elements
    if len(specs) != 1:
        return None
    found = _RANGE_SPEC.fullmatch(specs[0])
    if found is None or found.groups() == ("", ""):
        return None
    first, last = found.groups()
    if first == "":  # suffix-range: the last n bytes
        n, _ = _position(last)
        if n == 0:
            return "unsatisfiable"
        if size == 0:
            return None  # nothing to range over: the (empty) whole file
        return max(0, size - n), size
    start, first_key = _position(first)
    stop = size
    if last != "":
        end, last_key = _position(last)
        if last_key < first_key:
            return None  # invalid: last-pos before first-pos
        stop = min(size, end + 1)
    if start >= size:
        return "unsatisfiable"
    return start, stop


def _handler(root: str, rate: float | None, log: Log, idle_timeout: float | None):
    real_root = os.path.realpath(root)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep connections alive between range requests
        disable_nagle_algorithm = True  # a short last piece must not wait for a delayed ACK
        timeout = idle_timeout  # a silent connection (idle keep-alive, stalled client) is closed

        def log_message(self, *args):  # quiet; `log` keeps what matters
            pass

        def resolve(self) -> str | int:
            """The served file the request's path names, or the status refusing it."""
            target = self.path
            if not target.startswith("/"):  # absolute-form (RFC 9112, 3.2.2), or nonsense
                try:
                    target = urllib.parse.urlsplit(target).path
                except ValueError:
                    return 400
            target = target.split("?", 1)[0].split("#", 1)[0]
            # the request line arrived as bytes decoded as latin-1: recover them, then decode %XX
            raw = urllib.parse.unquote_to_bytes(target.encode("latin-1", "replace"))
            if b"\0" in raw:
                return 400
            parts = [p for p in os.fsdecode(raw).split("/") if p]
            if not parts or any(p.startswith(".") for p in parts):
                return 404  # `..`, `.`, dotfiles, kvcodec's in-progress `.NAME.*.tmp` outputs
            path = os.path.realpath(os.path.join(real_root, *parts))
            if os.path.commonpath([real_root, path]) != real_root or not os.path.isfile(path):
                return 404  # outside the folder (through a symlink), a folder, or missing
            if any(p.startswith(".") for p in os.path.relpath(path, real_root).split(os.sep)):
                return 404  # a symlink inside the folder to a dotfile in it
            return path

        def do_HEAD(self):
            self.do_GET(body=False)

        def do_GET(self, body: bool = True):
            path = self.resolve()
            if isinstance(path, int):
                return self._empty(path)
            try:
                f = open(path, "rb")
            except OSError:
                return self._empty(403 if os.path.exists(path) else 404)
            with f:
                size = os.fstat(f.fileno()).st_size
                specs = self.headers.get_all("Range") or []
                spec = specs[0] if len(specs) == 1 else None  # several Range fields: invalid, ignored
                wanted = byte_range(spec, size) if body else None  # Range is defined for GET only
                if wanted == "unsatisfiable":
                    return self._empty(416, size)
                start, stop = (0, size) if wanted is None else wanted
                self.send_response(200 if wanted is None else 206)
                self.send_header("Content-Length", str(stop - start))
                self.send_header("Accept-Ranges", "bytes")
                if wanted is not None:
                    self.send_header("Content-Range", f"bytes {start}-{stop - 1}/{size}")
                self.end_headers()
                entry = log.add(self.path, self.headers.get("Range"), stop - start if body else 0)
                if body:
                    self._send(f, entry, start, stop)

        def _send(self, f, entry: int, start: int, stop: int) -> None:
            sent = 0
            began = time.perf_counter()
            f.seek(start)
            while sent < stop - start:
                piece = f.read(min(PIECE, stop - start - sent))
                if not piece:
                    break
                try:
                    self.wfile.write(piece)
                except OSError:  # the client went away or stalled past the timeout
                    break
                sent += len(piece)
                if rate:
                    time.sleep(max(0.0, sent / rate - (time.perf_counter() - began)))
            if sent != stop - start:
                log.correct(entry, sent)
                self.close_connection = True  # fewer bytes than Content-Length: no next request

        def _empty(self, status: int, size: int | None = None):
            log.add(self.path, self.headers.get("Range"), 0)
            self.send_response(status)
            self.send_header("Content-Length", "0")
            if size is not None:
                self.send_header("Content-Range", f"bytes */{size}")
            self.end_headers()

    return Handler


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = BACKLOG  # socketserver's default of 5 drops bursts of connections (1 s SYN retries)

    def handle_error(self, request, client_address):
        import sys

        if not isinstance(sys.exc_info()[1], OSError):  # a client resetting or timing out is no error
            super().handle_error(request, client_address)


class FileServer:
    """Serve `root` on `host:port` (port 0: any free one) from a background thread; a context
    manager. `rate` caps each response's bandwidth in bytes per second; a connection silent for
    `idle_timeout` seconds is closed (the class attribute is the default)."""

    idle_timeout: float | None = IDLE_TIMEOUT
    request_queue_size: int = BACKLOG

    def __init__(self, root, host: str = "127.0.0.1", port: int = 0, rate: float | None = None,
                 idle_timeout: float | None = None):
        self.log = Log()
        if idle_timeout is not None:
            self.idle_timeout = idle_timeout
        handler = _handler(os.fspath(root), rate, self.log, self.idle_timeout)
        server = type("Server", (_Server,), {
            "request_queue_size": self.request_queue_size,
            "address_family": socket.AF_INET6 if ":" in host else socket.AF_INET,
        })
        self._server = server((host, port), handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def address(self) -> tuple[str, int]:
        return self._server.server_address[:2]

    def url(self, name: str = "") -> str:
        """The URL of the served file `name` (a path under root, percent-encoded here)."""
        host, port = self.address
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{port}/{urllib.parse.quote(name)}"

    def __enter__(self) -> "FileServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def serve_forever(self) -> None:
        self._server.serve_forever()
