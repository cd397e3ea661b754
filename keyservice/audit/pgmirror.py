"""Audit chains in PostgreSQL: the append-only table ``audit_records`` (docs/AUDIT.md).

With the store on PostgreSQL, every line a chain writes — record or checkpoint, the exact
bytes — is also inserted as row ``(chain_id, seq, line)`` before its request is answered
(``AuditLog(mirror=...)`` calls ``PgMirror.ship`` after the fsync, under its commit lock, in
chain order; a failure fails those requests, closed, and the next commit retries them). So the
audit of every node survives the loss of that node's disk, and can be reviewed in one place.

The table refuses ``UPDATE``, ``DELETE`` and ``TRUNCATE`` (a trigger raises; the privileges are
revoked from PUBLIC); the schema lives in ``store/postgres_schema.py``. ``seq`` counts lines
from 1 per chain. Inserting is idempotent: a row already there (a commit whose reply was lost)
must hold the very same bytes, or the chain has diverged and nothing more is written.

``chain_id`` must be unique across nodes: ``<node>:w<i>`` for workers, ``<node>:main`` for a
single process, with ``--node-id`` set per node. ``resume`` (at start) checks that the table's
rows of the chain are a prefix of the local file and ships what is missing; a table holding
*more* than the local file means another node uses this chain id, or the local log was cut:
the service refuses to start. This module imports psycopg only when used.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


class AuditMirrorError(OSError):
    """The table cannot take (or disagrees with) the chain's lines."""


class PgMirror:
    """Copies one chain's lines into ``audit_records``; one connection, used under the log's lock."""

    def __init__(self, url: str, chain_id: str) -> None:
        self.url = url
        self.chain_id = chain_id
        self._conn: Any = None
        self._next_seq = 0  # known after resume

    def _connection(self) -> Any:
        import psycopg

        if self._conn is None or self._conn.closed or self._conn.broken:
            self._conn = psycopg.connect(self.url, autocommit=True, connect_timeout=5)
        return self._conn

    def resume(self, local_lines: Iterable[bytes]) -> int:
        """Check the table against the local chain and ship what it lacks; returns lines shipped.

        Comparing the table's last row with the local line of the same number is enough: every
        line carries the hash of the one before it, so equal last lines mean equal prefixes."""
        import psycopg

        local = list(local_lines)
        try:
            conn = self._connection()
            count, top = conn.execute(
                "SELECT count(*), coalesce(max(seq), 0) FROM audit_records WHERE chain_id = %s",
                (self.chain_id,),
            ).fetchone()
            last = None
            if count:
                (last,) = conn.execute(
                    "SELECT line FROM audit_records WHERE chain_id = %s AND seq = %s", (self.chain_id, top)
                ).fetchone()
        except psycopg.Error as error:
            raise AuditMirrorError(f"cannot read audit_records: {error}") from None
        if count != top or count > len(local) or (count and bytes(last) != local[count - 1]):
            raise AuditMirrorError(
                f"audit_records holds a different chain {self.chain_id!r} ({count} rows, "
                f"{len(local)} local lines): another node uses this --node-id, or the local log was cut"
            )
        self._next_seq = count + 1
        self.ship(local[count:])
        return len(local) - count

    def ship(self, lines: list[bytes]) -> None:
        """Insert ``lines`` as the next rows of the chain, in one transaction."""
        import psycopg

        if not lines:
            return
        first = self._next_seq
        try:
            conn = self._connection()
            with conn.transaction():
                for offset, line in enumerate(lines):
                    row = conn.execute(
                        "INSERT INTO audit_records(chain_id, seq, line) VALUES (%s, %s, %s)"
                        " ON CONFLICT (chain_id, seq) DO NOTHING RETURNING seq",
                        (self.chain_id, first + offset, line),
                    ).fetchone()
                    if row is None:  # already there: a retry of a commit whose reply was lost
                        (existing,) = conn.execute(
                            "SELECT line FROM audit_records WHERE chain_id = %s AND seq = %s",
                            (self.chain_id, first + offset),
                        ).fetchone()
                        if bytes(existing) != line:
                            raise AuditMirrorError(
                                f"audit chain {self.chain_id!r} diverged at {first + offset}"
                            )
        except psycopg.Error as error:
            if self._conn is not None and not self._conn.closed:
                self._conn.close()
            self._conn = None
            raise AuditMirrorError(f"cannot write audit_records: {error}") from None
        self._next_seq = first + len(lines)

    def close(self) -> None:
        if self._conn is not None and not self._conn.closed:
            self._conn.close()


def table_chains(url: str) -> dict[str, list[bytes]]:
    """Every chain in ``audit_records`` with its lines in order (``audit verify``)."""
    import psycopg

    chains: dict[str, list[bytes]] = {}
    with psycopg.connect(url, autocommit=True, connect_timeout=5) as conn:
        for chain_id, line in conn.execute("SELECT chain_id, line FROM audit_records ORDER BY chain_id, seq"):
            chains.setdefault(chain_id, []).append(bytes(line))
    return chains
