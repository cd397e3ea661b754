"""The key state machine and the one check "may this key be used for this operation now?".

Every operation that touches a key goes through ``check_usable`` so the rules of AWS's key-state
table (AWS KMS Developer Guide, "Key states of AWS KMS keys") live in one place: which state
refuses which operation with which error, what origin (service-generated vs imported) allows,
what a service-managed (``KeyManager=AWS``) key refuses its customers, and what time does to a
key (imported material past its ValidTo is gone; a key past its deletion date no longer exists),
so the answer is right even in the moment before the scheduler gets to a key.

Footnotes of AWS's table, as used below:
  [1] DisabledException: <arn> is disabled.
  [3] KMSInvalidStateException: <arn> is pending deletion.
  [4] KMSInvalidStateException: <arn> is not pending deletion.
  [5] KMSInvalidStateException: <arn> is pending import.
  [6]/[7] UnsupportedOperationException for rotation operations on imported keys.
  [8] KMSInvalidStateException for import operations on an imported key pending deletion.
  [9] UnsupportedOperationException for import operations on keys that cannot have imported material.
"""

from __future__ import annotations

from datetime import datetime

from keyservice.errors import (
    AccessDeniedException,
    DisabledException,
    KMSError,
    KMSInvalidStateException,
    UnsupportedOperationException,
)
from keyservice.store.model import (
    DISABLED,
    ENABLED,
    MANAGER_AWS,
    ORIGIN_EXTERNAL,
    PENDING_DELETION,
    PENDING_IMPORT,
    KeyRecord,
)

# Operations that use key material.
CRYPTO_OPERATIONS = frozenset(
    {
        "Encrypt",
        "Decrypt",
        "ReEncrypt",
        "GenerateDataKey",
        "GenerateDataKeyWithoutPlaintext",
        "GenerateDataKeyPair",
        "GenerateDataKeyPairWithoutPlaintext",
    }
)

# Allowed in every state.
ALWAYS_ALLOWED = frozenset(
    {
        "DescribeKey",
        "ListKeys",
        "ListAliases",
        "DeleteAlias",
        "GetKeyPolicy",
        "ListKeyPolicies",
        "PutKeyPolicy",
        "ListResourceTags",
        "ListGrants",
        "RetireGrant",
        "RevokeGrant",
    }
)

# Allowed unless the key is pending deletion [3].
METADATA_OPERATIONS = frozenset(
    {
        "CreateAlias",
        "UpdateAlias",
        "UpdateKeyDescription",
        "TagResource",
        "UntagResource",
        "ScheduleKeyDeletion",
        "CreateGrant",
    }
)

# Enabled/Disabled only: refused pending import [5] and pending deletion [3].
STATE_OPERATIONS = frozenset({"EnableKey", "DisableKey"})

# Rotation of service-generated keys: [7] on imported keys, [1] disabled, [3] pending deletion.
ROTATION_CHANGES = frozenset({"EnableKeyRotation", "DisableKeyRotation", "RotateKeyOnDemand"})
# Rotation reads: [7] on imported keys, otherwise allowed in every state.
ROTATION_READS = frozenset({"GetKeyRotationStatus", "ListKeyRotations"})

# Import operations: [9] on service-generated keys, [8] pending deletion.
IMPORT_OPERATIONS = frozenset({"GetParametersForImport", "ImportKeyMaterial", "DeleteImportedKeyMaterial"})

CANCEL_DELETION = "CancelKeyDeletion"

# What the customer may do with a service-managed (KeyManager AWS) key: its key policy
# (``policy.aws_managed_key_policy``, enforced by ``authorize.py`` before this check) lets the
# account use and view it, never manage it; this list is a backstop should a store ever hold
# another policy for such a key (AWS answers these with AccessDeniedException).
AWS_MANAGED_ALLOWED = (
    CRYPTO_OPERATIONS
    | ROTATION_READS
    | {
        "DescribeKey",
        "ListKeys",
        "ListAliases",
        "GetKeyPolicy",
        "ListKeyPolicies",
        "ListResourceTags",
        "ListGrants",
        "CreateGrant",
        "RetireGrant",
        "RevokeGrant",
    }
)

ALL_OPERATIONS = (
    CRYPTO_OPERATIONS
    | ALWAYS_ALLOWED
    | METADATA_OPERATIONS
    | STATE_OPERATIONS
    | ROTATION_CHANGES
    | ROTATION_READS
    | IMPORT_OPERATIONS
    | {CANCEL_DELETION}
)


def material_expired(key: KeyRecord, now: datetime) -> bool:
    """Imported material past its ValidTo is unusable even before the scheduler deletes it."""
    return key.origin == ORIGIN_EXTERNAL and key.valid_to is not None and key.valid_to <= now


def is_destroyed(key: KeyRecord, now: datetime) -> bool:
    """A key whose deletion date has passed no longer exists, whether or not the reaper ran yet."""
    return key.state == PENDING_DELETION and key.deletion_date is not None and key.deletion_date <= now


def effective_state(key: KeyRecord, now: datetime) -> str:
    """The KeyState AWS would report now (stored state, corrected for expired imported material)."""
    if key.state in (ENABLED, DISABLED) and material_expired(key, now):
        return PENDING_IMPORT
    return key.state


def refusal(key: KeyRecord, operation: str, now: datetime) -> KMSError | None:
    """The AWS error for ``operation`` on ``key`` in its current state, or None if it may proceed.

    ``is_destroyed`` keys must be treated as absent by the caller before asking.
    """
    if key.key_manager == MANAGER_AWS and operation not in AWS_MANAGED_ALLOWED:
        return AccessDeniedException(
            f"{key.arn} is managed by the service (KeyManager AWS); customers cannot call {operation} on it."
        )
    state = effective_state(key, now)
    if operation in ALWAYS_ALLOWED:
        return None
    if operation in CRYPTO_OPERATIONS:
        if state == ENABLED:  # the common case: no error object built
            return None
        if state == DISABLED:
            return DisabledException(f"{key.arn} is disabled.")
        if state == PENDING_IMPORT:
            return _pending_import(key)
        if state == PENDING_DELETION:
            return _pending_deletion(key)
        return _unknown(key, state)
    external = key.origin == ORIGIN_EXTERNAL
    if operation in METADATA_OPERATIONS:
        return _pending_deletion(key) if state == PENDING_DELETION else None
    if operation in STATE_OPERATIONS:
        if state == PENDING_IMPORT:
            return _pending_import(key)
        return _pending_deletion(key) if state == PENDING_DELETION else None
    if operation == CANCEL_DELETION:
        return (
            None
            if state == PENDING_DELETION
            else KMSInvalidStateException(f"{key.arn} is not pending deletion.")
        )
    if operation in ROTATION_CHANGES or operation in ROTATION_READS:
        if external:
            return UnsupportedOperationException(
                f"{key.arn} origin is EXTERNAL which is not valid for this operation."
            )
        if operation in ROTATION_READS:
            return None
        if state == DISABLED:
            return DisabledException(f"{key.arn} is disabled.")
        return _pending_deletion(key) if state == PENDING_DELETION else None
    if operation in IMPORT_OPERATIONS:
        if not external:
            return UnsupportedOperationException(
                f"{key.arn} origin is {key.origin} which is not valid for this operation."
            )
        return _pending_deletion(key) if state == PENDING_DELETION else None
    return KMSInvalidStateException(f"{operation} is not a key operation this service knows the rules of.")


def _pending_deletion(key: KeyRecord) -> KMSError:
    return KMSInvalidStateException(f"{key.arn} is pending deletion.")


def _pending_import(key: KeyRecord) -> KMSError:
    return KMSInvalidStateException(f"{key.arn} is pending import.")


def check_usable(key: KeyRecord, operation: str, now: datetime) -> None:
    """Raise the AWS error for using ``key`` with ``operation`` now, else return."""
    error = refusal(key, operation, now)
    if error is not None:
        raise error


def _unknown(key: KeyRecord, state: str) -> KMSError:
    return KMSInvalidStateException(f"{key.arn} is in an unknown state {state!r}.")
