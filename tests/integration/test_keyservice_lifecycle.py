"""Key lifecycle through boto3, unchanged, against real ``keyservice serve --dev`` processes (issue 3):
rotation (on demand and automatic), disable/enable, deletion windows and the reaper, imported key
material (every wrapping algorithm, expiry, deletion, re-import), ReEncrypt, quota, the default key
``alias/aws/kmsfs``, regions, tags and /metrics.

Time-driven behaviour is driven by the server's TEST-ONLY ``--clock-offset-file``: a test moves the
server's clock days ahead and polls (scheduler tick 0.2 s) instead of sleeping for days.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import requests
from botocore.config import Config
from botocore.exceptions import ClientError
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding
from cryptography.hazmat.primitives.keywrap import aes_key_wrap_with_padding

from tests.conftest import DevKeyService, free_port, start_dev_service, stop_dev_service

pytestmark = pytest.mark.integration

REGION = "eu-central-1"
TICK = "0.2"


class ServerClock:
    """The server's notion of now, moved by writing the offset file the server re-reads."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = timedelta(0)
        path.write_text("0")

    def advance(self, delta: timedelta) -> None:
        self.offset += delta
        self.path.write_text(str(self.offset.total_seconds()))

    def now(self) -> datetime:
        return datetime.now(UTC) + self.offset


class Server:
    def __init__(self, service: DevKeyService, clock: ServerClock, metrics: str) -> None:
        self.service = service
        self.clock = clock
        self.metrics = metrics  # the --metrics-listen endpoint
        self.kms = service.boto3_client()
        # botocore checks ranges itself; this client lets out-of-range values reach the server.
        self.raw = service.boto3_client(config=Config(parameter_validation=False))

    def events(self, operation: str, key_arn: str) -> list[dict[str, Any]]:
        return [
            r
            for r in self.service.audit_records()
            if r.get("operation") == operation and r.get("key_id") == key_arn
        ]


def _start(base: Path, *extra: str) -> Server:
    clock = ServerClock(base / "clock-offset")
    metrics = f"127.0.0.1:{free_port()}"
    service = start_dev_service(
        base, "--region", REGION, "--scheduler-interval", TICK, "--clock-offset-file", str(clock.path),
        "--metrics-listen", metrics, *extra,
    )  # fmt: skip
    return Server(service, clock, f"http://{metrics}")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = _start(tmp_path_factory.mktemp("lifecycle"))
    try:
        yield srv
    finally:
        stop_dev_service(srv.service)


def _code(excinfo: pytest.ExceptionInfo[ClientError]) -> str:
    return excinfo.value.response["Error"]["Code"]


def fails(code: str, fn: Callable[..., Any], **kwargs: Any) -> str:
    with pytest.raises(ClientError) as excinfo:
        fn(**kwargs)
    assert _code(excinfo) == code, excinfo.value.response["Error"]
    return excinfo.value.response["Error"]["Message"]


def eventually(check: Callable[[], Any], timeout: float = 15.0) -> Any:
    """Poll ``check`` until it returns something truthy (the scheduler ticks every 0.2 s)."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.05)


def blob_version(blob: bytes) -> int:
    return int.from_bytes(blob[17:21], "big")


def wrap(algorithm: str, public_der: bytes, material: bytes) -> bytes:
    """What a key owner does: wrap material under the service's public key, as AWS documents."""
    public_key = serialization.load_der_public_key(public_der)
    digest = hashes.SHA1() if algorithm.endswith("SHA_1") else hashes.SHA256()
    oaep = padding.OAEP(mgf=padding.MGF1(algorithm=digest), algorithm=digest, label=None)
    if algorithm.startswith("RSAES_OAEP"):
        return public_key.encrypt(material, oaep)  # type: ignore[union-attr]
    if algorithm == "RSAES_PKCS1_V1_5":
        return public_key.encrypt(material, padding.PKCS1v15())  # type: ignore[union-attr]
    aes_key = os.urandom(32)
    return public_key.encrypt(aes_key, oaep) + aes_key_wrap_with_padding(aes_key, material)  # type: ignore[union-attr]


def import_material(
    kms: Any,
    key_id: str,
    material: bytes,
    algorithm: str = "RSAES_OAEP_SHA_256",
    spec: str = "RSA_2048",
    **kw: Any,
) -> dict[str, Any]:
    params = kms.get_parameters_for_import(KeyId=key_id, WrappingAlgorithm=algorithm, WrappingKeySpec=spec)
    return kms.import_key_material(
        KeyId=key_id,
        ImportToken=params["ImportToken"],
        EncryptedKeyMaterial=wrap(algorithm, params["PublicKey"], material),
        **kw,
    )


# --------------------------------------------------------------------------- rotation (K6)


def test_on_demand_rotation_keeps_old_ciphertexts(server: Server) -> None:
    kms = server.kms
    key = kms.create_key()["KeyMetadata"]
    old = kms.encrypt(KeyId=key["KeyId"], Plaintext=b"before")["CiphertextBlob"]
    assert kms.get_key_rotation_status(KeyId=key["KeyId"])["KeyRotationEnabled"] is False
    assert kms.list_key_rotations(KeyId=key["KeyId"])["Rotations"] == []
    assert kms.rotate_key_on_demand(KeyId=key["KeyId"])["KeyId"] == key["Arn"]
    new = kms.encrypt(KeyId=key["KeyId"], Plaintext=b"after")["CiphertextBlob"]
    assert (blob_version(old), blob_version(new)) == (1, 2)
    assert kms.decrypt(CiphertextBlob=old)["Plaintext"] == b"before"
    assert kms.decrypt(CiphertextBlob=new)["Plaintext"] == b"after"
    rotations = kms.list_key_rotations(KeyId=key["Arn"])["Rotations"]
    assert [(r["KeyId"], r["RotationType"]) for r in rotations] == [(key["Arn"], "ON_DEMAND")]
    for _ in range(9):
        kms.rotate_key_on_demand(KeyId=key["KeyId"])
    fails("LimitExceededException", kms.rotate_key_on_demand, KeyId=key["KeyId"])
    pages = list(
        kms.get_paginator("list_key_rotations").paginate(KeyId=key["KeyId"], PaginationConfig={"PageSize": 3})
    )
    assert sum(len(p["Rotations"]) for p in pages) == 10 and len(pages) == 4
    assert kms.decrypt(CiphertextBlob=old)["Plaintext"] == b"before"
    fails("NotFoundException", kms.rotate_key_on_demand, KeyId="alias/nope")


def test_enable_rotation_validation(server: Server) -> None:
    kms = server.kms
    key_id = kms.create_key()["KeyMetadata"]["KeyId"]
    for bad in (89, 2561):
        fails("ValidationException", server.raw.enable_key_rotation, KeyId=key_id, RotationPeriodInDays=bad)
    assert kms.get_key_rotation_status(KeyId=key_id)["KeyRotationEnabled"] is False
    kms.enable_key_rotation(KeyId=key_id)
    status = kms.get_key_rotation_status(KeyId=key_id)
    assert status["KeyRotationEnabled"] is True and status["RotationPeriodInDays"] == 365
    expected = server.clock.now() + timedelta(days=365)
    assert abs((status["NextRotationDate"] - expected).total_seconds()) < 60
    kms.disable_key_rotation(KeyId=key_id)
    status = kms.get_key_rotation_status(KeyId=key_id)
    assert status["KeyRotationEnabled"] is False and "NextRotationDate" not in status


def test_automatic_rotation_by_the_scheduler(server: Server) -> None:
    kms = server.kms
    key = kms.create_key()["KeyMetadata"]
    idle = kms.create_key()["KeyMetadata"]  # rotation on, but disabled: must wait until enabled again
    kms.enable_key_rotation(KeyId=key["KeyId"], RotationPeriodInDays=90)
    kms.enable_key_rotation(KeyId=idle["KeyId"], RotationPeriodInDays=90)
    kms.disable_key(KeyId=idle["KeyId"])
    old = kms.encrypt(KeyId=key["KeyId"], Plaintext=b"v1")["CiphertextBlob"]
    server.clock.advance(timedelta(days=91))
    eventually(lambda: kms.list_key_rotations(KeyId=key["KeyId"])["Rotations"])
    rotation = kms.list_key_rotations(KeyId=key["KeyId"])["Rotations"]
    assert [r["RotationType"] for r in rotation] == ["AUTOMATIC"]
    new = kms.encrypt(KeyId=key["KeyId"], Plaintext=b"v2")["CiphertextBlob"]
    assert blob_version(new) == 2 and kms.decrypt(CiphertextBlob=old)["Plaintext"] == b"v1"
    status = kms.get_key_rotation_status(KeyId=key["KeyId"])
    assert status["NextRotationDate"] > server.clock.now() + timedelta(days=88)
    [event] = server.events("RotateKey", key["Arn"])
    assert event["principal"] == "keyservice" and event["outcome"] == "success" and event["key_version"] == 2
    assert kms.list_key_rotations(KeyId=idle["KeyId"])["Rotations"] == []
    kms.enable_key(KeyId=idle["KeyId"])  # catches up on the missed rotation
    eventually(lambda: kms.list_key_rotations(KeyId=idle["KeyId"])["Rotations"])


def test_restart_catches_up_on_missed_work(tmp_path: Path) -> None:
    srv = _start(tmp_path)
    try:
        kms = srv.kms
        rotating = kms.create_key()["KeyMetadata"]
        kms.enable_key_rotation(KeyId=rotating["KeyId"], RotationPeriodInDays=90)
        doomed = kms.create_key()["KeyMetadata"]
        kms.schedule_key_deletion(KeyId=doomed["KeyId"], PendingWindowInDays=7)
    finally:
        stop_dev_service(srv.service)
    srv.clock.advance(timedelta(days=100))  # the server is down while both come due
    srv2 = _start(tmp_path)
    srv2.clock.advance(timedelta(days=100))
    try:
        kms = srv2.kms
        eventually(lambda: kms.list_key_rotations(KeyId=rotating["KeyId"])["Rotations"])
        fails("NotFoundException", kms.describe_key, KeyId=doomed["KeyId"])
        eventually(lambda: srv2.events("DeleteKey", doomed["Arn"]))
    finally:
        stop_dev_service(srv2.service)


# --------------------------------------------------------------------------- disable / enable (K7)


def test_disable_enable(server: Server) -> None:
    kms = server.kms
    key_id = kms.create_key()["KeyMetadata"]["KeyId"]
    blob = kms.encrypt(KeyId=key_id, Plaintext=b"x")["CiphertextBlob"]
    kms.disable_key(KeyId=key_id)
    meta = kms.describe_key(KeyId=key_id)["KeyMetadata"]
    assert meta["KeyState"] == "Disabled" and meta["Enabled"] is False
    fails("DisabledException", kms.encrypt, KeyId=key_id, Plaintext=b"x")
    fails("DisabledException", kms.decrypt, CiphertextBlob=blob)
    fails("DisabledException", kms.generate_data_key, KeyId=key_id, KeySpec="AES_256")
    fails("DisabledException", kms.re_encrypt, CiphertextBlob=blob, DestinationKeyId=key_id)
    fails("DisabledException", kms.rotate_key_on_demand, KeyId=key_id)
    kms.disable_key(KeyId=key_id)  # idempotent
    kms.enable_key(KeyId=key_id)
    assert kms.decrypt(CiphertextBlob=blob)["Plaintext"] == b"x"
    assert kms.describe_key(KeyId=key_id)["KeyMetadata"]["KeyState"] == "Enabled"


# --------------------------------------------------------------------------- deletion (K8)


def test_deletion_window_cancel_and_reaper(server: Server) -> None:
    kms = server.kms
    key = kms.create_key()["KeyMetadata"]
    key_id = key["KeyId"]
    alias = f"alias/doomed-{uuid.uuid4().hex[:8]}"
    kms.create_alias(AliasName=alias, TargetKeyId=key_id)
    blob = kms.encrypt(KeyId=key_id, Plaintext=b"soon gone")["CiphertextBlob"]
    for bad in (6, 31, 0):
        fails("ValidationException", server.raw.schedule_key_deletion, KeyId=key_id, PendingWindowInDays=bad)
    assert kms.describe_key(KeyId=key_id)["KeyMetadata"]["KeyState"] == "Enabled"  # refused: no change
    fails("KMSInvalidStateException", kms.cancel_key_deletion, KeyId=key_id)
    out = kms.schedule_key_deletion(KeyId=key_id, PendingWindowInDays=7)
    assert out["KeyState"] == "PendingDeletion" and out["PendingWindowInDays"] == 7
    assert abs((out["DeletionDate"] - (server.clock.now() + timedelta(days=7))).total_seconds()) < 60
    meta = kms.describe_key(KeyId=key_id)["KeyMetadata"]
    assert meta["KeyState"] == "PendingDeletion" and meta["DeletionDate"] == out["DeletionDate"]
    fails("KMSInvalidStateException", kms.encrypt, KeyId=key_id, Plaintext=b"x")
    fails("KMSInvalidStateException", kms.decrypt, CiphertextBlob=blob)
    fails("KMSInvalidStateException", kms.enable_key, KeyId=key_id)
    fails("KMSInvalidStateException", kms.schedule_key_deletion, KeyId=key_id)
    assert kms.cancel_key_deletion(KeyId=key_id)["KeyId"] == key["Arn"]
    meta = kms.describe_key(KeyId=key_id)["KeyMetadata"]
    assert meta["KeyState"] == "Disabled" and "DeletionDate" not in meta
    kms.enable_key(KeyId=key_id)
    assert kms.decrypt(CiphertextBlob=blob)["Plaintext"] == b"soon gone"

    assert kms.schedule_key_deletion(KeyId=key_id)["PendingWindowInDays"] == 30
    server.clock.advance(timedelta(days=29))
    time.sleep(0.5)
    assert kms.describe_key(KeyId=key_id)["KeyMetadata"]["KeyState"] == "PendingDeletion"
    server.clock.advance(timedelta(days=1, minutes=1))
    [event] = eventually(lambda: server.events("DeleteKey", key["Arn"]))
    assert event["principal"] == "keyservice" and event["outcome"] == "success"
    fails("NotFoundException", kms.describe_key, KeyId=key_id)
    fails("NotFoundException", kms.describe_key, KeyId=alias)
    assert alias not in {a["AliasName"] for a in kms.list_aliases()["Aliases"]}
    fails("InvalidCiphertextException", kms.decrypt, CiphertextBlob=blob)
    with sqlite3.connect(server.service.data_dir / "keyservice.db") as db:
        for table in ("keys", "key_versions", "aliases"):
            column = "target_key_id" if table == "aliases" else "key_id"
            assert db.execute(f"SELECT COUNT(*) FROM {table} WHERE {column} = ?", (key_id,)).fetchone() == (
                0,
            )


# --------------------------------------------------------------------------- import (K2, K3, K16)


@pytest.mark.parametrize(
    "algorithm, spec",
    [
        ("RSAES_OAEP_SHA_1", "RSA_2048"),
        ("RSAES_OAEP_SHA_256", "RSA_3072"),
        ("RSA_AES_KEY_WRAP_SHA_1", "RSA_2048"),
        ("RSA_AES_KEY_WRAP_SHA_256", "RSA_2048"),
    ],
)
def test_import_with_each_wrapping_algorithm(server: Server, algorithm: str, spec: str) -> None:
    kms = server.kms
    meta = kms.create_key(Origin="EXTERNAL", Description="byok")["KeyMetadata"]
    assert meta["KeyState"] == "PendingImport" and meta["Origin"] == "EXTERNAL" and meta["Enabled"] is False
    fails("KMSInvalidStateException", kms.encrypt, KeyId=meta["KeyId"], Plaintext=b"x")
    fails("KMSInvalidStateException", kms.enable_key, KeyId=meta["KeyId"])
    params = kms.get_parameters_for_import(
        KeyId=meta["KeyId"], WrappingAlgorithm=algorithm, WrappingKeySpec=spec
    )
    public = serialization.load_der_public_key(params["PublicKey"])
    assert public.key_size == int(spec.split("_")[1])  # type: ignore[union-attr]
    valid = params["ParametersValidTo"] - server.clock.now()
    assert timedelta(hours=23, minutes=59) < valid <= timedelta(hours=24)
    material = os.urandom(32)
    out = kms.import_key_material(
        KeyId=meta["KeyId"],
        ImportToken=params["ImportToken"],
        EncryptedKeyMaterial=wrap(algorithm, params["PublicKey"], material),
        ExpirationModel="KEY_MATERIAL_DOES_NOT_EXPIRE",
    )
    assert out["KeyId"] == meta["Arn"] and len(out["KeyMaterialId"]) == 64
    meta = kms.describe_key(KeyId=meta["KeyId"])["KeyMetadata"]
    assert meta["KeyState"] == "Enabled" and meta["ExpirationModel"] == "KEY_MATERIAL_DOES_NOT_EXPIRE"
    blob = kms.encrypt(KeyId=meta["KeyId"], Plaintext=b"imported")["CiphertextBlob"]
    assert kms.decrypt(CiphertextBlob=blob)["Plaintext"] == b"imported"


def test_import_refusals(server: Server) -> None:
    kms = server.kms
    key_id = kms.create_key(Origin="EXTERNAL")["KeyMetadata"]["KeyId"]
    other_id = kms.create_key(Origin="EXTERNAL")["KeyMetadata"]["KeyId"]
    native_id = kms.create_key()["KeyMetadata"]["KeyId"]
    material = os.urandom(32)
    oaep = {"WrappingAlgorithm": "RSAES_OAEP_SHA_256", "WrappingKeySpec": "RSA_2048"}
    fails("UnsupportedOperationException", kms.get_parameters_for_import, KeyId=native_id, **oaep)
    fails("UnsupportedOperationException", kms.delete_imported_key_material, KeyId=native_id)
    message = fails(
        "UnsupportedOperationException",
        kms.get_parameters_for_import,
        KeyId=key_id,
        WrappingAlgorithm="RSAES_PKCS1_V1_5",
        WrappingKeySpec="RSA_2048",
    )
    assert "allow-pkcs1-import" in message
    for op in (kms.enable_key_rotation, kms.rotate_key_on_demand, kms.get_key_rotation_status):
        fails("UnsupportedOperationException", op, KeyId=key_id)
    fails("ValidationException", kms.get_parameters_for_import, KeyId=key_id, WrappingAlgorithm="ROT13",
          WrappingKeySpec="RSA_2048")  # fmt: skip
    params = kms.get_parameters_for_import(KeyId=key_id, **oaep)
    wrapped = wrap("RSAES_OAEP_SHA_256", params["PublicKey"], material)
    token = params["ImportToken"]
    fails("InvalidImportTokenException", kms.import_key_material, KeyId=other_id, ImportToken=token,
          EncryptedKeyMaterial=wrapped, ExpirationModel="KEY_MATERIAL_DOES_NOT_EXPIRE")  # fmt: skip
    fails("InvalidImportTokenException", kms.import_key_material, KeyId=key_id, ImportToken=os.urandom(33),
          EncryptedKeyMaterial=wrapped, ExpirationModel="KEY_MATERIAL_DOES_NOT_EXPIRE")  # fmt: skip
    fails("InvalidCiphertextException", kms.import_key_material, KeyId=key_id, ImportToken=token,
          EncryptedKeyMaterial=wrapped[:-1] + bytes([wrapped[-1] ^ 1]),
          ExpirationModel="KEY_MATERIAL_DOES_NOT_EXPIRE")  # fmt: skip
    fails("InvalidCiphertextException", kms.import_key_material, KeyId=key_id, ImportToken=token,
          EncryptedKeyMaterial=wrap("RSAES_OAEP_SHA_1", params["PublicKey"], material),
          ExpirationModel="KEY_MATERIAL_DOES_NOT_EXPIRE")  # fmt: skip
    fails("IncorrectKeyMaterialException", kms.import_key_material, KeyId=key_id, ImportToken=token,
          EncryptedKeyMaterial=wrap("RSAES_OAEP_SHA_256", params["PublicKey"], os.urandom(16)),
          ExpirationModel="KEY_MATERIAL_DOES_NOT_EXPIRE")  # fmt: skip
    past = server.clock.now() - timedelta(hours=1)
    far = server.clock.now() + timedelta(days=400)
    for valid_to in (past, far):
        fails("ValidationException", kms.import_key_material, KeyId=key_id, ImportToken=token,
              EncryptedKeyMaterial=wrapped, ValidTo=valid_to)  # fmt: skip
    fails("ValidationException", kms.import_key_material, KeyId=key_id, ImportToken=token,
          EncryptedKeyMaterial=wrapped, ExpirationModel="KEY_MATERIAL_EXPIRES")  # fmt: skip
    assert kms.describe_key(KeyId=key_id)["KeyMetadata"]["KeyState"] == "PendingImport"  # nothing changed
    stale = kms.get_parameters_for_import(KeyId=other_id, **oaep)
    server.clock.advance(timedelta(hours=24, minutes=1))
    rewrapped = wrap("RSAES_OAEP_SHA_256", stale["PublicKey"], material)
    fails("ExpiredImportTokenException", kms.import_key_material, KeyId=other_id,
          ImportToken=stale["ImportToken"], EncryptedKeyMaterial=rewrapped,
          ExpirationModel="KEY_MATERIAL_DOES_NOT_EXPIRE")  # fmt: skip


def test_delete_imported_material_and_reimport(server: Server) -> None:
    kms = server.kms
    key = kms.create_key(Origin="EXTERNAL")["KeyMetadata"]
    material = os.urandom(32)
    import_material(kms, key["KeyId"], material, "RSA_AES_KEY_WRAP_SHA_256")
    blob = kms.encrypt(KeyId=key["KeyId"], Plaintext=b"keep me", EncryptionContext={"a": "b"})[
        "CiphertextBlob"
    ]
    kms.disable_key(KeyId=key["KeyId"])
    kms.enable_key(KeyId=key["KeyId"])
    kms.delete_imported_key_material(KeyId=key["KeyId"])
    meta = kms.describe_key(KeyId=key["KeyId"])["KeyMetadata"]
    assert meta["KeyState"] == "PendingImport" and "ValidTo" not in meta
    fails("KMSInvalidStateException", kms.decrypt, CiphertextBlob=blob, EncryptionContext={"a": "b"})
    kms.delete_imported_key_material(KeyId=key["KeyId"])  # no effect, no error
    with pytest.raises(ClientError) as excinfo:
        import_material(kms, key["KeyId"], os.urandom(32))
    assert _code(excinfo) == "IncorrectKeyMaterialException"
    import_material(
        kms, key["KeyId"], material, "RSAES_OAEP_SHA_1", ExpirationModel="KEY_MATERIAL_DOES_NOT_EXPIRE"
    )
    assert kms.decrypt(CiphertextBlob=blob, EncryptionContext={"a": "b"})["Plaintext"] == b"keep me"
    import_material(kms, key["KeyId"], material)  # importing the same material again is fine
    with pytest.raises(ClientError) as excinfo:
        import_material(kms, key["KeyId"], os.urandom(32))
    assert _code(excinfo) == "IncorrectKeyMaterialException"
    assert kms.decrypt(CiphertextBlob=blob, EncryptionContext={"a": "b"})["Plaintext"] == b"keep me"


def _metric(server: Server, name: str, **labels: str) -> float | None:
    text = requests.get(server.metrics + "/metrics", timeout=5).text
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return None


def test_import_expiry_metrics_and_event(server: Server) -> None:
    kms = server.kms
    key = kms.create_key(Origin="EXTERNAL")["KeyMetadata"]
    material = os.urandom(32)
    valid_to = server.clock.now() + timedelta(days=2)
    import_material(kms, key["KeyId"], material, ValidTo=valid_to)
    meta = kms.describe_key(KeyId=key["KeyId"])["KeyMetadata"]
    assert meta["ExpirationModel"] == "KEY_MATERIAL_EXPIRES"
    assert abs((meta["ValidTo"] - valid_to).total_seconds()) < 1
    blob = kms.encrypt(KeyId=key["KeyId"], Plaintext=b"short-lived")["CiphertextBlob"]
    left = _metric(
        server, "keyservice_imported_key_material_expiry_seconds", key_id=key["KeyId"]
    )
    assert left is not None and 2 * 86400 - 120 < left <= 2 * 86400
    served = _metric(server, "keyservice_requests_total", operation="ImportKeyMaterial",
                     outcome="success")  # fmt: skip
    assert served is not None and served >= 1
    server.clock.advance(timedelta(days=2, minutes=1))
    [event] = eventually(lambda: server.events("DeleteExpiredKeyMaterial", key["Arn"]))
    assert event["principal"] == "keyservice" and event["caller"]["keyservice"]["valid_to"]
    assert kms.describe_key(KeyId=key["KeyId"])["KeyMetadata"]["KeyState"] == "PendingImport"
    fails("KMSInvalidStateException", kms.decrypt, CiphertextBlob=blob)
    assert _metric(server, "keyservice_imported_key_material_expiry_seconds",
                   key_id=key["KeyId"]) is None  # fmt: skip
    import_material(kms, key["KeyId"], material)
    assert kms.decrypt(CiphertextBlob=blob)["Plaintext"] == b"short-lived"


def test_pkcs1_import_only_when_the_operator_enables_it(tmp_path: Path) -> None:
    srv = _start(tmp_path, "--allow-pkcs1-import")
    try:
        key_id = srv.kms.create_key(Origin="EXTERNAL")["KeyMetadata"]["KeyId"]
        import_material(srv.kms, key_id, os.urandom(32), "RSAES_PKCS1_V1_5")
        assert srv.kms.describe_key(KeyId=key_id)["KeyMetadata"]["KeyState"] == "Enabled"
    finally:
        stop_dev_service(srv.service)


# --------------------------------------------------------------------------- ReEncrypt (K11)


def test_reencrypt(server: Server) -> None:
    kms = server.kms
    source = kms.create_key()["KeyMetadata"]
    target = kms.create_key()["KeyMetadata"]
    blob = kms.encrypt(KeyId=source["KeyId"], Plaintext=b"moving", EncryptionContext={"f": "1"})[
        "CiphertextBlob"
    ]
    out = kms.re_encrypt(
        CiphertextBlob=blob,
        SourceEncryptionContext={"f": "1"},
        DestinationKeyId=target["Arn"],
        DestinationEncryptionContext={"f": "2"},
    )
    assert "Plaintext" not in out
    assert out["SourceKeyId"] == source["Arn"] and out["KeyId"] == target["Arn"]
    assert out["DestinationEncryptionAlgorithm"] == "SYMMETRIC_DEFAULT"
    dec = kms.decrypt(CiphertextBlob=out["CiphertextBlob"], EncryptionContext={"f": "2"})
    assert dec["Plaintext"] == b"moving" and dec["KeyId"] == target["Arn"]
    fails("InvalidCiphertextException", kms.re_encrypt, CiphertextBlob=blob, DestinationKeyId=target["KeyId"])
    fails("IncorrectKeyException", kms.re_encrypt, CiphertextBlob=blob, SourceKeyId=target["KeyId"],
          SourceEncryptionContext={"f": "1"}, DestinationKeyId=target["KeyId"])  # fmt: skip
    kms.rotate_key_on_demand(KeyId=source["KeyId"])
    same = kms.re_encrypt(
        CiphertextBlob=blob,
        SourceEncryptionContext={"f": "1"},
        DestinationKeyId=source["KeyId"],
        DestinationEncryptionContext={"f": "1"},
    )
    assert blob_version(same["CiphertextBlob"]) == 2 and blob_version(blob) == 1
    kms.disable_key(KeyId=target["KeyId"])
    fails("DisabledException", kms.re_encrypt, CiphertextBlob=blob, SourceEncryptionContext={"f": "1"},
          DestinationKeyId=target["KeyId"])  # fmt: skip
    record = server.events("ReEncrypt", target["Arn"])[0]
    assert (
        record["key_id"] == target["Arn"] and record["caller"]["keyservice"]["source_key_id"] == source["Arn"]
    )
    assert "moving" not in json.dumps(server.service.audit_records())


# --------------------------------------------------------------------------- quota (K13), default key (K15)


def test_quota_counts_customer_keys_in_every_state(tmp_path: Path) -> None:
    srv = _start(tmp_path, "--max-keys", "3")
    try:
        kms = srv.kms
        a = kms.create_key()["KeyMetadata"]["KeyId"]
        b = kms.create_key(Origin="EXTERNAL")["KeyMetadata"]["KeyId"]
        c = kms.create_key()["KeyMetadata"]["KeyId"]
        kms.disable_key(KeyId=a)
        kms.schedule_key_deletion(KeyId=c, PendingWindowInDays=7)
        fails("LimitExceededException", kms.create_key)
        assert kms.describe_key(KeyId="alias/aws/kmsfs")["KeyMetadata"]["KeyManager"] == "AWS"  # not counted
        assert len(kms.list_keys()["Keys"]) == 4
        srv.clock.advance(timedelta(days=8))  # the reaper frees a slot
        eventually(lambda: len(kms.list_keys()["Keys"]) == 3)
        kms.create_key()
        assert b
    finally:
        stop_dev_service(srv.service)


def test_default_key_created_on_first_use(server: Server, tmp_path: Path) -> None:
    kms = server.kms
    fails("NotFoundException", kms.describe_key, KeyId="alias/aws/other")
    data_key = kms.generate_data_key(KeyId="alias/aws/kmsfs", KeySpec="AES_256")
    meta = kms.describe_key(KeyId="alias/aws/kmsfs")["KeyMetadata"]
    assert data_key["KeyId"] == meta["Arn"]
    assert meta["KeyManager"] == "AWS" and meta["KeyState"] == "Enabled"
    assert kms.decrypt(CiphertextBlob=data_key["CiphertextBlob"])["Plaintext"] == data_key["Plaintext"]
    assert kms.describe_key(KeyId="alias/aws/kmsfs")["KeyMetadata"]["KeyId"] == meta["KeyId"]  # one key
    aliases = [a for a in kms.list_aliases()["Aliases"] if a["AliasName"] == "alias/aws/kmsfs"]
    assert [a["TargetKeyId"] for a in aliases] == [meta["KeyId"]]
    assert kms.get_key_rotation_status(KeyId=meta["KeyId"])["KeyRotationEnabled"] is True
    for op, kw in [
        (kms.disable_key, {}),
        (kms.schedule_key_deletion, {}),
        (kms.disable_key_rotation, {}),
        (kms.update_key_description, {"Description": "mine"}),
        (kms.tag_resource, {"Tags": [{"TagKey": "a", "TagValue": "b"}]}),
        (kms.put_key_policy, {"PolicyName": "default", "Policy": "{}"}),
    ]:
        with pytest.raises(ClientError) as excinfo:
            op(KeyId=meta["KeyId"], **kw)
        assert _code(excinfo) in {"AccessDeniedException", "UnknownOperationException"}, op
    fails("AccessDeniedException", kms.disable_key, KeyId=meta["KeyId"])
    fails("NotAuthorizedException", kms.delete_alias, AliasName="alias/aws/kmsfs")
    fails("NotAuthorizedException", kms.create_alias, AliasName="alias/aws/mine", TargetKeyId=meta["KeyId"])
    mine = kms.create_key()["KeyMetadata"]["KeyId"]
    fails("NotAuthorizedException", kms.update_alias, AliasName="alias/aws/kmsfs", TargetKeyId=mine)
    # kmsfs init without --key uses the default key
    cipherdir = tmp_path / "cipher"
    result = subprocess.run(
        [sys.executable, "-m", "kmsfs", "init", str(cipherdir), "--credentials",
         str(server.service.credentials_file)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert meta["Arn"] in result.stdout


# --------------------------------------------------------------------------- regions (K17), tags


def test_regions(server: Server) -> None:
    kms = server.kms
    key = kms.create_key()["KeyMetadata"]
    assert key["Arn"].startswith(f"arn:aws:kms:{REGION}:")
    foreign = key["Arn"].replace(REGION, "us-west-2")
    fails("NotFoundException", kms.describe_key, KeyId=foreign)
    fails("NotFoundException", kms.encrypt, KeyId=foreign, Plaintext=b"x")
    blob = kms.encrypt(KeyId=key["Arn"], Plaintext=b"x")["CiphertextBlob"]
    fails("NotFoundException", kms.re_encrypt, CiphertextBlob=blob, DestinationKeyId=foreign)


def test_tags(server: Server) -> None:
    kms = server.kms
    key_id = kms.create_key(Tags=[{"TagKey": "team", "TagValue": "a"}])["KeyMetadata"]["KeyId"]
    kms.tag_resource(
        KeyId=key_id, Tags=[{"TagKey": "team", "TagValue": "b"}, {"TagKey": "env", "TagValue": "dev"}]
    )
    tags = kms.list_resource_tags(KeyId=key_id)["Tags"]
    assert sorted((t["TagKey"], t["TagValue"]) for t in tags) == [("env", "dev"), ("team", "b")]
    page = kms.list_resource_tags(KeyId=key_id, Limit=1)
    assert page["Truncated"] and len(page["Tags"]) == 1
    rest = kms.list_resource_tags(KeyId=key_id, Marker=page["NextMarker"])
    assert len(rest["Tags"]) == 1 and not rest["Truncated"]
    kms.untag_resource(KeyId=key_id, TagKeys=["team", "absent"])
    assert [t["TagKey"] for t in kms.list_resource_tags(KeyId=key_id)["Tags"]] == ["env"]
    fails("TagException", kms.tag_resource, KeyId=key_id, Tags=[{"TagKey": "aws:x", "TagValue": "1"}])
    many = [{"TagKey": f"k{i}", "TagValue": "v"} for i in range(50)]
    fails("LimitExceededException", kms.tag_resource, KeyId=key_id, Tags=many)
    kms.schedule_key_deletion(KeyId=key_id, PendingWindowInDays=7)
    fails("KMSInvalidStateException", kms.tag_resource, KeyId=key_id, Tags=[{"TagKey": "x", "TagValue": "1"}])
    assert [t["TagKey"] for t in kms.list_resource_tags(KeyId=key_id)["Tags"]] == ["env"]


def test_refused_requests_are_audited_once_and_change_nothing(server: Server) -> None:
    kms = server.kms
    key = kms.create_key()["KeyMetadata"]
    before = len(server.service.audit_records())
    fails("ValidationException", kms.schedule_key_deletion, KeyId=key["KeyId"], PendingWindowInDays=3)
    fails("ValidationException", server.raw.enable_key_rotation, KeyId=key["KeyId"], RotationPeriodInDays=10)
    records = server.service.audit_records()[before:]
    assert [(r["operation"], r["outcome"], r["error_code"]) for r in records] == [
        ("ScheduleKeyDeletion", "error", "ValidationException"),
        ("EnableKeyRotation", "error", "ValidationException"),
    ]
    assert kms.describe_key(KeyId=key["KeyId"])["KeyMetadata"]["KeyState"] == "Enabled"
    assert kms.get_key_rotation_status(KeyId=key["KeyId"])["KeyRotationEnabled"] is False
