"""The security officer's questions, answered from the index (``index``) or, failing that, a scan.

Why separate from ``review``: ``review`` defines what a filter means and reads every record;
this module answers the same filters through the index in time proportional to the answer, and
adds the questions only an index makes cheap: what happened to key K (``key_timeline``), which
principals used it (``key_principals``), the busiest files and users of a period (``top``).

Every answer from the index is checked first (``index.open_checked``: contiguous sequence
numbers, last indexed line present in the log); records are read from the log at the indexed
offsets and filtered again by ``review.filter_records``, so a row pointing elsewhere shows nothing
wrong. When the index cannot be trusted or is absent the caller is told (``warn``) and the answer
comes from a full scan.
"""

from __future__ import annotations

import collections
import contextlib
import gc
import sqlite3
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from keyservice.audit import index, pgquestions, review
from keyservice.audit.records import (
    REPORTED_CREATE,
    REPORTED_OPEN,
    REPORTED_TRUNCATE,
    is_checkpoint,
    is_intent,
    parse_line,
    read_record_lines,
    read_records,
)

Warn = Callable[[str], None]
_CRYPTO_OPS = ("Encrypt", "Decrypt", "ReEncrypt", "GenerateDataKey", "GenerateDataKeyWithoutPlaintext",
               "GenerateDataKeyPair", "GenerateDataKeyPairWithoutPlaintext", "GenerateMac", "VerifyMac",
               "Sign", "Verify", "GenerateRandom", REPORTED_OPEN, REPORTED_CREATE, REPORTED_TRUNCATE)


@dataclass
class Filters:
    """The filters of ``review.query``."""

    key: str | None = None
    operation: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    file: str | None = None
    principal: str | None = None
    outcome: str | None = None
    user: str | None = None
    file_id: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _ms(when: datetime | None) -> int | None:
    return None if when is None else int(when.timestamp() * 1000)


def open_index(data_dir: Path, warn: Warn) -> sqlite3.Connection | None:
    """The checked index, built on first use; None (after a warning) if it cannot be trusted."""
    try:
        return index.open_checked(data_dir)
    except (FileNotFoundError, index.IndexOutdated):
        try:  # first use, or written by an older version: build it (what `keyservice audit reindex` does)
            index.reindex(data_dir)
            return index.open_checked(data_dir)
        except (OSError, sqlite3.Error, index.IndexMismatch) as error:
            warn(f"the audit index could not be built ({error}): answering by a full scan")
            return None
    except (OSError, sqlite3.Error, index.IndexMismatch) as error:
        warn(f"the audit index does not match the log ({error}): answering by a full scan; "
             f"run `keyservice audit reindex` to rebuild it")
        return None


class _Sql:
    """WHERE clauses over ``rec`` for a ``Filters``; ``impossible`` when no row can match."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self.where: list[str] = []
        self.params: list[Any] = []
        self.impossible = False

    def ids(self, sql: str, *params: Any) -> list[int]:
        return [row[0] for row in self.conn.execute(sql, params)]

    def any_of(self, column: str, ids: list[int]) -> str:
        if not ids:
            return "0"
        return f"{column} IN ({','.join(str(int(i)) for i in ids)})"

    def key_ids(self, key: str) -> list[int]:
        return self.ids("SELECT id FROM strings WHERE s = ? OR (s >= 'arn:' AND s < 'arn;' AND s LIKE ?)",
                        key, f"%:key/{key}")

    def add(self, f: Filters) -> None:
        if f.key is not None:
            self.where.append(self.any_of("key", self.key_ids(f.key)))
        if f.operation is not None:
            self.where.append(self.any_of("op", self.ids("SELECT id FROM strings WHERE s = ? COLLATE NOCASE",
                                                         f.operation)))
        if f.since is not None:
            self.where.append("t >= ?")
            self.params.append(_ms(f.since))
        if f.until is not None:
            self.where.append("t < ?")
            self.params.append(_ms(f.until))
        if f.file is not None:
            prefix = f.file.rstrip("/")
            paths = self.ids("SELECT id FROM strings WHERE s = ? OR s = ? OR (s >= ? AND s < ?)",
                             f.file, prefix, prefix + "/", prefix + "0")
            self.where.append(self.any_of("path", paths))
        if f.principal is not None:
            ids = self.ids("SELECT id FROM strings WHERE s = ?", f.principal)
            self.where.append(f"({self.any_of('principal', ids)} OR {self.any_of('akid', ids)})")
        if f.outcome is not None:
            # A literal, not a parameter: only then can SQLite use the partial index of errors.
            self.where.append("outcome = 0" if f.outcome == "success" else "outcome = 1")
        if f.user is not None:
            clause = self.any_of("user", self.ids("SELECT id FROM strings WHERE s = ?", f.user))
            if f.user.lstrip("-").isdigit():
                clause = f"({clause} OR uid = {int(f.user)})"
            self.where.append(clause)
        if f.file_id is not None:
            fids = self.ids("SELECT id FROM strings WHERE s = ?", f.file_id.lower())
            self.where.append(self.any_of("fid", fids))

    def clause(self) -> str:
        return " AND ".join(self.where) or "1"


Pair = tuple[bytes, dict[str, Any]]


def _answer(data_dir: Path, conn: sqlite3.Connection, where: str, params: list[Any],
            matches: Callable[[dict[str, Any]], bool], *, records: bool = True,
            newest: int | None = None) -> list[Pair]:
    """The records of the rows matching ``where``, each with its line, read from the log and
    checked: every one must be a request record that matches the question (``matches``). A row
    that points at anything else proves the index was edited: ``IndexMismatch``, and the caller
    answers by a scan. The whole answer is read before any of it is given, so that a mismatch
    found late cannot leave half an answer from the index in front of the scan's. Without
    ``records`` only the lines are kept (each pair's record is ``{}``): a large ``--json``
    answer then holds ~0.7 KB per record, not the ~4 KB of a decoded one."""
    answer = []
    with _no_cycle_collection():
        for line in index.lines(data_dir, conn, where, params, newest_first=newest is not None, limit=newest):
            record = parse_line(line)
            if record is None or is_checkpoint(record) or is_intent(record):
                raise index.IndexMismatch("a row of the index points at a line that is not a request record")
            if not matches(record):
                raise index.IndexMismatch(f"a row of the index points at a record that does not match the "
                                          f"question (request {record.get('request_id')})")
            answer.append((line, record if records else _EMPTY))
    return answer


_EMPTY: dict[str, Any] = {}


@contextlib.contextmanager
def _no_cycle_collection() -> Iterator[None]:
    """Python's cycle collector off while an answer is held: records are trees of dicts (no
    cycles), and with 100,000 of them alive each collection walks them all again (measured: more
    than half of a large answer's CPU time)."""
    was_on = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_on:
            gc.enable()


def _mismatch(warn: Warn, error: Exception) -> None:
    warn(f"the audit index does not match the log ({error}): answering by a full scan; "
         f"run `keyservice audit reindex` to rebuild it")


def _from_table(store: str | None, scan: bool, warn: Warn, ask: Callable[[], Any]) -> Any:
    """``ask()``'s answer from PostgreSQL's audit table (every node's chains), or None after a
    warning when there is no table to ask or it cannot answer (then the local index does)."""
    if store is None or scan:
        return None
    try:
        return ask()
    except index.IndexMismatch as error:
        warn(f"the audit table does not match its lines ({error}): answering from this node's log")
    except Exception as error:  # noqa: BLE001 - any driver error: say it in one line, answer locally
        warn(f"cannot ask the audit table ({str(error).strip()[:200]}): answering from this node's log")
    return None


def query_lines(data_dir: Path, filters: Filters, *, warn: Warn, scan: bool = False,
                unparsable: list[int] | None = None, records: bool = True,
                store: str | None = None) -> Iterator[Pair]:
    """``query``'s records each with its line as written in the log (what ``--json`` prints);
    without ``records``, the records may be left out (``{}``) where that saves work. With
    ``store`` (a PostgreSQL URL) from the audit table, every node's chains."""
    from_table = _from_table(store, scan, warn, lambda: pgquestions.query_lines(store, filters, unparsable))
    if from_table is not None:
        yield from from_table
        return
    matches = review.matcher(**filters.as_dict())
    alias = filters.key is not None and (filters.key.startswith("alias/") or ":alias/" in filters.key)
    conn = None if scan or alias else open_index(data_dir, warn)
    if conn is not None:
        try:
            with conn:
                sql = _Sql(conn)
                sql.add(filters)
                answer = _answer(data_dir, conn, sql.clause(), sql.params, matches, records=records)
                damaged = index.damaged_lines(conn)
        except (index.IndexMismatch, sqlite3.Error) as error:
            _mismatch(warn, error)
        else:
            if unparsable is not None:
                unparsable.extend(damaged)
            yield from answer
            return
        finally:
            conn.close()
    for pair in read_record_lines(data_dir, unparsable):
        if matches(pair[1]):
            yield pair


def newest(data_dir: Path, filters: Filters, limit: int, *, warn: Warn) -> list[dict[str, Any]]:
    """The ``limit`` newest records matching ``filters``, newest first (the console's pages)."""
    conn = open_index(data_dir, warn)
    if conn is not None:
        try:
            with conn:
                sql = _Sql(conn)
                sql.add(filters)
                matches = review.matcher(**filters.as_dict())
                answer = _answer(data_dir, conn, sql.clause(), sql.params, matches, newest=limit)
                return [record for _line, record in answer]
        except (index.IndexMismatch, sqlite3.Error) as error:
            _mismatch(warn, error)
        finally:
            conn.close()
    kept: collections.deque[dict[str, Any]] = collections.deque(maxlen=limit)
    kept.extend(review.query(data_dir, **filters.as_dict()))
    return list(reversed(kept))


def query(data_dir: Path, filters: Filters, *, warn: Warn, scan: bool = False,
          unparsable: list[int] | None = None, store: str | None = None) -> Iterator[dict[str, Any]]:
    """The records matching ``filters``, oldest first: from the index, or a scan if it fails.

    ``unparsable`` receives the numbers of the log's lines that are not JSON objects (as
    ``review.query``'s)."""
    for _line, record in query_lines(data_dir, filters, warn=warn, scan=scan, unparsable=unparsable,
                                     store=store):
        yield record


def key_timeline(data_dir: Path, key: str, *, since: datetime | None = None, until: datetime | None = None,
                 warn: Warn, scan: bool = False, store: str | None = None,
                 newest: int | None = None) -> dict[str, Any]:
    """What happened to key K: every management request naming it and every refused request for
    it (e.g. opens refused while it was disabled), oldest first, and its successful crypto use in
    total. ``{"events": [...], "uses": n, "refused": n, "first": t, "last": t}``. ``newest``:
    only the newest that many events (still oldest first)."""
    filters = Filters(key=key, since=since, until=until)
    from_table = _from_table(store, scan, warn, lambda: pgquestions.key_timeline(store, filters, _CRYPTO_OPS))
    if from_table is not None:
        if newest is not None:
            from_table["events"] = from_table["events"][-newest:]
        return from_table  # type: ignore[no-any-return]
    conn = None if scan else open_index(data_dir, warn)
    if conn is None:
        events, uses = [], 0
        for record in review.query(data_dir, **filters.as_dict()):
            if record.get("operation") in _CRYPTO_OPS and record.get("outcome") == "success":
                uses += 1
            else:
                events.append(record)
        return {"events": events[-newest:] if newest is not None else events, "uses": uses}
    try:
        with conn:
            sql = _Sql(conn)
            sql.add(filters)
            keys = sql.any_of("key", sql.key_ids(key))
            marks = ",".join("?" * len(_CRYPTO_OPS))
            crypto = sql.ids(f"SELECT id FROM strings WHERE s IN ({marks})", *_CRYPTO_OPS)
            ops = sql.ids(
                f"SELECT DISTINCT op FROM key_principals WHERE {keys} AND NOT {sql.any_of('op', crypto)}")
            # Two narrow lookups (refusals by the error index, management requests by operation), not
            # a walk over every use of the key.
            # The period is checked on those rows only (``+``: no index for it), so that SQLite does
            # not walk the key's every use in time order instead.
            period = [f"+r.t {op} ?" for op, when in ((">=", since), ("<", until)) if when is not None]
            period_params = [_ms(when) for when in (since, until) if when is not None]
            # (The key, too, is only checked on the rows found: by the key's index SQLite would walk
            # its every use.)
            events = (f"r.id IN (SELECT id FROM rec WHERE outcome = 1 AND +{keys} UNION "
                      f"SELECT id FROM rec WHERE {sql.any_of('op', ops)} AND +{keys})")
            events_sql = " AND ".join([events, *period])
            in_question = review.matcher(**filters.as_dict())

            def matches(r: dict[str, Any]) -> bool:  # an event: not a successful cryptographic use
                crypto_use = r.get("operation") in _CRYPTO_OPS and r.get("outcome") == "success"
                return in_question(r) and not crypto_use

            answer = _answer(data_dir, conn, events_sql, period_params, matches, newest=newest)
            events = [r for _line, r in (reversed(answer) if newest is not None else answer)]
            if since is None and until is None:
                total = conn.execute(f"SELECT sum(n - refused) FROM key_principals WHERE {keys} AND "
                                     f"{sql.any_of('op', crypto)}").fetchone()[0] or 0
            else:
                total = conn.execute(f"SELECT count(*) FROM rec WHERE {sql.clause()} AND outcome = 0 AND "
                                     f"{sql.any_of('op', crypto)}", sql.params).fetchone()[0]
            return {"events": events, "uses": total}
    except (index.IndexMismatch, sqlite3.Error) as error:
        _mismatch(warn, error)
        return key_timeline(data_dir, key, since=since, until=until, warn=warn, scan=True, newest=newest)
    finally:
        conn.close()


def key_principals(data_dir: Path, key: str, *, warn: Warn, scan: bool = False,
                   store: str | None = None) -> list[dict[str, Any]]:
    """Which principals used key K: per principal and access key, requests, refusals, first, last."""
    from_table = _from_table(store, scan, warn, lambda: pgquestions.key_principals(store, Filters(key=key)))
    if from_table is not None:
        return from_table  # type: ignore[no-any-return]
    conn = None if scan else open_index(data_dir, warn)
    if conn is None:
        rows: dict[tuple[str, str], dict[str, Any]] = {}
        for r in review.query(data_dir, key=key):
            group = (str(r.get("principal") or "-"), str(r.get("access_key_id") or "-"))
            row = rows.setdefault(group, {"principal": group[0], "access_key_id": group[1], "requests": 0,
                                          "refused": 0, "first": r.get("time"), "last": r.get("time")})
            row["requests"] += 1
            row["refused"] += r.get("outcome") != "success"
            row["last"] = r.get("time")
        return sorted(rows.values(), key=lambda row: -row["requests"])
    with conn:
        sql = _Sql(conn)
        result = []
        for principal, akid, n, refused, first, last in conn.execute(
            "SELECT p.s, a.s, sum(k.n), sum(k.refused), min(k.first), max(k.last) FROM key_principals k "
            "LEFT JOIN strings p ON p.id = k.principal LEFT JOIN strings a ON a.id = k.akid "
            f"WHERE {sql.any_of('k.key', sql.key_ids(key))} GROUP BY k.principal, k.akid ORDER BY 3 DESC"
        ):
            result.append({"principal": principal or "-", "access_key_id": akid or "-", "requests": n,
                           "refused": refused, "first": _iso(first), "last": _iso(last)})
        return result


def _iso(ms: int | None) -> str | None:
    if ms is None:
        return None
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"


@dataclass
class Top:
    """The busiest files and local users of a period (counted in whole UTC hours)."""

    since: str | None
    until: str | None
    files: list[dict[str, Any]] = field(default_factory=list)
    users: list[dict[str, Any]] = field(default_factory=list)


def top(data_dir: Path, n: int, *, since: datetime | None = None, until: datetime | None = None,
        warn: Warn, scan: bool = False, store: str | None = None) -> Top:
    """The ``n`` files and users with the most kmsfs requests (opens + creates + refusals).

    From the index the period is widened to whole UTC hours (the summary's unit) and the answer
    says so; a scan (and the PostgreSQL table) counts the exact period."""
    from_table = _from_table(store, scan, warn, lambda: pgquestions.top(store, n, since, until))
    if from_table is not None:
        return Top(_iso(_ms(since)), _iso(_ms(until)), from_table["path"], from_table["user"])
    conn = None if scan else open_index(data_dir, warn)
    if conn is None:
        files: dict[str, list[int]] = {}
        users: dict[str, list[int]] = {}
        for row in review.files_summary(review.query(data_dir, since=since, until=until)):
            for table, name in ((files, row["path"]), (users, row["user"])):
                slot = table.setdefault(name, [0, 0, 0])
                slot[0] += row["opens"]
                slot[1] += row["created"]
                slot[2] += row["denied"]
        return Top(_iso(_ms(since)), _iso(_ms(until)), _ranked(files, "path", n), _ranked(users, "user", n))
    with conn:
        low = (_ms(since) // 3600000) if since is not None else None
        high = -(-_ms(until) // 3600000) if until is not None else None
        # Whole UTC days inside the period from the daily summary, the hours at its edges and the
        # hours not summed yet (the newest) from the hourly one: a few rows per file and user, not
        # one per hour. A day's row holds the hours before ``closed`` only.
        hourly = "SELECT path, user, opens, created, refused, last FROM activity WHERE hour >= ? AND hour < ?"
        daily = ("SELECT path, user, opens, created, refused, last FROM activity_day "
                 "WHERE day >= ? AND day < ?")
        lowest, highest = -(1 << 62), 1 << 62
        closed = index.closed_hours(conn)
        start, stop = (low if low is not None else lowest), (high if high is not None else highest)
        first_day = -(-start // 24)
        # whole days inside the period whose every hour is summed, plus the day of ``closed`` if
        # the period covers its summed hours from midnight
        end_day = min(stop // 24, closed // 24 + (1 if closed % 24 and stop >= closed else 0))
        parts: list[str] = []
        params: list[Any] = []
        if first_day >= end_day:  # no usable day inside: hours only
            parts.append(hourly)
            params += [start, stop]
        else:
            parts.append(daily)
            params += [first_day, end_day]
            if start < first_day * 24:
                parts.append(hourly)
                params += [start, first_day * 24]
            after = min(end_day * 24, closed) if end_day * 24 > closed else end_day * 24
            if after < stop:
                parts.append(hourly)
                params += [after, stop]
        union = " UNION ALL ".join(parts)
        result = Top(_iso(low * 3600000) if low is not None else None,
                     _iso(high * 3600000) if high is not None else None)
        for column, name, target in (("path", "path", result.files), ("user", "user", result.users)):
            # Names looked up for the n rows kept only, not for every group.
            for text, opens, created, refused, last in conn.execute(
                f"SELECT s.s, g.o, g.c, g.r, g.l FROM (SELECT a.{column} AS k, sum(a.opens) AS o, "
                f"sum(a.created) AS c, sum(a.refused) AS r, max(a.last) AS l FROM ({union}) a "
                f"GROUP BY a.{column} ORDER BY o + c + r DESC LIMIT ?) g JOIN strings s ON s.id = g.k "
                f"ORDER BY g.o + g.c + g.r DESC", [*params, n]
            ):
                target.append({name: text, "opens": opens, "created": created, "refused": refused,
                               "total": opens + created + refused, "last": _iso(last)})
        return result


def _ranked(table: dict[str, list[int]], name: str, n: int) -> list[dict[str, Any]]:
    rows = [{name: k, "opens": v[0], "created": v[1], "refused": v[2], "total": sum(v)}
            for k, v in table.items()]
    return sorted(rows, key=lambda r: -r["total"])[:n]


def scan_all(data_dir: Path) -> Iterator[dict[str, Any]]:
    """Every record by a full scan (what ``--scan`` and the fallbacks use)."""
    return read_records(data_dir)
