"""Issue 3 in-process: the scheduler's work on an injected FixedClock (deterministic, no threads), the
store migration from schema version 1, the default key under concurrency, /metrics text, and that
no key material reaches the audit log or the store unsealed."""

from __future__ import annotations

import json
import os
import sqlite3
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding

from keyservice import bootstrap, errors, scheduler
from keyservice.audit.records import read_records
from keyservice.authz import policy
from keyservice.clock import FileOffsetClock, FixedClock
from keyservice.context import RequestContext
from keyservice.service import KeyService
from keyservice.store import rootkey, sqlite_schema
from keyservice.store import sqlite as store

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


class Env:
    def __init__(self, tmp_path: Path, **kw: Any) -> None:
        self.data_dir = tmp_path / "data"
        self.root_key = rootkey.create_root_config(self.data_dir, rootkey.RootKeySource.dev())
        creds = bootstrap.initialize(
            self.data_dir, self.root_key, region="eu-west-1", account_id="123456789012"
        )
        self.clock = FixedClock(T0)
        self.service: KeyService = bootstrap.open_service(
            self.data_dir, self.root_key, clock=self.clock, **kw
        )
        _, self.principal = self.service.authenticate(creds.access_key_id)

    def call(self, operation: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        return self.service.call(operation, params or {}, RequestContext("r", "127.0.0.1", self.principal))

    def fails(self, error: type[errors.KMSError], operation: str, params: dict[str, Any]) -> None:
        with pytest.raises(error):
            self.call(operation, params)

    def records(self, operation: str) -> list[dict[str, Any]]:
        return [r for r in read_records(self.data_dir) if r.get("operation") == operation]


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    e = Env(tmp_path)
    yield e
    e.service.close()


def _import(env: Env, key_id: str, material: bytes, **kw: Any) -> None:
    params = env.call(
        "GetParametersForImport",
        {"KeyId": key_id, "WrappingAlgorithm": "RSAES_OAEP_SHA_256", "WrappingKeySpec": "RSA_2048"},
    )
    public = serialization.load_der_public_key(params["PublicKey"])
    oaep = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)
    wrapped = public.encrypt(material, oaep)  # type: ignore[union-attr]
    env.call(
        "ImportKeyMaterial",
        {"KeyId": key_id, "ImportToken": params["ImportToken"], "EncryptedKeyMaterial": wrapped, **kw},
    )


def test_scheduler_rotates_expires_and_reaps_when_due(env: Env) -> None:
    rotating = env.call("CreateKey")["KeyMetadata"]["KeyId"]
    env.call("EnableKeyRotation", {"KeyId": rotating, "RotationPeriodInDays": 90})
    imported = env.call("CreateKey", {"Origin": "EXTERNAL"})["KeyMetadata"]["KeyId"]
    material = os.urandom(32)
    _import(env, imported, material, ValidTo=(T0 + timedelta(days=10)).timestamp())
    doomed = env.call("CreateKey")["KeyMetadata"]["KeyId"]
    env.call("ScheduleKeyDeletion", {"KeyId": doomed, "PendingWindowInDays": 7})

    assert scheduler.run_due_work(env.service) == {
        "rotated": 0, "expired": 0, "deleted": 0, "import_parameters_purged": 0,
    }  # fmt: skip
    env.clock.advance(timedelta(days=7))
    done = scheduler.run_due_work(env.service)
    assert done["deleted"] == 1 and done["import_parameters_purged"] == 1  # the 24 h wrapping key too
    env.clock.advance(timedelta(days=3))
    assert scheduler.run_due_work(env.service)["expired"] == 1
    assert env.call("DescribeKey", {"KeyId": imported})["KeyMetadata"]["KeyState"] == "PendingImport"
    env.clock.advance(timedelta(days=80))
    assert scheduler.run_due_work(env.service)["rotated"] == 1
    assert scheduler.run_due_work(env.service)["rotated"] == 0  # done once, next date moved on
    status = env.call("GetKeyRotationStatus", {"KeyId": rotating})
    assert status["NextRotationDate"] == env.clock.now() + timedelta(days=90)
    for operation in ("DeleteKey", "DeleteExpiredKeyMaterial", "RotateKey"):
        [record] = env.records(operation)
        assert record["principal"] == "keyservice" and record["outcome"] == "success"
    env.fails(errors.NotFoundException, "DescribeKey", {"KeyId": doomed})


def test_key_past_deletion_date_is_gone_before_the_reaper_runs(env: Env) -> None:
    key_id = env.call("CreateKey")["KeyMetadata"]["KeyId"]
    blob = env.call("Encrypt", {"KeyId": key_id, "Plaintext": b"x"})["CiphertextBlob"]
    env.call("ScheduleKeyDeletion", {"KeyId": key_id, "PendingWindowInDays": 7})
    env.clock.advance(timedelta(days=7))
    env.fails(errors.NotFoundException, "DescribeKey", {"KeyId": key_id})
    env.fails(errors.NotFoundException, "CancelKeyDeletion", {"KeyId": key_id})
    env.fails(errors.InvalidCiphertextException, "Decrypt", {"CiphertextBlob": blob})


def test_reaper_never_undoes_a_cancel(env: Env) -> None:
    key_id = env.call("CreateKey")["KeyMetadata"]["KeyId"]
    env.call("ScheduleKeyDeletion", {"KeyId": key_id, "PendingWindowInDays": 7})
    due = env.service.store.get_key(key_id)
    env.call("CancelKeyDeletion", {"KeyId": key_id})
    assert due is not None
    env.clock.advance(timedelta(days=8))
    assert not env.service.store.destroy_key(key_id, env.clock.now())
    assert env.call("DescribeKey", {"KeyId": key_id})["KeyMetadata"]["KeyState"] == "Disabled"


def test_default_key_is_created_once_under_concurrency(env: Env) -> None:
    arns: list[str] = []

    def use() -> None:
        arns.append(env.call("GenerateDataKey", {"KeyId": "alias/aws/kmsfs", "NumberOfBytes": 32})["KeyId"])

    threads = [threading.Thread(target=use) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(arns)) == 1 and len(arns) == 8
    keys = env.call("ListKeys")["Keys"]
    assert len(keys) == 1 and env.service.store.count_customer_keys() == 0


def test_quota_is_configurable(tmp_path: Path) -> None:
    e = Env(tmp_path, max_keys=1)
    try:
        e.call("CreateKey")
        e.fails(errors.LimitExceededException, "CreateKey", {})
        e.call("DescribeKey", {"KeyId": "alias/aws/kmsfs"})  # service-managed: not counted
    finally:
        e.service.close()


def test_metrics_text(env: Env) -> None:
    key_id = env.call("CreateKey", {"Origin": "EXTERNAL"})["KeyMetadata"]["KeyId"]
    _import(env, key_id, os.urandom(32), ValidTo=(T0 + timedelta(hours=1)).timestamp())
    env.fails(errors.NotFoundException, "DescribeKey", {"KeyId": "alias/none"})
    content_type, text = env.service.metrics_text()
    assert content_type.startswith("text/plain; version=0.0.4")
    assert f'keyservice_imported_key_material_expiry_seconds{{key_id="{key_id}",' in text
    assert 'operation="DescribeKey",outcome="error",error_code="NotFoundException"} 1' in text
    assert 'keyservice_keys{key_manager="CUSTOMER",state="Enabled"} 1' in text
    line = next(
        x for x in text.splitlines() if x.startswith("keyservice_imported_key_material_expiry_seconds{")
    )
    assert float(line.rsplit(" ", 1)[1]) == 3600.0


def test_no_material_in_audit_or_store(env: Env) -> None:
    key_id = env.call("CreateKey", {"Origin": "EXTERNAL"})["KeyMetadata"]["KeyId"]
    material = os.urandom(32)
    _import(env, key_id, material)
    dk = env.call("GenerateDataKey", {"KeyId": key_id, "KeySpec": "AES_256"})
    env.call("DeleteImportedKeyMaterial", {"KeyId": key_id})
    raw = (env.data_dir / "keyservice.db").read_bytes() + (env.data_dir / "audit" / "audit.log").read_bytes()
    for secret in (material, dk["Plaintext"]):
        assert secret not in raw and secret.hex().encode() not in raw
    with sqlite3.connect(env.data_dir / "keyservice.db") as db:
        assert db.execute("SELECT COUNT(*) FROM key_versions WHERE key_id = ?", (key_id,)).fetchone() == (0,)


def test_schema_v1_store_is_migrated(tmp_path: Path) -> None:
    path = tmp_path / "keyservice.db"
    with sqlite3.connect(path) as db:
        db.executescript(sqlite_schema.SCHEMA_V1)
        db.execute("INSERT INTO meta VALUES ('schema_version', '1')")
        db.execute(
            "INSERT INTO keys(key_id, arn, account_id, region, description, state, origin, key_manager,"
            " key_usage, key_spec, creation_date) VALUES ('k', 'arn', '1', 'r', 'd', 'Enabled', 'AWS_KMS',"
            " 'CUSTOMER', 'ENCRYPT_DECRYPT', 'SYMMETRIC_DEFAULT', ?)",
            (T0.isoformat(),),
        )
        db.execute("INSERT INTO key_versions VALUES ('k', 1, ?, x'00')", (T0.isoformat(),))
    s = store.SQLiteStore(path)
    try:
        assert s.get_meta("schema_version") == str(sqlite_schema.SCHEMA_VERSION) == "3"
        key = s.get_key("k")
        assert key is not None and key.rotation_enabled is False and key.material_id is None
        assert key.policy == policy.default_key_policy("1")  # schema 3: every key has a key policy
        version = s.latest_key_version("k")
        assert version is not None and version.rotation_type is None
    finally:
        s.close()
    with sqlite3.connect(path) as db:
        db.execute("UPDATE meta SET value = '99' WHERE name = 'schema_version'")
    with pytest.raises(RuntimeError, match="newer"):
        store.SQLiteStore(path)


def test_file_offset_clock(tmp_path: Path) -> None:
    path = tmp_path / "offset"
    clock = FileOffsetClock(str(path))
    assert abs((clock.now() - datetime.now(UTC)).total_seconds()) < 5  # missing file: no offset
    path.write_text(str(timedelta(days=3).total_seconds()))
    assert timedelta(days=3) - timedelta(seconds=5) < clock.now() - datetime.now(UTC) <= timedelta(days=3)
    path.write_text("not a number")
    assert abs((clock.now() - datetime.now(UTC)).total_seconds()) < 5


def test_audit_records_extra_details_without_secrets(env: Env) -> None:
    a = env.call("CreateKey")["KeyMetadata"]["KeyId"]
    b = env.call("CreateKey")["KeyMetadata"]["Arn"]
    blob = env.call("Encrypt", {"KeyId": a, "Plaintext": b"p"})["CiphertextBlob"]
    env.call("ReEncrypt", {"CiphertextBlob": blob, "DestinationKeyId": b})
    [record] = env.records("ReEncrypt")
    assert record["key_id"] == b and record["caller"]["keyservice"]["source_key_version"] == 1
    assert json.dumps(record).count(blob.hex()) == 0
