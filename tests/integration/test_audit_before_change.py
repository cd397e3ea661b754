"""No state change without its durable audit record (issue 12, item 2).

A real server whose audit log cannot be written — a read-only (immutable) log file, or a full
audit disk (a small tmpfs) — is sent every operation that changes the store, plus the first use
of the default alias, which creates a key from inside an Encrypt. Each must fail with
KMSInternalException and leave the store exactly as it was (compared as a full SQLite dump), unless
its intent record reached the disk first, which on a full disk can happen when the intent fits in
the last free bytes and the outcome record does not. Afterwards the log still verifies.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from botocore.config import Config
from botocore.exceptions import ClientError
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding

from keyservice.audit.records import audit_path, chain_lines
from keyservice.ops.registry import OPERATIONS
from keyservice.service import READ_ONLY_OPERATIONS
from tests.conftest import DevKeyService, run_keyservice, start_dev_service, stop_dev_service
from tests.integration import audit_disk

pytestmark = pytest.mark.integration

ACCOUNT_ROOT = "arn:aws:iam::{account}:root"


def _dump(data_dir: Path) -> list[str]:
    """The whole store as SQL statements (read through SQLite, so uncheckpointed WAL pages count)."""
    with sqlite3.connect(f"file:{data_dir / 'keyservice.db'}?mode=ro", uri=True) as db:
        return list(db.iterdump())


def _wrap(public_der: bytes, material: bytes) -> bytes:
    public_key = serialization.load_der_public_key(public_der)
    oaep = padding.OAEP(mgf=padding.MGF1(algorithm=hashes.SHA256()), algorithm=hashes.SHA256(), label=None)
    return public_key.encrypt(material, oaep)  # type: ignore[union-attr]


def _lines(data_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in chain_lines(data_dir) if line]


def _prepare(kms: Any) -> dict[str, Callable[[], Any]]:
    """Keys, aliases and grants to act on, and one call per mutating operation (made later)."""
    key = kms.create_key()["KeyMetadata"]
    other = kms.create_key()["KeyMetadata"]
    disabled = kms.create_key()["KeyMetadata"]
    kms.disable_key(KeyId=disabled["KeyId"])
    pending = kms.create_key()["KeyMetadata"]
    kms.schedule_key_deletion(KeyId=pending["KeyId"], PendingWindowInDays=7)
    rotating = kms.create_key()["KeyMetadata"]
    kms.enable_key_rotation(KeyId=rotating["KeyId"])
    kms.create_alias(AliasName="alias/hostile-existing", TargetKeyId=key["KeyId"])
    kms.tag_resource(KeyId=key["KeyId"], Tags=[{"TagKey": "team", "TagValue": "a"}])
    external = kms.create_key(Origin="EXTERNAL")["KeyMetadata"]
    wrapping = kms.get_parameters_for_import(
        KeyId=external["KeyId"], WrappingAlgorithm="RSAES_OAEP_SHA_256", WrappingKeySpec="RSA_2048"
    )
    imported = kms.create_key(Origin="EXTERNAL")["KeyMetadata"]
    params = kms.get_parameters_for_import(
        KeyId=imported["KeyId"], WrappingAlgorithm="RSAES_OAEP_SHA_256", WrappingKeySpec="RSA_2048"
    )
    kms.import_key_material(
        KeyId=imported["KeyId"], ImportToken=params["ImportToken"],
        EncryptedKeyMaterial=_wrap(params["PublicKey"], os.urandom(32)),
        ExpirationModel="KEY_MATERIAL_DOES_NOT_EXPIRE",
    )  # fmt: skip
    account = key["AWSAccountId"]
    root = ACCOUNT_ROOT.format(account=account)
    grant = kms.create_grant(KeyId=key["KeyId"], GranteePrincipal=root, RetiringPrincipal=root,
                             Operations=["Decrypt"])  # fmt: skip
    grant2 = kms.create_grant(KeyId=key["KeyId"], GranteePrincipal=root, Operations=["Encrypt"])
    policy = json.dumps({"Version": "2012-10-17", "Statement": [{
        "Effect": "Allow", "Principal": {"AWS": root}, "Action": "kms:*", "Resource": "*"}]})  # fmt: skip
    k, k2 = key["KeyId"], other["KeyId"]
    return {
        "CreateKey": lambda: kms.create_key(Description="must not exist"),
        "UpdateKeyDescription": lambda: kms.update_key_description(KeyId=k, Description="changed"),
        "DisableKey": lambda: kms.disable_key(KeyId=k),
        "EnableKey": lambda: kms.enable_key(KeyId=disabled["KeyId"]),
        "ScheduleKeyDeletion": lambda: kms.schedule_key_deletion(KeyId=k, PendingWindowInDays=7),
        "CancelKeyDeletion": lambda: kms.cancel_key_deletion(KeyId=pending["KeyId"]),
        "CreateAlias": lambda: kms.create_alias(AliasName="alias/hostile-new", TargetKeyId=k),
        "UpdateAlias": lambda: kms.update_alias(AliasName="alias/hostile-existing", TargetKeyId=k2),
        "DeleteAlias": lambda: kms.delete_alias(AliasName="alias/hostile-existing"),
        "EnableKeyRotation": lambda: kms.enable_key_rotation(KeyId=k),
        "DisableKeyRotation": lambda: kms.disable_key_rotation(KeyId=rotating["KeyId"]),
        "RotateKeyOnDemand": lambda: kms.rotate_key_on_demand(KeyId=k),
        "GetParametersForImport": lambda: kms.get_parameters_for_import(
            KeyId=external["KeyId"], WrappingAlgorithm="RSAES_OAEP_SHA_256", WrappingKeySpec="RSA_2048"
        ),
        "ImportKeyMaterial": lambda: kms.import_key_material(
            KeyId=external["KeyId"], ImportToken=wrapping["ImportToken"],
            EncryptedKeyMaterial=_wrap(wrapping["PublicKey"], os.urandom(32)),
            ExpirationModel="KEY_MATERIAL_DOES_NOT_EXPIRE",
        ),  # fmt: skip
        "DeleteImportedKeyMaterial": lambda: kms.delete_imported_key_material(KeyId=imported["KeyId"]),
        "TagResource": lambda: kms.tag_resource(KeyId=k, Tags=[{"TagKey": "new", "TagValue": "b"}]),
        "UntagResource": lambda: kms.untag_resource(KeyId=k, TagKeys=["team"]),
        "PutKeyPolicy": lambda: kms.put_key_policy(KeyId=k, PolicyName="default", Policy=policy),
        "CreateGrant": lambda: kms.create_grant(KeyId=k, GranteePrincipal=root, Operations=["Encrypt"]),
        "RetireGrant": lambda: kms.retire_grant(KeyId=key["Arn"], GrantId=grant["GrantId"]),
        "RevokeGrant": lambda: kms.revoke_grant(KeyId=k, GrantId=grant2["GrantId"]),
        # The default key is created on the first use of its alias, inside a crypto request.
        "Encrypt (creates alias/aws/kmsfs)": lambda: kms.encrypt(KeyId="alias/aws/kmsfs", Plaintext=b"x"),
    }


def _attempt_all(service: DevKeyService, kms: Any, calls: dict[str, Callable[[], Any]]) -> list[str]:
    """Make every call against the unwritable log; returns the operations whose change was committed
    (each must have had its intent record made durable first)."""
    mutating = set(OPERATIONS.handlers) - READ_ONLY_OPERATIONS
    assert mutating <= {name.split()[0] for name in calls}, "a new mutating operation needs a call here"
    committed = []
    for name, call in calls.items():
        before = _dump(service.data_dir)
        with pytest.raises(ClientError) as excinfo:
            call()
        error = excinfo.value.response
        assert error["Error"]["Code"] == "KMSInternalException", (name, error["Error"])
        assert error["ResponseMetadata"]["HTTPStatusCode"] == 500
        if _dump(service.data_dir) != before:
            request_id = error["ResponseMetadata"]["RequestId"]
            intents = [r for r in _lines(service.data_dir)
                       if r.get("request_id") == request_id and r.get("outcome") == "intent"]  # fmt: skip
            assert intents, f"{name} changed the store without a durable audit record"
            committed.append(name)
    return committed


@contextmanager
def _immutable(path: Path) -> Iterator[None]:
    subprocess.run(["chattr", "+i", str(path)], check=True)
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)


def test_read_only_audit_log_blocks_every_change(tmp_path: Path) -> None:
    probe = tmp_path / "chattr-probe"
    probe.touch()
    if subprocess.run(["chattr", "+i", str(probe)], capture_output=True).returncode != 0:
        pytest.skip("the file system of the test directory does not support chattr +i")
    subprocess.run(["chattr", "-i", str(probe)], check=True)
    service = start_dev_service(tmp_path)
    try:
        kms = service.boto3_client(config=Config(retries={"max_attempts": 1}))
        calls = _prepare(kms)
        with _immutable(audit_path(service.data_dir)):
            committed = _attempt_all(service, kms, calls)
            # boto3's default retries (the CreateKey of the issue made two keys) change nothing either.
            before = _dump(service.data_dir)
            with pytest.raises(ClientError):
                service.boto3_client().create_key()
            assert _dump(service.data_dir) == before
        assert committed == []  # the intent itself cannot be written: nothing may change
        assert kms.describe_key(KeyId="alias/hostile-existing")["KeyMetadata"]["KeyState"] == "Enabled"
    finally:
        stop_dev_service(service)
    report = run_keyservice("audit", "verify", "--data-dir", str(service.data_dir))
    assert report.returncode == 0, report.stdout + report.stderr


@pytest.fixture
def small_audit_disk(tmp_path: Path) -> Iterator[tuple[DevKeyService, Path]]:
    """A dev service whose audit directory is a 1 MiB tmpfs, unmounted afterwards."""
    with audit_disk.small_audit_disk(tmp_path, "1m") as served:
        yield served


def test_full_audit_disk_blocks_every_change(small_audit_disk: tuple[DevKeyService, Path]) -> None:
    service, audit_dir = small_audit_disk
    kms = service.boto3_client(config=Config(retries={"max_attempts": 1}))
    calls = _prepare(kms)
    filler = audit_disk.fill(audit_dir)
    # The log's last tmpfs page may still hold a few records: use them up.
    for _ in range(100):
        try:
            kms.generate_random(NumberOfBytes=16)
        except ClientError as error:
            assert error.response["Error"]["Code"] == "KMSInternalException"
            break
    else:
        pytest.fail("requests kept succeeding although the audit log could not grow")
    committed = _attempt_all(service, kms, calls)
    assert len(committed) <= 1  # at most one intent can squeeze into what a failed record left
    filler.unlink()
    assert kms.describe_key(KeyId="alias/hostile-existing")["KeyMetadata"]["KeyState"] == "Enabled"
    stop_dev_service(service)
    report = run_keyservice("audit", "verify", "--data-dir", str(service.data_dir))
    assert report.returncode == 0, report.stdout + report.stderr
