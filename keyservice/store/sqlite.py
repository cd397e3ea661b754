"""``SQLiteStore``: the embedded default ``Store`` (one SQLite file).

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

import json
import os
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

from keyservice.errors import (
    AlreadyExistsException,
    LimitExceededException,
    NotFoundException,
)
from keyservice.store.model import (
    MANAGER_CUSTOMER,
    ORIGIN_EXTERNAL,
    PENDING_DELETION,
    AliasRecord,
    ImportParameters,
    KeyRecord,
    KeyVersionRecord,
)
from keyservice.store.sqlite_access import AccessTables
from keyservice.store.sqlite_memo import memo
from keyservice.store.sqlite_schema import (
    MIGRATIONS,
    SCHEMA_V1,
    SCHEMA_VERSION,
    alias_from_row,
    import_from_row,
    key_from_row,
    to_text,
    version_from_row,
)


class _ThreadState(threading.local):
    """One thread's connection, transaction depth and memo (class defaults: no getattr fallbacks
    on the per-request path)."""

    conn: sqlite3.Connection | None = None
    depth = 0
    pinned = False
    generation: tuple[int, int] | None = None
    memo: dict[tuple[Any, ...], Any] | None = None


class _ReadCheck:
    """``SQLiteStore.one_read_check``: checks for outside commits on entry, then pins the memo."""

    __slots__ = ("store",)

    def __init__(self, store: SQLiteStore) -> None:
        self.store = store

    def __enter__(self) -> None:
        self.store._memo_for_thread()
        self.store._local.pinned = True

    def __exit__(self, *exc: object) -> None:
        self.store._local.pinned = False


class SQLiteStore(AccessTables):
    """The embedded default store: one SQLite file in WAL mode, a connection per thread."""

    # What a constraint violation raises on this engine (the PostgreSQL store names its own).
    _integrity_errors: tuple[type[Exception], ...] = (sqlite3.IntegrityError,)

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        if not self.path.exists():
            # Create the file 0600 ourselves; SQLite gives -wal/-shm the same mode.
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600))
        self._local = _ThreadState()
        self._all: list[sqlite3.Connection] = []
        self._all_lock = threading.Lock()
        self._closed = False
        self._writes = 0  # commits made through this store, by any of its connections
        self._conn().executescript("BEGIN IMMEDIATE;" + SCHEMA_V1 + "COMMIT;")
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
                for statement in MIGRATIONS[version]:
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
        """One write: its own ``BEGIN IMMEDIATE`` transaction, or inside ``transaction()`` a
        savepoint of it (a failed write then undoes only itself, as it would on its own)."""
        conn = self._conn()
        if getattr(self._local, "depth", 0):
            conn.execute("SAVEPOINT store_write")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK TO store_write")
                conn.execute("RELEASE store_write")
                raise
            conn.execute("RELEASE store_write")
            return
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
    def transaction(self) -> Iterator[None]:
        """Run a whole read-modify-write (one state-changing request, a scheduler transition) as one
        transaction: every store call on this thread inside the block joins it, lookups bypass the
        memo, and it commits when the block ends (rolls back if it raises). Nested blocks join
        the outer one. On SQLite this is ``BEGIN IMMEDIATE``, which also serialises the writers
        of several worker processes sharing the file."""
        local = self._local
        if getattr(local, "depth", 0):
            local.depth += 1
            try:
                yield
            finally:
                local.depth -= 1
            return
        with self._write():
            local.depth = 1
            try:
                yield
            finally:
                local.depth = 0

    def acquire_scheduler_lease(self, holder: str, seconds: float) -> int | None:
        """One SQLite file serves one node, whose first worker alone runs the scheduler: it always
        holds the lease (token 1)."""
        return 1

    @contextmanager
    def fenced(self, holder: str, token: int) -> Iterator[None]:
        """Nothing to re-check on SQLite (see ``acquire_scheduler_lease``)."""
        yield

    def in_transaction(self) -> bool:
        """Is this thread inside ``transaction()``?"""
        return bool(getattr(self._local, "depth", 0))

    def one_read_check(self) -> _ReadCheck:
        """Within this block (one request), check for other connections' commits once, at entry.

        Memoised lookups inside then see the database as of the block's start, plus every write
        made through this store (those still empty the memo at once). Saves a ``PRAGMA
        data_version`` per lookup: a Decrypt makes five. Outside such a block every lookup checks.
        (A class rather than a generator context manager: it runs once per request.)
        """
        return _ReadCheck(self)

    def _memo_for_thread(self) -> dict[tuple[Any, ...], Any] | None:
        """This thread's memo, emptied first if anything may have been committed since it was filled;
        None inside ``transaction()`` (lookups there must see the transaction's own writes)."""
        local = self._local
        if local.depth:
            return None
        if local.pinned and local.generation[1] == self._writes:
            return local.memo
        generation = (self._conn().execute("PRAGMA data_version").fetchone()[0], self._writes)
        if local.generation != generation:
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
                self._take_quota(conn, max_customer_keys)
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
                    to_text(key.creation_date),
                    to_text(key.deletion_date),
                    to_text(key.valid_to),
                    key.policy,
                    json.dumps(key.tags),
                    int(key.rotation_enabled),
                    key.rotation_period_days,
                    to_text(key.next_rotation_date),
                    key.expiration_model,
                    key.material_id,
                ),
            )
            if first_version is not None:
                self._insert_version(conn, first_version)
            if alias is not None:
                try:
                    self._insert_alias(conn, alias)
                except self._integrity_errors:
                    raise AlreadyExistsException(f"An alias named {alias.name} already exists") from None

    @staticmethod
    def _take_quota(conn: Any, max_customer_keys: int) -> None:
        """Refuse a customer key past the quota. A COUNT is exact here: ``BEGIN IMMEDIATE`` holds
        the only write lock of the file until the insert commits."""
        sql = "SELECT COUNT(*) FROM keys WHERE key_manager = ?"
        (count,) = conn.execute(sql, (MANAGER_CUSTOMER,)).fetchone()
        if count >= max_customer_keys:
            raise LimitExceededException(
                f"The request would exceed the quota of {max_customer_keys} customer managed keys."
            )

    @memo
    def get_key(self, key_id: str) -> KeyRecord | None:
        row = self._one("SELECT * FROM keys WHERE key_id = ?", (key_id,))
        return None if row is None else key_from_row(row)

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
            key.description, key.state, to_text(key.deletion_date), to_text(key.valid_to), key.policy,
            json.dumps(key.tags), int(key.rotation_enabled), key.rotation_period_days,
            to_text(key.next_rotation_date), key.expiration_model, key.material_id, key.key_id,
        )  # fmt: skip

    def list_keys(self, *, after: str | None, limit: int) -> list[KeyRecord]:
        """Keys ordered by key id, strictly after ``after``."""
        rows = (
            self._conn()
            .execute("SELECT * FROM keys WHERE key_id > ? ORDER BY key_id LIMIT ?", (after or "", limit))
            .fetchall()
        )
        return [key_from_row(r) for r in rows]

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
                (to_text(now),),
            )
            .fetchall()
        )
        return [key_from_row(r) for r in rows]

    def keys_due_deletion(self, now: datetime) -> list[KeyRecord]:
        """Keys pending deletion whose waiting period has ended."""
        rows = (
            self._conn()
            .execute(
                "SELECT * FROM keys WHERE state = ? AND deletion_date <= ? ORDER BY key_id",
                (PENDING_DELETION, to_text(now)),
            )
            .fetchall()
        )
        return [key_from_row(r) for r in rows]

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
        return [key_from_row(r) for r in rows]

    def destroy_key(self, key_id: str, now: datetime) -> bool:
        """Delete a key whose deletion is due, with its versions, aliases and import parameters.

        Conditional on the key still being pending deletion with a due date, so a CancelKeyDeletion
        that won the race is never undone. True if the key was destroyed.
        """
        with self._write() as conn:
            row = conn.execute(
                "DELETE FROM keys WHERE key_id = ? AND state = ? AND deletion_date <= ?"
                " RETURNING key_manager",
                (key_id, PENDING_DELETION, to_text(now)),
            ).fetchone()
            if row is not None and row[0] == MANAGER_CUSTOMER:
                self._release_quota(conn)
            return row is not None

    @staticmethod
    def _release_quota(conn: Any) -> None:
        """A customer key was destroyed (nothing to do here: the quota is a COUNT on SQLite)."""

    # ----------------------------------------------------------------- key versions

    @staticmethod
    def _insert_version(conn: sqlite3.Connection, v: KeyVersionRecord) -> None:
        conn.execute(
            "INSERT INTO key_versions(key_id, version, creation_date, sealed_material, rotation_type)"
            " VALUES (?, ?, ?, ?, ?)",
            (v.key_id, v.version, to_text(v.creation_date), v.sealed_material, v.rotation_type),
        )

    def add_key_version(self, version: KeyVersionRecord) -> None:
        with self._write() as conn:
            self._insert_version(conn, version)

    @memo
    def get_key_version(self, key_id: str, version: int) -> KeyVersionRecord | None:
        row = self._one("SELECT * FROM key_versions WHERE key_id = ? AND version = ?", (key_id, version))
        return None if row is None else version_from_row(row)

    @memo
    def latest_key_version(self, key_id: str) -> KeyVersionRecord | None:
        row = self._one(
            "SELECT * FROM key_versions WHERE key_id = ? ORDER BY version DESC LIMIT 1", (key_id,)
        )
        return None if row is None else version_from_row(row)

    def list_key_versions(self, key_id: str) -> list[KeyVersionRecord]:
        rows = (
            self._conn()
            .execute("SELECT * FROM key_versions WHERE key_id = ? ORDER BY version", (key_id,))
            .fetchall()
        )
        return [version_from_row(r) for r in rows]

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
                    params.sealed_private_key, to_text(params.creation_date), to_text(params.valid_to),
                ),
            )  # fmt: skip

    def get_import_parameters(self, token_id: str) -> ImportParameters | None:
        row = self._one("SELECT * FROM import_parameters WHERE token_id = ?", (token_id,))
        return None if row is None else import_from_row(row)

    def purge_import_parameters(self, now: datetime) -> int:
        """Forget wrapping key pairs past their 24 hours; returns how many."""
        with self._write() as conn:
            return conn.execute("DELETE FROM import_parameters WHERE valid_to <= ?", (to_text(now),)).rowcount

    # ----------------------------------------------------------------- aliases

    @staticmethod
    def _insert_alias(conn: sqlite3.Connection, alias: AliasRecord) -> None:
        conn.execute(
            "INSERT INTO aliases(name, target_key_id, creation_date, last_updated_date) VALUES (?, ?, ?, ?)",
            (alias.name, alias.target_key_id, to_text(alias.creation_date), to_text(alias.last_updated_date)),
        )

    def create_alias(self, alias: AliasRecord) -> None:
        try:
            with self._write() as conn:
                self._insert_alias(conn, alias)
        except self._integrity_errors:
            if self.get_alias(alias.name) is not None:
                raise AlreadyExistsException(f"An alias with the name {alias.name} already exists") from None
            raise NotFoundException(f"Key '{alias.target_key_id}' does not exist") from None

    def update_alias(self, name: str, target_key_id: str, when: datetime) -> None:
        with self._write() as conn:
            cur = conn.execute(
                "UPDATE aliases SET target_key_id = ?, last_updated_date = ? WHERE name = ?",
                (target_key_id, to_text(when), name),
            )
            if cur.rowcount != 1:
                raise NotFoundException(f"Alias {name} is not found.")

    def delete_alias(self, name: str) -> None:
        with self._write() as conn:
            cur = conn.execute("DELETE FROM aliases WHERE name = ?", (name,))
            if cur.rowcount != 1:
                raise NotFoundException(f"Alias {name} is not found.")

    @memo
    def get_alias(self, name: str) -> AliasRecord | None:
        row = self._one("SELECT * FROM aliases WHERE name = ?", (name,))
        return None if row is None else alias_from_row(row)

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
        return [alias_from_row(r) for r in rows]
