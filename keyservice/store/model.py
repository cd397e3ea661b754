"""Plain records the store persists and the service reasons about.

No behaviour here beyond small conveniences; state rules live in ``lifecycle.py``, sealing in
``rootkey.py``. Timestamps are timezone-aware UTC datetimes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

# Key states (AWS names).
ENABLED = "Enabled"
DISABLED = "Disabled"
PENDING_DELETION = "PendingDeletion"
PENDING_IMPORT = "PendingImport"
KEY_STATES = frozenset({ENABLED, DISABLED, PENDING_DELETION, PENDING_IMPORT})

# Origins and managers.
ORIGIN_AWS_KMS = "AWS_KMS"
ORIGIN_EXTERNAL = "EXTERNAL"
MANAGER_CUSTOMER = "CUSTOMER"
MANAGER_AWS = "AWS"

# Imported material (SPEC K3).
EXPIRES = "KEY_MATERIAL_EXPIRES"
DOES_NOT_EXPIRE = "KEY_MATERIAL_DOES_NOT_EXPIRE"

# How a key version came to be (ListKeyRotations' RotationType; None for the first material).
ROTATION_AUTOMATIC = "AUTOMATIC"
ROTATION_ON_DEMAND = "ON_DEMAND"

KEY_USAGE = "ENCRYPT_DECRYPT"
KEY_SPEC = "SYMMETRIC_DEFAULT"
ENCRYPTION_ALGORITHM = "SYMMETRIC_DEFAULT"


@dataclass
class KeyRecord:
    key_id: str  # lowercase UUID
    arn: str
    account_id: str
    region: str
    description: str
    state: str
    origin: str
    key_manager: str
    creation_date: datetime
    key_usage: str = KEY_USAGE
    key_spec: str = KEY_SPEC
    deletion_date: datetime | None = None
    valid_to: datetime | None = None
    policy: str | None = None
    tags: list[dict[str, str]] = field(default_factory=list)
    # Automatic rotation (SPEC K6): on/off, period, and when the scheduler rotates next.
    rotation_enabled: bool = False
    rotation_period_days: int | None = None
    next_rotation_date: datetime | None = None
    # Imported keys (SPEC K3): how the current material expires (None while none is imported) and
    # KeyMaterialId, an HMAC of the material under the root key that lets a re-import prove it is
    # the same material without the store keeping the material after it was deleted.
    expiration_model: str | None = None
    material_id: str | None = None

    @property
    def enabled(self) -> bool:
        return self.state == ENABLED


@dataclass(frozen=True)
class KeyVersionRecord:
    key_id: str
    version: int  # 1, 2, ... (rotation adds versions)
    creation_date: datetime
    sealed_material: bytes  # rootkey.seal(root, material, store.material_aad(key_id, version))
    rotation_type: str | None = None  # ROTATION_AUTOMATIC / ROTATION_ON_DEMAND; None for version 1


@dataclass(frozen=True)
class ImportParameters:
    """One GetParametersForImport answer: the RSA wrapping key pair, valid 24 hours, for one key."""

    token_id: str  # hex; the ImportToken handed out names it
    key_id: str
    wrapping_algorithm: str
    wrapping_key_spec: str
    sealed_private_key: bytes  # rootkey.seal(root, PKCS#8 DER, store.import_key_aad(token_id))
    creation_date: datetime
    valid_to: datetime


@dataclass(frozen=True)
class AliasRecord:
    name: str  # "alias/..."
    target_key_id: str
    creation_date: datetime
    last_updated_date: datetime


@dataclass(frozen=True)
class CredentialRecord:
    access_key_id: str
    principal_arn: str
    account_id: str
    sealed_secret: bytes  # rootkey.seal(root, secret, store.secret_aad(access_key_id))
    creation_date: datetime
    enabled: bool = True


@dataclass(frozen=True)
class PrincipalRecord:
    """A named user of the account (``arn:aws:iam::<account>:user/<name>``); its access keys are
    ``CredentialRecord`` rows with its ARN, its identity policies ``IdentityPolicyRecord`` rows."""

    arn: str
    name: str
    account_id: str
    creation_date: datetime


@dataclass(frozen=True)
class IdentityPolicyRecord:
    principal_arn: str
    name: str
    document: str  # the policy JSON as attached (validated by policy.parse(key_policy=False))


@dataclass(frozen=True)
class GrantRecord:
    """A grant on one key: who may do which operations, under which context constraints."""

    grant_id: str  # 64 hex characters, like AWS's
    key_id: str
    grantee: str
    operations: tuple[str, ...]  # AWS operation names, e.g. "Decrypt"
    issuing_account: str
    creation_date: datetime
    retiring_principal: str | None = None
    name: str | None = None
    context_subset: dict[str, str] | None = None
    context_equals: dict[str, str] | None = None

    def constraints(self) -> dict[str, dict[str, str]]:
        """The context constraints under AWS's names (ListGrants' ``Constraints``, the store's
        column); empty when there are none."""
        constraints: dict[str, dict[str, str]] = {}
        if self.context_subset is not None:
            constraints["EncryptionContextSubset"] = self.context_subset
        if self.context_equals is not None:
            constraints["EncryptionContextEquals"] = self.context_equals
        return constraints
