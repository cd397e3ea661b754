"""Reviewing the audit log: filters, the human table, and the per-file summary (SPEC F10).

Reads records only through ``audit.read_records`` (the one reader of the format) and works
offline while the server runs.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from keyservice.audit.records import is_create, is_open, read_records

_RELATIVE = re.compile(r"^(\d+)([smhd])$")


def parse_time(text: str, *, now: datetime | None = None, local: bool = False) -> datetime:
    """Parse ``--since``/``--until`` into an aware UTC time.

    Accepts RFC 3339 / ISO 8601, a date, a span ago (``30m``, ``1h``, ``7d``), or ``today`` /
    ``yesterday`` (from midnight). Midnight and naive times are UTC, or local time with ``local``.
    """
    text = text.strip()
    now = now or datetime.now(UTC)
    m = _RELATIVE.match(text)
    if m:
        unit = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}[m.group(2)]
        return now - timedelta(**{unit: int(m.group(1))})
    if text.lower() in ("today", "yesterday"):
        here = now.astimezone() if local else now.astimezone(UTC)
        midnight = here.replace(hour=0, minute=0, second=0, microsecond=0)
        if text.lower() == "yesterday":
            midnight = (midnight - timedelta(days=1)).replace(tzinfo=None)
            midnight = midnight.astimezone() if local else midnight.replace(tzinfo=UTC)
        return midnight.astimezone(UTC)
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(
            f"cannot parse time {text!r}: use ISO 8601 (2026-01-31T12:00:00Z), 30m/1h/7d, today "
            "or yesterday"
        ) from None
    if when.tzinfo is None:
        when = when.astimezone() if local else when.replace(tzinfo=UTC)
    return when.astimezone(UTC)


def display_time(value: object, local: bool) -> str:
    """A record's time for the tables: as recorded (UTC), or in local time with its offset."""
    if not local or not isinstance(value, str):
        return str(value if value is not None else "-")
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        return value
    when = when.replace(tzinfo=UTC) if when.tzinfo is None else when
    return when.astimezone().isoformat(timespec="milliseconds" if when.microsecond else "seconds")


def _record_time(record: Mapping[str, Any]) -> datetime | None:
    try:
        return parse_time(str(record["time"]))
    except (KeyError, ValueError):
        return None


def _matches_key(record: Mapping[str, Any], key: str) -> bool:
    arn = record.get("key_id") or ""
    candidates = {arn, record.get("requested_key_id"), record.get("alias_name")}
    if "/" in arn:
        candidates.add(arn.rsplit("/", 1)[1])
    if key.startswith("arn:") and ":alias/" in key:
        key_alias = "alias/" + key.split(":alias/", 1)[1]
        return key in candidates or key_alias in candidates
    return key in candidates


def _matches_file(record: Mapping[str, Any], file: str) -> bool:
    caller = record.get("caller")
    path = caller.get("path") if isinstance(caller, dict) else None
    if not isinstance(path, str):
        return False
    prefix = file.rstrip("/")
    return path == file or path == prefix or path.startswith(prefix + "/")


# The encryption-context entry kmsfs binds every data key to (kmsfs/format.py): it names the file
# across its records — the pooled GenerateDataKey (no path), the create's claim and every open.
FILE_ID_CONTEXT = "kmsfs:file-id"


def file_id_of(record: Mapping[str, Any]) -> str | None:
    """The kmsfs file id of a crypto record (from its encryption context), if any."""
    context = record.get("encryption_context")
    value = context.get(FILE_ID_CONTEXT) if isinstance(context, dict) else None
    return value if isinstance(value, str) else None


def query(
    data_dir: Path,
    *,
    key: str | None = None,
    operation: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    file: str | None = None,
    principal: str | None = None,
    outcome: str | None = None,
    user: str | None = None,
    file_id: str | None = None,
    unparsable: list[int] | None = None,
) -> Iterator[dict[str, Any]]:
    """Records matching every given filter, oldest first.

    ``key``: key id, key ARN, alias name or alias ARN as recorded. ``operation``: exact AWS name
    (case-insensitive). ``since`` inclusive, ``until`` exclusive. ``file``: the kmsfs path, exact
    or a directory prefix. ``principal``: principal ARN or access key id. ``outcome``: ``success`` or
    ``error``. ``user``: the local user behind a kmsfs open, by uid or user name. ``file_id``: the
    kmsfs file id in the encryption context (hex), which joins a pooled GenerateDataKey — audited
    before any path was known — to the create that used it and to every open of that file.
    """
    yield from filter_records(
        read_records(data_dir, unparsable), key=key, operation=operation, since=since, until=until, file=file,
        principal=principal, outcome=outcome, user=user, file_id=file_id,
    )  # fmt: skip


def filter_records(
    records: Iterable[dict[str, Any]],
    *,
    key: str | None = None,
    operation: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    file: str | None = None,
    principal: str | None = None,
    outcome: str | None = None,
    user: str | None = None,
    file_id: str | None = None,
) -> Iterator[dict[str, Any]]:
    """The records matching every given filter (those of ``query``), in their order."""
    matches = matcher(key=key, operation=operation, since=since, until=until, file=file, principal=principal,
                      outcome=outcome, user=user, file_id=file_id)
    return (record for record in records if matches(record))


# A record's time as the service writes it: fixed width, UTC, so its text orders like the time.
_RECORD_TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


def _ms_text(when: datetime) -> str:
    """``when`` rounded up to the next whole millisecond, in the records' format: a record time
    (whole ms) is >= ``when`` exactly when its text is >= this one, and likewise for <."""
    micros = when.microsecond
    if micros % 1000:
        when += timedelta(microseconds=1000 - micros % 1000)
    when = when.astimezone(UTC)
    return when.strftime("%Y-%m-%dT%H:%M:%S.") + f"{when.microsecond // 1000:03d}Z"


def matcher(
    *,
    key: str | None = None,
    operation: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    file: str | None = None,
    principal: str | None = None,
    outcome: str | None = None,
    user: str | None = None,
    file_id: str | None = None,
) -> Callable[[Mapping[str, Any]], bool]:
    """A test of one record against the filters of ``query`` (what the index's answers are
    checked with, record by record, after they are read from the log)."""
    since_text = _ms_text(since) if since is not None else None
    until_text = _ms_text(until) if until is not None else None
    operation_lower = operation.lower() if operation is not None else None
    file_id_lower = file_id.lower() if file_id is not None else None

    def in_period(record: Mapping[str, Any]) -> bool:
        text = record.get("time")
        if text.__class__ is str and _RECORD_TIME.fullmatch(text):  # type: ignore[arg-type]
            return (since_text is None or text >= since_text) and (until_text is None or text < until_text)
        when = _record_time(record)
        return when is not None and (since is None or when >= since) and (until is None or when < until)

    def matches(record: Mapping[str, Any]) -> bool:
        if key is not None and not _matches_key(record, key):
            return False
        if operation_lower is not None and str(record.get("operation", "")).lower() != operation_lower:
            return False
        if (since is not None or until is not None) and not in_period(record):
            return False
        if file is not None and not _matches_file(record, file):
            return False
        if principal is not None and principal not in (record.get("principal"), record.get("access_key_id")):
            return False
        if outcome is not None and record.get("outcome") != outcome:
            return False
        if user is not None and not _matches_user(record, user):
            return False
        return file_id_lower is None or file_id_of(record) == file_id_lower

    return matches


def _matches_user(record: Mapping[str, Any], user: str) -> bool:
    caller = record.get("caller")
    if not isinstance(caller, dict):
        return False
    return user in (str(caller.get("uid")), str(caller.get("user")))


def _short_key(record: Mapping[str, Any]) -> str:
    arn = record.get("key_id")
    if not arn:
        return record.get("alias_name") or record.get("requested_key_id") or "-"
    key = str(arn).rsplit("/", 1)[-1]
    version = record.get("key_version")
    return f"{key}:v{version}" if version else key


def _caller(record: Mapping[str, Any]) -> tuple[str, str]:
    caller = record.get("caller")
    if not isinstance(caller, dict):
        return "-", "-"
    path = str(caller.get("path", "-"))
    who = []
    if caller.get("user"):
        who.append(str(caller["user"]))
    elif "uid" in caller:
        who.append(f"uid={caller['uid']}")
    if "pid" in caller:
        who.append(f"pid={caller['pid']}")
    name = caller.get("process") or caller.get("process_name") or caller.get("comm")
    if name:
        who.append(str(name))
    return path, " ".join(who) or "-"


def format_table(records: Iterable[Mapping[str, Any]], local: bool = False) -> str:
    """A fixed-width table for humans (the CLI's default output); times in UTC, or local."""
    header = ("TIME", "OPERATION", "OUTCOME", "PRINCIPAL", "KEY", "FILE", "PROCESS", "ERROR")
    rows: list[tuple[str, ...]] = [header]
    for r in records:
        path, process = _caller(r)
        outcome = str(r.get("outcome", "-"))
        error = r.get("error_code") or ""
        principal = r.get("principal")
        rows.append(
            (
                display_time(r.get("time", "-"), local),
                str(r.get("operation", "-")),
                outcome,
                _principal_name(principal),
                _short_key(r),
                path,
                process,
                str(error),
            )
        )
    return _render(rows)


def _principal_name(arn: object) -> str:
    text = str(arn or "-")
    return text.rsplit(":", 1)[-1] if text.startswith("arn:") else text


def files_summary(records: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Who created and opened which file how often, through which key: one row per (file,
    principal, local user, key), from the kmsfs records (those with a ``caller.path``), most
    recent first.

    A create is counted once per file id, whether the key was asked for at the create
    (GenerateDataKey with the path) or taken from the mount's key pool and then claimed (a Decrypt
    with ``"op": "create"``, see ``is_create``); a claim is not an open. The pool's own
    GenerateDataKey records carry no path (``caller.pool``) and join through ``file_id``."""
    rows: dict[tuple[str, str, str, str], dict[str, Any]] = {}
    created: dict[tuple[str, str, str, str], set[str]] = {}
    for record in records:
        caller = record.get("caller")
        if not isinstance(caller, dict) or not isinstance(caller.get("path"), str):
            continue
        user = str(caller.get("user") or (f"uid={caller['uid']}" if "uid" in caller else "-"))
        key = str(record.get("key_id") or "-")
        group = (caller["path"], str(record.get("principal") or "-"), user, key)
        row = rows.setdefault(group, {
            "path": group[0], "principal": group[1], "user": user, "key_id": key, "processes": [],
            "opens": 0, "created": 0, "denied": 0, "first": record.get("time"), "last": record.get("time"),
        })  # fmt: skip
        process = caller.get("process")
        if isinstance(process, str) and process and process not in row["processes"]:
            row["processes"].append(process)
        if record.get("outcome") != "success":
            row["denied"] += 1
        elif is_create(record):
            ids = created.setdefault(group, set())
            file_id = file_id_of(record)
            if file_id is None or file_id not in ids:  # a retried claim is one create
                row["created"] += 1
            if file_id is not None:
                ids.add(file_id)
        elif is_open(record):
            row["opens"] += 1
        row["last"] = record.get("time")
    return sorted(rows.values(), key=lambda r: (str(r["last"]), r["path"]), reverse=True)


def format_files(rows: Iterable[Mapping[str, Any]], local: bool = False) -> str:
    """The ``audit files`` table; times in UTC, or local."""
    header = ("FILE", "LOCAL USER", "PROCESS", "PRINCIPAL", "KEY", "OPENS", "CREATED", "REFUSED", "LAST")
    table: list[tuple[str, ...]] = [header]
    for r in rows:
        key = str(r["key_id"]).rsplit("/", 1)[-1]
        table.append((r["path"], r["user"], ",".join(r.get("processes") or ()) or "-",
                      _principal_name(r["principal"]), key, str(r["opens"]), str(r["created"]),
                      str(r["denied"]), display_time(r["last"], local)))
    return _render(table)


def _render(rows: list[tuple[str, ...]]) -> str:
    """Left-aligned columns two spaces apart, the first row being the header."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(widths[i]) for i, c in enumerate(row)).rstrip() for row in rows) + "\n"
