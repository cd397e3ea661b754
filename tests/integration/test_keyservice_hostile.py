"""The key service's port under hostile input (issue 12, items 1 and 3), against a real server.

Every request, however malformed, is answered with an AWS error (``__type``, ``message``, a
request id) and a 4xx status, and leaves exactly one audit record with that request id; hostile
text is stored escaped and the log still verifies. /metrics is not on the KMS port, labels only
operations the service knows, and is served only where the operator asked.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.conftest import DevKeyService, free_port, run_keyservice
from tests.integration.hostile_helpers import (
    AuditTail,
    Reply,
    exchange,
    request_bytes,
    serve_and_verify,
    sign,
)

pytestmark = pytest.mark.integration

MAX_BODY = 64 * 1024


def _serve(base: Path, *extra: str) -> Iterator[tuple[DevKeyService, AuditTail]]:
    yield from serve_and_verify(base, "--max-body", str(MAX_BODY), *extra)


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[DevKeyService, AuditTail]]:
    yield from _serve(tmp_path_factory.mktemp("hostile"))


@pytest.fixture(scope="module")
def with_metrics(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[DevKeyService, AuditTail, str]]:
    metrics = f"127.0.0.1:{free_port()}"
    for service, tail in _serve(tmp_path_factory.mktemp("metrics"), "--metrics-listen", metrics):
        yield service, tail, f"http://{metrics}"


def _port(service: DevKeyService) -> int:
    return int(service.endpoint.rsplit(":", 1)[1])


def _refused(reply: Reply, tail: AuditTail, status: int, aws_type: str) -> dict[str, Any]:
    """The reply is the AWS error ``aws_type`` with ``status``; returns its one audit record."""
    assert reply.status == status, (reply.status, reply.body[:300])
    assert reply.headers["content-type"] == "application/x-amz-json-1.1"
    body = reply.error()
    assert body["__type"] == aws_type and isinstance(body["message"], str), body
    assert re.fullmatch(r"[0-9a-f-]{36}", reply.request_id)
    [record] = tail.outcomes(reply.request_id)
    assert record["outcome"] == "error" and record["error_code"] == aws_type
    return record


def _post(service: DevKeyService, headers: dict[str, str], body: bytes = b"{}") -> Reply:
    return exchange(_port(service), [request_bytes("POST", "/", headers, body)])


def _signed(service: DevKeyService, operation: str, body: bytes, **headers: str) -> Reply:
    return _post(service, sign(service, f"TrentService.{operation}", body, headers), body)


def test_lone_surrogate_in_the_caller_header_unsigned(target: Any) -> None:
    service, tail = target
    caller = '{"path": "/a\\ud800b", "\\udfff": 1}'
    reply = _post(service, {"X-Amz-Target": "TrentService.Encrypt", "X-Kmsfs-Caller": caller})
    record = _refused(reply, tail, 400, "MissingAuthenticationTokenException")
    assert record["caller"] == {"path": "/a\\ud800b", "\\udfff": 1}  # stored as escape text


def test_lone_surrogate_in_signed_key_id_and_context(target: Any) -> None:
    service, tail = target
    for body in (b'{"KeyId": "\\ud800", "Plaintext": "eA=="}',
                 b'{"KeyId": "alias/\\udbff", "Plaintext": "eA=="}',
                 b'{"KeyId": "alias/x", "Plaintext": "eA==", "EncryptionContext": {"a": "\\ud800"}}',
                 b'{"KeyId": "alias/x", "Plaintext": "eA=="}' .replace(b"x", b"\xed\xa0\x80")):  # fmt: skip
        reply = _signed(service, "Encrypt", body)
        record = _refused(reply, tail, 400, "SerializationException")
        assert record["principal"]  # signed: the principal is known


def test_deep_json_in_caller_header_and_body(target: Any) -> None:
    service, tail = target
    deep = "[" * 2000 + "]" * 2000
    reply = _post(service, {"X-Amz-Target": "TrentService.Decrypt", "X-Kmsfs-Caller": deep})
    record = _refused(reply, tail, 400, "MissingAuthenticationTokenException")
    assert record["caller"] == {"invalid": "caller header is nested too deep"}
    for depth in (40, 1500, 2000):
        body = ('{"KeyId": ' + "[" * depth + "]" * depth + "}").encode()
        _refused(_signed(service, "DescribeKey", body), tail, 400, "SerializationException")
    # Within the body limit, but signed by a principal that exists with a wrong secret.
    body = b"[" * 3000 + b"]" * 3000
    reply = _post(service, sign(service, "TrentService.ListKeys", body, secret="x" * 40), body)
    _refused(reply, tail, 400, "InvalidSignatureException")


def test_deep_policy_is_malformed(target: Any) -> None:
    service, tail = target
    policy = "[" * 12000 + "]" * 12000  # 24 KB: under the 32 KB policy limit
    for operation, params in (("CreateKey", {"Policy": policy}),):
        reply = _signed(service, operation, json.dumps(params).encode())
        _refused(reply, tail, 400, "MalformedPolicyDocumentException")
    key_id = json.loads(_signed(service, "CreateKey", b"{}").body)["KeyMetadata"]["KeyId"]
    body = json.dumps({"KeyId": key_id, "PolicyName": "default", "Policy": policy}).encode()
    _refused(_signed(service, "PutKeyPolicy", body), tail, 400, "MalformedPolicyDocumentException")


@pytest.mark.parametrize(("method", "path"), [("GET", "/"), ("POST", "/x"), ("PUT", "/"), ("DELETE", "/a?b")])
def test_other_methods_and_paths(target: Any, method: str, path: str) -> None:
    service, tail = target
    headers = {"X-Amz-Target": "TrentService.ListKeys"}
    reply = exchange(_port(service), [request_bytes(method, path, headers, b"")])
    record = _refused(reply, tail, 400, "UnknownOperationException")
    assert record["operation"] == "ListKeys" and record["principal"] is None


def test_metrics_are_not_served_on_the_kms_port(target: Any) -> None:
    service, tail = target
    reply = exchange(_port(service), [request_bytes("GET", "/metrics", {}, b"")])
    _refused(reply, tail, 400, "UnknownOperationException")


def test_body_over_the_limit(target: Any) -> None:
    service, tail = target
    body = b"{" + b" " * (MAX_BODY * 2) + b"}"
    headers = {"X-Amz-Target": "TrentService.Encrypt",
               "Authorization": "AWS4-HMAC-SHA256 Credential=AKIAHOSTILE/x"}  # fmt: skip
    record = _refused(_post(service, headers, body), tail, 413, "RequestEntityTooLargeException")
    assert record["access_key_id"] == "AKIAHOSTILE"


def test_headers_over_256_kib(target: Any) -> None:
    service, tail = target
    chunk = b"X-Filler: " + b"a" * 8000 + b"\r\n"
    chunks = [b"POST / HTTP/1.1\r\nHost: x\r\n"] + [chunk] * 40  # 320 KB of headers
    record = _refused(exchange(_port(service), chunks), tail, 431, "RequestHeaderFieldsTooLargeException")
    assert record["source_address"] == "127.0.0.1"


@pytest.mark.parametrize("garbage", [b"\x00\x01\x02 / HTTP/1.1\r\n\r\n", b"GET / HTTP/9.9\r\n\r\n",
                                     b"POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
                                     b"POST / HTTP/1.1\r\nBad Header\r\n\r\n"])  # fmt: skip
def test_bytes_that_are_not_http(target: Any, garbage: bytes) -> None:
    service, tail = target
    _refused(exchange(_port(service), [garbage]), tail, 400, "SerializationException")


def test_forwarded_for_does_not_replace_the_source_address(target: Any) -> None:
    service, tail = target
    reply = _post(service, {"X-Amz-Target": "TrentService.ListKeys", "X-Forwarded-For": "203.0.113.9"})
    record = _refused(reply, tail, 400, "MissingAuthenticationTokenException")
    assert record["source_address"] == "127.0.0.1"


def test_metrics_label_only_known_operations(with_metrics: Any) -> None:
    service, tail, metrics = with_metrics
    marker = uuid.uuid4().hex
    for n in range(200):
        reply = _post(service, {"X-Amz-Target": f"TrentService.{marker}{n}"})
        assert reply.status == 400
    _signed(service, f"{marker}Signed", b"{}")
    text = requests.get(metrics + "/metrics", timeout=5).text
    assert marker not in text
    assert re.search(r'keyservice_requests_total\{operation="unknown",outcome="error",'
                     r'error_code="MissingAuthenticationTokenException"\} ([0-9]+)', text)  # fmt: skip
    series = [line for line in text.splitlines() if line.startswith("keyservice_requests_total{")]
    assert len(series) < 100
    assert requests.get(metrics + "/nothing", timeout=5).status_code == 404


def test_metrics_listener_is_opt_in_and_loopback(tmp_path: Path) -> None:
    refused = run_keyservice("serve", "--dev", "--insecure-http", "--listen", f"127.0.0.1:{free_port()}",
                             "--data-dir", str(tmp_path / "d"), "--metrics-listen", "0.0.0.0:0")  # fmt: skip
    assert refused.returncode == 1
    assert refused.stderr.strip().splitlines()[-1].startswith("keyservice: --metrics-listen 0.0.0.0:")
