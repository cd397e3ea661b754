"""A lean keep-alive HTTP(S) connection pool for the key client, in place of requests.

Why: every open of a file is one Decrypt round trip, so the client's own cost per request is on
the critical path of ``cat``-like workloads. Measured on the benchmark machine, requests +
urllib3 add about 0.8 ms of Python per call on top of a ~1.3 ms loopback round trip (merging
session settings, proxy lookups, header validation); ``http.client`` over a pooled, kept-alive
TLS connection adds a few tens of microseconds.

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


class Response:
    """The subset of ``requests.Response`` keyclient reads."""

    def __init__(self, status: int, headers: http.client.HTTPMessage, content: bytes) -> None:
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
            conn.request("POST", path, body=data, headers=headers)
            resp = conn.getresponse()
            content = resp.read()
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            raise requests.ConnectionError(str(exc) or type(exc).__name__) from exc
        if resp.will_close:
            conn.close()
        else:
            with self._lock:
                if len(self._idle) < MAX_IDLE:
                    self._idle.append(conn)
                    conn = None  # type: ignore[assignment]
            if conn is not None:
                conn.close()
        return Response(resp.status, resp.headers, content)

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


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
