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

import contextlib
import re
from collections.abc import Iterable
from typing import Any

from keyservice.audit.records import is_checkpoint, parse_line
from keyservice.store.postgres_schema import AUDIT_COLUMNS

_COLUMN_NAMES = ", ".join(AUDIT_COLUMNS)
_COLUMN_MARKS = ", ".join(["%s"] * len(AUDIT_COLUMNS))
_INT64 = 1 << 62


def _text(value: object) -> str | None:
    """A text column's value: PostgreSQL text cannot hold U+0000 (the line keeps it)."""
    if value is None:
        return None
    text = value if value.__class__ is str else str(value)
    return text.replace("\x00", "\ufffd") if "\x00" in text else text  # type: ignore[union-attr]


def _int(value: object) -> int | None:
    return value if value.__class__ is int and -_INT64 < value < _INT64 else None  # type: ignore[operator,return-value]


def audit_columns(line: bytes) -> tuple[Any, ...]:
    """The question columns of one line (``postgres_schema.AUDIT_COLUMNS``), in that order: those
    of a request record; only ``outcome = 'unindexed'`` for a line that is not a JSON object; all
    None for checkpoints and intents."""
    record = parse_line(line)
    if record is None:
        return (None, None, "unindexed", *([None] * (len(AUDIT_COLUMNS) - 3)))
    outcome = record.get("outcome")
    if is_checkpoint(record) or outcome not in ("success", "error"):
        return (None,) * len(AUDIT_COLUMNS)
    caller = record.get("caller")
    caller = caller if caller.__class__ is dict else {}
    context = record.get("encryption_context")
    file_id = context.get("kmsfs:file-id") if context.__class__ is dict else None
    when = record.get("time")
    path = caller.get("path")
    return (
        when if when.__class__ is str and _RECORD_TIME.fullmatch(when) else None,  # type: ignore[arg-type]
        _text(record.get("operation")), outcome, _text(record.get("principal")),
        _text(record.get("access_key_id")), _text(record.get("key_id")), _int(record.get("key_version")),
        _text(path) if path.__class__ is str else None, _text(caller.get("user")), _int(caller.get("uid")),
        _text(caller.get("process")), _text(file_id) if file_id.__class__ is str else None,
        _text(record.get("request_id")),
    )


_RECORD_TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z")


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
            # Lines pruned from the table (``prune_table``) were pruned from the local log too,
            # whole segments: the local lines then begin after them.
            (pruned,) = conn.execute(
                "SELECT coalesce(max(through_seq), 0) FROM audit_prunes WHERE chain_id = %s", (self.chain_id,)
            ).fetchone()
            last = None
            if count:
                (last,) = conn.execute(
                    "SELECT line FROM audit_records WHERE chain_id = %s AND seq = %s", (self.chain_id, top)
                ).fetchone()
        except psycopg.Error as error:
            raise AuditMirrorError(f"cannot read audit_records: {error}") from None
        gap = bool(count) and top - pruned != count  # rows missing between the pruned ones and the top
        if gap or count > len(local) or (count and bytes(last) != local[count - 1]):
            raise AuditMirrorError(
                f"audit_records holds a different chain {self.chain_id!r} ({count} rows, "
                f"{len(local)} local lines): another node uses this --node-id, or the local log was cut"
            )
        self._next_seq = (top if count else pruned) + 1
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
            # One pipeline: the group commit's lines go out together, one round trip, not one each.
            with conn.transaction(), conn.pipeline() if len(lines) > 1 else contextlib.nullcontext():
                inserted = [conn.execute(
                    f"INSERT INTO audit_records(chain_id, seq, line, {_COLUMN_NAMES}) "
                    f"VALUES (%s, %s, %s, {_COLUMN_MARKS}) ON CONFLICT (chain_id, seq) DO NOTHING "
                    "RETURNING seq",
                    (self.chain_id, first + offset, line, *audit_columns(line)),
                ) for offset, line in enumerate(lines)]
                for offset, (line, cursor) in enumerate(zip(lines, inserted, strict=True)):
                    if cursor.fetchone() is None:  # already there: a retry of a commit whose reply was lost
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


def prune_table(url: str, chain: str, record: dict[str, Any]) -> tuple[str, int] | None:
    """Remove from the table the lines a signed prune record of the local ``chain`` removed from
    the log: find the table's copy of that chain (``<node>:main`` for ``main``) by the hash of
    the last pruned line, store the record in ``audit_prunes``, then delete the rows up to it
    (the trigger allows no others), in one transaction. Returns (table chain, last seq pruned),
    or None if the table holds no line with that hash (nothing to prune there)."""
    import json

    import psycopg

    pattern = chain if ":" in chain else f"%:{chain}"
    try:
        with psycopg.connect(url, autocommit=True, connect_timeout=5) as conn, conn.transaction():
            found = conn.execute(
                "SELECT chain_id, seq FROM audit_records WHERE (chain_id = %s OR chain_id LIKE %s) AND "
                "sha256(line) = decode(%s, 'hex') ORDER BY chain_id, seq LIMIT 1",
                (chain, pattern, str(record.get("last_hash"))),
            ).fetchone()
            if found is None:
                return None
            table_chain, through = found
            conn.execute("INSERT INTO audit_prunes(chain_id, through_seq, record) VALUES (%s, %s, %s) "
                         "ON CONFLICT DO NOTHING", (table_chain, through, json.dumps(record).encode()))
            conn.execute("DELETE FROM audit_records WHERE chain_id = %s AND seq <= %s",
                         (table_chain, through))
    except psycopg.Error as error:
        raise AuditMirrorError(f"cannot prune audit_records: {str(error).strip()}") from None
    return table_chain, through


def table_prunes(url: str) -> dict[str, dict[str, Any]]:
    """Each table chain's newest prune record (``verify`` starts the chain there)."""
    import json

    import psycopg

    with psycopg.connect(url, autocommit=True, connect_timeout=5) as conn:
        rows = conn.execute("SELECT DISTINCT ON (chain_id) chain_id, record FROM audit_prunes "
                            "ORDER BY chain_id, through_seq DESC").fetchall()
    return {chain_id: json.loads(bytes(record)) for chain_id, record in rows}


def table_chains(url: str) -> dict[str, list[bytes]]:
    """Every chain in ``audit_records`` with its lines in order (``audit verify``)."""
    import psycopg

    chains: dict[str, list[bytes]] = {}
    with psycopg.connect(url, autocommit=True, connect_timeout=5) as conn:
        for chain_id, line in conn.execute("SELECT chain_id, line FROM audit_records ORDER BY chain_id, seq"):
            chains.setdefault(chain_id, []).append(bytes(line))
    return chains
