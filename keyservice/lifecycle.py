"""The key state machine and the one check "may this key be used for this operation now?".

Every operation that touches a key goes through ``check_usable`` so the rules of the AWS
key-state table live in one place (SPEC K7, K8; later issues add expiry via ``now``).
"""

from __future__ import annotations

from datetime import datetime

from keyservice.errors import DisabledException, KMSInvalidStateException
from keyservice.model import DISABLED, ENABLED, PENDING_DELETION, PENDING_IMPORT, KeyRecord

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

# Operations allowed on a key pending deletion (everything else is KMSInvalidStateException).
_ALLOWED_PENDING_DELETION = frozenset(
    {
        "DescribeKey",
        "ListKeys",
        "ListAliases",
        "DeleteAlias",
        "CancelKeyDeletion",
        "GetKeyPolicy",
        "ListKeyPolicies",
        "GetKeyRotationStatus",
        "ListKeyRotations",
        "ListResourceTags",
        "ListGrants",
        "RetireGrant",
        "RevokeGrant",
    }
)

# Operations refused on a key waiting for imported material.
_REFUSED_PENDING_IMPORT = CRYPTO_OPERATIONS | {
    "EnableKey",
    "DisableKey",
    "RotateKeyOnDemand",
    "EnableKeyRotation",
}


def check_usable(key: KeyRecord, operation: str, now: datetime) -> None:
    """Raise the AWS error for using ``key`` with ``operation`` in its current state, else return.

    ``now`` is accepted so that time-dependent rules (imported material expiry) can join here.
    """
    del now  # no time-dependent rule yet
    state = key.state
    if state == ENABLED:
        return
    if state == DISABLED:
        if operation in CRYPTO_OPERATIONS:
            raise DisabledException(f"{key.arn} is disabled.")
        return
    if state == PENDING_DELETION:
        if operation not in _ALLOWED_PENDING_DELETION:
            raise KMSInvalidStateException(f"{key.arn} is pending deletion.")
        return
    if state == PENDING_IMPORT:
        if operation in _REFUSED_PENDING_IMPORT:
            raise KMSInvalidStateException(f"{key.arn} is pending import.")
        return
    raise KMSInvalidStateException(f"{key.arn} is in an unknown state {state!r}.")
