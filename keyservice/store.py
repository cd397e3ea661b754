"""Persistence: a small ``Store`` interface and its SQLite implementation.

The store holds only public metadata and *sealed* secrets; it never sees a root key and never
holds plaintext key material or credential secrets (the service seals before it stores). The
AAD of each seal binds the sealed value to its row, so swapping sealed blobs between rows makes
them fail to open. See docs/STORE.md for the schema.

SQLite runs in WAL mode with ``synchronous=FULL`` (a commit is durable when it returns), one
connection per thread (the event loop and the management thread pool each get one), ``BEGIN IMMEDIATE`` for
writes so concurrent writers queue on the busy timeout instead of failing on lock upgrade.

The lookups every Decrypt makes (credential, key, version, grants, identity policies, aliases)
are memoised per thread (``_memo``). A thread's memo is dropped whenever the database may have
changed: SQLite's ``PRAGMA data_version`` (it moves when any *other* connection, in this process
or another such as ``keyservice principal``, commits) or this store's own write counter (a
connection's own commits do not move its data_version). One pragma costs ~4 µs; a lookup ~25.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import sqlite3
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol, TypeVar

from keyservice import policy
from keyservice.errors import (
    AlreadyExistsException,
    LimitExceededException,
    MalformedPolicyDocumentException,
    NotFoundException,
)
from keyservice.model import (
    MANAGER_AWS,
    MANAGER_CUSTOMER,
    ORIGIN_EXTERNAL,
    PENDING_DELETION,
    AliasRecord,
    CredentialRecord,
    GrantRecord,
    IdentityPolicyRecord,
    ImportParameters,
    KeyRecord,
    KeyVersionRecord,
    PrincipalRecord,
)

SCHEMA_VERSION = 3
DB_NAME = "keyservice.db"


def material_aad(key_id: str, version: int) -> bytes:
    """AAD sealing one key version's material: binds it to its key id and version."""
    return f"keyservice/key-material/v1\x00{key_id}\x00{version}".encode()


def secret_aad(access_key_id: str) -> bytes:
    """AAD sealing a credential's secret access key: binds it to its access key id."""
    return f"keyservice/credential-secret/v1\x00{access_key_id}".encode()


def import_key_aad(token_id: str) -> bytes:
    """AAD sealing the RSA private wrapping key of one GetParametersForImport answer."""
    return f"keyservice/import-wrapping-key/v1\x00{token_id}".encode()


def root_check_aad() -> bytes:
    """AAD of the meta value ``root_check``, a constant sealed under the root key."""
    return b"keyservice/root-check/v1"


class Store(Protocol):
    """What the service needs from persistence. All methods are thread-safe."""

    def one_read_check(self) -> AbstractContextManager[None]: ...
    def get_meta(self, name: str) -> str | None: ...
    def set_meta(self, name: str, value: str) -> None: ...

    def create_key(
        self,
        key: KeyRecord,
        first_version: KeyVersionRecord | None,
        *,
        max_customer_keys: int,
        alias: AliasRecord | None = None,
    ) -> None: ...
    def get_key(self, key_id: str) -> KeyRecord | None: ...
    def update_key(self, key: KeyRecord) -> None: ...
    def list_keys(self, *, after: str | None, limit: int) -> list[KeyRecord]: ...
    def count_customer_keys(self) -> int: ...
    def count_keys_by_state(self) -> dict[tuple[str, str], int]: ...
    def keys_due_rotation(self, now: datetime) -> list[KeyRecord]: ...
    def keys_due_deletion(self, now: datetime) -> list[KeyRecord]: ...
    def keys_with_material_expiry(self) -> list[KeyRecord]: ...
    def destroy_key(self, key_id: str, now: datetime) -> bool: ...

    def add_key_version(self, version: KeyVersionRecord) -> None: ...
    def get_key_version(self, key_id: str, version: int) -> KeyVersionRecord | None: ...
    def latest_key_version(self, key_id: str) -> KeyVersionRecord | None: ...
    def list_key_versions(self, key_id: str) -> list[KeyVersionRecord]: ...
    def delete_key_material(self, key: KeyRecord) -> None: ...
    def import_key_material(self, key: KeyRecord, version: KeyVersionRecord | None) -> None: ...

    def add_import_parameters(self, params: ImportParameters) -> None: ...
    def get_import_parameters(self, token_id: str) -> ImportParameters | None: ...
    def purge_import_parameters(self, now: datetime) -> int: ...

    def create_alias(self, alias: AliasRecord) -> None: ...
    def update_alias(self, name: str, target_key_id: str, when: datetime) -> None: ...
    def delete_alias(self, name: str) -> None: ...
    def get_alias(self, name: str) -> AliasRecord | None: ...
    def list_aliases(self, *, key_id: str | None, after: str | None, limit: int) -> list[AliasRecord]: ...

    def add_credential(self, cred: CredentialRecord) -> None: ...
    def get_credential(self, access_key_id: str) -> CredentialRecord | None: ...
    def list_credentials(self) -> list[CredentialRecord]: ...

    def delete_credentials(self, principal_arn: str, *, except_access_key_id: str | None = None) -> int: ...

    def create_principal(self, principal: PrincipalRecord) -> None: ...
    def get_principal(self, arn: str) -> PrincipalRecord | None: ...
    def list_principals(self) -> list[PrincipalRecord]: ...
    def delete_principal(self, arn: str) -> bool: ...
    def put_identity_policy(self, record: IdentityPolicyRecord) -> None: ...
    def delete_identity_policy(self, principal_arn: str, name: str) -> bool: ...
    def identity_policies(self, principal_arn: str) -> list[IdentityPolicyRecord]: ...

    def create_grant(self, grant: GrantRecord) -> None: ...
    def get_grant(self, grant_id: str) -> GrantRecord | None: ...
    def list_grants(
        self, *, key_id: str | None = None, grantee: str | None = None, retiring_principal: str | None = None,
        grant_id: str | None = None, after: str | None = None, limit: int = 1000,
    ) -> list[GrantRecord]: ...  # fmt: skip
    def delete_grant(self, grant_id: str) -> bool: ...

    def close(self) -> None: ...


# Schema version 1, as first released; later versions are reached by _MIGRATIONS.
_SCHEMA_V1 = """
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


# _MIGRATIONS[n] takes a store from schema version n to n + 1, inside one write transaction, so a
# data directory created by an older release keeps working (and a crash mid-migration changes nothing).
_MIGRATIONS: dict[int, tuple[str | Callable[[sqlite3.Connection], None], ...]] = {
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


_MIGRATIONS[2] = (
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
        rotation_enabled=bool(row["rotation_enabled"]),
        rotation_period_days=row["rotation_period_days"],
        next_rotation_date=_dt(row["next_rotation_date"]),
        expiration_model=row["expiration_model"],
        material_id=row["material_id"],
    )


def _version_from_row(row: sqlite3.Row) -> KeyVersionRecord:
    return KeyVersionRecord(
        key_id=row["key_id"],
        version=row["version"],
        creation_date=_dt(row["creation_date"]),  # type: ignore[arg-type]
        sealed_material=bytes(row["sealed_material"]),
        rotation_type=row["rotation_type"],
    )


def _import_from_row(row: sqlite3.Row) -> ImportParameters:
    return ImportParameters(
        token_id=row["token_id"],
        key_id=row["key_id"],
        wrapping_algorithm=row["wrapping_algorithm"],
        wrapping_key_spec=row["wrapping_key_spec"],
        sealed_private_key=bytes(row["sealed_private_key"]),
        creation_date=_dt(row["creation_date"]),  # type: ignore[arg-type]
        valid_to=_dt(row["valid_to"]),  # type: ignore[arg-type]
    )


def _alias_from_row(row: sqlite3.Row) -> AliasRecord:
    return AliasRecord(
        name=row["name"],
        target_key_id=row["target_key_id"],
        creation_date=_dt(row["creation_date"]),  # type: ignore[arg-type]
        last_updated_date=_dt(row["last_updated_date"]),  # type: ignore[arg-type]
    )


def _grant_from_row(row: sqlite3.Row) -> GrantRecord:
    constraints = json.loads(row["constraints"]) if row["constraints"] else {}
    return GrantRecord(
        grant_id=row["grant_id"],
        key_id=row["key_id"],
        grantee=row["grantee"],
        operations=tuple(json.loads(row["operations"])),
        issuing_account=row["issuing_account"],
        creation_date=_dt(row["creation_date"]),  # type: ignore[arg-type]
        retiring_principal=row["retiring_principal"],
        name=row["name"],
        context_subset=constraints.get("EncryptionContextSubset"),
        context_equals=constraints.get("EncryptionContextEquals"),
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


_MEMO_LIMIT = 4096
_F = TypeVar("_F", bound=Callable[..., Any])


def _memo(method: _F) -> _F:
    """Memoise a read-only lookup in the calling thread until the database changes (see module doc).

    Results are handed out as copies where the record type is mutable (``KeyRecord``, lists), so
    a caller that edits what it got cannot edit the memo.
    """
    name = method.__name__

    @functools.wraps(method)
    def wrapper(self: SQLiteStore, *args: Any, **kwargs: Any) -> Any:
        memo = self._memo_for_thread()
        key = (name, args, tuple(sorted(kwargs.items())))
        try:
            value = memo[key]
        except KeyError:
            value = method(self, *args, **kwargs)
            if len(memo) < _MEMO_LIMIT:
                memo[key] = value
        if isinstance(value, list):
            return list(value)
        if isinstance(value, KeyRecord):
            return copy.copy(value)
        return value

    return wrapper  # type: ignore[return-value]


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
        self._writes = 0  # commits made through this store, by any of its connections
        self._conn().executescript("BEGIN IMMEDIATE;" + _SCHEMA_V1 + "COMMIT;")
        with self._write() as conn:
            row = conn.execute("SELECT value FROM meta WHERE name = 'schema_version'").fetchone()
            if row is None:  # a new store: version 1 tables were just created
                conn.execute("INSERT INTO meta(name, value) VALUES ('schema_version', '1')")
                version = 1
            else:
                version = int(row[0])
            if version > SCHEMA_VERSION:
                raise RuntimeError(
                    f"store schema version {version} is newer than this release supports ({SCHEMA_VERSION})"
                )
            while version < SCHEMA_VERSION:
                for statement in _MIGRATIONS[version]:
                    if callable(statement):
                        statement(conn)
                    else:
                        conn.execute(statement)
                version += 1
                conn.execute("UPDATE meta SET value = ? WHERE name = 'schema_version'", (str(version),))

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
        try:
            conn.execute("COMMIT")
        finally:
            with self._all_lock:
                self._writes += 1

    @contextmanager
    def one_read_check(self) -> Iterator[None]:
        """Within this block (one request), check for other connections' commits once, at entry.

        Memoised lookups inside then see the database as of the block's start, plus every write
        made through this store (those still empty the memo at once). Saves a ``PRAGMA
        data_version`` per lookup: a Decrypt makes five. Outside such a block every lookup checks.
        """
        local = self._local
        self._memo_for_thread()
        local.pinned = True
        try:
            yield
        finally:
            local.pinned = False

    def _memo_for_thread(self) -> dict[tuple[Any, ...], Any]:
        """This thread's memo, emptied first if anything may have been committed since it was filled."""
        local = self._local
        if getattr(local, "pinned", False) and local.generation[1] == self._writes:
            return local.memo
        generation = (self._conn().execute("PRAGMA data_version").fetchone()[0], self._writes)
        if getattr(local, "generation", None) != generation:
            local.memo = {}
            local.generation = generation
        return local.memo

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

    def create_key(
        self,
        key: KeyRecord,
        first_version: KeyVersionRecord | None,
        *,
        max_customer_keys: int,
        alias: AliasRecord | None = None,
    ) -> None:
        """Insert a key, its first version (None for imported keys) and optionally an alias atomically,
        enforcing the customer-key quota (service-managed keys do not count, SPEC K13)."""
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
                " key_usage, key_spec, creation_date, deletion_date, valid_to, policy, tags,"
                " rotation_enabled, rotation_period_days, next_rotation_date, expiration_model, material_id)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    key.key_id,
                    key.arn,
                    key.account_id,
                    key.region,
                    key.description,
                    key.state,
                    key.origin,
                    key.key_manager,
                    key.key_usage,
                    key.key_spec,
                    _ts(key.creation_date),
                    _ts(key.deletion_date),
                    _ts(key.valid_to),
                    key.policy,
                    json.dumps(key.tags),
                    int(key.rotation_enabled),
                    key.rotation_period_days,
                    _ts(key.next_rotation_date),
                    key.expiration_model,
                    key.material_id,
                ),
            )
            if first_version is not None:
                self._insert_version(conn, first_version)
            if alias is not None:
                try:
                    conn.execute(
                        "INSERT INTO aliases(name, target_key_id, creation_date, last_updated_date)"
                        " VALUES (?, ?, ?, ?)",
                        (
                            alias.name,
                            alias.target_key_id,
                            _ts(alias.creation_date),
                            _ts(alias.last_updated_date),
                        ),  # fmt: skip
                    )
                except sqlite3.IntegrityError:
                    raise AlreadyExistsException(f"An alias named {alias.name} already exists") from None

    @_memo
    def get_key(self, key_id: str) -> KeyRecord | None:
        row = self._one("SELECT * FROM keys WHERE key_id = ?", (key_id,))
        return None if row is None else _key_from_row(row)

    def update_key(self, key: KeyRecord) -> None:
        """Write back the mutable fields of a key."""
        with self._write() as conn:
            cur = conn.execute(
                "UPDATE keys SET description = ?, state = ?, deletion_date = ?, valid_to = ?, policy = ?,"
                " tags = ?, rotation_enabled = ?, rotation_period_days = ?, next_rotation_date = ?,"
                " expiration_model = ?, material_id = ? WHERE key_id = ?",
                self._mutable(key),
            )
            if cur.rowcount != 1:
                raise NotFoundException(f"Key '{key.arn}' does not exist")

    @staticmethod
    def _mutable(key: KeyRecord) -> tuple[object, ...]:
        return (
            key.description, key.state, _ts(key.deletion_date), _ts(key.valid_to), key.policy,
            json.dumps(key.tags), int(key.rotation_enabled), key.rotation_period_days,
            _ts(key.next_rotation_date), key.expiration_model, key.material_id, key.key_id,
        )  # fmt: skip

    def list_keys(self, *, after: str | None, limit: int) -> list[KeyRecord]:
        """Keys ordered by key id, strictly after ``after``."""
        rows = (
            self._conn()
            .execute("SELECT * FROM keys WHERE key_id > ? ORDER BY key_id LIMIT ?", (after or "", limit))
            .fetchall()
        )
        return [_key_from_row(r) for r in rows]

    def count_customer_keys(self) -> int:
        row = self._one("SELECT COUNT(*) AS n FROM keys WHERE key_manager = ?", (MANAGER_CUSTOMER,))
        return int(row["n"]) if row else 0

    def count_keys_by_state(self) -> dict[tuple[str, str], int]:
        """{(key_manager, state): count}, for /metrics."""
        rows = (
            self._conn()
            .execute("SELECT key_manager, state, COUNT(*) AS n FROM keys GROUP BY key_manager, state")
            .fetchall()
        )
        return {(r["key_manager"], r["state"]): int(r["n"]) for r in rows}

    def keys_due_rotation(self, now: datetime) -> list[KeyRecord]:
        """Keys with automatic rotation on whose next rotation date has come."""
        rows = (
            self._conn()
            .execute(
                "SELECT * FROM keys WHERE rotation_enabled = 1 AND next_rotation_date <= ? ORDER BY key_id",
                (_ts(now),),
            )
            .fetchall()
        )
        return [_key_from_row(r) for r in rows]

    def keys_due_deletion(self, now: datetime) -> list[KeyRecord]:
        """Keys pending deletion whose waiting period has ended."""
        rows = (
            self._conn()
            .execute(
                "SELECT * FROM keys WHERE state = ? AND deletion_date <= ? ORDER BY key_id",
                (PENDING_DELETION, _ts(now)),
            )
            .fetchall()
        )
        return [_key_from_row(r) for r in rows]

    def keys_with_material_expiry(self) -> list[KeyRecord]:
        """Imported keys whose current material has an expiry time (ValidTo)."""
        rows = (
            self._conn()
            .execute(
                "SELECT * FROM keys WHERE origin = ? AND valid_to IS NOT NULL ORDER BY key_id",
                (ORIGIN_EXTERNAL,),
            )
            .fetchall()
        )
        return [_key_from_row(r) for r in rows]

    def destroy_key(self, key_id: str, now: datetime) -> bool:
        """Delete a key whose deletion is due, with its versions, aliases and import parameters.

        Conditional on the key still being pending deletion with a due date, so a CancelKeyDeletion
        that won the race is never undone. True if the key was destroyed.
        """
        with self._write() as conn:
            cur = conn.execute(
                "DELETE FROM keys WHERE key_id = ? AND state = ? AND deletion_date <= ?",
                (key_id, PENDING_DELETION, _ts(now)),
            )
            return cur.rowcount == 1

    # ----------------------------------------------------------------- key versions

    @staticmethod
    def _insert_version(conn: sqlite3.Connection, v: KeyVersionRecord) -> None:
        conn.execute(
            "INSERT INTO key_versions(key_id, version, creation_date, sealed_material, rotation_type)"
            " VALUES (?, ?, ?, ?, ?)",
            (v.key_id, v.version, _ts(v.creation_date), v.sealed_material, v.rotation_type),
        )

    def add_key_version(self, version: KeyVersionRecord) -> None:
        with self._write() as conn:
            self._insert_version(conn, version)

    @_memo
    def get_key_version(self, key_id: str, version: int) -> KeyVersionRecord | None:
        row = self._one("SELECT * FROM key_versions WHERE key_id = ? AND version = ?", (key_id, version))
        return None if row is None else _version_from_row(row)

    @_memo
    def latest_key_version(self, key_id: str) -> KeyVersionRecord | None:
        row = self._one(
            "SELECT * FROM key_versions WHERE key_id = ? ORDER BY version DESC LIMIT 1", (key_id,)
        )
        return None if row is None else _version_from_row(row)

    def list_key_versions(self, key_id: str) -> list[KeyVersionRecord]:
        rows = (
            self._conn()
            .execute("SELECT * FROM key_versions WHERE key_id = ? ORDER BY version", (key_id,))
            .fetchall()
        )
        return [_version_from_row(r) for r in rows]

    def delete_key_material(self, key: KeyRecord) -> None:
        """Drop every version's sealed material and write back ``key`` (its new state), atomically."""
        with self._write() as conn:
            conn.execute("DELETE FROM key_versions WHERE key_id = ?", (key.key_id,))
            conn.execute("DELETE FROM import_parameters WHERE key_id = ?", (key.key_id,))
            conn.execute(
                "UPDATE keys SET description = ?, state = ?, deletion_date = ?, valid_to = ?, policy = ?,"
                " tags = ?, rotation_enabled = ?, rotation_period_days = ?, next_rotation_date = ?,"
                " expiration_model = ?, material_id = ? WHERE key_id = ?",
                self._mutable(key),
            )

    def import_key_material(self, key: KeyRecord, version: KeyVersionRecord | None) -> None:
        """Store imported material (None when the same material is already there) and write back ``key``."""
        with self._write() as conn:
            if version is not None:
                conn.execute("DELETE FROM key_versions WHERE key_id = ?", (key.key_id,))
                self._insert_version(conn, version)
            conn.execute(
                "UPDATE keys SET description = ?, state = ?, deletion_date = ?, valid_to = ?, policy = ?,"
                " tags = ?, rotation_enabled = ?, rotation_period_days = ?, next_rotation_date = ?,"
                " expiration_model = ?, material_id = ? WHERE key_id = ?",
                self._mutable(key),
            )

    # ----------------------------------------------------------------- import parameters

    def add_import_parameters(self, params: ImportParameters) -> None:
        with self._write() as conn:
            conn.execute(
                "INSERT INTO import_parameters(token_id, key_id, wrapping_algorithm, wrapping_key_spec,"
                " sealed_private_key, creation_date, valid_to) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    params.token_id, params.key_id, params.wrapping_algorithm, params.wrapping_key_spec,
                    params.sealed_private_key, _ts(params.creation_date), _ts(params.valid_to),
                ),
            )  # fmt: skip

    def get_import_parameters(self, token_id: str) -> ImportParameters | None:
        row = self._one("SELECT * FROM import_parameters WHERE token_id = ?", (token_id,))
        return None if row is None else _import_from_row(row)

    def purge_import_parameters(self, now: datetime) -> int:
        """Forget wrapping key pairs past their 24 hours; returns how many."""
        with self._write() as conn:
            return conn.execute("DELETE FROM import_parameters WHERE valid_to <= ?", (_ts(now),)).rowcount

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

    @_memo
    def get_alias(self, name: str) -> AliasRecord | None:
        row = self._one("SELECT * FROM aliases WHERE name = ?", (name,))
        return None if row is None else _alias_from_row(row)

    def list_aliases(self, *, key_id: str | None, after: str | None, limit: int) -> list[AliasRecord]:
        """Aliases ordered by name, strictly after ``after``, optionally only those of ``key_id``."""
        if key_id is None:
            rows = (
                self._conn()
                .execute("SELECT * FROM aliases WHERE name > ? ORDER BY name LIMIT ?", (after or "", limit))
                .fetchall()
            )
        else:
            rows = (
                self._conn()
                .execute(
                    "SELECT * FROM aliases WHERE target_key_id = ? AND name > ? ORDER BY name LIMIT ?",
                    (key_id, after or "", limit),
                )
                .fetchall()
            )
        return [_alias_from_row(r) for r in rows]

    # ----------------------------------------------------------------- credentials

    def add_credential(self, cred: CredentialRecord) -> None:
        try:
            with self._write() as conn:
                conn.execute(
                    "INSERT INTO credentials(access_key_id, principal_arn, account_id, sealed_secret,"
                    " creation_date, enabled) VALUES (?, ?, ?, ?, ?, ?)",
                    (
                        cred.access_key_id,
                        cred.principal_arn,
                        cred.account_id,
                        cred.sealed_secret,
                        _ts(cred.creation_date),
                        int(cred.enabled),
                    ),
                )
        except sqlite3.IntegrityError:
            raise AlreadyExistsException(f"Access key {cred.access_key_id} already exists") from None

    @_memo
    def get_credential(self, access_key_id: str) -> CredentialRecord | None:
        row = self._one("SELECT * FROM credentials WHERE access_key_id = ?", (access_key_id,))
        return None if row is None else _cred_from_row(row)

    def list_credentials(self) -> list[CredentialRecord]:
        rows = (
            self._conn().execute("SELECT * FROM credentials ORDER BY creation_date, access_key_id").fetchall()
        )
        return [_cred_from_row(r) for r in rows]

    def delete_credentials(self, principal_arn: str, *, except_access_key_id: str | None = None) -> int:
        """Delete the access keys of ``principal_arn`` (all, or all but one); returns how many."""
        with self._write() as conn:
            return conn.execute(
                "DELETE FROM credentials WHERE principal_arn = ? AND access_key_id != ?",
                (principal_arn, except_access_key_id or ""),
            ).rowcount

    # ----------------------------------------------------------------- principals and identity policies

    def create_principal(self, principal: PrincipalRecord) -> None:
        try:
            with self._write() as conn:
                conn.execute(
                    "INSERT INTO principals(arn, name, account_id, creation_date) VALUES (?, ?, ?, ?)",
                    (principal.arn, principal.name, principal.account_id, _ts(principal.creation_date)),
                )
        except sqlite3.IntegrityError:
            raise AlreadyExistsException(f"Principal {principal.name} already exists") from None

    @_memo
    def get_principal(self, arn: str) -> PrincipalRecord | None:
        row = self._one("SELECT * FROM principals WHERE arn = ?", (arn,))
        return None if row is None else self._principal(row)

    @staticmethod
    def _principal(row: sqlite3.Row) -> PrincipalRecord:
        return PrincipalRecord(
            arn=row["arn"], name=row["name"], account_id=row["account_id"],
            creation_date=_dt(row["creation_date"]),  # type: ignore[arg-type]
        )  # fmt: skip

    def list_principals(self) -> list[PrincipalRecord]:
        rows = self._conn().execute("SELECT * FROM principals ORDER BY name").fetchall()
        return [self._principal(r) for r in rows]

    def delete_principal(self, arn: str) -> bool:
        """Delete a principal with its access keys and identity policies, atomically."""
        with self._write() as conn:
            conn.execute("DELETE FROM credentials WHERE principal_arn = ?", (arn,))
            conn.execute("DELETE FROM identity_policies WHERE principal_arn = ?", (arn,))
            return conn.execute("DELETE FROM principals WHERE arn = ?", (arn,)).rowcount == 1

    def put_identity_policy(self, record: IdentityPolicyRecord) -> None:
        """Attach (or replace) the identity policy ``record.name`` of a principal."""
        try:
            with self._write() as conn:
                conn.execute(
                    "INSERT INTO identity_policies(principal_arn, name, document) VALUES (?, ?, ?)"
                    " ON CONFLICT(principal_arn, name) DO UPDATE SET document = excluded.document",
                    (record.principal_arn, record.name, record.document),
                )
        except sqlite3.IntegrityError:
            raise NotFoundException(f"Principal {record.principal_arn} does not exist") from None

    def delete_identity_policy(self, principal_arn: str, name: str) -> bool:
        with self._write() as conn:
            sql = "DELETE FROM identity_policies WHERE principal_arn = ? AND name = ?"
            return conn.execute(sql, (principal_arn, name)).rowcount == 1

    @_memo
    def identity_policies(self, principal_arn: str) -> list[IdentityPolicyRecord]:
        sql = "SELECT * FROM identity_policies WHERE principal_arn = ? ORDER BY name"
        rows = self._conn().execute(sql, (principal_arn,)).fetchall()
        return [IdentityPolicyRecord(r["principal_arn"], r["name"], r["document"]) for r in rows]

    # ----------------------------------------------------------------- grants

    def create_grant(self, grant: GrantRecord) -> None:
        constraints: dict[str, dict[str, str]] = {}
        if grant.context_subset is not None:
            constraints["EncryptionContextSubset"] = grant.context_subset
        if grant.context_equals is not None:
            constraints["EncryptionContextEquals"] = grant.context_equals
        with self._write() as conn:
            conn.execute(
                "INSERT INTO grants(grant_id, key_id, grantee, retiring_principal, operations, constraints,"
                " name, issuing_account, creation_date) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    grant.grant_id, grant.key_id, grant.grantee, grant.retiring_principal,
                    json.dumps(list(grant.operations)), json.dumps(constraints) if constraints else None,
                    grant.name, grant.issuing_account, _ts(grant.creation_date),
                ),
            )  # fmt: skip

    def get_grant(self, grant_id: str) -> GrantRecord | None:
        row = self._one("SELECT * FROM grants WHERE grant_id = ?", (grant_id,))
        return None if row is None else _grant_from_row(row)

    @_memo
    def list_grants(
        self, *, key_id: str | None = None, grantee: str | None = None, retiring_principal: str | None = None,
        grant_id: str | None = None, after: str | None = None, limit: int = 1000,
    ) -> list[GrantRecord]:  # fmt: skip
        """Grants ordered by grant id, strictly after ``after``, filtered by the given fields."""
        where, args = ["grant_id > ?"], [after or ""]
        for column, value in (
            ("key_id", key_id), ("grantee", grantee), ("retiring_principal", retiring_principal),
            ("grant_id", grant_id),
        ):  # fmt: skip
            if value is not None:
                where.append(f"{column} = ?")
                args.append(value)
        sql = f"SELECT * FROM grants WHERE {' AND '.join(where)} ORDER BY grant_id LIMIT ?"
        rows = self._conn().execute(sql, (*args, limit)).fetchall()
        return [_grant_from_row(r) for r in rows]

    def delete_grant(self, grant_id: str) -> bool:
        with self._write() as conn:
            return conn.execute("DELETE FROM grants WHERE grant_id = ?", (grant_id,)).rowcount == 1
