"""boto3, unchanged, against a real ``keyservice serve --dev`` process: every operation of the spine,
the SigV4 failures, and the audit record each request leaves."""

from __future__ import annotations

import base64
import contextlib
import json
import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta
from unittest import mock

import boto3
import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from botocore.exceptions import ClientError

from keyservice.audit.records import audit_path
from tests.conftest import run_keyservice

pytestmark = pytest.mark.integration


def _code(excinfo: pytest.ExceptionInfo[ClientError]) -> str:
    return excinfo.value.response["Error"]["Code"]


@pytest.fixture
def key(kms) -> dict:
    return kms.create_key(Description="boto3 test key")["KeyMetadata"]


def test_create_describe_list_update(kms, key) -> None:
    assert key["KeyState"] == "Enabled" and key["Enabled"] is True
    assert key["Arn"].startswith("arn:aws:kms:") and key["Arn"].endswith(f"key/{key['KeyId']}")
    assert key["KeyManager"] == "CUSTOMER" and key["Origin"] == "AWS_KMS"
    assert key["KeySpec"] == "SYMMETRIC_DEFAULT" and key["KeyUsage"] == "ENCRYPT_DECRYPT"
    assert isinstance(key["CreationDate"], datetime)
    kms.update_key_description(KeyId=key["KeyId"], Description="renamed")
    described = kms.describe_key(KeyId=key["Arn"])["KeyMetadata"]
    assert described["Description"] == "renamed" and described["KeyId"] == key["KeyId"]
    ids = {
        k["KeyId"]
        for page in kms.get_paginator("list_keys").paginate(PaginationConfig={"PageSize": 1})
        for k in page["Keys"]
    }
    assert key["KeyId"] in ids


def test_aliases(kms, key) -> None:
    other = kms.create_key()["KeyMetadata"]
    name = f"alias/t-{uuid.uuid4().hex[:8]}"
    kms.create_alias(AliasName=name, TargetKeyId=key["KeyId"])
    with pytest.raises(ClientError) as excinfo:
        kms.create_alias(AliasName=name, TargetKeyId=other["KeyId"])
    assert _code(excinfo) == "AlreadyExistsException"
    assert kms.describe_key(KeyId=name)["KeyMetadata"]["KeyId"] == key["KeyId"]
    listed = kms.list_aliases(KeyId=key["KeyId"])["Aliases"]
    assert [a["AliasName"] for a in listed] == [name]
    assert listed[0]["AliasArn"].endswith(":" + name)
    kms.update_alias(AliasName=name, TargetKeyId=other["KeyId"])
    assert kms.describe_key(KeyId=name)["KeyMetadata"]["KeyId"] == other["KeyId"]
    alias_arn = listed[0]["AliasArn"]
    blob = kms.encrypt(KeyId=alias_arn, Plaintext=b"via alias arn")["CiphertextBlob"]
    assert kms.decrypt(CiphertextBlob=blob)["KeyId"] == other["Arn"]
    kms.delete_alias(AliasName=name)
    with pytest.raises(ClientError) as excinfo:
        kms.describe_key(KeyId=name)
    assert _code(excinfo) == "NotFoundException"
    with pytest.raises(ClientError) as excinfo:
        kms.create_alias(AliasName="not-an-alias", TargetKeyId=key["KeyId"])
    assert _code(excinfo) in {"ValidationException", "InvalidAliasNameException"}


def test_encrypt_decrypt_with_context(kms, key) -> None:
    context = {"purpose": "test", "file": "a"}
    out = kms.encrypt(KeyId=key["KeyId"], Plaintext=b"secret words", EncryptionContext=context)
    assert out["KeyId"] == key["Arn"] and out["EncryptionAlgorithm"] == "SYMMETRIC_DEFAULT"
    assert b"secret words" not in out["CiphertextBlob"]
    reordered = dict(reversed(list(context.items())))
    back = kms.decrypt(CiphertextBlob=out["CiphertextBlob"], EncryptionContext=reordered)
    assert back["Plaintext"] == b"secret words" and back["KeyId"] == key["Arn"]
    for bad_context in ({}, {"purpose": "test"}, {**context, "file": "b"}):
        with pytest.raises(ClientError) as excinfo:
            kms.decrypt(CiphertextBlob=out["CiphertextBlob"], EncryptionContext=bad_context)
        assert _code(excinfo) == "InvalidCiphertextException"
    tampered = bytearray(out["CiphertextBlob"])
    tampered[-1] ^= 1
    with pytest.raises(ClientError) as excinfo:
        kms.decrypt(CiphertextBlob=bytes(tampered), EncryptionContext=context)
    assert _code(excinfo) == "InvalidCiphertextException"
    other = kms.create_key()["KeyMetadata"]
    with pytest.raises(ClientError) as excinfo:
        kms.decrypt(CiphertextBlob=out["CiphertextBlob"], EncryptionContext=context, KeyId=other["KeyId"])
    assert _code(excinfo) == "IncorrectKeyException"


def test_encrypt_size_limits(kms, key) -> None:
    assert kms.encrypt(KeyId=key["KeyId"], Plaintext=b"x" * 4096)["CiphertextBlob"]
    with pytest.raises(ClientError) as excinfo:
        kms.encrypt(KeyId=key["KeyId"], Plaintext=b"x" * 4097)
    assert _code(excinfo) == "ValidationException"


def test_generate_data_key_variants(kms, key) -> None:
    for spec, size in (("AES_256", 32), ("AES_128", 16)):
        out = kms.generate_data_key(KeyId=key["KeyId"], KeySpec=spec, EncryptionContext={"f": "1"})
        assert len(out["Plaintext"]) == size and out["KeyId"] == key["Arn"]
        assert (
            kms.decrypt(CiphertextBlob=out["CiphertextBlob"], EncryptionContext={"f": "1"})["Plaintext"]
            == out["Plaintext"]
        )
    out = kms.generate_data_key(KeyId=key["KeyId"], NumberOfBytes=1024)
    assert len(out["Plaintext"]) == 1024
    bare = kms.generate_data_key_without_plaintext(KeyId=key["KeyId"], KeySpec="AES_256")
    assert "Plaintext" not in bare
    assert len(kms.decrypt(CiphertextBlob=bare["CiphertextBlob"])["Plaintext"]) == 32
    for kwargs in ({}, {"KeySpec": "AES_256", "NumberOfBytes": 32}, {"NumberOfBytes": 1025}):
        with pytest.raises(ClientError) as excinfo:
            kms.generate_data_key(KeyId=key["KeyId"], **kwargs)
        assert _code(excinfo) == "ValidationException"


def test_generate_random(kms) -> None:
    one, two = (kms.generate_random(NumberOfBytes=64)["Plaintext"] for _ in range(2))
    assert len(one) == 64 and one != two
    with pytest.raises(ClientError) as excinfo:
        kms.generate_random(NumberOfBytes=1025)
    assert _code(excinfo) == "ValidationException"


def test_disable_and_enable(kms, key) -> None:
    blob = kms.encrypt(KeyId=key["KeyId"], Plaintext=b"p")["CiphertextBlob"]
    kms.disable_key(KeyId=key["KeyId"])
    assert kms.describe_key(KeyId=key["KeyId"])["KeyMetadata"]["KeyState"] == "Disabled"
    with pytest.raises(ClientError) as excinfo:
        kms.decrypt(CiphertextBlob=blob)
    assert _code(excinfo) == "DisabledException"
    kms.enable_key(KeyId=key["KeyId"])
    assert kms.decrypt(CiphertextBlob=blob)["Plaintext"] == b"p"


def test_unknown_key(kms) -> None:
    with pytest.raises(ClientError) as excinfo:
        kms.describe_key(KeyId=str(uuid.uuid4()))
    assert _code(excinfo) == "NotFoundException"


def test_wrong_secret_is_refused(keyservice_dev) -> None:
    client = keyservice_dev.boto3_client(aws_secret_access_key="x" * 40)
    with pytest.raises(ClientError) as excinfo:
        client.list_keys()
    assert _code(excinfo) == "InvalidSignatureException"


def test_unknown_access_key_is_refused(keyservice_dev) -> None:
    client = keyservice_dev.boto3_client(aws_access_key_id="AKIAUNKNOWNUNKNOWN00")
    with pytest.raises(ClientError) as excinfo:
        client.list_keys()
    assert _code(excinfo) == "UnrecognizedClientException"


def _signed(keyservice_dev, target: str, body: bytes, *, when: datetime | None = None) -> dict[str, str]:
    creds = keyservice_dev.credentials
    request = AWSRequest(
        method="POST",
        url=keyservice_dev.endpoint + "/",
        data=body,
        headers={"Content-Type": "application/x-amz-json-1.1", "X-Amz-Target": f"TrentService.{target}"},
    )
    auth = SigV4Auth(
        Credentials(creds["access_key_id"], creds["secret_access_key"]), "kms", keyservice_dev.region
    )
    with mock.patch("botocore.auth.get_current_datetime", return_value=when or datetime.now(UTC)):
        auth.add_auth(request)
    return dict(request.headers.items())


def test_tampered_body_is_refused(keyservice_dev) -> None:
    body = json.dumps({"NumberOfBytes": 8}).encode()
    headers = _signed(keyservice_dev, "GenerateRandom", body)
    ok = keyservice_dev.http.post(keyservice_dev.endpoint + "/", data=body, headers=headers, timeout=10)
    assert ok.status_code == 200 and len(base64.b64decode(ok.json()["Plaintext"])) == 8
    reply = keyservice_dev.http.post(
        keyservice_dev.endpoint + "/", data=body.replace(b"8", b"9"), headers=headers, timeout=10
    )
    assert reply.status_code == 400 and reply.json()["__type"] == "InvalidSignatureException"


def test_stale_date_is_refused(keyservice_dev) -> None:
    body = b"{}"
    headers = _signed(keyservice_dev, "ListKeys", body, when=datetime.now(UTC) - timedelta(minutes=10))
    reply = keyservice_dev.http.post(keyservice_dev.endpoint + "/", data=body, headers=headers, timeout=10)
    assert reply.json()["__type"] == "InvalidSignatureException"
    assert "Signature expired" in reply.json()["message"]


def test_no_auth_is_refused(keyservice_dev) -> None:
    reply = keyservice_dev.http.post(
        keyservice_dev.endpoint + "/",
        data=b"{}",
        timeout=10,
        headers={"Content-Type": "application/x-amz-json-1.1", "X-Amz-Target": "TrentService.ListKeys"},
    )
    assert reply.status_code == 400 and reply.json()["__type"] == "MissingAuthenticationTokenException"


def test_unknown_operation_and_bad_json(keyservice_dev) -> None:
    reply = keyservice_dev.http.post(
        keyservice_dev.endpoint + "/",
        data=b"{}",
        timeout=10,
        headers=_signed(keyservice_dev, "NoSuchThing", b"{}"),
    )
    assert reply.json()["__type"] == "UnknownOperationException"
    reply = keyservice_dev.http.post(
        keyservice_dev.endpoint + "/",
        data=b"{nope",
        timeout=10,
        headers=_signed(keyservice_dev, "ListKeys", b"{nope"),
    )
    assert reply.json()["__type"] == "SerializationException"


def test_body_limit(keyservice_dev) -> None:
    body = json.dumps({"KeyId": "alias/x", "Plaintext": "A" * (400 * 1024)}).encode()
    reply = keyservice_dev.http.post(
        keyservice_dev.endpoint + "/", data=body, timeout=10, headers=_signed(keyservice_dev, "Encrypt", body)
    )
    assert reply.status_code == 413
    assert reply.json()["__type"] == "RequestEntityTooLargeException"
    assert reply.headers.get("connection") == "close"


def test_oversized_headers_are_refused_without_buffering(keyservice_dev) -> None:
    """An endless header gets a 431 and a closed connection, not unbounded server memory."""
    import socket
    import ssl
    from urllib.parse import urlsplit

    parts = urlsplit(keyservice_dev.endpoint)
    raw = socket.create_connection((parts.hostname, parts.port), timeout=10)
    if parts.scheme == "https":
        context = ssl.create_default_context(cafile=keyservice_dev.http.verify)
        raw = context.wrap_socket(raw, server_hostname=parts.hostname)
    with raw:
        raw.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nX-Junk: ")
        reply = b""
        with contextlib.suppress(OSError):
            for _ in range(64):  # up to 4 MiB; the limit is 256 KiB
                raw.sendall(b"a" * 65536)
        with contextlib.suppress(OSError):
            while chunk := raw.recv(4096):
                reply += chunk
    assert reply.startswith(b"HTTP/1.1 431 "), reply[:100]


def test_keep_alive(keyservice_dev) -> None:
    with keyservice_dev.http as session:
        for _ in range(3):
            reply = session.post(
                keyservice_dev.endpoint + "/",
                data=b"{}",
                timeout=10,
                headers=_signed(keyservice_dev, "ListKeys", b"{}"),
            )
            assert reply.status_code == 200
            assert reply.headers.get("Connection", "").lower() != "close"


def test_every_request_is_audited(keyservice_dev, kms, key) -> None:
    marker = {"audit-marker": uuid.uuid4().hex}
    blob = kms.encrypt(KeyId=key["KeyId"], Plaintext=b"audited plaintext", EncryptionContext=marker)[
        "CiphertextBlob"
    ]
    with pytest.raises(ClientError):
        kms.decrypt(CiphertextBlob=blob, EncryptionContext={"audit-marker": "wrong"})
    with pytest.raises(ClientError):
        keyservice_dev.boto3_client(aws_secret_access_key="y" * 40).list_aliases()
    records = keyservice_dev.audit_records()
    mine = [r for r in records if r.get("encryption_context") == marker]
    assert len(mine) == 1 and mine[0]["operation"] == "Encrypt"
    assert mine[0]["key_id"] == key["Arn"] and mine[0]["principal"]
    failed = [
        r
        for r in records
        if r["operation"] == "Decrypt" and r.get("error_code") == "InvalidCiphertextException"
    ]
    assert failed
    refused = [
        r
        for r in records
        if r["operation"] == "ListAliases" and r.get("error_code") == "InvalidSignatureException"
    ]
    assert refused and refused[-1]["principal"] in (None, "")
    raw = (audit_path(keyservice_dev.data_dir)).read_bytes()
    assert b"audited plaintext" not in raw
    assert base64.b64encode(b"audited plaintext") not in raw
    assert keyservice_dev.credentials["secret_access_key"].encode() not in raw


def audit_list(keyservice_dev, *args: str) -> str:
    out = run_keyservice("audit", "list", "--data-dir", str(keyservice_dev.data_dir), *args)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_audit_list_cli(keyservice_dev, kms, key) -> None:
    kms.encrypt(KeyId=key["KeyId"], Plaintext=b"x")
    out = audit_list(keyservice_dev, "--key", key["KeyId"], "--operation", "Encrypt", "--json")
    records = [json.loads(line) for line in out.splitlines()]
    assert records and all(r["operation"] == "Encrypt" and r["key_id"] == key["Arn"] for r in records)
    future = (datetime.now(UTC) + timedelta(days=1)).isoformat()
    out = audit_list(keyservice_dev, "--since", future, "--json")
    assert out.strip() == ""
    table = audit_list(keyservice_dev, "--key", key["KeyId"])
    assert "Encrypt" in table


def test_aws_cli_unchanged(keyservice_dev, key) -> None:
    creds = keyservice_dev.credentials
    env = {
        "AWS_ACCESS_KEY_ID": creds["access_key_id"],
        "AWS_SECRET_ACCESS_KEY": creds["secret_access_key"],
        "AWS_DEFAULT_REGION": keyservice_dev.region,
        "PATH": "/usr/bin:/bin",
        "AWS_CONFIG_FILE": "/dev/null",
        "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
        "AWS_CA_BUNDLE": keyservice_dev.ca_bundle,
    }
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "awscli",
            "--endpoint-url",
            keyservice_dev.endpoint,
            "kms",
            "describe-key",
            "--key-id",
            key["KeyId"],
            "--output",
            "json",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["KeyMetadata"]["Arn"] == key["Arn"]


def test_boto3_session_default_chain(keyservice_dev, monkeypatch) -> None:
    creds = keyservice_dev.credentials
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", creds["access_key_id"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", creds["secret_access_key"])
    monkeypatch.setenv("AWS_CA_BUNDLE", creds["ca_bundle"])
    client = boto3.session.Session(region_name=keyservice_dev.region).client(
        "kms", endpoint_url=keyservice_dev.endpoint
    )
    assert "Keys" in client.list_keys()
