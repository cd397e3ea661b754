"""How the nodes sharing one PostgreSQL store keep their caches correct (docs/STORE.md, "Several nodes").

Every write transaction bumps the one-row ``generation`` table and sends its new value with
``NOTIFY keyservice_generation`` (delivered at commit, in commit order). Each serving process
runs one ``NodeWatch`` thread on its own connection: it LISTENs, and on every notification (or,
as a fallback for lost notifications, whenever a poll of ``generation`` shows a new value) it
moves ``epoch``, which empties every memo of the process, then records in its ``nodes`` row
the generation it has applied and renews its lease (``lease_until``, database clock).

A writer acknowledges its change only once every node with a live lease has applied its
generation (``wait_applied``): "disabled" then means no node still serves the key from a memo.
A node that could not renew its lease in time stops using its memo (``lease_valid``) and reads
every lookup from the database, so a node cut off from the database never serves a stale
value either: it fails, as reads from a database it cannot reach do. After a reconnect the
watch drops everything (notifications sent while it was away are lost) before it reports.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid

import psycopg

log = logging.getLogger(__name__)

CHANNEL = "keyservice_generation"
DEFAULT_LEASE_SECONDS = 5.0
DEFAULT_POLL_SECONDS = 1.0
# A node stops trusting its memo this long before its lease ends by its own clock.
_LEASE_MARGIN = 1.0


class NodeWatch:
    """One process's listener: applies other nodes' commits to this process's memo, renews its lease."""

    def __init__(
        self,
        url: str,
        *,
        label: str,
        lease_seconds: float = DEFAULT_LEASE_SECONDS,
        poll_seconds: float = DEFAULT_POLL_SECONDS,
    ) -> None:
        if lease_seconds <= _LEASE_MARGIN + poll_seconds:
            raise ValueError("the node lease must outlast the poll interval by more than a second")
        self.url = url
        self.node_id = uuid.uuid4().hex
        self.label = label
        self.lease_seconds = lease_seconds
        self.poll_seconds = poll_seconds
        self.epoch = 0  # moved whenever the memo may be stale; read without a lock (one int)
        self.applied = -1
        self.down = False  # the last attempt to reach the database failed
        self._valid_until = 0.0  # time.monotonic() after which the memo is not trusted
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="keyservice-node-watch", daemon=True)

    def start(self, timeout: float = 10.0) -> None:
        """Start listening; returns once the first lease is held (or ``timeout`` passed)."""
        self._thread.start()
        self._ready.wait(timeout)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5.0)

    def lease_valid(self) -> bool:
        return time.monotonic() < self._valid_until

    # ----------------------------------------------------------------- the thread

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                with psycopg.connect(self.url, autocommit=True, connect_timeout=5) as conn:
                    self.down = False
                    conn.execute(f"LISTEN {CHANNEL}")
                    # Anything may have changed while we were not listening: drop everything.
                    self.epoch += 1
                    self._apply(conn, self._current(conn))
                    self._ready.set()
                    self._listen(conn)
            except psycopg.Error as error:
                self._valid_until = 0.0
                self.down = True
                self.epoch += 1
                log.warning("node watch: lost the database (%s); memo off until reconnected", error)
                self._stop.wait(0.5)
        self._valid_until = 0.0

    def _listen(self, conn: psycopg.Connection) -> None:
        last_poll = time.monotonic()
        while not self._stop.is_set():
            newest = None
            for notify in conn.notifies(timeout=self.poll_seconds, stop_after=1):
                try:
                    newest = int(notify.payload)
                except ValueError:
                    newest = self.applied + 1  # not ours: treat as a change
            if newest is not None and newest > self.applied:
                self._apply(conn, newest)
            if time.monotonic() - last_poll >= self.poll_seconds:
                last_poll = time.monotonic()
                current = self._current(conn)  # the fallback for lost notifications
                self._apply(conn, current)

    @staticmethod
    def _current(conn: psycopg.Connection) -> int:
        row = conn.execute("SELECT value FROM generation").fetchone()
        return int(row[0]) if row else 0

    def _apply(self, conn: psycopg.Connection, generation: int) -> None:
        """Drop the memo if ``generation`` is new, then report it applied and renew the lease."""
        if generation != self.applied:
            self.epoch += 1
            self.applied = max(generation, self.applied)
        started = time.monotonic()
        conn.execute(
            "INSERT INTO nodes(node_id, label, applied_generation, lease_until)"
            " VALUES (%s, %s, %s, now() + make_interval(secs => %s))"
            " ON CONFLICT (node_id) DO UPDATE SET applied_generation = excluded.applied_generation,"
            " lease_until = excluded.lease_until",
            (self.node_id, self.label, self.applied, self.lease_seconds),
        )
        self._valid_until = started + self.lease_seconds - _LEASE_MARGIN


def wait_applied(conn: psycopg.Connection, generation: int, *, timeout: float) -> float:
    """Block until every node with a live lease has applied ``generation``; returns the seconds
    waited. A node that stopped renewing drops out when its lease ends, so this ends within one
    lease; ``timeout`` only guards against a clock gone wrong (logged, never silent)."""
    started = time.monotonic()
    delay = 0.001
    while True:
        row = conn.execute(
            "SELECT count(*) FROM nodes WHERE lease_until > now() AND applied_generation < %s",
            (generation,),
        ).fetchone()
        if row is None or int(row[0]) == 0:
            return time.monotonic() - started
        if time.monotonic() - started > timeout:
            log.error("generation %d not applied by every live node after %.1f s", generation, timeout)
            return time.monotonic() - started
        time.sleep(delay)
        delay = min(delay * 2, 0.05)
