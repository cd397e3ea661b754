"""The SQLite schema, its migrations, and the conversion between rows and records.

``SCHEMA_VERSION`` is the version a store is migrated to on open; ``MIGRATIONS[n]`` takes a
store from version n to n + 1 (docs/STORE.md).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from datetime import UTC, datetime

from keyservice.authz import policy
from keyservice.errors import (
    MalformedPolicyDocumentException,
)
from keyservice.store.model import (
    MANAGER_AWS,
    AliasRecord,
    CredentialRecord,
    GrantRecord,
    ImportParameters,
    KeyRecord,
    KeyVersionRecord,
)

SCHEMA_VERSION = 3
DB_NAME = "keyservice.db"

# Schema version 1, as first released; later versions are reached by MIGRATIONS.
SCHEMA_V1 = """
CREATE TABLE IF NOT EXISTS meta (
    name  TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS keys (
    key_id        TEXT PRIMARY KEY,
    arn           TEXT NOT NULL UNIQUE,
    account_id    TEXT NOT NULL,
    region        TEXT NOT NULL,
    description   TEXT NOT NULL,
    state         TEXT NOT NULL,
    origin        TEXT NOT NULL,
    key_manager   TEXT NOT NULL,
    key_usage     TEXT NOT NULL,
    key_spec      TEXT NOT NULL,
    creation_date TEXT NOT NULL,
    deletion_date TEXT,
    valid_to      TEXT,
    policy        TEXT,
    tags          TEXT NOT NULL DEFAULT '[]'
);
CREATE TABLE IF NOT EXISTS key_versions (
    key_id          TEXT NOT NULL REFERENCES keys(key_id) ON DELETE CASCADE,
    version         INTEGER NOT NULL,
    creation_date   TEXT NOT NULL,
    sealed_material BLOB NOT NULL,
    PRIMARY KEY (key_id, version)
);
CREATE TABLE IF NOT EXISTS aliases (
    name              TEXT PRIMARY KEY,
    target_key_id     TEXT NOT NULL REFERENCES keys(key_id) ON DELETE CASCADE,
    creation_date     TEXT NOT NULL,
    last_updated_date TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS aliases_by_target ON aliases(target_key_id);
CREATE TABLE IF NOT EXISTS credentials (
    access_key_id TEXT PRIMARY KEY,
    principal_arn TEXT NOT NULL,
    account_id    TEXT NOT NULL,
    sealed_secret BLOB NOT NULL,
    creation_date TEXT NOT NULL,
    enabled       INTEGER NOT NULL DEFAULT 1
);
"""


# MIGRATIONS[n] takes a store from schema version n to n + 1, inside one write transaction, so a
# data directory created by an older release keeps working (and a crash mid-migration changes nothing).
MIGRATIONS: dict[int, tuple[str | Callable[[sqlite3.Connection], None], ...]] = {
    1: (
        "ALTER TABLE keys ADD COLUMN rotation_enabled INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE keys ADD COLUMN rotation_period_days INTEGER",
        "ALTER TABLE keys ADD COLUMN next_rotation_date TEXT",
        "ALTER TABLE keys ADD COLUMN expiration_model TEXT",
        "ALTER TABLE keys ADD COLUMN material_id TEXT",
        "ALTER TABLE key_versions ADD COLUMN rotation_type TEXT",
        """CREATE TABLE import_parameters (
            token_id           TEXT PRIMARY KEY,
            key_id             TEXT NOT NULL REFERENCES keys(key_id) ON DELETE CASCADE,
            wrapping_algorithm TEXT NOT NULL,
            wrapping_key_spec  TEXT NOT NULL,
            sealed_private_key BLOB NOT NULL,
            creation_date      TEXT NOT NULL,
            valid_to           TEXT NOT NULL
        )""",
        "CREATE INDEX import_parameters_by_key ON import_parameters(key_id)",
        "CREATE INDEX keys_by_next_rotation ON keys(next_rotation_date) WHERE rotation_enabled = 1",
        "CREATE INDEX keys_by_deletion_date ON keys(deletion_date) WHERE deletion_date IS NOT NULL",
    ),
}


def _fill_key_policies(conn: sqlite3.Connection) -> None:
    """Schema 3: every key gets a key policy. Keys without one, or with one that is not a valid
    policy document (CreateKey did not validate before schema 3; nothing enforced them), get the
    default policy (the account has full access, as before); service-managed keys get theirs."""
    rows = conn.execute("SELECT key_id, account_id, key_manager, policy FROM keys").fetchall()
    for key_id, account_id, manager, text in rows:
        if manager == MANAGER_AWS:
            new = policy.aws_managed_key_policy(account_id)
        else:
            try:
                policy.parse(text)
                continue
            except MalformedPolicyDocumentException:
                new = policy.default_key_policy(account_id)
        conn.execute("UPDATE keys SET policy = ? WHERE key_id = ?", (new, key_id))


MIGRATIONS[2] = (
    """CREATE TABLE principals (
        arn           TEXT PRIMARY KEY,
        name          TEXT NOT NULL UNIQUE,
        account_id    TEXT NOT NULL,
        creation_date TEXT NOT NULL
    )""",
    """CREATE TABLE identity_policies (
        principal_arn TEXT NOT NULL REFERENCES principals(arn) ON DELETE CASCADE,
        name          TEXT NOT NULL,
        document      TEXT NOT NULL,
        PRIMARY KEY (principal_arn, name)
    )""",
    """CREATE TABLE grants (
        grant_id           TEXT PRIMARY KEY,
        key_id             TEXT NOT NULL REFERENCES keys(key_id) ON DELETE CASCADE,
        grantee            TEXT NOT NULL,
        retiring_principal TEXT,
        operations         TEXT NOT NULL,
        constraints        TEXT,
        name               TEXT,
        issuing_account    TEXT NOT NULL,
        creation_date      TEXT NOT NULL
    )""",
    "CREATE INDEX grants_by_key ON grants(key_id, grantee)",
    "CREATE INDEX grants_by_retiring_principal ON grants(retiring_principal)",
    "CREATE INDEX credentials_by_principal ON credentials(principal_arn)",
    _fill_key_policies,
)


def to_text(value: datetime | None) -> str | None:
    if value is None:
        return None
    if value.tzinfo is None:
        raise ValueError("timestamps must be timezone-aware")
    return value.astimezone(UTC).isoformat(timespec="microseconds")


def to_datetime(value: str | None) -> datetime | None:
    return None if value is None else datetime.fromisoformat(value)


def key_from_row(row: sqlite3.Row) -> KeyRecord:
    return KeyRecord(
        key_id=row["key_id"],
        arn=row["arn"],
        account_id=row["account_id"],
        region=row["region"],
        description=row["description"],
        state=row["state"],
        origin=row["origin"],
        key_manager=row["key_manager"],
        key_usage=row["key_usage"],
        key_spec=row["key_spec"],
        creation_date=to_datetime(row["creation_date"]),  # type: ignore[arg-type]
        deletion_date=to_datetime(row["deletion_date"]),
        valid_to=to_datetime(row["valid_to"]),
        policy=row["policy"],
        tags=json.loads(row["tags"]),
        rotation_enabled=bool(row["rotation_enabled"]),
        rotation_period_days=row["rotation_period_days"],
        next_rotation_date=to_datetime(row["next_rotation_date"]),
        expiration_model=row["expiration_model"],
        material_id=row["material_id"],
    )


def version_from_row(row: sqlite3.Row) -> KeyVersionRecord:
    return KeyVersionRecord(
        key_id=row["key_id"],
        version=row["version"],
        creation_date=to_datetime(row["creation_date"]),  # type: ignore[arg-type]
        sealed_material=bytes(row["sealed_material"]),
        rotation_type=row["rotation_type"],
    )


def import_from_row(row: sqlite3.Row) -> ImportParameters:
    return ImportParameters(
        token_id=row["token_id"],
        key_id=row["key_id"],
        wrapping_algorithm=row["wrapping_algorithm"],
        wrapping_key_spec=row["wrapping_key_spec"],
        sealed_private_key=bytes(row["sealed_private_key"]),
        creation_date=to_datetime(row["creation_date"]),  # type: ignore[arg-type]
        valid_to=to_datetime(row["valid_to"]),  # type: ignore[arg-type]
    )


def alias_from_row(row: sqlite3.Row) -> AliasRecord:
    return AliasRecord(
        name=row["name"],
        target_key_id=row["target_key_id"],
        creation_date=to_datetime(row["creation_date"]),  # type: ignore[arg-type]
        last_updated_date=to_datetime(row["last_updated_date"]),  # type: ignore[arg-type]
    )


def grant_from_row(row: sqlite3.Row) -> GrantRecord:
    constraints = json.loads(row["constraints"]) if row["constraints"] else {}
    return GrantRecord(
        grant_id=row["grant_id"],
        key_id=row["key_id"],
        grantee=row["grantee"],
        operations=tuple(json.loads(row["operations"])),
        issuing_account=row["issuing_account"],
        creation_date=to_datetime(row["creation_date"]),  # type: ignore[arg-type]
        retiring_principal=row["retiring_principal"],
        name=row["name"],
        context_subset=constraints.get("EncryptionContextSubset"),
        context_equals=constraints.get("EncryptionContextEquals"),
    )


def cred_from_row(row: sqlite3.Row) -> CredentialRecord:
    return CredentialRecord(
        access_key_id=row["access_key_id"],
        principal_arn=row["principal_arn"],
        account_id=row["account_id"],
        sealed_secret=bytes(row["sealed_secret"]),
        creation_date=to_datetime(row["creation_date"]),  # type: ignore[arg-type]
        enabled=bool(row["enabled"]),
    )
