"""KmsfsReportAccess: a kmsfs mount reports, in batches, the opens it granted under directory keys.

Why an extension operation: in directory-key mode (``kmsfs init --directory-keys``) a mount
unwraps one key per directory and then opens and creates that directory's files without asking
the service, so the per-open audit record that ``Decrypt`` gives in strict mode would be lost.
The mount sends every open and create here instead, asynchronously and in batches, and fails
closed when it cannot (docs/SECURITY.md). The name starts with ``Kmsfs``: no AWS KMS operation
does, so it can never clash with one (docs/PROTOCOL.md).

Authorization: the reporting principal must be allowed ``kms:Decrypt`` on the directory keys'
master key (``KeyId``) under the encryption context of each directory named in the batch (the
context the directory key is wrapped under), and the key must be usable now: a disabled key, or a
principal whose access was withdrawn, has the whole batch refused, and the mount then drops its
cached directory keys for that key.

Audit: besides the request's own record (``caller.keyservice`` counts the reports and names the
batch), one record per reported access, operation ``KmsfsReportedOpen`` (or ``...Create`` /
``...Truncate``), with the reporting principal, the master key, the directory's context, and in
``caller`` the mount's path, uid, user, gid, pid, process, the time of the access (``accessed_at``)
and ``"reported_by": "mount"``, ``"authorized_by": "directory-key"``. The batch's records are made
durable together (one fsync) before the reply, like every record.
"""

from __future__ import annotations

import math
import re
import uuid
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from keyservice import errors
from keyservice.audit.commit import deferred_commits, not_recorded, pending_tickets
from keyservice.audit.records import (
    REPORTED_CREATE,
    REPORTED_OPEN,
    REPORTED_TRUNCATE,
    build_record,
    format_time,
)
from keyservice.context import RequestContext
from keyservice.params import AuditInfo, get_str

if TYPE_CHECKING:
    from keyservice.service import KeyService

OPERATION = "KmsfsReportAccess"
MAX_REPORTS = 1000
MAX_PATH = 4096
MAX_TEXT = 256
_HEX32 = re.compile(r"^[0-9a-f]{32}$")
_KINDS = {"open": REPORTED_OPEN, "create": REPORTED_CREATE, "truncate": REPORTED_TRUNCATE}
# How far the time of a reported access may lie in the future (clock skew between mount and service).
_FUTURE_SLACK_S = 300


def directory_context(cipherdir_id: str, dir_id: str) -> dict[str, str]:
    """The encryption context of a kmsfs directory key (kmsfs/format.py's ``directory_context``;
    part of the protocol, docs/PROTOCOL.md)."""
    return {"kmsfs:purpose": "directory", "kmsfs:cipherdir": cipherdir_id, "kmsfs:directory-id": dir_id}


def _bad(message: str) -> errors.KMSError:
    return errors.ValidationException(message)


def _text(report: dict[str, Any], name: str, limit: int, *, hex32: bool = False) -> str:
    value = report.get(name, "")
    if not isinstance(value, str) or len(value) > limit or (hex32 and not _HEX32.match(value)):
        raise _bad(f"Reports[].{name} is invalid")
    return value


def _int(report: dict[str, Any], name: str) -> int:
    value = report.get(name, -1)
    if not isinstance(value, int) or isinstance(value, bool) or not -1 <= value < 1 << 32:
        raise _bad(f"Reports[].{name} is invalid")
    return value


def _report(raw: Any, now: datetime) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise _bad("Reports[] must be objects")
    kind = raw.get("Operation")
    if kind not in _KINDS:
        raise _bad("Reports[].Operation must be open, create or truncate")
    when = raw.get("Time")
    if not isinstance(when, int | float) or isinstance(when, bool) or not math.isfinite(when) or when < 0:
        raise _bad("Reports[].Time must be seconds since the epoch")
    if when > now.timestamp() + _FUTURE_SLACK_S:
        raise _bad("Reports[].Time lies in the future")
    return {
        "operation": kind,
        "path": _text(raw, "Path", MAX_PATH),
        "uid": _int(raw, "Uid"),
        "user": _text(raw, "User", MAX_TEXT),
        "gid": _int(raw, "Gid"),
        "pid": _int(raw, "Pid"),
        "process": _text(raw, "Process", MAX_TEXT),
        "accessed_at": format_time(datetime.fromtimestamp(when, UTC)),
        "file_id": _text(raw, "FileId", 32, hex32=True),
        "directory_id": _text(raw, "DirectoryId", 32, hex32=True),
    }


def report_access(service: KeyService, params: dict[str, Any], info: AuditInfo) -> dict[str, Any]:
    key = service.key_param(params, info, allow_alias=True)
    cipherdir = get_str(params, "CipherdirId", required=True, min_len=32, max_len=32)
    if cipherdir is None or not _HEX32.match(cipherdir):
        raise _bad("CipherdirId must be 32 lowercase hex digits")
    raw = params.get("Reports")
    if not isinstance(raw, list) or len(raw) > MAX_REPORTS:
        raise _bad(f"Reports must be a list of at most {MAX_REPORTS} reports")
    now = service.clock.now()
    reports = [_report(item, now) for item in raw]
    info.encryption_context = {"kmsfs:purpose": "directory", "kmsfs:cipherdir": cipherdir}
    # One authorization per directory named: policy conditions on the directory's context apply
    # exactly as they do to its Decrypt. With no reports, the key alone (a probe: ``kmsfs init``).
    directories = sorted({r["directory_id"] for r in reports}) or [None]
    for dir_id in directories:
        context = directory_context(cipherdir, dir_id) if dir_id else info.encryption_context
        service.check_usable(key, "Decrypt", info, action="kms:Decrypt", context=context)
    service.dry_run(params)
    batch = str(uuid.uuid4())
    info.extra = {"reports": len(reports), "report_batch": batch}
    principal = info.principal
    outer = pending_tickets()
    # Written first, made durable together: one fsync for the batch, not one per record. The
    # operation changes no store row (service.READ_ONLY_OPERATIONS), so the HTTP layer runs it on
    # its event loop inside deferred commits, and its wait for durability covers these records.
    with deferred_commits() as tickets:
        for report in reports:
            kind = report.pop("operation")
            caller = {**report, "reported_by": "mount", "authorized_by": "directory-key",
                      "report_batch": batch}
            ctx = RequestContext(request_id=str(uuid.uuid4()), source_address=info.source_address,
                                 principal=principal, user_agent="kmsfs-report", caller=caller,
                                 peer=info.peer)
            service.audit_log.append(build_record(
                when=now, ctx=ctx, operation=_KINDS[kind], key_arn=key.arn,
                encryption_context=directory_context(cipherdir, report["directory_id"]),
            ))
    if outer is not None:
        outer.extend(tickets)
    else:
        try:
            for ticket in tickets:  # the first fsyncs them all; each publishes its checkpoint
                ticket.commit()
        except OSError as exc:
            raise not_recorded() from exc
    return {"KeyId": key.arn, "Recorded": len(reports)}


HANDLERS = {OPERATION: report_access}
