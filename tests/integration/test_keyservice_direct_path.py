"""The server's direct path for ``POST /`` (issue 19): KMS requests answered without an ASGI cycle,
against a real server on a raw socket.

What must not change with it: replies in request order on a keep-alive connection (pipelined
requests included, whichever path each takes), ``Connection: close`` honoured, chunked bodies and
``Expect: 100-continue`` still answered (through ASGI), a refused request still an AWS error
with its record, and one audit record per request. (That the head and body leave in one buffer
is ``tests/unit/test_http_direct.py``'s.)
"""

from __future__ import annotations

import base64
import json
import socket
import time
from collections.abc import Iterator

import pytest

from tests.conftest import DevKeyService
from tests.integration.hostile_helpers import (
    AuditTail,
    Reply,
    _complete,
    request_bytes,
    serve_and_verify,
    sign,
)

pytestmark = pytest.mark.integration

TIMEOUT = 15.0


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[DevKeyService, AuditTail]]:
    yield from serve_and_verify(tmp_path_factory.mktemp("direct"))


def _port(service: DevKeyService) -> int:
    return int(service.endpoint.rsplit(":", 1)[1])


def _signed(service: DevKeyService, operation: str, payload: dict[str, object], **extra: str) -> bytes:
    body = json.dumps(payload).encode()
    return request_bytes("POST", "/", sign(service, f"TrentService.{operation}", body) | extra, body)


class Connection:
    """One keep-alive connection; ``replies(n)`` reads n complete replies in order."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        self.buffer = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def replies(self, count: int) -> list[Reply]:
        out: list[Reply] = []
        deadline = time.monotonic() + TIMEOUT
        while len(out) < count:
            reply = _complete(self.buffer)
            if reply is not None:
                head_length = self.buffer.index(b"\r\n\r\n") + 4
                self.buffer = self.buffer[head_length + int(reply.headers.get("content-length", "0")) :]
                out.append(reply)
                continue
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(out)} of {count} replies; got {self.buffer[:200]!r}")
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError(f"closed after {len(out)} of {count} replies")
            self.buffer += data
        return out

    def closed_by_server(self) -> bool:
        self.sock.settimeout(TIMEOUT)
        return self.sock.recv(1) == b""

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def conn(target: tuple[DevKeyService, AuditTail]) -> Iterator[Connection]:
    connection = Connection(_port(target[0]))
    yield connection
    connection.close()


def _one_record(tail: AuditTail, reply: Reply, operation: str) -> None:
    [record] = tail.outcomes(reply.request_id)
    assert record["operation"] == operation and record["outcome"] == "success", record


def test_keep_alive_requests_each_answered_and_audited(
    target: tuple[DevKeyService, AuditTail], conn: Connection
) -> None:
    service, tail = target
    ids = set()
    for n in range(1, 31):
        conn.send(_signed(service, "GenerateRandom", {"NumberOfBytes": n}))
        [reply] = conn.replies(1)
        assert reply.status == 200, reply.body
        assert len(base64.b64decode(json.loads(reply.body)["Plaintext"])) == n
        assert reply.headers["content-type"] == "application/x-amz-json-1.1"
        assert "date" in reply.headers and "connection" not in reply.headers
        _one_record(tail, reply, "GenerateRandom")
        ids.add(reply.request_id)
    assert len(ids) == 30


def test_pipelined_requests_are_answered_in_order(
    target: tuple[DevKeyService, AuditTail], conn: Connection
) -> None:
    """Five requests in one send: read-only ones (on the event loop), a key-management one (on the
    thread pool, which finishes later), a GET: the replies still come in request order."""
    service, tail = target
    batch = [
        _signed(service, "GenerateRandom", {"NumberOfBytes": 1}),
        _signed(service, "CreateKey", {"Description": "pipelined"}),
        _signed(service, "GenerateRandom", {"NumberOfBytes": 3}),
        request_bytes("GET", "/healthz", {}, b""),
        _signed(service, "GenerateRandom", {"NumberOfBytes": 5}),
    ]
    conn.send(b"".join(batch))
    replies = conn.replies(len(batch))
    assert [r.status for r in replies] == [200] * 5, [r.body[:200] for r in replies]
    sizes = [len(base64.b64decode(json.loads(replies[i].body)["Plaintext"])) for i in (0, 2, 4)]
    assert sizes == [1, 3, 5]
    assert json.loads(replies[1].body)["KeyMetadata"]["Description"] == "pipelined"
    assert replies[3].body == b"ok\n"
    for i, operation in enumerate(["GenerateRandom", "CreateKey", "GenerateRandom", "", "GenerateRandom"]):
        if operation:
            _one_record(tail, replies[i], operation)


def test_connection_close_is_honoured(target: tuple[DevKeyService, AuditTail], conn: Connection) -> None:
    service, tail = target
    conn.send(_signed(service, "GenerateRandom", {"NumberOfBytes": 8}, Connection="close"))
    [reply] = conn.replies(1)
    assert reply.status == 200 and reply.headers.get("connection") == "close"
    assert conn.closed_by_server()
    _one_record(tail, reply, "GenerateRandom")


def test_chunked_body_goes_through_asgi_and_is_answered(
    target: tuple[DevKeyService, AuditTail], conn: Connection
) -> None:
    service, tail = target
    body = json.dumps({"NumberOfBytes": 4}).encode()
    headers = sign(service, "TrentService.GenerateRandom", body) | {"Transfer-Encoding": "chunked"}
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    half = len(body) // 2
    chunks = f"{half:x}\r\n".encode() + body[:half] + f"\r\n{len(body) - half:x}\r\n".encode() + body[half:]
    conn.send(f"POST / HTTP/1.1\r\n{head}\r\n".encode() + chunks + b"\r\n0\r\n\r\n")
    [reply] = conn.replies(1)
    assert reply.status == 200, reply.body
    _one_record(tail, reply, "GenerateRandom")


def test_expect_100_continue_still_gets_its_interim_answer(
    target: tuple[DevKeyService, AuditTail], conn: Connection
) -> None:
    service, tail = target
    body = json.dumps({"NumberOfBytes": 2}).encode()
    request = request_bytes("POST", "/", sign(service, "TrentService.GenerateRandom", body) | {
        "Expect": "100-continue"}, body)
    head, _, _ = request.partition(b"\r\n\r\n")
    conn.send(head + b"\r\n\r\n")
    [interim] = conn.replies(1)
    assert interim.status == 100
    conn.send(body)
    [reply] = conn.replies(1)
    assert reply.status == 200, reply.body
    _one_record(tail, reply, "GenerateRandom")


def test_refused_request_on_the_direct_path_is_an_aws_error_with_its_record(
    target: tuple[DevKeyService, AuditTail], conn: Connection
) -> None:
    service, tail = target
    body = b'{"NumberOfBytes": 4}'
    headers = sign(service, "TrentService.GenerateRandom", body)
    conn.send(request_bytes("POST", "/", headers, b'{"NumberOfBytes": 5}'))  # not what was signed
    [reply] = conn.replies(1)
    assert reply.status == 400 and json.loads(reply.body)["__type"] == "InvalidSignatureException"
    [record] = tail.outcomes(reply.request_id)
    assert record["outcome"] == "error" and record["error_code"] == "InvalidSignatureException"
    conn.send(_signed(service, "GenerateRandom", {"NumberOfBytes": 4}))  # the connection goes on
    [again] = conn.replies(1)
    assert again.status == 200



def test_many_pipelined_requests_unread_then_read(
    target: tuple[DevKeyService, AuditTail], conn: Connection
) -> None:
    """200 requests sent before reading any reply (flow control on both paths): all answered, in order."""
    service, tail = target
    sizes = [1 + n % 32 for n in range(200)]
    conn.send(b"".join(_signed(service, "GenerateRandom", {"NumberOfBytes": n}) for n in sizes))
    replies = conn.replies(len(sizes))
    assert [r.status for r in replies] == [200] * len(sizes)
    assert [len(base64.b64decode(json.loads(r.body)["Plaintext"])) for r in replies] == sizes
    assert len({r.request_id for r in replies}) == len(sizes)
    for reply in replies[:: 40]:
        _one_record(tail, reply, "GenerateRandom")


def test_client_gone_before_its_answer(target: tuple[DevKeyService, AuditTail]) -> None:
    """A client that hangs up while its request waits for the audit fsync costs nothing but its
    answer: the request is still recorded, and the server goes on serving."""
    service, tail = target
    tail.refresh()
    known = set(tail.by_id)
    for _ in range(20):
        gone = Connection(_port(service))
        gone.send(_signed(service, "GenerateRandom", {"NumberOfBytes": 2}))
        gone.close()
    again = Connection(_port(service))
    try:
        again.send(_signed(service, "GenerateRandom", {"NumberOfBytes": 3}))
        [reply] = again.replies(1)
        assert reply.status == 200
        _one_record(tail, reply, "GenerateRandom")
    finally:
        again.close()
    deadline = time.monotonic() + 10
    while True:
        tail.refresh()
        new = [rs for rid, rs in tail.by_id.items() if rid not in known]
        if len(new) >= 20 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert len(new) == 20, f"{len(new)} of the 20 abandoned requests were recorded"
    assert all(r["operation"] == "GenerateRandom" for records in new for r in records)
