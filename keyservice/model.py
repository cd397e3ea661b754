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

    @property
    def enabled(self) -> bool:
        return self.state == ENABLED


@dataclass(frozen=True)
class KeyVersionRecord:
    key_id: str
    version: int  # 1, 2, ... (rotation adds versions)
    creation_date: datetime
    sealed_material: bytes  # rootkey.seal(root, material, store.material_aad(key_id, version))


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
