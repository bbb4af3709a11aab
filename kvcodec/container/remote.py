"""Byte ranges of remote files: `.kvc` files read from HTTP(S) servers that honour Range requests
(the standard library's client, one kept-alive connection) or from any fsspec filesystem
(`s3://`, `gs://`, `file://`, ... whichever backends the user has installed).

A `RangedFile` fetches as little as the reader needs: the first window of the file (preamble
and header) with the request that also tells the file's size, a tail window sized from the
header to hold the index and trailer, then only the spans of the records asked for. Spans the
reader announces (`prefetch`) are fetched in as few requests as they allow and kept until
released, so decoding one layer can overlap fetching the next.
"""

from __future__ import annotations

import bisect
import http.client
import re
import threading
import urllib.parse

from kvcodec.errors import FormatError, InputError, KVCError

HEAD_WINDOW = 64 << 10  # bytes fetched with the first request: preamble and (almost always) header
MERGE_GAP = 64 << 10  # announced spans closer than this are fetched as one
_CONTENT_RANGE = re.compile(r"bytes ([0-9]{1,19})-([0-9]{1,19})/([0-9]{1,19})")  # no 5000-digit ints


def shown(url: str) -> str:
    """A URL for a one-line message: control characters (a newline...) escaped."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in url)


def _quoted(text: str, safe: str) -> str:
    """`text` percent-encoded where it needs it (spaces, non-ASCII, controls), keeping escapes
    already there: `a b` and `a%20b` both become `a%20b`; a `%` starting none becomes `%25`."""
    text = re.sub(r"%(?![0-9A-Fa-f]{2})", "%25", text)
    return urllib.parse.quote(text, safe=safe + "%", errors="surrogateescape")  # lone surrogates: os.fsencode's bytes


_SUB_DELIMS = "!$&'()*+,;=:@"
_BAD_HOST = re.compile(r"[\x00-\x20\x7f/\\?#]")


class HTTPBackend:
    """GET requests with a Range header on one persistent connection (reconnecting if the
    server closes it). Counts requests and bytes received. Every failure, of the URL, the
    network or the server, is an InputError or a FormatError naming the URL."""

    def __init__(self, url: str, timeout: float = 60.0):
        self.url, self._name, self._timeout = url, shown(url), timeout
        try:
            parts = urllib.parse.urlsplit(url)
            port = parts.port
        except ValueError as exc:  # "Invalid IPv6 URL", "Port out of range 0-65535", ...
            raise InputError(f"{self._name}: not a valid URL ({exc})") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise InputError(f"{self._name}: not an http(s) URL")
        if _BAD_HOST.search(parts.hostname):
            raise InputError(f"{self._name}: not a valid URL (bad host name {parts.hostname!r})")
        self._parts = parts
        self._host = parts.hostname
        self._port = port if port is not None else (443 if parts.scheme == "https" else 80)
        self._target = _quoted(parts.path or "/", "/" + _SUB_DELIMS)
        if parts.query:
            self._target += "?" + _quoted(parts.query, "/?" + _SUB_DELIMS)
        self._conn = None
        self.requests = 0
        self.bytes_fetched = 0

    def _connection(self):
        if self._conn is None:
            kind = http.client.HTTPSConnection if self._parts.scheme == "https" else http.client.HTTPConnection
            # the port given apart: an IPv6 host ("::1") must not be split at its last colon
            self._conn = kind(self._host, self._port, timeout=self._timeout)
        return self._conn

    def fetch(self, start: int, stop: int | None) -> tuple[bytes, int]:
        """Bytes [start, stop) (to the end when stop is None) and the file's total size."""
        try:
            return self._fetch(start, stop)
        except KVCError:
            raise
        except OSError as exc:  # refused, reset, timed out, unknown host, TLS...
            self.close()
            raise InputError(f"{self._name}: {_one_line(exc)}") from None
        except http.client.HTTPException as exc:  # a malformed response
            self.close()
            raise InputError(f"{self._name}: bad response from the server ({type(exc).__name__}: {_one_line(exc)})") from None
        except ValueError as exc:  # a host name IDNA cannot encode ("a..b")
            self.close()
            raise InputError(f"{self._name}: not a valid URL ({_one_line(exc)})") from None

    def _fetch(self, start: int, stop: int | None) -> tuple[bytes, int]:
        spec = f"bytes={start}-" + ("" if stop is None else str(stop - 1))
        for attempt in (0, 1):  # a kept-alive connection the server closed is reopened once
            try:
                conn = self._connection()
                conn.request("GET", self._target, headers={"Range": spec})
                response = conn.getresponse()
                break
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                self.close()
                if attempt:
                    raise
        self.requests += 1
        if response.status != 206:
            response.close()
            self.close()
            if response.status == 416:
                raise FormatError(f"{self._name}: the server has fewer bytes than the file's index says: it is truncated")
            if response.status == 200:
                raise InputError(f"{self._name}: the server ignores Range requests (it sent the whole file)")
            raise InputError(f"{self._name}: HTTP {response.status} {_one_line(response.reason)}")
        found = _CONTENT_RANGE.fullmatch(response.getheader("Content-Range", "").strip())
        if found is None:
            self.close()
            raise InputError(f"{self._name}: the server's 206 response has no usable Content-Range")
        first, last, total = (int(g) for g in found.groups())
        want = (total if stop is None else min(stop, total)) - start
        if first != start or last - first + 1 != want or not first <= last < total:
            self.close()
            raise InputError(f"{self._name}: asked for bytes {spec[6:]}, the server sent {first}-{last}/{total}")
        data = response.read(want)  # never more than asked for, whatever the server sends
        if len(data) != want:
            self.close()
            raise FormatError(f"{self._name}: the connection ended {want - len(data)} bytes early")
        self.bytes_fetched += len(data)
        return data, total

    def close(self):
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def _one_line(exc) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


class FsspecBackend:
    """Any fsspec URL; the size comes from the filesystem's metadata. The filesystem is
    third-party code raising what it likes: every failure becomes an InputError naming the URL."""

    def __init__(self, url: str):
        self.url, self._name = url, shown(url)
        try:
            import fsspec
        except ImportError:
            raise InputError(f"{self._name}: reading this URL needs fsspec (pip install fsspec)") from None
        try:
            self._fs, self._path = fsspec.core.url_to_fs(url)
            self._size = int(self._fs.size(self._path))
        except (ImportError, ValueError) as exc:  # an unknown protocol, its package missing
            raise InputError(f"{self._name}: {_one_line(exc)}") from None
        except Exception as exc:  # noqa: BLE001 - missing file, credentials, the backend's own errors
            raise InputError(f"{self._name}: cannot open ({type(exc).__name__}: {_one_line(exc)})") from None
        self.requests = 0
        self.bytes_fetched = 0

    def fetch(self, start: int, stop: int | None) -> tuple[bytes, int]:
        stop = self._size if stop is None else min(stop, self._size)
        try:
            data = self._fs.cat_file(self._path, start=start, end=stop) if stop > start else b""
        except Exception as exc:  # noqa: BLE001
            raise InputError(f"{self._name}: cannot read ({type(exc).__name__}: {_one_line(exc)})") from None
        self.requests += 1
        self.bytes_fetched += len(data)
        if len(data) != stop - start:
            raise FormatError(f"{self._name}: got {len(data)} bytes of {stop - start} (changed while reading?)")
        return data, self._size

    def close(self):
        pass


def backend_for(url: str):
    scheme = url.partition(":")[0].lower()
    return HTTPBackend(url) if scheme in ("http", "https") else FsspecBackend(url)


def is_url(src) -> bool:
    return isinstance(src, str) and re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", src) is not None


class RangedFile:
    """Random access to a remote file through a backend, keeping the spans fetched so far:
    reads inside a kept span cost no request. Thread-safe (a prefetching thread and the
    decoding thread share it)."""

    def __init__(self, backend):
        self.backend = backend
        self._lock = threading.Lock()  # guards the kept spans; held only briefly
        self._io_lock = threading.Lock()  # one request at a time on the backend
        self._spans: list[tuple[int, bytes]] = []  # (start, data), sorted by start; may overlap
        self._size: int | None = None
        self.tail_window = HEAD_WINDOW

    @property
    def size(self) -> int:
        if self._size is None:
            self._fetch(0, HEAD_WINDOW)
        return self._size

    def _fetch(self, start: int, stop: int | None) -> None:
        with self._io_lock:
            data, total = self.backend.fetch(start, stop)
        with self._lock:
            self._size = total
            self._keep(start, data)

    def _keep(self, start: int, data: bytes) -> None:
        i = bisect.bisect_left(self._spans, start, key=lambda s: s[0])
        self._spans.insert(i, (start, data))

    def _find(self, offset: int, length: int) -> memoryview | None:
        with self._lock:
            i = bisect.bisect_right(self._spans, offset, key=lambda s: s[0])
            for start, data in reversed(self._spans[:i]):  # spans may nest; few are kept
                if offset + length <= start + len(data):
                    return memoryview(data)[offset - start:offset - start + length]
        return None

    def read(self, offset: int, length: int) -> memoryview:
        found = self._find(offset, length)
        if found is None:
            size = self.size
            if offset + length <= HEAD_WINDOW:
                self._fetch(0, min(size, HEAD_WINDOW))
            elif offset >= size - self.tail_window:
                self._fetch(max(0, size - self.tail_window), size)
            found = self._find(offset, length)
        if found is None:  # elsewhere, or across the edge of a window: fetch exactly this
            self._fetch(offset, offset + length)
            found = self._find(offset, length)
        return found

    def prefetch(self, extents) -> None:
        """Fetch the (offset, length) extents not yet kept, merging near ones into one request."""
        wanted = sorted((o, o + n) for o, n in extents if n > 0 and self._find(o, n) is None)
        merged: list[list[int]] = []
        for start, stop in wanted:
            if merged and start - merged[-1][1] <= MERGE_GAP:
                merged[-1][1] = max(merged[-1][1], stop)
            else:
                merged.append([start, stop])
        for start, stop in merged:
            self._fetch(start, stop)

    def forget(self, start: int, stop: int) -> None:
        """Drop the kept spans lying within [start, stop) (bytes already decoded)."""
        with self._lock:
            self._spans = [(s, d) for s, d in self._spans if not (start <= s and s + len(d) <= stop)]

    def close(self):
        self.backend.close()
