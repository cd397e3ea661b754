"""``PostgresStore``: the ``Store`` on PostgreSQL, for several workers and several nodes.

It runs the very SQL of ``SQLiteStore`` (standard SQL; the ``?`` placeholders become ``%s``)
over the schema of ``postgres_schema`` (the same tables and columns), so both engines share one
definition of every query and row conversion; what differs is overridden here:

- connections: psycopg 3 from a ``psycopg_pool.ConnectionPool``; each thread keeps the one it
  was handed and trades it for a fresh one once it is broken (the database restarted), so the
  store recovers by itself when the database returns;
- ``transaction()`` / writes: a PostgreSQL transaction (a savepoint when nested); inside a
  ``transaction()`` block ``get_key`` is ``SELECT ... FOR UPDATE``, so two nodes changing one
  key queue on its row, as threads once queued on ``KeyService.lock``;
- every outermost write bumps ``generation`` and NOTIFYs it, and returns only once every live
  node has applied it (``postgres_nodes``);
- the customer-key quota is the locked counter ``counters.customer_keys`` (a ``COUNT`` would
  race between nodes under READ COMMITTED);
- the memo is trusted only while this process's ``NodeWatch`` holds its lease; without one (a
  one-off CLI command) every lookup reads the database.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import psycopg
import psycopg.errors
from psycopg_pool import ConnectionPool, PoolTimeout

from keyservice.errors import DependencyTimeoutException, LimitExceededException
from keyservice.store import postgres_nodes
from keyservice.store.base import LeaseLostError
from keyservice.store.model import KeyRecord
from keyservice.store.postgres_schema import MIGRATIONS, SCHEMA_V1, SCHEMA_VERSION
from keyservice.store.sqlite import SQLiteStore
from keyservice.store.sqlite_schema import key_from_row

log = logging.getLogger(__name__)

POOL_MAX = 64
POOL_TIMEOUT = 5.0  # seconds a thread waits for a connection while the database is away
# Any constant: serialises two nodes creating or migrating the schema at the same moment.
_MIGRATION_LOCK = 0x6B6D7366


class Row(tuple):  # type: ignore[type-arg]
    """A result row readable by position and by column name, like ``sqlite3.Row``."""

    __slots__ = ()
    _names: dict[str, int] = {}

    def __getitem__(self, item: Any) -> Any:
        if isinstance(item, str):
            item = self._names[item]
        return tuple.__getitem__(self, item)


def _row_factory(cursor: psycopg.Cursor[Any]) -> Any:
    names = {column.name: i for i, column in enumerate(cursor.description or ())}
    row_type = type("Row", (Row,), {"__slots__": (), "_names": names})
    return lambda values: row_type(values)


def unavailable() -> DependencyTimeoutException:
    return DependencyTimeoutException("The key store's database is unavailable; retry the request.")


class _Connection:
    """A psycopg connection that takes the store's ``?`` placeholders; a lost database surfaces as
    ``DependencyTimeoutException`` (503, retry), never as a success."""

    __slots__ = ("raw",)

    def __init__(self, raw: psycopg.Connection[Any]) -> None:
        self.raw = raw

    def execute(self, sql: str, args: Sequence[object] = ()) -> psycopg.Cursor[Any]:
        try:
            return self.raw.execute(sql.replace("?", "%s"), args)  # type: ignore[arg-type]
        except psycopg.OperationalError:
            raise unavailable() from None


class PostgresStore(SQLiteStore):
    """The store on PostgreSQL (see the module docstring). ``watch``: run a ``NodeWatch`` (serving
    processes do; one-off commands do not, and then read every lookup from the database)."""

    _integrity_errors = (psycopg.errors.IntegrityError,)

    def __init__(
        self,
        url: str,
        *,
        watch: bool = False,
        label: str | None = None,
        lease_seconds: float = postgres_nodes.DEFAULT_LEASE_SECONDS,
        poll_seconds: float = postgres_nodes.DEFAULT_POLL_SECONDS,
    ) -> None:
        self.url = url
        self.path = None  # type: ignore[assignment]  # no file: the database is elsewhere
        self._local = threading.local()
        self._all: list[Any] = []
        self._all_lock = threading.Lock()
        self._closed = False
        self._writes = 0
        self.lease_seconds = lease_seconds
        self.last_ack_seconds = 0.0  # how long the last write waited for every node (tests, docs)
        self._pool = ConnectionPool(
            url,
            min_size=1,
            max_size=POOL_MAX,
            timeout=POOL_TIMEOUT,
            kwargs={"autocommit": True, "row_factory": _row_factory},
            open=False,
            name="keyservice-store",
        )
        try:
            self._pool.open(wait=True, timeout=POOL_TIMEOUT * 2)
            self._migrate()
        except BaseException:
            self._pool.close()
            raise
        self.watch: postgres_nodes.NodeWatch | None = None
        if watch:
            self.watch = postgres_nodes.NodeWatch(
                url,
                label=label or socket.gethostname(),
                lease_seconds=lease_seconds,
                poll_seconds=poll_seconds,
            )
            self.watch.start()

    def _migrate(self) -> None:
        with self._pool.connection() as raw, raw.transaction():
            raw.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
            if raw.execute("SELECT to_regclass('meta')").fetchone()[0] is None:
                raw.execute(SCHEMA_V1)
                raw.execute("INSERT INTO meta(name, value) VALUES ('schema_version', '1')")
            version = int(raw.execute("SELECT value FROM meta WHERE name = 'schema_version'").fetchone()[0])
            if version > SCHEMA_VERSION:
                raise RuntimeError(
                    f"store schema version {version} is newer than this release supports ({SCHEMA_VERSION})"
                )
            while version < SCHEMA_VERSION:
                for statement in MIGRATIONS[version]:
                    raw.execute(statement)
                version += 1
                raw.execute(
                    "UPDATE meta SET value = %s WHERE name = 'schema_version'", (str(version),)
                )

    # ----------------------------------------------------------------- connections

    def _conn(self) -> _Connection:  # type: ignore[override]
        if self._closed:
            raise RuntimeError("store is closed")
        conn: _Connection | None = getattr(self._local, "conn", None)
        if conn is not None and (conn.raw.broken or conn.raw.closed):
            self._local.conn = None
            self._pool.putconn(conn.raw)  # the pool discards a broken connection
            conn = None
        if conn is None:
            if self.watch is not None and self.watch.down:
                raise unavailable()  # fail fast: the watch cannot reach the database either
            try:
                conn = _Connection(self._pool.getconn())
            except PoolTimeout:
                raise unavailable() from None
            self._local.conn = conn
        return conn

    @contextmanager
    def _write(self) -> Iterator[_Connection]:  # type: ignore[override]
        conn = self._conn()
        try:
            if getattr(self._local, "depth", 0):
                with conn.raw.transaction():  # a savepoint of the open transaction
                    yield conn
                return
            with conn.raw.transaction():
                yield conn
                bump = "UPDATE generation SET value = value + 1 RETURNING value"
                (generation,) = conn.raw.execute(bump).fetchone()
                conn.raw.execute("SELECT pg_notify(%s, %s)", (postgres_nodes.CHANNEL, str(generation)))
            with self._all_lock:
                self._writes += 1
            self.last_ack_seconds = postgres_nodes.wait_applied(
                conn.raw, generation, timeout=3 * self.lease_seconds
            )
        except psycopg.OperationalError:
            raise unavailable() from None

    # ----------------------------------------------------------------- the scheduler's lease

    def acquire_scheduler_lease(self, holder: str, seconds: float) -> int | None:
        """Take or renew the lease (timed by the database clock); a new holder gets a new fencing token."""
        row = self._conn().execute(
            "UPDATE scheduler_lease SET fence = CASE WHEN holder = ? THEN fence ELSE fence + 1 END,"
            " holder = ?, lease_until = now() + make_interval(secs => ?)"
            " WHERE holder = ? OR holder IS NULL OR lease_until < now() RETURNING fence",
            (holder, holder, seconds, holder),
        ).fetchone()
        return None if row is None else int(row[0])

    @contextmanager
    def fenced(self, holder: str, token: int) -> Iterator[None]:
        self._local.fence = (holder, token)
        try:
            yield
        finally:
            self._local.fence = None

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """As SQLite's; inside ``fenced`` the outermost transaction first re-checks the lease (its
        row stays share-locked until commit, so it cannot pass to another node meanwhile)."""
        outermost = not self.in_transaction()
        with super().transaction():
            fence = getattr(self._local, "fence", None)
            if outermost and fence is not None:
                row = self._one(
                    "SELECT 1 FROM scheduler_lease WHERE holder = ? AND fence = ? AND lease_until > now()"
                    " FOR SHARE",
                    fence,
                )
                if row is None:
                    raise LeaseLostError(f"the scheduler lease (token {fence[1]}) is no longer held")
            yield

    def _memo_for_thread(self) -> dict[tuple[Any, ...], Any] | None:
        local = self._local
        watch = self.watch
        if getattr(local, "depth", 0) or watch is None or not watch.lease_valid():
            return None
        generation = (watch.epoch, self._writes)
        if getattr(local, "generation", None) != generation:
            local.memo = {}
            local.generation = generation
        return local.memo

    def close(self) -> None:
        with self._all_lock:
            if self._closed:
                return
            self._closed = True
        if self.watch is not None:
            self.watch.stop()
        self._pool.close()

    # ----------------------------------------------------------------- what differs from SQLite

    def get_key(self, key_id: str) -> KeyRecord | None:
        """Inside ``transaction()`` the key row stays locked until commit (read-modify-write)."""
        if self.in_transaction():
            row = self._one("SELECT * FROM keys WHERE key_id = ? FOR UPDATE", (key_id,))
            return None if row is None else key_from_row(row)
        return super().get_key(key_id)

    @staticmethod
    def _take_quota(conn: Any, max_customer_keys: int) -> None:
        row = conn.execute(
            "UPDATE counters SET value = value + 1"
            " WHERE name = 'customer_keys' AND value < ? RETURNING value",
            (max_customer_keys,),
        ).fetchone()
        if row is None:
            raise LimitExceededException(
                f"The request would exceed the quota of {max_customer_keys} customer managed keys."
            )

    @staticmethod
    def _release_quota(conn: Any) -> None:
        conn.execute("UPDATE counters SET value = value - 1 WHERE name = 'customer_keys'")

