"""The key service client against canned HTTP replies: wire shape, signing, error mapping."""

from __future__ import annotations

import base64
import json
import socket
import time
from datetime import UTC, datetime
from typing import Any

import pytest
import requests
from requests.adapters import BaseAdapter

from keyservice.http.sigv4 import verify_request
from kmsfs.keyclient import (
    Credentials,
    KeyClient,
    KeyServiceError,
    KeyServiceUnavailable,
    load_credentials,
)

CREDS = Credentials(access_key_id="AKIDEXAMPLE", secret_access_key="secret")


class Canned(BaseAdapter):
    """A transport adapter that records requests and answers (status, body)."""

    def __init__(self, status: int, body: Any) -> None:
        super().__init__()
        self.status, self.body, self.requests = status, body, []

    def send(self, request: requests.PreparedRequest, **kwargs: Any) -> requests.Response:
        self.requests.append((request, kwargs))
        resp = requests.Response()
        resp.status_code = self.status
        resp._content = self.body if isinstance(self.body, bytes) else json.dumps(self.body).encode()
        resp.headers["Content-Type"] = "application/x-amz-json-1.1"
        resp.request = request
        return resp

    def close(self) -> None:
        pass


def client_with(adapter: Canned, **kw: Any) -> KeyClient:
    client = KeyClient("http://127.0.0.1:8600", "eu-west-1", CREDS, **kw)
    client.session.mount("http://", adapter)
    return client


def test_generate_data_key_wire_format_and_signature() -> None:
    adapter = Canned(200, {"Plaintext": base64.b64encode(b"k" * 32).decode(),
                           "CiphertextBlob": base64.b64encode(b"blob").decode(), "KeyId": "arn:x"})
    client = client_with(adapter, connect_timeout=1.5, read_timeout=4)
    caller = {"path": "/dir/naïve.txt", "uid": 1000, "pid": 42, "process": "cat"}
    key, blob, arn = client.generate_data_key("alias/k", {"kmsfs:file-id": "ab"}, caller)
    assert (key, blob, arn) == (b"k" * 32, b"blob", "arn:x")
    req, kwargs = adapter.requests[0]
    assert kwargs["timeout"] == (1.5, 4)
    assert req.method == "POST" and req.url == "http://127.0.0.1:8600/"
    assert req.headers["Content-Type"] == "application/x-amz-json-1.1"
    assert req.headers["X-Amz-Target"] == "TrentService.GenerateDataKey"
    assert json.loads(req.body) == {"KeyId": "alias/k", "KeySpec": "AES_256",
                                    "EncryptionContext": {"kmsfs:file-id": "ab"}}
    assert json.loads(req.headers["X-Kmsfs-Caller"]) == caller
    assert req.headers["X-Kmsfs-Caller"].isascii()
    assert "x-kmsfs-caller" in req.headers["Authorization"]
    # the server's verifier accepts exactly what we sent
    principal = verify_request(method="POST", path="/", query="",
                               headers={k.lower(): v for k, v in req.headers.items()}, body=req.body,
                               region="eu-west-1", lookup=lambda akid: ("secret", akid),
                               now=datetime.now(UTC))
    assert principal == "AKIDEXAMPLE"


def test_decrypt_sends_base64_and_key_id() -> None:
    adapter = Canned(200, {"Plaintext": base64.b64encode(b"p" * 32).decode(), "KeyId": "arn:x"})
    assert client_with(adapter).decrypt(b"\x00\xff", {"a": "b"}, None, key_id="arn:x") == b"p" * 32
    body = json.loads(adapter.requests[0][0].body)
    assert body == {"CiphertextBlob": "AP8=", "EncryptionContext": {"a": "b"}, "KeyId": "arn:x"}
    assert "X-Kmsfs-Caller" not in adapter.requests[0][0].headers


@pytest.mark.parametrize("type_,code,denied", [
    ("com.amazonaws.kms#DisabledException", "DisabledException", True),
    ("AccessDeniedException", "AccessDeniedException", True),
    ("KMSInvalidStateException", "KMSInvalidStateException", True),
    ("InvalidCiphertextException", "InvalidCiphertextException", False),
])
def test_error_replies(type_: str, code: str, denied: bool) -> None:
    adapter = Canned(400, {"__type": type_, "message": "nope"})
    with pytest.raises(KeyServiceError) as info:
        client_with(adapter).decrypt(b"x", {})
    assert info.value.code == code and info.value.message == "nope"
    assert info.value.is_access_denied is denied


@pytest.mark.parametrize("status,body", [(500, {"__type": "KMSInternalException"}), (503, b"busy"),
                                         (200, b"not json"), (200, {"Plaintext": "!!"})])
def test_unavailable_replies(status: int, body: Any) -> None:
    with pytest.raises(KeyServiceUnavailable):
        client_with(Canned(status, body)).decrypt(b"x", {})


def test_connection_refused_is_unavailable_and_fast() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    client = KeyClient(f"http://127.0.0.1:{port}", "us-east-1", CREDS, connect_timeout=1)
    start = time.monotonic()
    with pytest.raises(KeyServiceUnavailable):
        client.describe_key("k")
    assert time.monotonic() - start < 5


def test_read_timeout_is_bounded() -> None:
    with socket.socket() as srv:  # accepts, never answers
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        client = KeyClient(f"http://127.0.0.1:{srv.getsockname()[1]}", "us-east-1", CREDS,
                           connect_timeout=1, read_timeout=0.5)
        start = time.monotonic()
        with pytest.raises(KeyServiceUnavailable):
            client.describe_key("k")
        assert time.monotonic() - start < 5


def test_credentials_sources(tmp_path: Any) -> None:
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"endpoint": "http://e", "region": "r", "access_key_id": "A",
                                "secret_access_key": "S"}))
    c = load_credentials(path)
    assert (c.access_key_id, c.secret_access_key, c.endpoint, c.region) == ("A", "S", "http://e", "r")
    assert "S" not in repr(c)
    env = {"AWS_ACCESS_KEY_ID": "A2", "AWS_SECRET_ACCESS_KEY": "S2", "AWS_SESSION_TOKEN": "T",
           "AWS_DEFAULT_REGION": "r2", "AWS_ENDPOINT_URL": "http://x", "AWS_ENDPOINT_URL_KMS": "http://k"}
    c = load_credentials(None, env)
    assert (c.access_key_id, c.session_token, c.region, c.endpoint) == ("A2", "T", "r2", "http://k")
    with pytest.raises(ValueError):
        load_credentials(None, {})
    path.write_text("{")
    with pytest.raises(ValueError):
        load_credentials(path)


def test_session_token_is_sent() -> None:
    adapter = Canned(200, {"KeyMetadata": {"KeyId": "k"}})
    client = KeyClient("http://localhost:1", "us-east-1", Credentials("A", "S", session_token="TOKEN"))
    client.session.mount("http://", adapter)
    assert client.describe_key("k") == {"KeyId": "k"}
    req = adapter.requests[0][0]
    assert req.headers["X-Amz-Security-Token"] == "TOKEN"
    assert "x-amz-security-token" in req.headers["Authorization"]
