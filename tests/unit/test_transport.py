"""kmsfs's lean HTTP transport against a real socket that answers with scripted bytes: the reply
framings it must read (Content-Length, chunked, to the close, after a 1xx), when it must not reuse
the connection, and what it refuses (issue 19: it no longer uses http.client's request/response)."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import pytest
import requests

from kmsfs import transport

TIMEOUT = (2.0, 2.0)


class Scripted:
    """Accepts connections; answers each request (read up to its body) with the next scripted reply."""

    def __init__(self, replies: list[bytes]) -> None:
        self.replies = list(replies)
        self.requests: list[bytes] = []
        self.connections = 0
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/"
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while self.replies:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            with conn:
                data = b""
                while self.replies:
                    while b"\r\n\r\n" not in data:
                        chunk = conn.recv(65536)
                        if not chunk:
                            break
                        data += chunk
                    if b"\r\n\r\n" not in data:
                        break
                    head, _, rest = data.partition(b"\r\n\r\n")
                    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                                      if line.lower().startswith(b"content-length:")))
                    while len(rest) < length:
                        rest += conn.recv(65536)
                    self.requests.append(head + b"\r\n\r\n" + rest[:length])
                    data = rest[length:]
                    reply = self.replies.pop(0)
                    conn.sendall(reply)
                    if reply.endswith(b"<close>"):
                        break

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def pool() -> Iterator[transport.ConnectionPool]:
    pools: list[transport.ConnectionPool] = []

    def make(server: Scripted) -> transport.ConnectionPool:
        made = transport.ConnectionPool(server.url)
        pools.append(made)
        return made

    yield make  # type: ignore[misc]
    for made in pools:
        made.close()


def _post(pool: transport.ConnectionPool, server: Scripted, body: bytes = b"{}") -> transport.Response:
    return pool.post(server.url, data=body, headers={"Host": "h", "X-Amz-Target": "T.Op"}, timeout=TIMEOUT)


def test_content_length_reply_and_the_connection_is_reused(pool) -> None:  # type: ignore[no-untyped-def]
    server = Scripted([b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Amzn-ErrorType: E:x\r\n\r\n{}"] * 3)
    p = pool(server)
    for _ in range(3):
        reply = _post(p, server, b'{"a":1}')
        assert (reply.status_code, reply.content) == (200, b"{}")
        assert reply.headers.get("x-amzn-ErrorType") == "E:x"  # any case, as requests' headers
    assert server.connections == 1
    assert server.requests[0].startswith(b"POST / HTTP/1.1\r\nHost: h\r\nX-Amz-Target: T.Op\r\n")
    assert server.requests[0].endswith(b"Content-Length: 7\r\n\r\n{\"a\":1}")
    server.close()


def test_chunked_reply(pool) -> None:  # type: ignore[no-untyped-def]
    body = (b"HTTP/1.1 400 Bad Request\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5;ext=1\r\n{\"__t\r\n7\r\nype\":1}\r\n0\r\nX-T: 1\r\n\r\n")
    server = Scripted([body, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"])
    p = pool(server)
    reply = _post(p, server)
    assert (reply.status_code, reply.content) == (400, b'{"__type":1}')
    assert _post(p, server).status_code == 200
    assert server.connections == 1
    server.close()


def test_interim_100_then_the_reply(pool) -> None:  # type: ignore[no-untyped-def]
    server = Scripted([b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc"])
    reply = _post(pool(server), server)
    assert (reply.status_code, reply.content) == (200, b"abc")
    server.close()


def test_reply_to_the_close_and_connection_close_are_not_reused(  # type: ignore[no-untyped-def]
    pool,
) -> None:
    server = Scripted([
        b"HTTP/1.1 200 OK\r\n\r\nuntil-close<close>",
        b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\nx<close>",
        b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\ny<close>",
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nz",
    ])
    p = pool(server)
    assert _post(p, server).content == b"until-close<close>"
    assert _post(p, server).content == b"x"
    assert _post(p, server).content == b"y"
    assert _post(p, server).content == b"z"
    assert server.connections == 4
    server.close()


@pytest.mark.parametrize("reply", [
    b"SSH-2.0-OpenSSH\r\n\r\n",
    b"HTTP/1.1 2x0 OK\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 20\r\n\r\nshort<close>",
    b"HTTP/1.1 200 OK\r\nX: " + b"a" * (70 * 1024) + b"\r\n\r\n",
])
def test_malformed_replies_mean_no_answer(pool, reply: bytes) -> None:  # type: ignore[no-untyped-def]
    server = Scripted([reply + (b"" if reply.endswith(b"<close>") else b"<close>")])
    with pytest.raises(requests.ConnectionError):
        _post(pool(server), server)
    server.close()


def test_bytes_after_the_reply_drop_the_connection(pool) -> None:  # type: ignore[no-untyped-def]
    server = Scripted([b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\naEXTRA",
                       b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nb"])
    p = pool(server)
    assert _post(p, server).content == b"a"
    assert _post(p, server).content == b"b"  # on a new connection: the old one was out of step
    assert server.connections == 2
    server.close()


@pytest.mark.parametrize("name,value", [("X-Kmsfs-Caller", "a\r\nInjected: 1"), ("Bad\nName", "v"),
                                        ("A:B", "v")])
def test_header_injection_is_refused_before_sending(  # type: ignore[no-untyped-def]
    pool, name: str, value: str
) -> None:
    server = Scripted([b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"])
    with pytest.raises(requests.ConnectionError):
        pool(server).post(server.url, data=b"{}", headers={"Host": "h", name: value}, timeout=TIMEOUT)
    assert server.requests == []
    server.close()
