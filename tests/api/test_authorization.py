"""Authorization glue, in-process (issue 4): principals from ``principals.py``, key policies,
identity policies and grants, as ``KeyService.call`` applies them to every operation."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from keyservice import bootstrap, errors, principals
from keyservice.authz import authorize, policy
from keyservice.clock import FixedClock
from keyservice.context import RequestContext
from keyservice.service import KeyService
from keyservice.store import rootkey
from keyservice.store import sqlite as store

REGION = "eu-west-1"
ACCOUNT = "123456789012"
ROOT = f"arn:aws:iam::{ACCOUNT}:root"
T0 = datetime(2026, 5, 1, 9, 0, tzinfo=UTC)


class Caller:
    def __init__(self, service: KeyService, access_key_id: str) -> None:
        self.service = service
        _, self.principal = service.authenticate(access_key_id)

    def call(self, operation: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        return self.service.call(operation, params or {}, RequestContext("r", "127.0.0.1", self.principal))

    def denied(self, operation: str, params: dict[str, Any] | None = None) -> str:
        with pytest.raises(errors.AccessDeniedException) as info:
            self.call(operation, params)
        return info.value.message


class World:
    def __init__(self, tmp_path: Path) -> None:
        self.data_dir = tmp_path / "data"
        self.root_key = rootkey.create_root_config(self.data_dir, rootkey.RootKeySource.dev())
        admin = bootstrap.initialize(self.data_dir, self.root_key, region=REGION, account_id=ACCOUNT)
        self.service = bootstrap.open_service(self.data_dir, self.root_key, clock=FixedClock(T0))
        self.admin = Caller(self.service, admin.access_key_id)
        bob = principals.create(self.data_dir, self.root_key, "bob")
        self.bob_arn = bob.principal_arn
        self.bob = Caller(self.service, bob.access_key_id)

    def key(self, **params: Any) -> str:
        return self.admin.call("CreateKey", params)["KeyMetadata"]["Arn"]

    def attach(self, name: str, *statements: dict[str, Any]) -> None:
        doc = json.dumps({"Version": "2012-10-17", "Statement": list(statements)})
        principals.attach_policy(self.data_dir, self.root_key, "bob", name, doc)


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    w = World(tmp_path)
    yield w
    w.service.close()


def key_policy(*extra: dict[str, Any], root: bool = True) -> str:
    statements = list(extra)
    if root:
        statements.insert(
            0, {"Effect": "Allow", "Principal": {"AWS": ROOT}, "Action": "kms:*", "Resource": "*"}
        )
    return json.dumps({"Version": "2012-10-17", "Statement": statements})


def test_new_principal_is_denied_with_aws_wording_and_no_policy_text(world: World) -> None:
    key = world.key(Policy=key_policy({"Sid": "SECRET-SID", "Effect": "Deny", "Principal": "*",
                                       "Action": "kms:Decrypt", "Resource": "*"}))  # fmt: skip
    message = world.bob.denied("Encrypt", {"KeyId": key, "Plaintext": b"x"})
    assert message == (
        f"User: {world.bob_arn} is not authorized to perform: kms:Encrypt on resource: {key} "
        "because no identity-based policy allows the kms:Encrypt action"
    )
    assert "SECRET-SID" not in world.bob.denied("DescribeKey", {"KeyId": key})
    assert "*" in world.bob.denied("CreateKey")  # account-level: resource "*"
    world.bob.denied("ListKeys")
    world.bob.denied("GenerateRandom", {"NumberOfBytes": 8})


def test_the_root_keeps_full_control_and_default_policy_is_stored(world: World) -> None:
    key = world.key()
    assert json.loads(world.admin.call("GetKeyPolicy", {"KeyId": key})["Policy"]) == json.loads(
        policy.default_key_policy(ACCOUNT)
    )
    assert world.admin.call("ListKeyPolicies", {"KeyId": key})["PolicyNames"] == ["default"]
    world.admin.call("DisableKey", {"KeyId": key})
    with pytest.raises(errors.NotFoundException):
        world.admin.call("GetKeyPolicy", {"KeyId": key, "PolicyName": "other"})


def test_identity_policy_is_seen_at_once_and_detach_revokes(world: World) -> None:
    key = world.key()
    world.attach("use", {"Effect": "Allow", "Action": ["kms:Encrypt", "kms:Decrypt"], "Resource": key})
    blob = world.bob.call("Encrypt", {"KeyId": key, "Plaintext": b"hi"})["CiphertextBlob"]
    assert world.bob.call("Decrypt", {"CiphertextBlob": blob})["Plaintext"] == b"hi"
    world.bob.denied("DisableKey", {"KeyId": key})
    principals.detach_policy(world.data_dir, world.root_key, "bob", "use")
    world.bob.denied("Decrypt", {"CiphertextBlob": blob})


def test_decrypt_authorizes_on_the_blob_key_not_the_key_id(world: World) -> None:
    x, y = world.key(), world.key()
    blob = world.admin.call("Encrypt", {"KeyId": x, "Plaintext": b"secret"})["CiphertextBlob"]
    world.attach("y-only", {"Effect": "Allow", "Action": "kms:*", "Resource": y})
    message = world.bob.denied("Decrypt", {"CiphertextBlob": blob})
    assert x in message and "kms:Decrypt" in message
    with pytest.raises(errors.IncorrectKeyException):
        world.bob.call("Decrypt", {"CiphertextBlob": blob, "KeyId": y})
    # ReEncrypt: source is authorized on the blob's key (kms:ReEncryptFrom), not on SourceKeyId.
    message = world.bob.denied("ReEncrypt", {"CiphertextBlob": blob, "DestinationKeyId": y})
    assert "kms:ReEncryptFrom" in message and x in message


def test_reencrypt_needs_from_and_to(world: World) -> None:
    x, y = world.key(), world.key()
    blob = world.admin.call("Encrypt", {"KeyId": x, "Plaintext": b"s"})["CiphertextBlob"]
    world.attach("from", {"Effect": "Allow", "Action": "kms:ReEncryptFrom", "Resource": x})
    assert "kms:ReEncryptTo" in world.bob.denied("ReEncrypt", {"CiphertextBlob": blob, "DestinationKeyId": y})
    world.attach("to", {"Effect": "Allow", "Action": "kms:ReEncrypt*", "Resource": y})
    out = world.bob.call("ReEncrypt", {"CiphertextBlob": blob, "DestinationKeyId": y})
    assert out["KeyId"] == y


def test_put_key_policy_lockout_guard_and_bypass(world: World) -> None:
    key = world.key()
    lockout = key_policy({"Effect": "Allow", "Principal": {"AWS": world.bob_arn}, "Action": "kms:Encrypt",
                          "Resource": "*"}, root=False)  # fmt: skip
    with pytest.raises(errors.MalformedPolicyDocumentException, match="will not allow you to update"):
        world.admin.call("PutKeyPolicy", {"KeyId": key, "PolicyName": "default", "Policy": lockout})
    with pytest.raises(errors.MalformedPolicyDocumentException, match="will not allow you to update"):
        world.admin.call("CreateKey", {"Policy": lockout})
    with pytest.raises(errors.MalformedPolicyDocumentException):
        world.admin.call("PutKeyPolicy", {"KeyId": key, "Policy": '{"Statement": []}'})
    world.admin.call(
        "PutKeyPolicy", {"KeyId": key, "Policy": lockout, "BypassPolicyLockoutSafetyCheck": True}
    )
    world.admin.denied("PutKeyPolicy", {"KeyId": key, "Policy": key_policy()})  # locked out, as warned
    world.bob.call("Encrypt", {"KeyId": key, "Plaintext": b"x"})  # named in the policy: no identity needed


def test_grants_constraints_tokens_retire_and_revoke(world: World) -> None:
    key = world.key()
    grant = world.admin.call("CreateGrant", {
        "KeyId": key, "GranteePrincipal": world.bob_arn, "Operations": ["Encrypt", "Decrypt", "RetireGrant"],
        "Constraints": {"EncryptionContextSubset": {"dept": "hr"}},
    })  # fmt: skip
    token = grant["GrantToken"]
    assert authorize.grant_id_of_token(world.service, token) == grant["GrantId"]
    ok = {
        "KeyId": key,
        "Plaintext": b"x",
        "EncryptionContext": {"dept": "hr", "extra": "1"},
        "GrantTokens": [token],
    }
    blob = world.bob.call("Encrypt", ok)["CiphertextBlob"]
    world.bob.denied("Encrypt", {"KeyId": key, "Plaintext": b"x", "EncryptionContext": {"dept": "it"}})
    world.bob.denied("DisableKey", {"KeyId": key})
    with pytest.raises(errors.InvalidGrantTokenException):
        world.bob.call("Encrypt", {**ok, "GrantTokens": [token[:-2] + "AA"]})
    listed = world.admin.call("ListGrants", {"KeyId": key})["Grants"]
    assert [g["GrantId"] for g in listed] == [grant["GrantId"]]
    assert listed[0]["Constraints"] == {"EncryptionContextSubset": {"dept": "hr"}}
    world.bob.call("RetireGrant", {"GrantToken": token})  # the grantee, since the grant has RetireGrant
    world.bob.denied("Decrypt", {"CiphertextBlob": blob, "EncryptionContext": {"dept": "hr", "extra": "1"}})
    with pytest.raises(errors.InvalidGrantTokenException):
        world.bob.call("Encrypt", ok)  # a retired grant's token is stale
    again = world.admin.call("CreateGrant", {"KeyId": key, "GranteePrincipal": world.bob_arn,
                                             "Operations": ["Decrypt"]})  # fmt: skip
    world.bob.denied("RetireGrant", {"KeyId": key, "GrantId": again["GrantId"]})  # not RetireGrant in ops
    world.admin.call("RevokeGrant", {"KeyId": key, "GrantId": again["GrantId"]})
    assert world.admin.call("ListGrants", {"KeyId": key})["Grants"] == []
    with pytest.raises(errors.NotFoundException):
        world.admin.call("RevokeGrant", {"KeyId": key, "GrantId": again["GrantId"]})


def test_aws_managed_key_policy_lets_the_account_use_but_not_manage(world: World) -> None:
    world.admin.call("GenerateDataKey", {"KeyId": "alias/aws/kmsfs", "KeySpec": "AES_256"})
    meta = world.admin.call("DescribeKey", {"KeyId": "alias/aws/kmsfs"})["KeyMetadata"]
    text = world.admin.call("GetKeyPolicy", {"KeyId": meta["KeyId"]})["Policy"]
    assert text == policy.aws_managed_key_policy(ACCOUNT)
    assert "kms:DisableKey" in world.admin.denied("DisableKey", {"KeyId": meta["KeyId"]})
    world.bob.denied("GenerateDataKey", {"KeyId": "alias/aws/kmsfs", "KeySpec": "AES_256"})


def test_deleted_principal_and_rotated_key_stop_working(world: World) -> None:
    old = world.bob.principal.access_key_id
    new = principals.rotate_access_key(world.data_dir, world.root_key, "bob")
    with pytest.raises(errors.UnrecognizedClientException):
        world.service.authenticate(old)
    world.service.authenticate(new.access_key_id)
    principals.delete(world.data_dir, world.root_key, "bob")
    with pytest.raises(errors.UnrecognizedClientException):
        world.service.authenticate(new.access_key_id)
    assert principals.list_all(world.data_dir) == []


def test_a_key_operation_that_skips_authorization_fails_closed(world: World, monkeypatch) -> None:
    key = world.key()
    monkeypatch.setattr(world.service, "check_usable", lambda *a, **k: None)
    with pytest.raises(errors.KMSInternalException):
        world.admin.call("DisableKey", {"KeyId": key})


def test_schema_2_store_migrates_policies(tmp_path: Path) -> None:
    path = tmp_path / "keyservice.db"
    s = store.SQLiteStore(path)
    s.close()
    import sqlite3

    with sqlite3.connect(path) as db:
        db.execute("UPDATE meta SET value = '2' WHERE name = 'schema_version'")
        for table in ("grants", "identity_policies", "principals"):
            db.execute(f"DROP TABLE {table}")
        db.execute("DROP INDEX credentials_by_principal")
        rows = (
            ("a", "CUSTOMER", None),
            ("b", "CUSTOMER", "{}"),
            ("c", "AWS", None),
            ("d", "CUSTOMER", policy.default_key_policy("999999999999")),
        )
        for key_id, manager, text in rows:
            db.execute(
                "INSERT INTO keys(key_id, arn, account_id, region, description, state, origin, key_manager,"
                " key_usage, key_spec, creation_date, policy) VALUES (?, ?, ?, 'r', '', 'Enabled', 'AWS_KMS',"
                " ?, 'ENCRYPT_DECRYPT', 'SYMMETRIC_DEFAULT', ?, ?)",
                (key_id, "arn:" + key_id, ACCOUNT, manager, T0.isoformat(), text),
            )
    s = store.SQLiteStore(path)
    try:
        assert s.get_meta("schema_version") == "3"
        assert s.get_key("a").policy == s.get_key("b").policy == policy.default_key_policy(ACCOUNT)
        assert s.get_key("c").policy == policy.aws_managed_key_policy(ACCOUNT)
        assert s.get_key("d").policy == policy.default_key_policy("999999999999")  # valid: kept
        assert s.list_principals() == [] and s.list_grants() == []
    finally:
        s.close()


def test_a_grant_with_create_grant_cannot_hand_out_more(world: World) -> None:
    key = world.key()
    world.admin.call("CreateGrant", {
        "KeyId": key, "GranteePrincipal": world.bob_arn, "Operations": ["Decrypt", "CreateGrant"],
        "Constraints": {"EncryptionContextSubset": {"dept": "hr"}},
    })  # fmt: skip
    other = f"arn:aws:iam::{ACCOUNT}:user/eve"
    with pytest.raises(errors.AccessDeniedException, match="Encrypt"):
        hr = {"EncryptionContextSubset": {"dept": "hr"}}
        world.bob.call(
            "CreateGrant",
            {"KeyId": key, "GranteePrincipal": other, "Operations": ["Encrypt"], "Constraints": hr},
        )
    with pytest.raises(errors.AccessDeniedException, match="strict"):
        world.bob.call("CreateGrant", {"KeyId": key, "GranteePrincipal": other, "Operations": ["Decrypt"]})
    stricter = {"EncryptionContextEquals": {"dept": "hr", "x": "1"}}
    world.bob.call(
        "CreateGrant",
        {"KeyId": key, "GranteePrincipal": other, "Operations": ["Decrypt"], "Constraints": stricter},
    )
