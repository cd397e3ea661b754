"""A lean keep-alive HTTP(S) connection pool for the key client, in place of requests.

Why: every open of a file is one Decrypt round trip, so the client's own cost per request is on
the critical path of ``cat``-like workloads. Measured on the benchmark machine, requests +
urllib3 add about 0.8 ms of Python per call on top of a ~1.3 ms loopback round trip (merging
session settings, proxy lookups, header validation); ``http.client`` over a pooled, kept-alive
TLS connection adds a few tens of microseconds. Since issue 19 http.client only connects: the
request goes out in one write and the reply is read here (``_exchange``), which took the client's
CPU per Decrypt from ~0.42 to ~0.25 ms (docs/PERFORMANCE.md).

The pool mimics the small part of ``requests.Session.post`` that ``keyclient`` uses (status code,
content, headers, json) and raises ``requests.ConnectionError`` for anything that means "no
answer", so keyclient's error mapping is unchanged. Certificates are always verified: the CA
bundle keyclient passes, or with ``verify=True`` the bundle requests would use
(``REQUESTS_CA_BUNDLE`` / ``CURL_CA_BUNDLE`` / certifi). It is only used when no proxy is
configured in the environment (requests handles proxies); see ``usable``.

A ``unix:///path`` endpoint is served over that Unix socket (``UnixConnection``): plain HTTP, no
TLS and no TCP_NODELAY (neither applies), the requests otherwise identical.

A request is never sent twice: a pooled connection that the server closed while idle is detected
(readable socket) and dropped *before* it is used.
"""

from __future__ import annotations

import http.client
import json
import os
import select
import socket
import ssl
import threading
import urllib.request
from typing import Any
from urllib.parse import urlsplit

import requests

MAX_IDLE = 16


def usable() -> bool:
    """True when no proxy is configured (the pool speaks to the endpoint directly)."""
    return not urllib.request.getproxies()


class Headers(dict[str, str]):
    """Reply headers by lower-case name; ``get`` takes any case, like ``requests``' headers."""

    def get(self, name: str, default: Any = None) -> Any:  # type: ignore[override]
        return super().get(name.lower(), default)


class Response:
    """The subset of ``requests.Response`` keyclient reads."""

    def __init__(self, status: int, headers: Headers, content: bytes) -> None:
        self.status_code = status
        self.headers = headers
        self.content = content

    def json(self) -> Any:
        return json.loads(self.content)


class ConnectionPool:
    """Thread-safe pool of keep-alive connections to one endpoint."""

    def __init__(self, endpoint: str) -> None:
        parts = urlsplit(endpoint)
        self.unix_path = parts.path if parts.scheme == "unix" else None
        self.https = parts.scheme == "https"
        self.host = parts.hostname or ""
        self.port = parts.port or (443 if self.https else 80)
        self._idle: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()
        self._contexts: dict[str, ssl.SSLContext] = {}

    def _context(self, verify: str | bool) -> ssl.SSLContext:
        if verify is False:
            raise ValueError("certificate verification cannot be turned off")
        cafile = verify if isinstance(verify, str) else (
            os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE") or _certifi())
        with self._lock:
            ctx = self._contexts.get(cafile or "")
            if ctx is None:
                ctx = ssl.create_default_context(cafile=cafile or None)
                self._contexts[cafile or ""] = ctx
        return ctx

    def _connection(self, timeout: tuple[float, float], verify: str | bool) -> http.client.HTTPConnection:
        with self._lock:
            while self._idle:
                conn = self._idle.pop()
                if _still_open(conn):
                    conn.sock.settimeout(timeout[1])
                    return conn
                conn.close()
        conn: http.client.HTTPConnection
        if self.unix_path is not None:
            conn = UnixConnection(self.unix_path, timeout=timeout[0])
            conn.connect()
            conn.sock.settimeout(timeout[1])
            return conn
        if self.https:
            conn = http.client.HTTPSConnection(self.host, self.port, timeout=timeout[0],
                                               context=self._context(verify))
        else:
            conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout[0])
        conn.connect()
        # http.client sends the headers and the body with two writes: with Nagle on, the body
        # waited for the ACK of the headers, which the server delays (up to 40 ms) while it waits
        # for the body. Measured: serial Decrypt p99 26 ms -> see docs/PERFORMANCE.md.
        conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn.sock.settimeout(timeout[1])
        return conn

    def post(self, url: str, *, data: bytes, headers: dict[str, str], timeout: tuple[float, float],
             verify: str | bool = True) -> Response:
        path = urlsplit(url).path or "/"
        try:
            conn = self._connection(timeout, verify)
        except (OSError, http.client.HTTPException) as exc:
            raise requests.ConnectionError(f"cannot connect: {exc}") from exc
        try:
            status, reply_headers, content, will_close = _exchange(conn, path, headers, data)
        except (OSError, http.client.HTTPException, ValueError) as exc:
            conn.close()
            raise requests.ConnectionError(str(exc) or type(exc).__name__) from exc
        if will_close:
            conn.close()
        else:
            with self._lock:
                if len(self._idle) < MAX_IDLE:
                    self._idle.append(conn)
                    conn = None  # type: ignore[assignment]
            if conn is not None:
                conn.close()
        return Response(status, reply_headers, content)

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


# Bounds on what a reply may make this client hold (a KMS reply is a few KiB).
MAX_HEAD_BYTES = 64 * 1024
MAX_BODY_BYTES = 64 * 1024 * 1024
_RECV = 65536


def _exchange(conn: http.client.HTTPConnection, path: str, headers: dict[str, str],
              body: bytes) -> tuple[int, Headers, bytes, bool]:
    """Send one request on the connected ``conn`` and read its reply: (status, headers, body,
    whether the server will close the connection).

    http.client is used only to connect (TCP, TLS, its timeouts). Its ``request``/``getresponse``
    cost a Decrypt ~0.1 ms of Python (the head and the body as two writes, so two TLS records and
    two sends; the reply's headers through the ``email`` parser), so the exchange is done here:
    the request in one ``sendall``; the reply read with Content-Length, chunked, or to the close.
    Anything malformed raises ValueError (the caller's "no answer")."""
    sock = conn.sock
    if sock is None:
        raise OSError("not connected")
    lines = [f"POST {path} HTTP/1.1"]
    for name, value in headers.items():
        if "\r" in value or "\n" in value or "\r" in name or "\n" in name or ":" in name:
            raise ValueError(f"invalid header {name!r}")
        lines.append(f"{name}: {value}")
    lines.append(f"Content-Length: {len(body)}")
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
    reader = _Reader(sock)
    while True:
        status, version, reply_headers = _read_head(reader)
        if status >= 200:
            break  # 1xx: an interim answer; the real one follows
    if reply_headers.get("transfer-encoding", "").lower() == "chunked":
        content = _read_chunked(reader)
    elif "content-length" in reply_headers:
        length = reply_headers["content-length"]
        if not length.isdigit() or int(length) > MAX_BODY_BYTES:
            raise ValueError(f"invalid Content-Length {length[:40]!r}")
        content = reader.exactly(int(length))
    elif status in (204, 304):
        content = b""
    else:
        return status, reply_headers, reader.until_close(), True
    connection = reply_headers.get("connection", "").lower()
    will_close = "close" in connection or (version == "HTTP/1.0" and "keep-alive" not in connection)
    return status, reply_headers, content, will_close or bool(reader.buffer)


class _Reader:
    """Buffered reads from a socket (plain or TLS)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""

    def _more(self) -> None:
        data = self.sock.recv(_RECV)
        if not data:
            raise OSError("the server closed the connection")
        self.buffer += data

    def line_block(self, end: bytes, limit: int) -> bytes:
        """Everything up to ``end`` (consumed, not returned)."""
        while (at := self.buffer.find(end, 0, limit + len(end))) < 0:
            if len(self.buffer) > limit:
                raise ValueError("reply head too large")
            self._more()
        block, self.buffer = self.buffer[:at], self.buffer[at + len(end) :]
        return block

    def exactly(self, size: int) -> bytes:
        while len(self.buffer) < size:
            self._more()
        data, self.buffer = self.buffer[:size], self.buffer[size:]
        return data

    def until_close(self) -> bytes:
        while len(self.buffer) <= MAX_BODY_BYTES:
            data = self.sock.recv(_RECV)
            if not data:
                data, self.buffer = self.buffer, b""
                return data
            self.buffer += data
        raise ValueError("reply body too large")


def _read_head(reader: _Reader) -> tuple[int, str, Headers]:
    head = reader.line_block(b"\r\n\r\n", MAX_HEAD_BYTES).decode("latin-1")
    status_line, *lines = head.split("\r\n")
    version, _, rest = status_line.partition(" ")
    code = rest[:3]
    if version not in ("HTTP/1.1", "HTTP/1.0") or not code.isdigit() or rest[3:4] not in ("", " "):
        raise ValueError(f"not an HTTP/1.x status line: {status_line[:80]!r}")
    headers = Headers()
    for line in lines:
        name, colon, value = line.partition(":")
        if not colon or not name or name != name.strip():
            raise ValueError(f"malformed reply header {line[:80]!r}")
        name, value = name.lower(), value.strip()
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    return int(code), version, headers


def _read_chunked(reader: _Reader) -> bytes:
    parts: list[bytes] = []
    total = 0
    while True:
        size_line = reader.line_block(b"\r\n", 1024).split(b";", 1)[0].strip()
        try:
            size = int(size_line, 16)
        except ValueError:
            raise ValueError(f"invalid chunk size {size_line[:40]!r}") from None
        if size == 0:
            while reader.line_block(b"\r\n", MAX_HEAD_BYTES):  # trailers, up to the empty line
                pass
            return b"".join(parts)
        total += size
        if size < 0 or total > MAX_BODY_BYTES:
            raise ValueError("reply body too large")
        parts.append(reader.exactly(size))
        if reader.exactly(2) != b"\r\n":
            raise ValueError("chunk not followed by CRLF")


def _still_open(conn: http.client.HTTPConnection) -> bool:
    """An idle keep-alive socket is readable only if the server closed it (or sent junk)."""
    sock = conn.sock
    if sock is None:
        return False
    try:
        readable, _, _ = select.select([sock], [], [], 0)
    except (OSError, ValueError):
        return False
    return not readable


def _certifi() -> str | None:
    try:
        import certifi
    except ImportError:
        return None
    return certifi.where()


class UnixConnection(http.client.HTTPConnection):
    """``http.client`` over a Unix-domain socket (the key service's ``--listen unix:PATH``)."""

    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(self.unix_path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock
