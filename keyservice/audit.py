"""The audit log: one JSON line per request, durable before the reply, readable offline.

Writing (``AuditLog.append``) opens ``DATA_DIR/audit/audit.log`` with O_APPEND, writes the
whole line with one ``write`` and ``fsync``s under a lock. If anything fails the caller gets
``KMSInternalException``: a request that cannot be audited is not answered (fail closed).

Each record carries ``prev_hash``, the SHA-256 of the previous line's bytes, so editing or
deleting a line in the middle breaks the chain (``verify``). Truncating the tail is only
detectable against an external copy of the last hash.

Records never hold plaintext, key material, data keys, secrets or ciphertext blobs: the
service builds them only from the fields listed in docs/AUDIT.md.

Reading (``query``/``format_table``) needs no server and tolerates a partial last line
(a write in progress, or a crash mid-write).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from collections.abc import Iterable, Iterator, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from keyservice.context import RequestContext
from keyservice.errors import KMSError, KMSInternalException

RECORD_VERSION = 1
AUDIT_DIR = "audit"
AUDIT_FILE = "audit.log"
GENESIS_HASH = "0" * 64

OUTCOME_SUCCESS = "success"
OUTCOME_ERROR = "error"

FIELDS = (
    "version",
    "time",
    "request_id",
    "operation",
    "outcome",
    "error_code",
    "error_message",
    "principal",
    "access_key_id",
    "key_id",
    "key_version",
    "requested_key_id",
    "alias_name",
    "encryption_context",
    "source_address",
    "user_agent",
    "caller",
    "prev_hash",
)


def audit_path(data_dir: Path) -> Path:
    return Path(data_dir) / AUDIT_DIR / AUDIT_FILE


def format_time(when: datetime) -> str:
    """RFC 3339 UTC with milliseconds, e.g. ``2026-01-01T12:00:00.123Z``."""
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{when.microsecond // 1000:03d}Z"


def build_record(
    *,
    when: datetime,
    ctx: RequestContext,
    operation: str,
    error: KMSError | None = None,
    key_arn: str | None = None,
    key_version: int | None = None,
    requested_key_id: str | None = None,
    alias_name: str | None = None,
    encryption_context: Mapping[str, str] | None = None,
    claimed_access_key_id: str | None = None,
) -> dict[str, Any]:
    """The audit record of one request (without ``prev_hash``, which ``append`` adds).

    ``claimed_access_key_id`` is the access key id a refused request claimed (unknown key, bad
    signature); it is recorded when there is no authenticated principal.
    """
    principal = ctx.principal
    return {
        "version": RECORD_VERSION,
        "time": format_time(when),
        "request_id": ctx.request_id,
        "operation": operation,
        "outcome": OUTCOME_SUCCESS if error is None else OUTCOME_ERROR,
        "error_code": None if error is None else error.aws_type,
        "error_message": None if error is None else error.message,
        "principal": principal.arn if principal else None,
        "access_key_id": principal.access_key_id if principal else claimed_access_key_id,
        "key_id": key_arn,
        "key_version": key_version,
        "requested_key_id": requested_key_id,
        "alias_name": alias_name,
        "encryption_context": dict(encryption_context) if encryption_context is not None else None,
        "source_address": ctx.source_address,
        "user_agent": ctx.user_agent,
        "caller": dict(ctx.caller) if ctx.caller else None,
    }


def _line_hash(line: bytes) -> str:
    return hashlib.sha256(line).hexdigest()


def _last_line(path: Path) -> tuple[bytes | None, bool]:
    """(last complete line or None, whether the file ends with a partial line)."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return None, False
    if size == 0:
        return None, False
    with path.open("rb") as f:
        block = 1 << 16
        pos = size
        buf = b""
        while pos > 0:
            step = min(block, pos)
            pos -= step
            f.seek(pos)
            buf = f.read(step) + buf
            if buf.count(b"\n") >= 2 or pos == 0:
                break
    partial = not buf.endswith(b"\n")
    lines = buf.split(b"\n")
    complete = lines[:-1]  # everything before the last newline
    return (complete[-1] if complete else None), partial


class AuditLog:
    """Appends records durably. Thread-safe; one instance per data directory per process."""

    def __init__(self, data_dir: Path) -> None:
        self.path = audit_path(data_dir)
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.path.parent, 0o700)
        self._lock = threading.Lock()
        last, partial = _last_line(self.path)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        if partial:
            # A crash left half a line; terminate it so the next record starts on its own line.
            os.write(self._fd, b"\n")
            os.fsync(self._fd)
            last, _ = _last_line(self.path)
        self._prev_hash = _line_hash(last) if last is not None else GENESIS_HASH

    def append(self, record: Mapping[str, Any]) -> None:
        """Write one record and fsync it; raise KMSInternalException if that fails."""
        with self._lock:
            try:
                body = dict(record)
                body["prev_hash"] = self._prev_hash
                line = json.dumps(body, separators=(",", ":"), ensure_ascii=False, default=str).encode()
                data = line + b"\n"
                written = os.write(self._fd, data)
                if written != len(data):
                    raise OSError("short write to the audit log")
                os.fsync(self._fd)
            except (OSError, ValueError, TypeError) as exc:
                raise KMSInternalException("The request could not be recorded in the audit log.") from exc
            self._prev_hash = _line_hash(line)

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1


# --------------------------------------------------------------------------- reading


def _read_lines(path: Path) -> Iterator[bytes]:
    """Complete lines only; a final line without its newline is still being written (or torn)."""
    try:
        f = path.open("rb")
    except FileNotFoundError:
        return
    with f:
        for raw in f:
            if raw.endswith(b"\n"):
                yield raw[:-1]


def read_records(data_dir: Path) -> Iterator[dict[str, Any]]:
    """Every well-formed record in order; unparseable lines (torn by a crash) are skipped."""
    for line in _read_lines(audit_path(data_dir)):
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            yield record


_RELATIVE = re.compile(r"^(\d+)([smhd])$")


def parse_time(text: str, *, now: datetime | None = None) -> datetime:
    """Parse ``--since``/``--until``.

    Accepts RFC 3339 / ISO 8601 (naive means UTC), a date, or a span ago: ``15m``, ``2h``, ``7d``.
    """
    text = text.strip()
    m = _RELATIVE.match(text)
    if m:
        unit = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}[m.group(2)]
        return (now or datetime.now(UTC)) - timedelta(**{unit: int(m.group(1))})
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(
            f"cannot parse time {text!r}: use ISO 8601 (2026-01-31T12:00:00Z) or 15m/2h/7d"
        ) from None
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)


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


def query(
    data_dir: Path,
    *,
    key: str | None = None,
    operation: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    file: str | None = None,
    principal: str | None = None,
) -> Iterator[dict[str, Any]]:
    """Records matching every given filter, oldest first.

    ``key``: key id, key ARN, alias name or alias ARN as recorded. ``operation``: exact AWS name
    (case-insensitive). ``since`` inclusive, ``until`` exclusive. ``file``: the kmsfs path, exact
    or a directory prefix. ``principal``: principal ARN or access key id.
    """
    for record in read_records(data_dir):
        if key is not None and not _matches_key(record, key):
            continue
        if operation is not None and str(record.get("operation", "")).lower() != operation.lower():
            continue
        if since is not None or until is not None:
            when = _record_time(record)
            if when is None or (since is not None and when < since) or (until is not None and when >= until):
                continue
        if file is not None and not _matches_file(record, file):
            continue
        if principal is not None and principal not in (record.get("principal"), record.get("access_key_id")):
            continue
        yield record


def verify(data_dir: Path) -> list[str]:
    """Check the hash chain; return a list of problems (empty when intact)."""
    problems: list[str] = []
    prev = GENESIS_HASH
    for number, line in enumerate(_read_lines(audit_path(data_dir)), start=1):
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if isinstance(record, dict) and record.get("prev_hash") != prev:
            problems.append(f"line {number}: hash chain broken (a record was edited, inserted or removed)")
        elif not isinstance(record, dict):
            problems.append(f"line {number}: not a JSON record (torn write or tampering)")
        prev = _line_hash(line)
    return problems


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
    if "uid" in caller:
        who.append(f"uid={caller['uid']}")
    if "pid" in caller:
        who.append(f"pid={caller['pid']}")
    name = caller.get("process") or caller.get("process_name") or caller.get("comm")
    if name:
        who.append(str(name))
    return path, " ".join(who) or "-"


def format_table(records: Iterable[Mapping[str, Any]]) -> str:
    """A fixed-width table for humans (the CLI's default output)."""
    header = ("TIME", "OPERATION", "OUTCOME", "PRINCIPAL", "KEY", "FILE", "PROCESS", "ERROR")
    rows: list[tuple[str, ...]] = [header]
    for r in records:
        path, process = _caller(r)
        outcome = str(r.get("outcome", "-"))
        error = r.get("error_code") or ""
        principal = str(r.get("principal") or "-")
        rows.append(
            (
                str(r.get("time", "-")),
                str(r.get("operation", "-")),
                outcome,
                principal.rsplit(":", 1)[-1] if principal.startswith("arn:") else principal,
                _short_key(r),
                path,
                process,
                str(error),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip() for row in rows]
    return "\n".join(lines) + "\n"
