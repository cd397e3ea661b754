"""Principals, key policies, identity policies and grants through boto3, unchanged, against a real
``keyservice serve --dev`` process (TLS), with two principals: the admin (the account root) and
``bob``, created with ``keyservice principal create`` while the server runs (issue 4, SPEC K4/K5).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError

from keyservice.audit.records import audit_path
from tests.conftest import DevKeyService, run_keyservice, start_dev_service, stop_dev_service

pytestmark = pytest.mark.integration


def _code(call: Callable[..., Any], **kwargs: Any) -> str:
    with pytest.raises(ClientError) as info:
        call(**kwargs)
    return info.value.response["Error"]["Code"]


def _cli(service: DevKeyService, *args: str) -> str:
    result = run_keyservice("principal", *args, "--data-dir", str(service.data_dir))
    assert result.returncode == 0, result.stderr
    return result.stdout


def _doc(*statements: dict[str, Any]) -> str:
    return json.dumps({"Version": "2012-10-17", "Statement": list(statements)})


class World:
    def __init__(self, service: DevKeyService) -> None:
        self.service = service
        self.admin = service.boto3_client()
        self.account = self.admin.describe_key(KeyId=self.admin.create_key()["KeyMetadata"]["KeyId"])[
            "KeyMetadata"
        ]["AWSAccountId"]
        self.root = f"arn:aws:iam::{self.account}:root"
        self.bob_creds = json.loads(_cli(service, "create", "bob", "--json"))
        self.bob_arn = self.bob_creds["principal_arn"]
        self.bob = self.client(self.bob_creds)

    def client(self, creds: dict[str, str]) -> Any:
        return self.service.boto3_client(
            aws_access_key_id=creds["access_key_id"], aws_secret_access_key=creds["secret_access_key"]
        )

    def key(self, *statements: dict[str, Any]) -> str:
        """A new key whose policy keeps the account root in control, plus ``statements``."""
        root = {"Sid": "root", "Effect": "Allow", "Principal": {"AWS": self.root}, "Action": "kms:*",
                "Resource": "*"}  # fmt: skip
        return self.admin.create_key(Policy=_doc(root, *statements))["KeyMetadata"]["Arn"]

    def to_bob(self, actions: object, **extra: Any) -> dict[str, Any]:
        return {
            "Effect": "Allow",
            "Principal": {"AWS": self.bob_arn},
            "Action": actions,
            "Resource": "*",
            **extra,
        }

    def attach(self, name: str, document: str, tmp_path: Path) -> None:
        path = tmp_path / f"{name}.json"
        path.write_text(document)
        _cli(self.service, "attach-policy", "bob", "--policy-file", str(path), "--name", name)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    service = start_dev_service(tmp_path_factory.mktemp("policies"))
    try:
        yield World(service)
    finally:
        stop_dev_service(service)


def test_a_principal_without_permission_is_denied_everything_and_audited(world: World) -> None:
    key = world.key()
    blob = world.admin.encrypt(KeyId=key, Plaintext=b"top secret")["CiphertextBlob"]
    grant = world.admin.create_grant(KeyId=key, GranteePrincipal=world.root, Operations=["Decrypt"])
    bob = world.bob
    attempts: list[tuple[str, Callable[..., Any], dict[str, Any]]] = [
        ("Encrypt", bob.encrypt, {"KeyId": key, "Plaintext": b"x"}),
        ("Decrypt", bob.decrypt, {"CiphertextBlob": blob}),
        ("ReEncrypt", bob.re_encrypt, {"CiphertextBlob": blob, "DestinationKeyId": key}),
        ("GenerateDataKey", bob.generate_data_key, {"KeyId": key, "KeySpec": "AES_256"}),
        ("GenerateDataKeyWithoutPlaintext", bob.generate_data_key_without_plaintext,
         {"KeyId": key, "KeySpec": "AES_256"}),
        ("DescribeKey", bob.describe_key, {"KeyId": key}),
        ("DisableKey", bob.disable_key, {"KeyId": key}),
        ("EnableKey", bob.enable_key, {"KeyId": key}),
        ("UpdateKeyDescription", bob.update_key_description, {"KeyId": key, "Description": "mine"}),
        ("ScheduleKeyDeletion", bob.schedule_key_deletion, {"KeyId": key, "PendingWindowInDays": 7}),
        ("CancelKeyDeletion", bob.cancel_key_deletion, {"KeyId": key}),
        ("EnableKeyRotation", bob.enable_key_rotation, {"KeyId": key}),
        ("RotateKeyOnDemand", bob.rotate_key_on_demand, {"KeyId": key}),
        ("GetKeyRotationStatus", bob.get_key_rotation_status, {"KeyId": key}),
        ("PutKeyPolicy", bob.put_key_policy, {"KeyId": key, "PolicyName": "default", "Policy": _doc(
            world.to_bob("kms:*"))}),
        ("GetKeyPolicy", bob.get_key_policy, {"KeyId": key, "PolicyName": "default"}),
        ("ListKeyPolicies", bob.list_key_policies, {"KeyId": key}),
        ("CreateAlias", bob.create_alias, {"AliasName": "alias/bobs", "TargetKeyId": key}),
        ("TagResource", bob.tag_resource, {"KeyId": key, "Tags": [{"TagKey": "a", "TagValue": "b"}]}),
        ("ListResourceTags", bob.list_resource_tags, {"KeyId": key}),
        ("CreateGrant", bob.create_grant, {"KeyId": key, "GranteePrincipal": world.bob_arn,
                                           "Operations": ["Encrypt"]}),
        ("ListGrants", bob.list_grants, {"KeyId": key}),
        ("RevokeGrant", bob.revoke_grant, {"KeyId": key, "GrantId": grant["GrantId"]}),
        ("RetireGrant", bob.retire_grant, {"GrantToken": grant["GrantToken"]}),
        ("CreateKey", bob.create_key, {}),
        ("ListKeys", bob.list_keys, {}),
        ("ListAliases", bob.list_aliases, {}),
        ("GenerateRandom", bob.generate_random, {"NumberOfBytes": 16}),
    ]  # fmt: skip
    for operation, call, kwargs in attempts:
        with pytest.raises(ClientError) as info:
            call(**kwargs)
        error = info.value.response["Error"]
        assert error["Code"] == "AccessDeniedException", operation
        assert world.bob_arn in error["Message"] and "is not authorized to perform: kms:" in error["Message"]
        assert "Statement" not in error["Message"] and "Allow" not in error["Message"]
    assert world.admin.describe_key(KeyId=key)["KeyMetadata"]["KeyState"] == "Enabled"
    denied = {
        r["operation"]
        for r in world.service.audit_records()
        if r["principal"] == world.bob_arn and r["error_code"] == "AccessDeniedException"
    }
    assert denied >= {operation for operation, _, _ in attempts}


def test_usage_in_the_key_policy_lets_encrypt_but_not_disable(world: World) -> None:
    key = world.key(world.to_bob(["kms:Encrypt", "kms:Decrypt", "kms:GenerateDataKey*"]))
    blob = world.bob.encrypt(KeyId=key, Plaintext=b"hello")["CiphertextBlob"]
    assert world.bob.decrypt(CiphertextBlob=blob)["Plaintext"] == b"hello"
    data_key = world.bob.generate_data_key(KeyId=key, KeySpec="AES_256")
    assert (
        world.admin.decrypt(CiphertextBlob=data_key["CiphertextBlob"])["Plaintext"] == data_key["Plaintext"]
    )
    assert _code(world.bob.disable_key, KeyId=key) == "AccessDeniedException"
    assert _code(world.bob.describe_key, KeyId=key) == "AccessDeniedException"
    assert world.admin.describe_key(KeyId=key)["KeyMetadata"]["Enabled"] is True


def test_deny_beats_allow(world: World) -> None:
    deny = {"Effect": "Deny", "Principal": {"AWS": world.bob_arn}, "Action": "kms:Decrypt", "Resource": "*"}
    key = world.key(world.to_bob("kms:*"), deny)
    blob = world.bob.encrypt(KeyId=key, Plaintext=b"x")["CiphertextBlob"]
    with pytest.raises(ClientError) as info:
        world.bob.decrypt(CiphertextBlob=blob)
    assert info.value.response["Error"]["Code"] == "AccessDeniedException"
    assert "explicit deny" in info.value.response["Error"]["Message"]


def test_an_encryption_context_condition_is_enforced(world: World) -> None:
    condition = {"StringEquals": {"kms:EncryptionContext:dept": "hr"}}
    key = world.key(world.to_bob(["kms:Encrypt", "kms:Decrypt"], Condition=condition))
    hr = {"dept": "hr"}
    blob = world.bob.encrypt(KeyId=key, Plaintext=b"pay", EncryptionContext=hr)["CiphertextBlob"]
    assert world.bob.decrypt(CiphertextBlob=blob, EncryptionContext=hr)["Plaintext"] == b"pay"
    assert _code(world.bob.encrypt, KeyId=key, Plaintext=b"x", EncryptionContext={"dept": "it"}) == (
        "AccessDeniedException"
    )
    assert _code(world.bob.encrypt, KeyId=key, Plaintext=b"x") == "AccessDeniedException"
    it_blob = world.admin.encrypt(KeyId=key, Plaintext=b"x", EncryptionContext={"dept": "it"})[
        "CiphertextBlob"
    ]
    assert _code(world.bob.decrypt, CiphertextBlob=it_blob, EncryptionContext={"dept": "it"}) == (
        "AccessDeniedException"
    )


def test_a_blob_of_key_x_is_not_decrypted_for_a_principal_allowed_only_on_key_y(world: World) -> None:
    x = world.key()
    y = world.key(world.to_bob("kms:*"))
    blob = world.admin.encrypt(KeyId=x, Plaintext=b"for x only")["CiphertextBlob"]
    assert _code(world.bob.decrypt, CiphertextBlob=blob) == "AccessDeniedException"
    assert _code(world.bob.decrypt, CiphertextBlob=blob, KeyId=y) in {
        "AccessDeniedException", "IncorrectKeyException",
    }  # fmt: skip
    assert _code(world.bob.re_encrypt, CiphertextBlob=blob, DestinationKeyId=y) == "AccessDeniedException"
    assert _code(world.bob.re_encrypt, CiphertextBlob=blob, SourceKeyId=y, DestinationKeyId=y) in {
        "AccessDeniedException", "IncorrectKeyException",
    }  # fmt: skip
    assert world.admin.decrypt(CiphertextBlob=blob)["Plaintext"] == b"for x only"


def test_the_lockout_guard(world: World) -> None:
    key = world.key()
    lockout = _doc(world.to_bob("kms:Encrypt"))
    with pytest.raises(ClientError) as info:
        world.admin.put_key_policy(KeyId=key, PolicyName="default", Policy=lockout)
    assert info.value.response["Error"]["Code"] == "MalformedPolicyDocumentException"
    assert "will not allow you to update the key policy" in info.value.response["Error"]["Message"]
    assert _code(world.admin.create_key, Policy=lockout) == "MalformedPolicyDocumentException"
    assert _code(world.admin.put_key_policy, KeyId=key, PolicyName="default", Policy="{nope") == (
        "MalformedPolicyDocumentException"
    )
    world.admin.put_key_policy(
        KeyId=key, PolicyName="default", Policy=lockout, BypassPolicyLockoutSafetyCheck=True
    )
    assert _code(world.admin.get_key_policy, KeyId=key, PolicyName="default") == "AccessDeniedException"
    world.bob.encrypt(KeyId=key, Plaintext=b"still usable by bob")


def test_identity_policy_delegation_through_the_cli_while_the_server_runs(
    world: World, tmp_path: Path
) -> None:
    key = world.key()  # the default-style policy: the account root, hence identity policies
    other = world.key()
    assert _code(world.bob.encrypt, KeyId=key, Plaintext=b"x") == "AccessDeniedException"
    world.attach("use-one-key", _doc({"Effect": "Allow", "Action": ["kms:Encrypt", "kms:DescribeKey"],
                                      "Resource": key}), tmp_path)  # fmt: skip
    world.bob.encrypt(KeyId=key, Plaintext=b"x")
    world.bob.describe_key(KeyId=key)
    assert _code(world.bob.encrypt, KeyId=other, Plaintext=b"x") == "AccessDeniedException"
    assert _code(world.bob.disable_key, KeyId=key) == "AccessDeniedException"
    assert _code(world.bob.create_key) == "AccessDeniedException"
    world.attach("create", _doc({"Effect": "Allow", "Action": "kms:CreateKey", "Resource": "*"}), tmp_path)
    world.bob.create_key()  # default policy: the account root; bob keeps no rights on it by himself
    listed = json.loads(_cli(world.service, "list", "--json").splitlines()[0])
    assert listed["name"] == "bob" and set(listed["policies"]) >= {"use-one-key", "create"}
    _cli(world.service, "detach-policy", "bob", "--name", "use-one-key")
    _cli(world.service, "detach-policy", "bob", "--name", "create")
    assert _code(world.bob.encrypt, KeyId=key, Plaintext=b"x") == "AccessDeniedException"
    bad = tmp_path / "bad.json"
    bad.write_text(_doc({"Effect": "Allow", "Principal": "*", "Action": "kms:*", "Resource": "*"}))
    result = run_keyservice("principal", "attach-policy", "bob", "--policy-file", str(bad), "--data-dir",
                            str(world.service.data_dir))  # fmt: skip
    assert result.returncode == 1 and "malformed" in result.stderr


def test_grants_create_use_retire_revoke_with_constraints(world: World) -> None:
    key = world.key()
    grant = world.admin.create_grant(
        KeyId=key, GranteePrincipal=world.bob_arn, RetiringPrincipal=world.bob_arn,
        Operations=["Encrypt", "Decrypt", "GenerateDataKey"],
        Constraints={"EncryptionContextEquals": {"app": "files"}}, Name="bob-files",
    )  # fmt: skip
    files = {"app": "files"}
    blob = world.bob.encrypt(
        KeyId=key, Plaintext=b"g", EncryptionContext=files, GrantTokens=[grant["GrantToken"]]
    )["CiphertextBlob"]
    assert world.bob.decrypt(CiphertextBlob=blob, EncryptionContext=files)["Plaintext"] == b"g"
    assert _code(
        world.bob.encrypt, KeyId=key, Plaintext=b"g", EncryptionContext={"app": "files", "x": "1"}
    ) == ("AccessDeniedException")
    assert _code(world.bob.encrypt, KeyId=key, Plaintext=b"g") == "AccessDeniedException"
    assert _code(world.bob.disable_key, KeyId=key) == "AccessDeniedException"
    assert _code(world.bob.encrypt, KeyId=key, Plaintext=b"g", EncryptionContext=files,
                 GrantTokens=["forged-token"]) == "InvalidGrantTokenException"  # fmt: skip
    grants = world.admin.list_grants(KeyId=key)["Grants"]
    assert [(g["GrantId"], g["Name"], g["GranteePrincipal"]) for g in grants] == [
        (grant["GrantId"], "bob-files", world.bob_arn)
    ]
    assert [
        g["GrantId"] for g in world.admin.list_retirable_grants(RetiringPrincipal=world.bob_arn)["Grants"]
    ] == [grant["GrantId"]]
    world.bob.retire_grant(GrantToken=grant["GrantToken"])  # bob is the retiring principal
    assert _code(world.bob.decrypt, CiphertextBlob=blob, EncryptionContext=files) == "AccessDeniedException"
    second = world.admin.create_grant(KeyId=key, GranteePrincipal=world.bob_arn, Operations=["Decrypt"])
    assert world.bob.decrypt(CiphertextBlob=blob, EncryptionContext=files)["Plaintext"] == b"g"
    assert _code(world.bob.retire_grant, KeyId=key, GrantId=second["GrantId"]) == "AccessDeniedException"
    world.admin.revoke_grant(KeyId=key, GrantId=second["GrantId"])
    assert _code(world.bob.decrypt, CiphertextBlob=blob, EncryptionContext=files) == "AccessDeniedException"
    assert world.admin.list_grants(KeyId=key)["Grants"] == []


def test_rotate_and_delete_principal_through_the_cli(world: World) -> None:
    carol = json.loads(_cli(world.service, "create", "carol", "--json"))
    client = world.client(carol)
    assert _code(client.list_keys) == "AccessDeniedException"  # authenticated, not authorized
    rotated = json.loads(_cli(world.service, "rotate-access-key", "carol", "--json"))
    assert rotated["access_key_id"] != carol["access_key_id"]
    assert _code(client.list_keys) == "UnrecognizedClientException"
    assert _code(world.client(rotated).list_keys) == "AccessDeniedException"
    _cli(world.service, "delete", "carol")
    assert _code(world.client(rotated).list_keys) == "UnrecognizedClientException"
    data = world.service.data_dir
    store = (
        b"".join(p.read_bytes() for p in data.glob("keyservice.db*"))
        + audit_path(data).read_bytes()
    )
    assert rotated["secret_access_key"].encode() not in store
