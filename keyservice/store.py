"""Persistence: a small ``Store`` interface and its SQLite implementation.

The store holds only public metadata and *sealed* secrets; it never sees a root key and never
holds plaintext key material or credential secrets (the service seals before it stores). The
AAD of each seal binds the sealed value to its row, so swapping sealed blobs between rows makes
them fail to open. See docs/STORE.md for the schema.

SQLite runs in WAL mode with ``synchronous=FULL`` (a commit is durable when it returns), one
connection per thread (waitress serves requests from a thread pool), ``BEGIN IMMEDIATE`` for
writes so concurrent writers queue on the busy timeout instead of failing on lock upgrade.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

from keyservice.errors import AlreadyExistsException, LimitExceededException, NotFoundException
from keyservice.model import MANAGER_CUSTOMER, AliasRecord, CredentialRecord, KeyRecord, KeyVersionRecord

SCHEMA_VERSION = 1
DB_NAME = "keyservice.db"


def material_aad(key_id: str, version: int) -> bytes:
    """AAD sealing one key version's material: binds it to its key id and version."""
    return f"keyservice/key-material/v1\x00{key_id}\x00{version}".encode()


def secret_aad(access_key_id: str) -> bytes:
    """AAD sealing a credential's secret access key: binds it to its access key id."""
    return f"keyservice/credential-secret/v1\x00{access_key_id}".encode()


def root_check_aad() -> bytes:
    """AAD of the meta value ``root_check``, a constant sealed under the root key."""
    return b"keyservice/root-check/v1"


class Store(Protocol):
    """What the service needs from persistence. All methods are thread-safe."""

    def get_meta(self, name: str) -> str | None: ...
    def set_meta(self, name: str, value: str) -> None: ...

    def create_key(
        self, key: KeyRecord, first_version: KeyVersionRecord, *, max_customer_keys: int
    ) -> None: ...
    def get_key(self, key_id: str) -> KeyRecord | None: ...
    def update_key(self, key: KeyRecord) -> None: ...
    def list_keys(self, *, after: str | None, limit: int) -> list[KeyRecord]: ...
    def count_customer_keys(self) -> int: ...

    def add_key_version(self, version: KeyVersionRecord) -> None: ...
    def get_key_version(self, key_id: str, version: int) -> KeyVersionRecord | None: ...
    def latest_key_version(self, key_id: str) -> KeyVersionRecord | None: ...

    def create_alias(self, alias: AliasRecord) -> None: ...
    def update_alias(self, name: str, target_key_id: str, when: datetime) -> None: ...
    def delete_alias(self, name: str) -> None: ...
    def get_alias(self, name: str) -> AliasRecord | None: ...
    def list_aliases(self, *, key_id: str | None, after: str | None, limit: int) -> list[AliasRecord]: ...

    def add_credential(self, cred: CredentialRecord) -> None: ...
    def get_credential(self, access_key_id: str) -> CredentialRecord | None: ...
    def list_credentials(self) -> list[CredentialRecord]: ...

    def close(self) -> None: ...


_SCHEMA = """
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


def _ts(value: datetime | None) -> str | None:
    if value is None:
        return None
    if value.tzinfo is None:
        raise ValueError("timestamps must be timezone-aware")
    return value.astimezone(UTC).isoformat(timespec="microseconds")


def _dt(value: str | None) -> datetime | None:
    return None if value is None else datetime.fromisoformat(value)


def _key_from_row(row: sqlite3.Row) -> KeyRecord:
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
        creation_date=_dt(row["creation_date"]),  # type: ignore[arg-type]
        deletion_date=_dt(row["deletion_date"]),
        valid_to=_dt(row["valid_to"]),
        policy=row["policy"],
        tags=json.loads(row["tags"]),
    )


def _version_from_row(row: sqlite3.Row) -> KeyVersionRecord:
    return KeyVersionRecord(
        key_id=row["key_id"],
        version=row["version"],
        creation_date=_dt(row["creation_date"]),  # type: ignore[arg-type]
        sealed_material=bytes(row["sealed_material"]),
    )


def _alias_from_row(row: sqlite3.Row) -> AliasRecord:
    return AliasRecord(
        name=row["name"],
        target_key_id=row["target_key_id"],
        creation_date=_dt(row["creation_date"]),  # type: ignore[arg-type]
        last_updated_date=_dt(row["last_updated_date"]),  # type: ignore[arg-type]
    )


def _cred_from_row(row: sqlite3.Row) -> CredentialRecord:
    return CredentialRecord(
        access_key_id=row["access_key_id"],
        principal_arn=row["principal_arn"],
        account_id=row["account_id"],
        sealed_secret=bytes(row["sealed_secret"]),
        creation_date=_dt(row["creation_date"]),  # type: ignore[arg-type]
        enabled=bool(row["enabled"]),
    )


class SQLiteStore:
    """The embedded default store: one SQLite file in WAL mode, a connection per thread."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        if not self.path.exists():
            # Create the file 0600 ourselves; SQLite gives -wal/-shm the same mode.
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600))
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._all_lock = threading.Lock()
        self._closed = False
        self._conn().executescript("BEGIN IMMEDIATE;" + _SCHEMA + "COMMIT;")
        with self._write() as conn:
            row = conn.execute("SELECT value FROM meta WHERE name = 'schema_version'").fetchone()
            if row is None:
                conn.execute(
                    "INSERT INTO meta(name, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),)
                )
            elif int(row[0]) != SCHEMA_VERSION:
                raise RuntimeError(
                    f"store schema version {row[0]} is not supported (expected {SCHEMA_VERSION})"
                )

    # ----------------------------------------------------------------- connections

    def _conn(self) -> sqlite3.Connection:
        if self._closed:
            raise RuntimeError("store is closed")
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, isolation_level=None, timeout=30.0, check_same_thread=False)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA foreign_keys=ON")
            conn.execute("PRAGMA busy_timeout=30000")
            self._local.conn = conn
            with self._all_lock:
                self._all.append(conn)
        return conn

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def _one(self, sql: str, args: tuple[object, ...]) -> sqlite3.Row | None:
        return self._conn().execute(sql, args).fetchone()

    def close(self) -> None:
        with self._all_lock:
            self._closed = True
            for conn in self._all:
                try:
                    conn.close()
                except sqlite3.Error:
                    pass
            self._all.clear()

    # ----------------------------------------------------------------- meta

    def get_meta(self, name: str) -> str | None:
        row = self._one("SELECT value FROM meta WHERE name = ?", (name,))
        return None if row is None else row["value"]

    def set_meta(self, name: str, value: str) -> None:
        with self._write() as conn:
            conn.execute(
                "INSERT INTO meta(name, value) VALUES (?, ?)"
                " ON CONFLICT(name) DO UPDATE SET value = excluded.value",
                (name, value),
            )

    # ----------------------------------------------------------------- keys

    def create_key(self, key: KeyRecord, first_version: KeyVersionRecord, *, max_customer_keys: int) -> None:
        """Insert a key and its first version atomically, enforcing the customer-key quota."""
        with self._write() as conn:
            if key.key_manager == MANAGER_CUSTOMER:
                (count,) = conn.execute(
                    "SELECT COUNT(*) FROM keys WHERE key_manager = ?", (MANAGER_CUSTOMER,)
                ).fetchone()
                if count >= max_customer_keys:
                    raise LimitExceededException(
                        f"The request would exceed the quota of {max_customer_keys} customer managed keys."
                    )
            conn.execute(
                "INSERT INTO keys(key_id, arn, account_id, region, description, state, origin, key_manager,"
                " key_usage, key_spec, creation_date, deletion_date, valid_to, policy, tags)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    key.key_id, key.arn, key.account_id, key.region, key.description, key.state, key.origin,
                    key.key_manager, key.key_usage, key.key_spec, _ts(key.creation_date),
                    _ts(key.deletion_date), _ts(key.valid_to), key.policy, json.dumps(key.tags),
                ),
            )
            self._insert_version(conn, first_version)

    def get_key(self, key_id: str) -> KeyRecord | None:
        row = self._one("SELECT * FROM keys WHERE key_id = ?", (key_id,))
        return None if row is None else _key_from_row(row)

    def update_key(self, key: KeyRecord) -> None:
        """Write back the mutable fields of a key."""
        with self._write() as conn:
            cur = conn.execute(
                "UPDATE keys SET description = ?, state = ?, deletion_date = ?, valid_to = ?, policy = ?,"
                " tags = ? WHERE key_id = ?",
                (
                    key.description, key.state, _ts(key.deletion_date), _ts(key.valid_to), key.policy,
                    json.dumps(key.tags), key.key_id,
                ),
            )
            if cur.rowcount != 1:
                raise NotFoundException(f"Key '{key.arn}' does not exist")

    def list_keys(self, *, after: str | None, limit: int) -> list[KeyRecord]:
        """Keys ordered by key id, strictly after ``after``."""
        rows = self._conn().execute(
            "SELECT * FROM keys WHERE key_id > ? ORDER BY key_id LIMIT ?", (after or "", limit)
        ).fetchall()
        return [_key_from_row(r) for r in rows]

    def count_customer_keys(self) -> int:
        row = self._one("SELECT COUNT(*) AS n FROM keys WHERE key_manager = ?", (MANAGER_CUSTOMER,))
        return int(row["n"]) if row else 0

    # ----------------------------------------------------------------- key versions

    @staticmethod
    def _insert_version(conn: sqlite3.Connection, v: KeyVersionRecord) -> None:
        conn.execute(
            "INSERT INTO key_versions(key_id, version, creation_date, sealed_material) VALUES (?, ?, ?, ?)",
            (v.key_id, v.version, _ts(v.creation_date), v.sealed_material),
        )

    def add_key_version(self, version: KeyVersionRecord) -> None:
        with self._write() as conn:
            self._insert_version(conn, version)

    def get_key_version(self, key_id: str, version: int) -> KeyVersionRecord | None:
        row = self._one("SELECT * FROM key_versions WHERE key_id = ? AND version = ?", (key_id, version))
        return None if row is None else _version_from_row(row)

    def latest_key_version(self, key_id: str) -> KeyVersionRecord | None:
        row = self._one(
            "SELECT * FROM key_versions WHERE key_id = ? ORDER BY version DESC LIMIT 1", (key_id,)
        )
        return None if row is None else _version_from_row(row)

    # ----------------------------------------------------------------- aliases

    def create_alias(self, alias: AliasRecord) -> None:
        try:
            with self._write() as conn:
                conn.execute(
                    "INSERT INTO aliases(name, target_key_id, creation_date, last_updated_date)"
                    " VALUES (?, ?, ?, ?)",
                    (alias.name, alias.target_key_id, _ts(alias.creation_date), _ts(alias.last_updated_date)),
                )
        except sqlite3.IntegrityError:
            if self.get_alias(alias.name) is not None:
                raise AlreadyExistsException(f"An alias with the name {alias.name} already exists") from None
            raise NotFoundException(f"Key '{alias.target_key_id}' does not exist") from None

    def update_alias(self, name: str, target_key_id: str, when: datetime) -> None:
        with self._write() as conn:
            cur = conn.execute(
                "UPDATE aliases SET target_key_id = ?, last_updated_date = ? WHERE name = ?",
                (target_key_id, _ts(when), name),
            )
            if cur.rowcount != 1:
                raise NotFoundException(f"Alias {name} is not found.")

    def delete_alias(self, name: str) -> None:
        with self._write() as conn:
            cur = conn.execute("DELETE FROM aliases WHERE name = ?", (name,))
            if cur.rowcount != 1:
                raise NotFoundException(f"Alias {name} is not found.")

    def get_alias(self, name: str) -> AliasRecord | None:
        row = self._one("SELECT * FROM aliases WHERE name = ?", (name,))
        return None if row is None else _alias_from_row(row)

    def list_aliases(self, *, key_id: str | None, after: str | None, limit: int) -> list[AliasRecord]:
        """Aliases ordered by name, strictly after ``after``, optionally only those of ``key_id``."""
        if key_id is None:
            rows = self._conn().execute(
                "SELECT * FROM aliases WHERE name > ? ORDER BY name LIMIT ?", (after or "", limit)
            ).fetchall()
        else:
            rows = self._conn().execute(
                "SELECT * FROM aliases WHERE target_key_id = ? AND name > ? ORDER BY name LIMIT ?",
                (key_id, after or "", limit),
            ).fetchall()
        return [_alias_from_row(r) for r in rows]

    # ----------------------------------------------------------------- credentials

    def add_credential(self, cred: CredentialRecord) -> None:
        try:
            with self._write() as conn:
                conn.execute(
                    "INSERT INTO credentials(access_key_id, principal_arn, account_id, sealed_secret,"
                    " creation_date, enabled) VALUES (?, ?, ?, ?, ?, ?)",
                    (
                        cred.access_key_id, cred.principal_arn, cred.account_id, cred.sealed_secret,
                        _ts(cred.creation_date), int(cred.enabled),
                    ),
                )
        except sqlite3.IntegrityError:
            raise AlreadyExistsException(f"Access key {cred.access_key_id} already exists") from None

    def get_credential(self, access_key_id: str) -> CredentialRecord | None:
        row = self._one("SELECT * FROM credentials WHERE access_key_id = ?", (access_key_id,))
        return None if row is None else _cred_from_row(row)

    def list_credentials(self) -> list[CredentialRecord]:
        rows = self._conn().execute(
            "SELECT * FROM credentials ORDER BY creation_date, access_key_id"
        ).fetchall()
        return [_cred_from_row(r) for r in rows]
