"""The security officer's questions answered from PostgreSQL's audit table, every node's chains at once.

Why a module of its own: with the store on PostgreSQL every node copies each durable line into
``audit_records`` with the questions' columns beside it (``pgmirror.audit_columns``; schema
version 2, ``store/postgres_schema.py``); the SQLite index (``index``) covers only the chains of
one data directory. The questions are ``questions``'s, asked in SQL over those columns.

The table refuses UPDATE, DELETE and TRUNCATE (a trigger), and the columns are written with the
line, so they cannot drift from it without the schema owner's hand; still, as with the SQLite
index, every record answered is read from its line and checked against the question
(``review.matcher``), and a row that does not match raises ``questions.IndexMismatch``: the
caller then answers from the local index or a scan. Lines that are not JSON objects
(``outcome = 'unindexed'``) are reported like the log's unparsable lines.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

from keyservice.audit import review
from keyservice.audit.index import IndexMismatch
from keyservice.audit.records import (
    REPORTED_CREATE,
    REPORTED_OPEN,
    REPORTED_TRUNCATE,
    is_checkpoint,
    is_intent,
    parse_line,
)

Pair = tuple[bytes, dict[str, Any]]
REQUEST = "outcome IN ('success', 'error')"


def _connect(url: str) -> Any:
    import psycopg

    return psycopg.connect(url, autocommit=True, connect_timeout=5)


def where(filters: Any) -> tuple[list[str], list[Any]]:
    """SQL conditions over ``audit_records`` for ``questions.Filters`` (a superset: every record
    is checked again against the filters after it is read)."""
    clauses, params = [REQUEST], []
    if filters.key is not None:
        clauses.append("(key_id = %s OR key_id LIKE %s)")
        params += [filters.key, "%:key/" + filters.key.replace("\\", "\\\\").replace("%", "\\%")
                   .replace("_", "\\_")]
    if filters.operation is not None:
        clauses.append("lower(operation) = lower(%s)")
        params.append(filters.operation)
    if filters.since is not None:
        clauses.append("t >= %s")
        params.append(filters.since)
    if filters.until is not None:
        clauses.append("t < %s")
        params.append(filters.until)
    if filters.file is not None:
        prefix = filters.file.rstrip("/")
        clauses.append("path IS NOT NULL AND (path = %s OR path = %s OR (path >= %s AND path < %s))")
        params += [filters.file, prefix, prefix + "/", prefix + "0"]
    if filters.principal is not None:
        clauses.append("(principal = %s OR access_key_id = %s)")
        params += [filters.principal, filters.principal]
    if filters.outcome is not None:
        clauses.append("outcome = 'error'" if filters.outcome == "error" else "outcome = 'success'")
    if filters.user is not None:
        if filters.user.lstrip("-").isdigit() and len(filters.user) < 18:
            clauses.append("(local_user = %s OR uid = %s)")
            params += [filters.user, int(filters.user)]
        else:
            clauses.append("local_user = %s")
            params.append(filters.user)
    if filters.file_id is not None:
        clauses.append("file_id = %s")
        params.append(filters.file_id.lower())
    return clauses, params


def _checked(rows: Any, matches: Callable[[dict[str, Any]], bool]) -> list[Pair]:
    answer = []
    for (line,) in rows:
        data = bytes(line)
        record = parse_line(data)
        if record is None or is_checkpoint(record) or is_intent(record) or not matches(record):
            raise IndexMismatch("a row of audit_records does not match its own line's record")
        answer.append((data, record))
    return answer


def query_lines(url: str, filters: Any, unparsable: list[int] | None = None) -> list[Pair]:
    """The records of every chain in the table matching ``filters``, oldest first, with their lines."""
    clauses, params = where(filters)
    with _connect(url) as conn:
        rows = conn.execute(f"SELECT line FROM audit_records WHERE {' AND '.join(clauses)} "
                            "ORDER BY t, chain_id, seq", params)
        answer = _checked(rows, review.matcher(**filters.as_dict()))
        if unparsable is not None:
            unparsable.extend(seq for (seq,) in conn.execute(
                "SELECT seq FROM audit_records WHERE outcome = 'unindexed' ORDER BY chain_id, seq"))
    return answer


def key_timeline(url: str, filters: Any, crypto_ops: tuple[str, ...]) -> dict[str, Any]:
    """``questions.key_timeline`` from the table: the events (refusals and every non-crypto
    request for the key) as records, and the count of successful cryptographic uses."""
    clauses, params = where(filters)
    base = " AND ".join(clauses)
    with _connect(url) as conn:
        rows = conn.execute(f"SELECT line FROM audit_records WHERE {base} AND (outcome = 'error' OR "
                            "operation IS NULL OR NOT operation = ANY(%s)) ORDER BY t, chain_id, seq",
                            [*params, list(crypto_ops)])
        in_question = review.matcher(**filters.as_dict())

        def event(r: dict[str, Any]) -> bool:
            return in_question(r) and not (r.get("operation") in crypto_ops and r.get("outcome") == "success")

        events = [record for _line, record in _checked(rows, event)]
        (uses,) = conn.execute(f"SELECT count(*) FROM audit_records WHERE {base} AND outcome = 'success' "
                               "AND operation = ANY(%s)", [*params, list(crypto_ops)]).fetchone()
    return {"events": events, "uses": uses}


def key_principals(url: str, filters: Any) -> list[dict[str, Any]]:
    clauses, params = where(filters)
    with _connect(url) as conn:
        rows = conn.execute(
            "SELECT coalesce(principal, '-'), coalesce(access_key_id, '-'), count(*), "
            "count(*) FILTER (WHERE outcome = 'error'), min(t), max(t) FROM audit_records "
            f"WHERE {' AND '.join(clauses)} GROUP BY 1, 2 ORDER BY 3 DESC", params).fetchall()
    return [{"principal": p, "access_key_id": a, "requests": n, "refused": refused, "first": _iso(first),
             "last": _iso(last)} for p, a, n, refused, first, last in rows]


def top(url: str, n: int, since: datetime | None, until: datetime | None) -> dict[str, list[dict[str, Any]]]:
    """The busiest files and local users of the period (exact, not widened to hours)."""
    clauses, params = [REQUEST, "path IS NOT NULL"], []
    if since is not None:
        clauses.append("t >= %s")
        params.append(since)
    if until is not None:
        clauses.append("t < %s")
        params.append(until)
    create = "convert_from(line, 'UTF8')::jsonb->'caller'->>'op' = 'create'"
    reported_opens = f"operation IN ('{REPORTED_OPEN}', '{REPORTED_TRUNCATE}')"
    counts = (f"count(*) FILTER (WHERE outcome = 'success' AND ((operation = 'Decrypt' AND NOT "
              f"coalesce({create}, false)) OR {reported_opens})) AS o, "
              f"count(*) FILTER (WHERE outcome = 'success' AND (operation LIKE 'GenerateDataKey%%' OR "
              f"operation = '{REPORTED_CREATE}' OR "
              f"(operation = 'Decrypt' AND coalesce({create}, false)))) AS c, "
              "count(*) FILTER (WHERE outcome = 'error') AS r, max(t) AS last")
    result: dict[str, list[dict[str, Any]]] = {}
    with _connect(url) as conn:
        for column, name in (("path", "path"), ("coalesce(local_user, 'uid=' || uid::text, '-')", "user")):
            rows = conn.execute(f"SELECT * FROM (SELECT {column} AS k, {counts} FROM audit_records WHERE "
                                f"{' AND '.join(clauses)} GROUP BY 1) q WHERE o + c + r > 0 "
                                "ORDER BY o + c + r DESC, k LIMIT %s", [*params, n]).fetchall()
            result[name] = [{name: key, "opens": o, "created": c, "refused": r, "total": o + c + r,
                             "last": _iso(last)} for key, o, c, r, last in rows]
    return result


def _iso(when: datetime | None) -> str | None:
    if when is None:
        return None
    return review._ms_text(when.replace(microsecond=when.microsecond // 1000 * 1000))
