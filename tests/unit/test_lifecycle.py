"""The key state machine against AWS's key-states table: every state x operation pair, for keys with
service-generated material (origin AWS_KMS) and imported material (origin EXTERNAL), plus what a
service-managed key refuses and what time does (expired material, passed deletion date).

The expectations below are transcribed from the table in the AWS KMS Developer Guide ("Key states
of AWS KMS keys") independently of ``lifecycle.py``: "ok" or the AWS error name.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from keyservice import lifecycle
from keyservice.store.model import KeyRecord

NOW = datetime(2026, 6, 1, tzinfo=UTC)
STATES = ("Enabled", "Disabled", "PendingImport", "PendingDeletion")
OK = "ok"
DIS = "DisabledException"
INV = "KMSInvalidStateException"
UNS = "UnsupportedOperationException"

# operation -> expected outcome per state (Enabled, Disabled, PendingImport, PendingDeletion), for a key
# with service-generated material. PendingImport never happens to such a key but is listed for
# completeness: the rules must still be defined.
AWS_KMS_TABLE: dict[str, tuple[str, str, str, str]] = {
    "CancelKeyDeletion": (INV, INV, INV, OK),
    "CreateAlias": (OK, OK, OK, INV),
    "CreateGrant": (OK, OK, OK, INV),
    "Decrypt": (OK, DIS, INV, INV),
    "DeleteAlias": (OK, OK, OK, OK),
    "DeleteImportedKeyMaterial": (UNS, UNS, UNS, UNS),
    "DescribeKey": (OK, OK, OK, OK),
    "DisableKey": (OK, OK, INV, INV),
    "DisableKeyRotation": (OK, DIS, OK, INV),
    "EnableKey": (OK, OK, INV, INV),
    "EnableKeyRotation": (OK, DIS, OK, INV),
    "Encrypt": (OK, DIS, INV, INV),
    "GenerateDataKey": (OK, DIS, INV, INV),
    "GenerateDataKeyWithoutPlaintext": (OK, DIS, INV, INV),
    "GetKeyPolicy": (OK, OK, OK, OK),
    "GetKeyRotationStatus": (OK, OK, OK, OK),
    "GetParametersForImport": (UNS, UNS, UNS, UNS),
    "ImportKeyMaterial": (UNS, UNS, UNS, UNS),
    "ListAliases": (OK, OK, OK, OK),
    "ListGrants": (OK, OK, OK, OK),
    "ListKeyPolicies": (OK, OK, OK, OK),
    "ListKeyRotations": (OK, OK, OK, OK),
    "ListResourceTags": (OK, OK, OK, OK),
    "PutKeyPolicy": (OK, OK, OK, OK),
    "ReEncrypt": (OK, DIS, INV, INV),
    "RetireGrant": (OK, OK, OK, OK),
    "RevokeGrant": (OK, OK, OK, OK),
    "RotateKeyOnDemand": (OK, DIS, OK, INV),
    "ScheduleKeyDeletion": (OK, OK, OK, INV),
    "TagResource": (OK, OK, OK, INV),
    "UntagResource": (OK, OK, OK, INV),
    "UpdateAlias": (OK, OK, OK, INV),
    "UpdateKeyDescription": (OK, OK, OK, INV),
}

# Differences for imported keys (origin EXTERNAL): footnotes [6]-[9] of AWS's table.
EXTERNAL_OVERRIDES: dict[str, tuple[str, str, str, str]] = {
    "DeleteImportedKeyMaterial": (OK, OK, OK, INV),
    "GetParametersForImport": (OK, OK, OK, INV),
    "ImportKeyMaterial": (OK, OK, OK, INV),
    "EnableKeyRotation": (UNS, UNS, UNS, UNS),
    "DisableKeyRotation": (UNS, UNS, UNS, UNS),
    "RotateKeyOnDemand": (UNS, UNS, UNS, UNS),
    "GetKeyRotationStatus": (UNS, UNS, UNS, UNS),
    "ListKeyRotations": (UNS, UNS, UNS, UNS),
}


def make_key(state: str, origin: str = "AWS_KMS", manager: str = "CUSTOMER", **kw: object) -> KeyRecord:
    return KeyRecord(
        key_id="1234abcd-12ab-34cd-56ef-1234567890ab",
        arn="arn:aws:kms:us-east-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab",
        account_id="111122223333",
        region="us-east-1",
        description="",
        state=state,
        origin=origin,
        key_manager=manager,
        creation_date=NOW - timedelta(days=1),
        deletion_date=NOW + timedelta(days=7) if state == "PendingDeletion" else None,
        **kw,  # type: ignore[arg-type]
    )


def outcome(key: KeyRecord, operation: str, now: datetime = NOW) -> str:
    error = lifecycle.refusal(key, operation, now)
    return OK if error is None else error.aws_type


def _cases(origin: str) -> list[tuple[str, str, str]]:
    table = AWS_KMS_TABLE | (EXTERNAL_OVERRIDES if origin == "EXTERNAL" else {})
    return [(op, state, expected[i]) for op, expected in table.items() for i, state in enumerate(STATES)]


def test_the_table_covers_every_operation_lifecycle_knows() -> None:
    assert set(AWS_KMS_TABLE) >= lifecycle.ALL_OPERATIONS - {
        "ListKeys",
        "GenerateDataKeyPair",
        "GenerateDataKeyPairWithoutPlaintext",
    }


@pytest.mark.parametrize("operation, state, expected", _cases("AWS_KMS"))
def test_service_generated_key(operation: str, state: str, expected: str) -> None:
    assert outcome(make_key(state), operation) == expected


@pytest.mark.parametrize("operation, state, expected", _cases("EXTERNAL"))
def test_imported_key(operation: str, state: str, expected: str) -> None:
    assert outcome(make_key(state, origin="EXTERNAL"), operation) == expected


def test_check_usable_raises_the_refusal_with_the_key_arn() -> None:
    key = make_key("Disabled")
    with pytest.raises(Exception) as excinfo:
        lifecycle.check_usable(key, "Encrypt", NOW)
    assert type(excinfo.value).__name__ == DIS and key.arn in str(excinfo.value)
    lifecycle.check_usable(make_key("Enabled"), "Encrypt", NOW)


@pytest.mark.parametrize("operation", sorted(AWS_KMS_TABLE))
def test_service_managed_key_refuses_management(operation: str) -> None:
    """Customers may use and view an AWS managed key, never manage it (its key policy)."""
    key = make_key("Enabled", manager="AWS", rotation_enabled=True)
    allowed = lifecycle.CRYPTO_OPERATIONS | {
        "DescribeKey",
        "GetKeyPolicy",
        "ListKeyPolicies",
        "ListResourceTags",
        "ListGrants",
        "RetireGrant",
        "RevokeGrant",
        "CreateGrant",
        "ListAliases",
        "GetKeyRotationStatus",
        "ListKeyRotations",
    }
    expected = OK if operation in allowed else "AccessDeniedException"
    assert outcome(key, operation) == expected


def test_expired_imported_material_reads_as_pending_import() -> None:
    key = make_key("Enabled", origin="EXTERNAL", valid_to=NOW + timedelta(hours=1))
    assert lifecycle.effective_state(key, NOW) == "Enabled"
    assert outcome(key, "Encrypt") == OK
    later = NOW + timedelta(hours=1)
    assert lifecycle.effective_state(key, later) == "PendingImport"
    assert outcome(key, "Encrypt", later) == INV
    assert outcome(key, "EnableKey", later) == INV
    assert outcome(replace(key, state="Disabled"), "Decrypt", later) == INV
    # expiry does not hide a pending deletion
    pending = replace(key, state="PendingDeletion", deletion_date=NOW + timedelta(days=7))
    assert lifecycle.effective_state(pending, later) == "PendingDeletion"
    # service-generated keys have no expiry, whatever valid_to says
    assert lifecycle.effective_state(replace(key, origin="AWS_KMS"), later) == "Enabled"


def test_a_key_past_its_deletion_date_is_destroyed() -> None:
    key = make_key("PendingDeletion")
    assert not lifecycle.is_destroyed(key, NOW)
    assert lifecycle.is_destroyed(key, key.deletion_date)  # type: ignore[arg-type]
    assert not lifecycle.is_destroyed(make_key("Disabled"), NOW + timedelta(days=365))


def test_unknown_operation_or_state_is_refused() -> None:
    assert outcome(make_key("Enabled"), "FlyToTheMoon") == INV
    assert outcome(make_key("Creating"), "Encrypt") == INV
