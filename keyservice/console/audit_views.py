"""Every read of the audit log the console makes, in one place.

The pages call only this module, which asks ``keyservice.audit.questions`` (answers from the
audit index, checked before and record by record after, or a scan when it cannot be trusted: the
reason is logged) and calls ``verify``. Read-only: nothing here writes the log (the index, a
cache beside it, is brought up to date before an answer).
Permission to read (``kms:ReadAuditLog``) is checked by the caller through the service, first.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from keyservice.audit import questions, review, signing, verify
from keyservice.audit.records import head_path

log = logging.getLogger(__name__)

PAGE_SIZE = 50
MAX_PAGE = 200  # deepest page offered (PAGE_SIZE x MAX_PAGE newest records)

# Key operations whose records make up a key's timeline next to every refusal: state changes.
KEY_CHANGES = frozenset({
    "CreateKey", "EnableKey", "DisableKey", "ScheduleKeyDeletion", "CancelKeyDeletion",
    "RotateKeyOnDemand", "EnableKeyRotation", "DisableKeyRotation", "PutKeyPolicy", "ImportKeyMaterial",
    "DeleteImportedKeyMaterial", "CreateAlias", "DeleteAlias", "UpdateAlias", "CreateGrant", "RevokeGrant",
    "RetireGrant", "TagResource", "UntagResource", "UpdateKeyDescription",
})  # fmt: skip

FILTERS = ("user", "principal", "key", "file", "operation", "outcome", "since", "until")


class BadFilter(ValueError):
    """A filter value the review functions cannot use (shown to the user as is)."""


@dataclass(frozen=True)
class Row:
    """One record as the timeline shows it."""

    time: str  # UTC, "2026-01-31 12:00:00.123"
    operation: str
    outcome: str
    error: str
    principal: str
    principal_name: str  # the ARN's last part (root, user/bob), shown; the ARN is its title
    key: str
    path: str
    process: str
    source: str
    user_agent: str


def _row(record: Mapping[str, Any]) -> Row:
    caller = record.get("caller") if isinstance(record.get("caller"), dict) else {}
    assert isinstance(caller, dict)
    who = []
    if caller.get("user") or "uid" in caller:
        who.append(str(caller.get("user") or f"uid={caller['uid']}"))
    if "pid" in caller:
        who.append(f"pid={caller['pid']}")
    if caller.get("process"):
        who.append(str(caller["process"]))
    key = str(record.get("key_id") or record.get("alias_name") or record.get("requested_key_id") or "")
    key = key.split(":key/", 1)[1] if ":key/" in key else key  # the id says it; the ARN is long
    if record.get("key_version"):
        key += f" v{record['key_version']}"
    principal = str(record.get("principal") or record.get("access_key_id") or "")
    return Row(
        time=str(record.get("time", "")).replace("T", " ").rstrip("Z"),
        operation=str(record.get("operation", "")),
        outcome=str(record.get("outcome", "")), error=str(record.get("error_code") or ""),
        principal=principal, principal_name=principal.rsplit(":", 1)[-1],
        key=key, path=str(caller.get("path", "")), process=" ".join(who),
        source=str(record.get("source_address") or ""), user_agent=str(record.get("user_agent") or ""),
    )  # fmt: skip


def _filters(raw: Mapping[str, str]) -> dict[str, Any]:
    """Query-string filters as ``review.query`` keywords (empty ones dropped)."""
    out: dict[str, Any] = {}
    for name in FILTERS:
        value = (raw.get(name) or "").strip()[:1024]
        if not value:
            continue
        if name in ("since", "until"):
            try:
                out[name] = review.parse_time(value)
            except ValueError as error:
                raise BadFilter(str(error)) from None
        elif name == "outcome":
            if value not in ("success", "error"):
                raise BadFilter("outcome is success or error")
            out[name] = value
        else:
            out[name] = value
    return out


@dataclass
class Page:
    rows: list[Row]
    page: int
    more: bool
    seconds: float


def _warn(message: str) -> None:
    log.warning("audit page: %s", message)


def timeline(data_dir: Path, raw_filters: Mapping[str, str], page: int = 1) -> Page:
    """Newest first, PAGE_SIZE a page: reads only the newest ``page * PAGE_SIZE + 1`` matches."""
    started = time.perf_counter()
    page = min(max(page, 1), MAX_PAGE)
    keep = page * PAGE_SIZE + 1
    ordered = questions.newest(data_dir, questions.Filters(**_filters(raw_filters)), keep, warn=_warn)
    rows = [_row(r) for r in ordered[(page - 1) * PAGE_SIZE : page * PAGE_SIZE]]
    return Page(rows, page, len(ordered) > page * PAGE_SIZE, time.perf_counter() - started)


def key_timeline(data_dir: Path, key_id: str) -> list[Row]:
    """A key's state changes and every refusal naming it, newest first (at most 500)."""
    events = questions.key_timeline(data_dir, key_id, warn=_warn, newest=500)["events"]
    kept = [r for r in events
            if r.get("outcome") == "error" or r.get("operation") in KEY_CHANGES
            or str(r.get("principal")) == "keyservice"][-500:]  # fmt: skip
    return [_row(r) for r in reversed(kept)]


def files(data_dir: Path, prefix: str | None) -> list[dict[str, Any]]:
    """Who opened which file how often, through which key, last access (``review.files_summary``)."""
    filters = questions.Filters(file=prefix.strip() or None if prefix else None)
    return review.files_summary(questions.query(data_dir, filters, warn=_warn))


def last_checkpoint(data_dir: Path) -> dict[str, Any] | None:
    """The head file's checkpoint (seq, time, records), as written; ``verify`` checks its signature."""
    try:
        head = json.loads(head_path(data_dir).read_bytes())
    except (OSError, ValueError):
        return None
    if not isinstance(head, dict):
        return None
    return {k: head.get(k) for k in ("seq", "time", "records")}


@dataclass
class VerifyStatus:
    """The last background run: ``report`` is ``verify.verify``'s (None before the first, or if the
    run could not start: then ``error`` says why)."""

    running: bool = False
    started: str | None = None
    finished: str | None = None
    seconds: float | None = None
    report: verify.VerifyReport | None = None
    error: str | None = None

    @property
    def ok(self) -> bool | None:
        if self.error is not None:
            return False
        return None if self.report is None else self.report.ok


class Verifier:
    """Runs ``audit.verify`` on a background thread, one run at a time; keeps the last result."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self._status = VerifyStatus()
        self._lock = threading.Lock()

    def status(self) -> VerifyStatus:
        with self._lock:
            return dataclasses.replace(self._status)

    def start(self) -> bool:
        """Start a run unless one is running; True if started."""
        with self._lock:
            if self._status.running:
                return False
            self._status.running = True
            self._status.started = datetime.now(UTC).isoformat(timespec="seconds")
        threading.Thread(target=self._run, name="console-verify", daemon=True).start()
        return True

    def _run(self) -> None:
        started = time.perf_counter()
        result = VerifyStatus()
        try:
            public_key = signing.load_public(signing.public_path(self.data_dir))
            result.report = verify.verify(self.data_dir, public_key)
        except (OSError, ValueError) as error:
            result.error = f"cannot verify: {error}"
        finally:
            with self._lock:
                result.started = self._status.started
                result.finished = datetime.now(UTC).isoformat(timespec="seconds")
                result.seconds = round(time.perf_counter() - started, 3)
                self._status = result
