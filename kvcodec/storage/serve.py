"""A small HTTP file server that honours Range requests, optionally throttled to a bandwidth:
to try ranged reads and streaming restores on one machine (`kvc serve`), and what the tests
and benchmarks fetch from. It logs every request and the bytes it sent. Not for production:
serve files to real clients from nginx, S3 or a CDN, all of which honour Range.
"""

from __future__ import annotations

import os
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

_RANGE = re.compile(r"bytes=(\d*)-(\d*)")
PIECE = 256 << 10  # bytes written between throttling pauses


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


def _handler(root: str, rate: float | None, log: Log):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep connections alive between range requests
        disable_nagle_algorithm = True  # a short last piece must not wait for a delayed ACK

        def log_message(self, *args):  # quiet; `log` keeps what matters
            pass

        def do_GET(self):
            path = os.path.realpath(os.path.join(root, self.path.split("?")[0].lstrip("/")))
            if not path.startswith(os.path.realpath(root) + os.sep) or not os.path.isfile(path):
                return self._empty(404)
            size = os.path.getsize(path)
            spec = self.headers.get("Range")
            start, stop = 0, size
            if spec is not None:
                found = _RANGE.fullmatch(spec.strip())
                if found is None or found.groups() == ("", ""):
                    return self._empty(416, size)
                a, b = found.groups()
                if a == "":  # the last b bytes
                    start, stop = max(0, size - int(b)), size
                else:
                    start, stop = int(a), size if b == "" else min(size, int(b) + 1)
                if start >= size or stop <= start:
                    return self._empty(416, size)
            self.send_response(206 if spec is not None else 200)
            self.send_header("Content-Length", str(stop - start))
            self.send_header("Accept-Ranges", "bytes")
            if spec is not None:
                self.send_header("Content-Range", f"bytes {start}-{stop - 1}/{size}")
            self.end_headers()
            entry = log.add(self.path, spec, stop - start)
            sent = 0
            began = time.perf_counter()
            with open(path, "rb") as f:
                f.seek(start)
                while sent < stop - start:
                    piece = f.read(min(PIECE, stop - start - sent))
                    if not piece:
                        break
                    try:
                        self.wfile.write(piece)
                    except (BrokenPipeError, ConnectionResetError):
                        break
                    sent += len(piece)
                    if rate:
                        time.sleep(max(0.0, sent / rate - (time.perf_counter() - began)))
            if sent != stop - start:
                log.correct(entry, sent)

        def _empty(self, status: int, size: int | None = None):
            log.add(self.path, self.headers.get("Range"), 0)
            self.send_response(status)
            self.send_header("Content-Length", "0")
            if size is not None:
                self.send_header("Content-Range", f"bytes */{size}")
            self.end_headers()

    return Handler


class FileServer:
    """Serve `root` on `host:port` (port 0: any free one) from a background thread; a context
    manager. `rate` caps each response's bandwidth in bytes per second."""

    def __init__(self, root, host: str = "127.0.0.1", port: int = 0, rate: float | None = None):
        self.log = Log()
        self._server = ThreadingHTTPServer((host, port), _handler(os.fspath(root), rate, self.log))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def address(self) -> tuple[str, int]:
        return self._server.server_address[:2]

    def url(self, name: str = "") -> str:
        host, port = self.address
        return f"http://{host}:{port}/{name}"

    def __enter__(self) -> "FileServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def serve_forever(self) -> None:
        self._server.serve_forever()
