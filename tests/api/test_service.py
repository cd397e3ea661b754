"""KeyService driven in-process through ``call``: every operation of issue 2, its errors, its audit."""

from __future__ import annotations

import base64
import json
import os
import re
import stat
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from keyservice import bootstrap, errors
from keyservice.audit import log as audit_log
from keyservice.audit import review as audit_review
from keyservice.audit import signing as audit_signing
from keyservice.audit import verify as audit_verify
from keyservice.audit.records import read_records
from keyservice.authz import policy
from keyservice.clock import FixedClock
from keyservice.context import Principal, RequestContext
from keyservice.service import KeyService
from keyservice.store import rootkey
from keyservice.store.base import material_aad

REGION = "eu-west-1"
ACCOUNT = "123456789012"
T0 = datetime(2026, 5, 1, 9, 0, tzinfo=UTC)


class Env:
    def __init__(self, data_dir: Path, service: KeyService, root_key: bytes, creds: bootstrap.Credentials):
        self.data_dir = data_dir
        self.service = service
        self.root_key = root_key
        self.creds = creds
        _, self.principal = service.authenticate(creds.access_key_id)
        self.n = 0

    def ctx(self, **caller: object) -> RequestContext:
        self.n += 1
        return RequestContext(f"req-{self.n}", "192.0.2.7", self.principal, "pytest/1.0", dict(caller))

    def call(self, operation: str, params: dict[str, Any] | None = None, **caller: object) -> dict[str, Any]:
        return self.service.call(operation, params or {}, self.ctx(**caller))

    def fails(
        self, error: type[errors.KMSError], operation: str, params: dict[str, Any] | None = None
    ) -> str:
        with pytest.raises(error) as info:
            self.call(operation, params)
        assert info.value.aws_type == error.__name__
        return info.value.message

    def key(self, **params: Any) -> str:
        return self.call("CreateKey", params)["KeyMetadata"]["KeyId"]

    def records(self) -> list[dict[str, Any]]:
        return list(read_records(self.data_dir))

    def last(self) -> dict[str, Any]:
        return self.records()[-1]


def make_env(tmp_path: Path, **kw: Any) -> Env:
    data_dir = tmp_path / "data"
    root_key = rootkey.create_root_config(data_dir, rootkey.RootKeySource.dev())
    creds = bootstrap.initialize(data_dir, root_key, region=REGION, account_id=ACCOUNT)
    service = bootstrap.open_service(data_dir, root_key, clock=FixedClock(T0), **kw)
    return Env(data_dir, service, root_key, creds)


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    e = make_env(tmp_path)
    yield e
    e.service.close()


def arn(key_id: str) -> str:
    return f"arn:aws:kms:{REGION}:{ACCOUNT}:key/{key_id}"


# --------------------------------------------------------------------------- bootstrap / auth


def test_bootstrap_credentials_and_modes(env: Env) -> None:
    assert re.fullmatch(r"AKIA[A-Z0-9]{16}", env.creds.access_key_id)
    assert len(env.creds.secret_access_key) == 40
    assert env.creds.principal_arn == f"arn:aws:iam::{ACCOUNT}:root"
    assert stat.S_IMODE(env.data_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE((env.data_dir / "keyservice.db").stat().st_mode) == 0o600
    assert stat.S_IMODE((env.data_dir / "audit").stat().st_mode) == 0o700
    assert bootstrap.admin_credentials(env.data_dir, env.root_key) == env.creds
    with pytest.raises(bootstrap.AlreadyInitializedError):
        bootstrap.initialize(env.data_dir, env.root_key, region=REGION, account_id=ACCOUNT)


def test_authenticate(env: Env) -> None:
    secret, principal = env.service.authenticate(env.creds.access_key_id)
    assert secret == env.creds.secret_access_key
    assert principal == Principal(ACCOUNT, env.creds.principal_arn, env.creds.access_key_id)
    for bad in ("AKIAUNKNOWN000000000", ""):
        with pytest.raises(errors.UnrecognizedClientException):
            env.service.authenticate(bad)


def test_create_credentials(env: Env) -> None:
    creds = bootstrap.create_credentials(env.data_dir, env.root_key, f"arn:aws:iam::{ACCOUNT}:user/app")
    secret, principal = env.service.authenticate(creds.access_key_id)
    assert secret == creds.secret_access_key and principal.arn.endswith(":user/app")
    with pytest.raises(ValueError):
        bootstrap.create_credentials(env.data_dir, env.root_key, "arn:aws:iam::999999999999:user/x")


def test_restart_keeps_keys_and_checks_root_key(tmp_path: Path) -> None:
    env = make_env(tmp_path)
    key_id = env.key(Description="persist")
    blob = env.call("Encrypt", {"KeyId": key_id, "Plaintext": b"data"})["CiphertextBlob"]
    env.service.close()
    root_key = rootkey.load_root_key(env.data_dir, rootkey.RootKeySource.dev())
    service = bootstrap.open_service(env.data_dir, root_key)
    try:
        assert service.region == REGION and service.account_id == ACCOUNT
        ctx = RequestContext("r", "127.0.0.1", env.principal)
        assert service.call("Decrypt", {"CiphertextBlob": blob}, ctx)["Plaintext"] == b"data"
        assert bootstrap.admin_credentials(env.data_dir, root_key) == env.creds
    finally:
        service.close()
    with pytest.raises(rootkey.RootKeyError):
        bootstrap.open_service(env.data_dir, os.urandom(32))
    with pytest.raises(ValueError):
        bootstrap.open_service(env.data_dir, root_key, region="us-west-2")
    with pytest.raises(bootstrap.NotInitializedError):
        bootstrap.open_service(tmp_path / "empty", root_key)


def test_unauthenticated_or_foreign_principal_refused(env: Env) -> None:
    with pytest.raises(errors.AccessDeniedException):
        env.service.call("ListKeys", {}, RequestContext("r", "127.0.0.1", None))
    foreign = Principal("999999999999", "arn:aws:iam::999999999999:root", "AKIAFOREIGN000000000")
    with pytest.raises(errors.AccessDeniedException):
        env.service.call("ListKeys", {}, RequestContext("r", "127.0.0.1", foreign))
    assert [r["outcome"] for r in env.records()] == ["error", "error"]


# --------------------------------------------------------------------------- keys


def test_create_and_describe_key(env: Env) -> None:
    meta = env.call("CreateKey", {"Description": "first", "Tags": [{"TagKey": "team", "TagValue": "x"}]})[
        "KeyMetadata"
    ]
    key_id = meta["KeyId"]
    assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", key_id)
    assert meta == {
        "AWSAccountId": ACCOUNT,
        "KeyId": key_id,
        "Arn": arn(key_id),
        "CreationDate": T0,
        "Enabled": True,
        "Description": "first",
        "KeyUsage": "ENCRYPT_DECRYPT",
        "KeyState": "Enabled",
        "Origin": "AWS_KMS",
        "KeyManager": "CUSTOMER",
        "KeySpec": "SYMMETRIC_DEFAULT",
        "CustomerMasterKeySpec": "SYMMETRIC_DEFAULT",
        "EncryptionAlgorithms": ["SYMMETRIC_DEFAULT"],
        "MultiRegion": False,
    }
    env.call("CreateAlias", {"AliasName": "alias/first", "TargetKeyId": key_id})
    for ident in (key_id, arn(key_id), "alias/first", f"arn:aws:kms:{REGION}:{ACCOUNT}:alias/first"):
        assert env.call("DescribeKey", {"KeyId": ident})["KeyMetadata"] == meta


@pytest.mark.parametrize(
    "params, error",
    [
        ({"KeyUsage": "SIGN_VERIFY"}, errors.UnsupportedOperationException),
        ({"KeyUsage": "BOGUS"}, errors.ValidationException),
        ({"KeySpec": "RSA_2048"}, errors.UnsupportedOperationException),
        ({"KeySpec": "NOPE"}, errors.ValidationException),
        (
            {"KeySpec": "SYMMETRIC_DEFAULT", "CustomerMasterKeySpec": "SYMMETRIC_DEFAULT"},
            errors.ValidationException,
        ),
        ({"Origin": "EXTERNAL_KEY_STORE"}, errors.UnsupportedOperationException),
        ({"Origin": "AWS_CLOUDHSM"}, errors.UnsupportedOperationException),
        ({"Origin": "MARS"}, errors.ValidationException),
        ({"MultiRegion": True}, errors.UnsupportedOperationException),
        ({"MultiRegion": "yes"}, errors.ValidationException),
        ({"Description": "x" * 8193}, errors.ValidationException),
        ({"Description": 5}, errors.ValidationException),
        ({"Policy": "{not json"}, errors.MalformedPolicyDocumentException),
        ({"Tags": "team=x"}, errors.TagException),
        ({"Tags": [{"TagKey": "a", "TagValue": "1"}, {"TagKey": "a", "TagValue": "2"}]}, errors.TagException),
        ({"Tags": [{"TagKey": "aws:x", "TagValue": "1"}]}, errors.TagException),
        ({"Tags": [{"TagKey": "", "TagValue": "1"}]}, errors.ValidationException),
    ],
)
def test_create_key_validation(env: Env, params: dict[str, Any], error: type[errors.KMSError]) -> None:
    env.fails(error, "CreateKey", params)
    assert env.call("ListKeys")["Keys"] == []


def test_create_key_explicit_defaults(env: Env) -> None:
    meta = env.call(
        "CreateKey",
        {
            "KeyUsage": "ENCRYPT_DECRYPT",
            "KeySpec": "SYMMETRIC_DEFAULT",
            "Origin": "AWS_KMS",
            "Policy": policy.default_key_policy(ACCOUNT),
        },
    )["KeyMetadata"]
    assert meta["Description"] == ""


def test_key_quota(tmp_path: Path) -> None:
    env = make_env(tmp_path, max_keys=3)
    try:
        for _ in range(3):
            env.key()
        env.fails(errors.LimitExceededException, "CreateKey")
        assert len(env.call("ListKeys")["Keys"]) == 3
    finally:
        env.service.close()


@pytest.mark.parametrize(
    "ident",
    [
        "00000000-0000-4000-8000-000000000000",
        f"arn:aws:kms:{REGION}:{ACCOUNT}:key/00000000-0000-4000-8000-000000000000",
        "not-a-key",
        "alias/missing",
        f"arn:aws:kms:{REGION}:{ACCOUNT}:alias/missing",
        "arn:aws:kms:eu-west-1",
        f"arn:aws:kms:{REGION}:{ACCOUNT}:something/else",
    ],
)
def test_describe_unknown_key(env: Env, ident: str) -> None:
    env.fails(errors.NotFoundException, "DescribeKey", {"KeyId": ident})


def test_other_region_or_account_arn_refused(env: Env) -> None:
    key_id = env.key()
    for other in (
        f"arn:aws:kms:us-east-1:{ACCOUNT}:key/{key_id}",
        f"arn:aws:kms:{REGION}:999999999999:key/{key_id}",
        f"arn:aws-cn:kms:{REGION}:{ACCOUNT}:key/{key_id}",
    ):
        env.fails(errors.NotFoundException, "DescribeKey", {"KeyId": other})
        env.fails(errors.NotFoundException, "Encrypt", {"KeyId": other, "Plaintext": b"x"})


def test_key_id_parameter_validation(env: Env) -> None:
    assert "null" in env.fails(errors.ValidationException, "DescribeKey", {})
    env.fails(errors.ValidationException, "DescribeKey", {"KeyId": ""})
    env.fails(errors.ValidationException, "DescribeKey", {"KeyId": "x" * 2049})
    env.fails(errors.ValidationException, "DescribeKey", {"KeyId": 7})


def test_list_keys_paging(env: Env) -> None:
    ids = sorted(env.key() for _ in range(5))
    seen: list[str] = []
    marker = None
    pages = 0
    while True:
        params: dict[str, Any] = {"Limit": 2}
        if marker:
            params["Marker"] = marker
        page = env.call("ListKeys", params)
        pages += 1
        seen += [k["KeyId"] for k in page["Keys"]]
        assert all(k["KeyArn"] == arn(k["KeyId"]) for k in page["Keys"])
        if not page["Truncated"]:
            assert "NextMarker" not in page
            break
        marker = page["NextMarker"]
    assert seen == ids and pages == 3
    assert env.call("ListKeys")["Truncated"] is False
    for limit in (0, 1001, "5", True):
        env.fails(errors.ValidationException, "ListKeys", {"Limit": limit})
    env.fails(errors.InvalidMarkerException, "ListKeys", {"Marker": "garbage!"})
    env.fails(
        errors.InvalidMarkerException, "ListKeys", {"Marker": base64.urlsafe_b64encode(b"aliases:x").decode()}
    )


def test_update_key_description(env: Env) -> None:
    key_id = env.key(Description="old")
    env.call("UpdateKeyDescription", {"KeyId": arn(key_id), "Description": "new"})
    assert env.call("DescribeKey", {"KeyId": key_id})["KeyMetadata"]["Description"] == "new"
    env.call("UpdateKeyDescription", {"KeyId": key_id, "Description": ""})
    assert env.call("DescribeKey", {"KeyId": key_id})["KeyMetadata"]["Description"] == ""
    env.call("CreateAlias", {"AliasName": "alias/k", "TargetKeyId": key_id})
    env.fails(errors.NotFoundException, "UpdateKeyDescription", {"KeyId": "alias/k", "Description": "x"})
    env.fails(errors.ValidationException, "UpdateKeyDescription", {"KeyId": key_id})
    env.fails(
        errors.ValidationException, "UpdateKeyDescription", {"KeyId": key_id, "Description": "x" * 8193}
    )


def test_disable_and_enable(env: Env) -> None:
    key_id = env.key()
    blob = env.call("Encrypt", {"KeyId": key_id, "Plaintext": b"secret"})["CiphertextBlob"]
    env.call("DisableKey", {"KeyId": key_id})
    env.call("DisableKey", {"KeyId": arn(key_id)})  # idempotent
    meta = env.call("DescribeKey", {"KeyId": key_id})["KeyMetadata"]
    assert meta["KeyState"] == "Disabled" and meta["Enabled"] is False
    env.fails(errors.DisabledException, "Encrypt", {"KeyId": key_id, "Plaintext": b"x"})
    env.fails(errors.DisabledException, "Decrypt", {"CiphertextBlob": blob})
    env.fails(errors.DisabledException, "GenerateDataKey", {"KeyId": key_id, "KeySpec": "AES_256"})
    env.fails(
        errors.DisabledException, "GenerateDataKeyWithoutPlaintext", {"KeyId": key_id, "NumberOfBytes": 8}
    )
    assert env.last()["error_code"] == "DisabledException" and env.last()["key_id"] == arn(key_id)
    env.call("UpdateKeyDescription", {"KeyId": key_id, "Description": "still manageable"})
    env.call("EnableKey", {"KeyId": key_id})
    assert env.call("DescribeKey", {"KeyId": key_id})["KeyMetadata"]["KeyState"] == "Enabled"
    assert env.call("Decrypt", {"CiphertextBlob": blob})["Plaintext"] == b"secret"
    env.call("CreateAlias", {"AliasName": "alias/d", "TargetKeyId": key_id})
    env.fails(errors.NotFoundException, "DisableKey", {"KeyId": "alias/d"})
    env.fails(errors.NotFoundException, "EnableKey", {"KeyId": "00000000-0000-4000-8000-000000000000"})


# --------------------------------------------------------------------------- aliases


def test_alias_lifecycle(env: Env) -> None:
    k1, k2 = env.key(), env.key()
    env.call("CreateAlias", {"AliasName": "alias/app/main", "TargetKeyId": k1})
    env.fails(
        errors.AlreadyExistsException, "CreateAlias", {"AliasName": "alias/app/main", "TargetKeyId": k2}
    )
    out = env.call("Encrypt", {"KeyId": "alias/app/main", "Plaintext": b"x"})
    assert out["KeyId"] == arn(k1)
    env.service.clock.advance(timedelta(hours=1))  # type: ignore[attr-defined]
    env.call("UpdateAlias", {"AliasName": "alias/app/main", "TargetKeyId": arn(k2)})
    assert env.call("Encrypt", {"KeyId": "alias/app/main", "Plaintext": b"x"})["KeyId"] == arn(k2)
    aliases = env.call("ListAliases")["Aliases"]
    assert aliases == [
        {
            "AliasName": "alias/app/main",
            "AliasArn": f"arn:aws:kms:{REGION}:{ACCOUNT}:alias/app/main",
            "TargetKeyId": k2,
            "CreationDate": T0,
            "LastUpdatedDate": T0 + timedelta(hours=1),
        }
    ]
    env.call("CreateAlias", {"AliasName": "alias/other", "TargetKeyId": k1})
    assert [a["AliasName"] for a in env.call("ListAliases", {"KeyId": k1})["Aliases"]] == ["alias/other"]
    assert [a["AliasName"] for a in env.call("ListAliases", {"KeyId": arn(k2)})["Aliases"]] == [
        "alias/app/main"
    ]
    env.fails(errors.NotFoundException, "ListAliases", {"KeyId": "00000000-0000-4000-8000-000000000000"})
    page = env.call("ListAliases", {"Limit": 1})
    assert page["Truncated"] is True and len(page["Aliases"]) == 1
    rest = env.call("ListAliases", {"Limit": 1, "Marker": page["NextMarker"]})
    assert rest["Truncated"] is False and rest["Aliases"][0]["AliasName"] == "alias/other"
    env.call("DeleteAlias", {"AliasName": "alias/app/main"})
    assert env.last()["key_id"] == arn(k2) and env.last()["alias_name"] == "alias/app/main"
    env.fails(errors.NotFoundException, "DeleteAlias", {"AliasName": "alias/app/main"})
    env.fails(errors.NotFoundException, "Encrypt", {"KeyId": "alias/app/main", "Plaintext": b"x"})
    env.fails(errors.NotFoundException, "UpdateAlias", {"AliasName": "alias/app/main", "TargetKeyId": k1})


@pytest.mark.parametrize(
    "name, error",
    [
        ("alias/aws/mine", errors.NotAuthorizedException),
        ("mine", errors.InvalidAliasNameException),
        ("alias/", errors.InvalidAliasNameException),
        ("alias/a:b", errors.InvalidAliasNameException),
        ("alias/has space", errors.ValidationException),
        ("alias/é", errors.ValidationException),
        ("alias/" + "a" * 251, errors.ValidationException),
        ("", errors.ValidationException),
        (None, errors.ValidationException),
    ],
)
def test_alias_name_validation(env: Env, name: str | None, error: type[errors.KMSError]) -> None:
    key_id = env.key()
    env.fails(error, "CreateAlias", {"AliasName": name, "TargetKeyId": key_id})
    assert env.call("ListAliases")["Aliases"] == []


def test_alias_max_length_ok(env: Env) -> None:
    name = "alias/" + "a" * 250
    env.call("CreateAlias", {"AliasName": name, "TargetKeyId": env.key()})
    assert env.call("DescribeKey", {"KeyId": name})["KeyMetadata"]["KeyState"] == "Enabled"


def test_alias_target_validation(env: Env) -> None:
    key_id = env.key()
    env.call("CreateAlias", {"AliasName": "alias/a", "TargetKeyId": key_id})
    env.fails(errors.ValidationException, "CreateAlias", {"AliasName": "alias/b", "TargetKeyId": "alias/a"})
    env.fails(
        errors.NotFoundException,
        "CreateAlias",
        {"AliasName": "alias/b", "TargetKeyId": "00000000-0000-4000-8000-000000000000"},
    )
    env.fails(errors.ValidationException, "CreateAlias", {"AliasName": "alias/b"})
    env.fails(errors.NotAuthorizedException, "DeleteAlias", {"AliasName": "alias/aws/kmsfs"})


# --------------------------------------------------------------------------- crypto


def test_encrypt_decrypt_roundtrip(env: Env) -> None:
    key_id = env.key()
    env.call("CreateAlias", {"AliasName": "alias/rt", "TargetKeyId": key_id})
    context = {"kmsfs:file": "abc", "purpose": "test"}
    for size in (1, 100, 4096):
        plaintext = os.urandom(size)
        out = env.call("Encrypt", {"KeyId": key_id, "Plaintext": plaintext, "EncryptionContext": context})
        assert out["KeyId"] == arn(key_id) and out["EncryptionAlgorithm"] == "SYMMETRIC_DEFAULT"
        blob = out["CiphertextBlob"]
        assert isinstance(blob, bytes) and (size < 16 or plaintext not in blob)
        reordered = dict(reversed(list(context.items())))
        for params in (
            {"CiphertextBlob": blob, "EncryptionContext": reordered},
            {"CiphertextBlob": blob, "EncryptionContext": context, "KeyId": "alias/rt"},
            {"CiphertextBlob": blob, "EncryptionContext": context, "KeyId": arn(key_id)},
        ):
            got = env.call("Decrypt", params)
            assert got == {
                "Plaintext": plaintext,
                "KeyId": arn(key_id),
                "EncryptionAlgorithm": "SYMMETRIC_DEFAULT",
            }


def test_encrypt_validation(env: Env) -> None:
    key_id = env.key()
    env.fails(errors.ValidationException, "Encrypt", {"KeyId": key_id, "Plaintext": b""})
    env.fails(errors.ValidationException, "Encrypt", {"KeyId": key_id, "Plaintext": b"x" * 4097})
    env.fails(errors.ValidationException, "Encrypt", {"KeyId": key_id, "Plaintext": "text"})
    env.fails(errors.ValidationException, "Encrypt", {"KeyId": key_id})
    env.fails(errors.ValidationException, "Encrypt", {"Plaintext": b"x"})
    env.fails(
        errors.ValidationException, "Encrypt", {"KeyId": key_id, "Plaintext": b"x", "EncryptionContext": "a"}
    )
    env.fails(
        errors.ValidationException,
        "Encrypt",
        {"KeyId": key_id, "Plaintext": b"x", "EncryptionContext": {"a": 1}},
    )
    env.fails(
        errors.InvalidKeyUsageException,
        "Encrypt",
        {"KeyId": key_id, "Plaintext": b"x", "EncryptionAlgorithm": "RSAES_OAEP_SHA_256"},
    )
    env.fails(
        errors.ValidationException,
        "Encrypt",
        {"KeyId": key_id, "Plaintext": b"x", "EncryptionAlgorithm": "X"},
    )
    env.fails(
        errors.DryRunOperationException, "Encrypt", {"KeyId": key_id, "Plaintext": b"x", "DryRun": True}
    )


def test_decrypt_errors(env: Env) -> None:
    k1, k2 = env.key(), env.key()
    blob = env.call("Encrypt", {"KeyId": k1, "Plaintext": b"p", "EncryptionContext": {"a": "1"}})[
        "CiphertextBlob"
    ]
    env.fails(errors.IncorrectKeyException, "Decrypt", {"CiphertextBlob": blob, "KeyId": k2})
    assert env.last()["key_id"] == arn(k1)
    env.fails(errors.NotFoundException, "Decrypt", {"CiphertextBlob": blob, "KeyId": "alias/none"})
    env.fails(errors.InvalidCiphertextException, "Decrypt", {"CiphertextBlob": blob})
    env.fails(
        errors.InvalidCiphertextException,
        "Decrypt",
        {"CiphertextBlob": blob, "EncryptionContext": {"a": "2"}},
    )
    tampered = blob[:-1] + bytes([blob[-1] ^ 1])
    env.fails(
        errors.InvalidCiphertextException,
        "Decrypt",
        {"CiphertextBlob": tampered, "EncryptionContext": {"a": "1"}},
    )
    env.fails(errors.InvalidCiphertextException, "Decrypt", {"CiphertextBlob": b"garbage"})
    env.fails(errors.InvalidCiphertextException, "Decrypt", {"CiphertextBlob": os.urandom(200)})
    # A well-formed blob naming a key this service does not have.
    foreign = blob[:1] + bytes(16) + blob[17:]
    env.fails(
        errors.InvalidCiphertextException,
        "Decrypt",
        {"CiphertextBlob": foreign, "EncryptionContext": {"a": "1"}},
    )
    # A version that does not exist.
    bad_version = blob[:17] + (9).to_bytes(4, "big") + blob[21:]
    env.fails(
        errors.InvalidCiphertextException,
        "Decrypt",
        {"CiphertextBlob": bad_version, "EncryptionContext": {"a": "1"}},
    )
    env.fails(errors.ValidationException, "Decrypt", {})
    env.fails(errors.ValidationException, "Decrypt", {"CiphertextBlob": b""})
    env.fails(errors.ValidationException, "Decrypt", {"CiphertextBlob": b"x" * 6145})
    env.fails(errors.ValidationException, "Decrypt", {"CiphertextBlob": base64.b64encode(blob).decode()})
    assert env.call("Decrypt", {"CiphertextBlob": blob, "EncryptionContext": {"a": "1"}})["Plaintext"] == b"p"


@pytest.mark.parametrize(
    "params, size",
    [
        ({"KeySpec": "AES_128"}, 16),
        ({"KeySpec": "AES_256"}, 32),
        ({"NumberOfBytes": 1}, 1),
        ({"NumberOfBytes": 1024}, 1024),
    ],
)
def test_generate_data_key(env: Env, params: dict[str, Any], size: int) -> None:
    key_id = env.key()
    ctx = {"file": "f"}
    out = env.call("GenerateDataKey", {"KeyId": key_id, "EncryptionContext": ctx, **params})
    assert set(out) == {"CiphertextBlob", "Plaintext", "KeyId"}
    assert len(out["Plaintext"]) == size and out["KeyId"] == arn(key_id)
    back = env.call("Decrypt", {"CiphertextBlob": out["CiphertextBlob"], "EncryptionContext": ctx})
    assert back["Plaintext"] == out["Plaintext"]
    wp = env.call("GenerateDataKeyWithoutPlaintext", {"KeyId": key_id, "EncryptionContext": ctx, **params})
    assert set(wp) == {"CiphertextBlob", "KeyId"}
    assert (
        len(
            env.call("Decrypt", {"CiphertextBlob": wp["CiphertextBlob"], "EncryptionContext": ctx})[
                "Plaintext"
            ]
        )
        == size
    )


@pytest.mark.parametrize("operation", ["GenerateDataKey", "GenerateDataKeyWithoutPlaintext"])
def test_generate_data_key_validation(env: Env, operation: str) -> None:
    key_id = env.key()
    env.fails(errors.ValidationException, operation, {"KeyId": key_id})
    env.fails(
        errors.ValidationException, operation, {"KeyId": key_id, "KeySpec": "AES_256", "NumberOfBytes": 32}
    )
    env.fails(errors.ValidationException, operation, {"KeyId": key_id, "KeySpec": "AES_512"})
    env.fails(errors.ValidationException, operation, {"KeyId": key_id, "NumberOfBytes": 0})
    env.fails(errors.ValidationException, operation, {"KeyId": key_id, "NumberOfBytes": 1025})
    env.fails(errors.ValidationException, operation, {"KeySpec": "AES_256"})
    env.fails(errors.NotFoundException, operation, {"KeyId": "alias/none", "KeySpec": "AES_256"})


def test_generate_random(env: Env) -> None:
    for n in (1, 32, 1024):
        out = env.call("GenerateRandom", {"NumberOfBytes": n})
        assert len(out["Plaintext"]) == n
    assert env.call("GenerateRandom", {"NumberOfBytes": 32}) != env.call(
        "GenerateRandom", {"NumberOfBytes": 32}
    )
    for bad in ({}, {"NumberOfBytes": 0}, {"NumberOfBytes": 1025}, {"NumberOfBytes": 1.5}):
        env.fails(errors.ValidationException, "GenerateRandom", bad)
    env.fails(
        errors.UnsupportedOperationException, "GenerateRandom", {"NumberOfBytes": 8, "CustomKeyStoreId": "c"}
    )


def test_unknown_operation_is_audited(env: Env) -> None:
    env.fails(errors.UnknownOperationException, "StealAllKeys", {})
    record = env.last()
    assert record["operation"] == "StealAllKeys" and record["error_code"] == "UnknownOperationException"


def test_params_must_be_object(env: Env) -> None:
    with pytest.raises(errors.SerializationException):
        env.service.call("ListKeys", [], env.ctx())  # type: ignore[arg-type]


# --------------------------------------------------------------------------- audit


def test_exactly_one_audit_record_per_call(env: Env) -> None:
    key_id = env.key()
    before = len(env.records())
    env.call(
        "Encrypt",
        {"KeyId": key_id, "Plaintext": b"x", "EncryptionContext": {"k": "v"}},
        path="/mnt/docs/a.txt",
        uid=1000,
        pid=4242,
        process="cat",
    )
    env.fails(errors.NotFoundException, "Encrypt", {"KeyId": "alias/none", "Plaintext": b"x"})
    records = env.records()
    assert len(records) == before + 2
    ok, bad = records[-2:]
    assert ok["operation"] == "Encrypt" and ok["outcome"] == "success"
    assert ok["key_id"] == arn(key_id) and ok["key_version"] == 1
    assert ok["encryption_context"] == {"k": "v"}
    assert ok["principal"] == env.creds.principal_arn and ok["access_key_id"] == env.creds.access_key_id
    assert ok["source_address"] == "192.0.2.7" and ok["user_agent"] == "pytest/1.0"
    assert ok["caller"] == {"path": "/mnt/docs/a.txt", "uid": 1000, "pid": 4242, "process": "cat"}
    assert ok["time"] == "2026-05-01T09:00:00.000Z"
    assert bad["outcome"] == "error" and bad["error_code"] == "NotFoundException" and bad["error_message"]
    assert bad["requested_key_id"] == "alias/none" and bad["key_id"] is None
    assert [r["request_id"] for r in records[-2:]] == [f"req-{env.n - 1}", f"req-{env.n}"]
    assert verify_audit(env.data_dir).ok
    files = [r for r in audit_review.query(env.data_dir, file="/mnt/docs")]
    assert len(files) == 1 and files[0]["operation"] == "Encrypt"


def test_record_refused(env: Env) -> None:
    ctx = RequestContext("req-x", "203.0.113.9", None, "aws-cli/2", {})
    env.service.record_refused("Decrypt", ctx, errors.InvalidSignatureException("signature mismatch"))
    record = env.last()
    assert record["operation"] == "Decrypt" and record["outcome"] == "error"
    assert record["error_code"] == "InvalidSignatureException" and record["principal"] is None
    assert record["source_address"] == "203.0.113.9"
    env.service.record_refused(
        "Encrypt", ctx, errors.UnrecognizedClientException("invalid"), access_key_id="AKIAUNKNOWN000000000"
    )
    assert env.last()["access_key_id"] == "AKIAUNKNOWN000000000" and env.last()["principal"] is None


def test_audit_failure_fails_closed(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    key_id = env.key()

    def broken(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(audit_log.os, "fsync", broken)
    with pytest.raises(errors.KMSInternalException):
        env.call("GenerateDataKey", {"KeyId": key_id, "KeySpec": "AES_256"})
    with pytest.raises(errors.KMSInternalException):
        env.call("DescribeKey", {"KeyId": "alias/none"})


def test_internal_errors_are_audited_and_hidden(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    def explode(key_id: str) -> None:
        raise RuntimeError("disk on fire at /secret/path")

    monkeypatch.setattr(env.service.store, "get_key", explode)
    message = env.fails(
        errors.KMSInternalException, "DescribeKey", {"KeyId": "00000000-0000-4000-8000-000000000000"}
    )
    assert "fire" not in message
    assert env.last()["error_code"] == "KMSInternalException"


def test_no_secrets_on_disk(env: Env) -> None:
    """Grep the raw bytes of the audit log and of every SQLite file for anything secret."""
    key_id = env.key()
    env.call("CreateAlias", {"AliasName": "alias/g", "TargetKeyId": key_id})
    plaintext = b"TOP-SECRET-PLAINTEXT-" + os.urandom(8).hex().encode()
    secrets_seen: list[bytes] = [plaintext, env.root_key, env.creds.secret_access_key.encode()]
    enc = env.call("Encrypt", {"KeyId": "alias/g", "Plaintext": plaintext, "EncryptionContext": {"f": "1"}})
    secrets_seen.append(enc["CiphertextBlob"])
    dk = env.call("GenerateDataKey", {"KeyId": key_id, "KeySpec": "AES_256"})
    secrets_seen += [dk["Plaintext"], dk["CiphertextBlob"]]
    secrets_seen.append(
        env.call("GenerateDataKeyWithoutPlaintext", {"KeyId": key_id, "NumberOfBytes": 64})["CiphertextBlob"]
    )
    secrets_seen.append(
        env.call("Decrypt", {"CiphertextBlob": enc["CiphertextBlob"], "EncryptionContext": {"f": "1"}})[
            "Plaintext"
        ]
    )
    secrets_seen.append(env.call("GenerateRandom", {"NumberOfBytes": 32})["Plaintext"])
    env.fails(errors.InvalidCiphertextException, "Decrypt", {"CiphertextBlob": enc["CiphertextBlob"]})
    version = env.service.store.latest_key_version(key_id)
    assert version is not None
    material = rootkey.unseal(env.root_key, version.sealed_material, material_aad(key_id, 1))
    assert len(material) == 32
    secrets_seen.append(material)

    def forms(secret: bytes) -> list[bytes]:
        out = [secret, secret.hex().encode(), secret.hex().upper().encode(), base64.b64encode(secret)]
        return [f for f in out if len(f) >= 16]

    files = [env.data_dir / "audit" / "audit.log"] + sorted(env.data_dir.glob("keyservice.db*"))
    blobs = {f.name: f.read_bytes() for f in files}
    assert blobs["keyservice.db"] or blobs.get("keyservice.db-wal")
    escaped = [json.dumps(s.decode("latin-1"))[1:-1].encode() for s in secrets_seen]
    for name, raw in blobs.items():
        for secret in secrets_seen:
            for form in forms(secret):
                assert form not in raw, f"secret material found in {name}"
        if name == "audit.log":
            for e in escaped:
                assert e not in raw
    # The data directory alone (without the dev key file, i.e. a non-dev layout) never holds the root key.
    assert env.root_key not in blobs["keyservice.db"]


def test_concurrent_calls(env: Env) -> None:
    key_id = env.key()
    failures: list[BaseException] = []

    def worker(n: int) -> None:
        try:
            for i in range(10):
                pt = f"{n}-{i}".encode()
                blob = env.service.call("Encrypt", {"KeyId": key_id, "Plaintext": pt}, env.ctx())[
                    "CiphertextBlob"
                ]
                assert env.service.call("Decrypt", {"CiphertextBlob": blob}, env.ctx())["Plaintext"] == pt
        except BaseException as exc:  # pragma: no cover
            failures.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []
    assert len([r for r in env.records() if r["operation"] in ("Encrypt", "Decrypt")]) == 120
    assert verify_audit(env.data_dir).ok


def verify_audit(data_dir: Path) -> audit_verify.VerifyReport:
    public_key = audit_signing.load_public(audit_signing.public_path(data_dir))
    return audit_verify.verify(data_dir, public_key)
