"""The server's direct path, in process: the reply bytes it writes in one buffer."""

from __future__ import annotations

from keyservice.http.api import HttpReply
from keyservice.http.server import _reply_bytes


def _parse(data: bytes) -> tuple[str, dict[str, str], bytes]:
    head, _, body = data.partition(b"\r\n\r\n")
    status, *lines = head.decode("latin-1").split("\r\n")
    return status, dict(line.split(": ", 1) for line in lines), body


def test_reply_is_one_buffer_with_head_and_body() -> None:
    request_id = "4f1c1c5e-0000-4000-8000-000000000000"
    reply = HttpReply(200, "application/x-amz-json-1.1", b'{"KeyId":"k"}', request_id)
    status, headers, body = _parse(_reply_bytes(reply, [(b"date", b"Sun, 29 Nov 2026 22:00:00 GMT")], True))
    assert status == "HTTP/1.1 200 OK"
    assert headers == {
        "content-type": "application/x-amz-json-1.1",
        "content-length": "13",
        "x-amzn-requestid": request_id,
        "date": "Sun, 29 Nov 2026 22:00:00 GMT",
    }
    assert body == b'{"KeyId":"k"}'


def test_error_reply_without_keep_alive_says_close() -> None:
    reply = HttpReply(400, "application/x-amz-json-1.1", b"{}", "r")
    status, headers, body = _parse(_reply_bytes(reply, [], False))
    assert status == "HTTP/1.1 400 Bad Request"
    assert headers["connection"] == "close" and headers["content-length"] == "2" and body == b"{}"


def test_a_status_without_a_phrase_still_has_a_status_line() -> None:
    status, _, _ = _parse(_reply_bytes(HttpReply(599, "text/plain", b"", "r"), [], True))
    assert status == "HTTP/1.1 599 "
