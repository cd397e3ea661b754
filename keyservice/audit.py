"""The audit log format: records, the hash chain, signed checkpoints; writing and verifying them.

This is the one module that reads and writes ``DATA_DIR/audit/audit.log`` (specified in
docs/AUDIT.md); reviewing (filters, tables, summaries) lives in ``audit_review``.

Writing (``AuditLog.append``) writes each line with one ``write`` on an O_APPEND descriptor and
``fsync``s it under a lock before returning. If anything fails the caller gets
``KMSInternalException``: a request that cannot be audited is not answered (fail closed).
The HTTP server's event loop must not block on that ``fsync``: it runs requests inside
``deferred_commits()``, where ``append`` writes the line and hands back a ``CommitTicket``
instead of waiting, and awaits ``AsyncCommitter.wait`` before it sends the reply. The rule is the
same either way: no reply leaves before its record is on disk.

Tamper evidence has three layers:

* every line carries ``prev_hash``, the SHA-256 of the previous line, so an edited, inserted,
  removed or reordered line breaks the chain;
* every ``checkpoint_every`` records or ``checkpoint_seconds`` (whichever comes first), and at
  clean shutdown, a *checkpoint* line is appended, signed (Ed25519) with the audit signing key,
  which is sealed under the root key outside the log directory (``audit_signing``). Whoever can
  rewrite the log cannot re-sign it, so a rewritten chain no longer matches its checkpoints;
* the newest checkpoint is also written to ``DATA_DIR/audit-head.json`` (outside the log
  directory), so cutting the tail of the log past a checkpoint is detected.

Records never hold plaintext, key material, data keys, secrets or ciphertext blobs: the
service builds them only from the fields of ``build_record``.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import contextvars
import hashlib
import json
import os
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from keyservice.context import RequestContext
from keyservice.errors import KMSError, KMSInternalException
from keyservice.files import write_atomic

RECORD_VERSION = 1
AUDIT_DIR = "audit"
AUDIT_FILE = "audit.log"
HEAD_FILE = "audit-head.json"
CHECKPOINT_TYPE = "checkpoint"
CHECKPOINT_VERSION = 1
DEFAULT_CHECKPOINT_EVERY = 100
DEFAULT_CHECKPOINT_SECONDS = 60.0
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


def head_path(data_dir: Path) -> Path:
    """Where the newest checkpoint is kept, outside the log directory."""
    return Path(data_dir) / HEAD_FILE


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


def line_hash(line: bytes) -> str:
    return hashlib.sha256(line).hexdigest()


def _encode_line(body: Mapping[str, Any]) -> bytes:
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False, default=str).encode()


def _signed_bytes(checkpoint: Mapping[str, Any]) -> bytes:
    """What a checkpoint signature covers: every field but the signature, canonically encoded."""
    body = {k: v for k, v in checkpoint.items() if k != "signature"}
    return b"kmsfs-audit-checkpoint-v1\n" + json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def key_fingerprint(public_key: Ed25519PublicKey) -> str:
    """SHA-256 of the raw public key, hex: what an operator pins and compares."""
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    return hashlib.sha256(public_key.public_bytes(Encoding.Raw, PublicFormat.Raw)).hexdigest()


def is_checkpoint(record: Mapping[str, Any]) -> bool:
    return record.get("type") == CHECKPOINT_TYPE


def _split_lines(data: bytes) -> tuple[list[bytes], int]:
    """Complete lines (without newline) and the length of the part up to the last newline."""
    end = data.rfind(b"\n") + 1
    return (data[:end].split(b"\n")[:-1] if end else []), end


@dataclass
class _Tail:
    """What the writer must know of an existing log to continue it."""

    prev_hash: str = GENESIS_HASH
    records: int = 0  # request records since the start of the log
    unsealed: int = 0  # request records after the last checkpoint
    checkpoint_seq: int = 0
    checkpoint_hash: str | None = None


def _scan(path: Path) -> tuple[_Tail, int]:
    """Read the log once at start-up; returns its tail state and the length of its complete part."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return _Tail(), 0
    lines, complete = _split_lines(data)
    tail = _Tail()
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            record = {}
        if isinstance(record, dict) and is_checkpoint(record):
            tail.checkpoint_seq = int(record.get("seq", tail.checkpoint_seq))
            tail.checkpoint_hash = line_hash(line)
            tail.unsealed = 0
        else:
            tail.records += 1
            tail.unsealed += 1
        tail.prev_hash = line_hash(line)
    return tail, complete


@dataclass(frozen=True)
class CommitTicket:
    """A written, not yet durable record: durable once ``log`` has synced up to ``end``."""

    log: AuditLog
    end: int
    epoch: int
    sealed: tuple[int, bytes] | None  # a checkpoint written with it, published once durable

    def commit(self) -> None:
        """Wait until durable (raise OSError if the bytes were lost); then publish its checkpoint."""
        self.log._commit(self.end, self.epoch)
        if self.sealed is not None:
            self.log._publish(*self.sealed)


_deferred: contextvars.ContextVar[list[CommitTicket] | None] = contextvars.ContextVar(
    "audit_deferred", default=None
)


@contextlib.contextmanager
def deferred_commits() -> Iterator[list[CommitTicket]]:
    """Within this block (per thread / asyncio task), ``append`` returns before the fsync.

    The yielded list collects one ``CommitTicket`` per record; the caller must not answer the
    request before every ticket is committed (``AsyncCommitter.wait``).
    """
    tickets: list[CommitTicket] = []
    token = _deferred.set(tickets)
    try:
        yield tickets
    finally:
        _deferred.reset(token)


def _not_recorded() -> KMSInternalException:
    """What a request gets when its record cannot be made durable (fail closed)."""
    return KMSInternalException("The request could not be recorded in the audit log.")


def _commit_all(tickets: list[CommitTicket]) -> None:
    try:
        for ticket in tickets:
            ticket.commit()
    except (OSError, ValueError) as exc:
        raise _not_recorded() from exc


_Outcome = tuple["asyncio.Future[None]", BaseException | None]


class AsyncCommitter:
    """Commits tickets on one background thread and wakes the waiting asyncio tasks.

    Group commit for the event loop: every ticket queued while an ``fsync`` runs is covered by the
    next one, and one ``call_soon_threadsafe`` wakes the whole batch.
    """

    def __init__(self) -> None:
        self._queue: collections.deque[tuple[list[CommitTicket], asyncio.Future[None]]] = collections.deque()
        self._ready = threading.Condition()
        self._stopping = False
        self._idle = False  # the thread waits for work: only then does a new ticket need a notify
        self._thread = threading.Thread(target=self._run, name="audit-commit", daemon=True)
        self._thread.start()

    async def wait(self, tickets: list[CommitTicket]) -> None:
        """Return once every ticket is durable; raise KMSInternalException if one was lost."""
        if not tickets:
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        with self._ready:
            if self._stopping:
                raise _not_recorded()
            self._queue.append((tickets, future))
            if self._idle:
                self._ready.notify()
        await future

    def _run(self) -> None:
        while True:
            with self._ready:
                while not self._queue and not self._stopping:
                    self._idle = True
                    self._ready.wait()
                    self._idle = False
                if not self._queue:
                    return
                batch = list(self._queue)
                self._queue.clear()
            outcomes: list[_Outcome] = []
            # The highest end first: one fsync covers the batch, the rest return at once.
            for tickets, future in sorted(batch, key=lambda item: -max(t.end for t in item[0])):
                error: BaseException | None = None
                try:
                    _commit_all(tickets)
                except KMSInternalException as exc:
                    error = exc
                outcomes.append((future, error))
            by_loop: dict[asyncio.AbstractEventLoop, list[_Outcome]] = {}
            for future, error in outcomes:
                by_loop.setdefault(future.get_loop(), []).append((future, error))
            for loop, items in by_loop.items():
                with contextlib.suppress(RuntimeError):  # the loop has closed: nobody waits any more
                    loop.call_soon_threadsafe(_settle, items)

    def close(self) -> None:
        """Commit what is queued, then stop the thread."""
        with self._ready:
            self._stopping = True
            self._ready.notify()
        self._thread.join(timeout=10)


def _settle(items: list[_Outcome]) -> None:
    for future, error in items:
        if future.done():
            continue
        if error is None:
            future.set_result(None)
        else:
            future.set_exception(error)


class AuditLog:
    """Appends records durably and seals them with signed checkpoints. Thread-safe.

    One instance per data directory per process. Without a ``signer`` (unit tests of the record
    format) no checkpoints are written and ``verify`` will report the log as unsealed.

    Group commit: a record is written under ``_lock`` (which keeps the chain in order), then
    ``append`` waits in ``_commit`` until an ``fsync`` that started after its write has
    finished. Concurrent requests share one fsync instead of queueing for one each; every
    request still returns only once its own record is on disk. If an fsync fails, the file is
    cut back to the last durable byte, every request whose record was cut fails, and the chain
    goes on from the last durable record.
    """

    def __init__(
        self,
        data_dir: Path,
        *,
        signer: Ed25519PrivateKey | None = None,
        checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY,
        checkpoint_seconds: float = DEFAULT_CHECKPOINT_SECONDS,
        now: Any = None,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.path = audit_path(data_dir)
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.path.parent, 0o700)
        self._signer = signer
        self._every = checkpoint_every
        self._seconds = checkpoint_seconds
        self._now = now or (lambda: datetime.now(UTC))
        self._lock = threading.Lock()  # the chain: writing lines, tail state
        self._sync_lock = threading.Lock()  # one fsync at a time; durable state
        self._head_lock = threading.Lock()
        self._head_seq = 0
        self._tail, complete = _scan(self.path)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        if os.fstat(self._fd).st_size > complete:
            # A crash left half a line. Its request was never answered (the reply waits for the
            # fsync), so the fragment is dropped rather than left to break the chain.
            os.ftruncate(self._fd, complete)
            os.fsync(self._fd)
        self._end = complete  # bytes written
        self._epoch = 0  # bumped when unsynced lines are cut back after a failed fsync
        self._durable_end = complete
        self._durable_tail = replace(self._tail)
        self._first_unsealed: datetime | None = None
        self._stop = threading.Event()
        self._timer: threading.Thread | None = None
        if signer is not None:
            if self._tail.unsealed:
                # Records left unsealed by an unclean shutdown: seal them now, marked as late.
                self._seal(recovered=True)
            self._timer = threading.Thread(target=self._tick, name="audit-checkpoint", daemon=True)
            self._timer.start()

    # -- writing ----------------------------------------------------------------------------------
    def _write_locked(self, body: dict[str, Any]) -> bytes:
        """Append one line (not yet durable); on failure nothing of it stays in the file."""
        if self._fd < 0:
            raise OSError("the audit log is closed")
        body["prev_hash"] = self._tail.prev_hash
        line = _encode_line(body)
        data = line + b"\n"
        try:
            if os.write(self._fd, data) != len(data):
                raise OSError("short write to the audit log")
        except OSError:
            # Take back whatever part reached the file (a full disk writes half a line): the
            # request fails, and the chain must go on from the last record that really exists.
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, self._end)
            raise
        self._end += len(data)
        self._tail.prev_hash = line_hash(line)
        return line

    def _commit(self, end: int, epoch: int) -> None:
        """Return once the file is durable up to ``end``; raise if those bytes were lost."""
        with self._sync_lock:
            if self._epoch != epoch:
                raise OSError("the audit record was rolled back after a failed fsync")
            if self._durable_end >= end:
                return  # another request's fsync covered this record
            with self._lock:
                target, snapshot = self._end, replace(self._tail)
            try:
                os.fsync(self._fd)
            except OSError:
                with self._lock:
                    with contextlib.suppress(OSError):
                        os.ftruncate(self._fd, self._durable_end)
                    self._end = self._durable_end
                    self._tail = replace(self._durable_tail)
                    self._epoch += 1
                raise
            self._durable_end, self._durable_tail = target, snapshot

    def append(self, record: Mapping[str, Any]) -> None:
        """Write one record and wait until it is durable; raise KMSInternalException if it cannot be."""
        try:
            with self._lock:
                self._write_locked(dict(record))
                self._tail.records += 1
                self._tail.unsealed += 1
                if self._first_unsealed is None:
                    self._first_unsealed = self._now()
                sealed = None
                if self._signer is not None and self._tail.unsealed >= self._every:
                    # Sealed in the same critical section, so no checkpoint ever seals more than
                    # ``checkpoint_every`` records; it becomes durable with this batch.
                    sealed = self._checkpoint_locked()
                ticket = CommitTicket(self, self._end, self._epoch, sealed)
            pending = _deferred.get()
            if pending is not None:
                pending.append(ticket)
                return
            ticket.commit()
        except (OSError, ValueError, TypeError) as exc:
            raise _not_recorded() from exc

    def _checkpoint_locked(self, *, recovered: bool = False) -> tuple[int, bytes]:
        """Write (not yet durable) a checkpoint sealing every unsealed record; caller holds ``_lock``."""
        assert self._signer is not None
        from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

        checkpoint: dict[str, Any] = {
            "type": CHECKPOINT_TYPE,
            "version": CHECKPOINT_VERSION,
            "seq": self._tail.checkpoint_seq + 1,
            "time": format_time(self._now()),
            "records": self._tail.records,
            "sealed": self._tail.unsealed,
            "recovered": recovered,
            "previous_checkpoint": self._tail.checkpoint_hash,
            "key": base64.b64encode(
                self._signer.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
            ).decode(),
            "prev_hash": self._tail.prev_hash,
        }
        checkpoint["signature"] = base64.b64encode(self._signer.sign(_signed_bytes(checkpoint))).decode()
        line = self._write_locked(checkpoint)
        self._tail.checkpoint_seq = checkpoint["seq"]
        self._tail.checkpoint_hash = line_hash(line)
        self._tail.unsealed = 0
        self._first_unsealed = None
        return checkpoint["seq"], line

    def _publish(self, seq: int, line: bytes) -> None:
        """Mirror a durable checkpoint in the head file; the head only ever moves forward."""
        with self._head_lock:
            if seq > self._head_seq:
                _write_head(self.data_dir, line)
                self._head_seq = seq

    def _seal(self, *, recovered: bool = False) -> None:
        """Write, commit and publish a checkpoint if any record is unsealed."""
        with self._lock:
            if self._tail.unsealed == 0:
                return
            sealed = self._checkpoint_locked(recovered=recovered)
            end, epoch = self._end, self._epoch
        self._commit(end, epoch)
        self._publish(*sealed)

    def checkpoint(self) -> None:
        """Seal the records written so far (no-op when there are none)."""
        if self._signer is None:
            return
        try:
            self._seal()
        except OSError as exc:
            raise KMSInternalException("The audit log could not be checkpointed.") from exc

    def _tick(self) -> None:
        while not self._stop.wait(min(1.0, self._seconds / 4)):
            first = self._first_unsealed
            if first is not None and (self._now() - first).total_seconds() >= self._seconds:
                try:
                    self.checkpoint()
                except KMSInternalException:
                    pass  # the next append fails closed on the same disk problem

    def close(self) -> None:
        self._stop.set()
        if self._timer is not None:
            self._timer.join(timeout=5)
        with contextlib.suppress(KMSInternalException):
            self.checkpoint()
        with self._sync_lock, self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1


def _write_head(data_dir: Path, checkpoint_line: bytes) -> None:
    """Atomically replace audit-head.json with the newest checkpoint line."""
    write_atomic(head_path(data_dir), checkpoint_line + b"\n")


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
    """Every well-formed request record in order (checkpoints and unparseable lines skipped)."""
    for line in _read_lines(audit_path(data_dir)):
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and not is_checkpoint(record):
            yield record


# --------------------------------------------------------------------------- verifying


@dataclass
class VerifyReport:
    """The outcome of ``verify``: ``problems[0]`` names the first bad line."""

    records: int = 0
    checkpoints: int = 0
    unsealed: int = 0
    fingerprint: str | None = None
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _check_signature(checkpoint: Mapping[str, Any], public_key: Ed25519PublicKey) -> bool:
    try:
        public_key.verify(base64.b64decode(str(checkpoint.get("signature", ""))), _signed_bytes(checkpoint))
    except (InvalidSignature, ValueError):
        return False
    return True


def _parse_time(text: object) -> datetime | None:
    try:
        return datetime.fromisoformat(str(text).replace("Z", "+00:00"))
    except ValueError:
        return None


def verify(
    data_dir: Path,
    public_key: Ed25519PublicKey,
    *,
    checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY,
    checkpoint_seconds: float = DEFAULT_CHECKPOINT_SECONDS,
    now: datetime | None = None,
) -> VerifyReport:
    """Check the chain, every checkpoint's signature and spacing, and the head file.

    Stops at the first bad line: everything after it is untrustworthy anyway.
    """
    report = VerifyReport(fingerprint=key_fingerprint(public_key))
    prev = GENESIS_HASH
    last_checkpoint: dict[str, Any] | None = None
    last_checkpoint_hash: str | None = None
    since_checkpoint = 0
    first_unsealed_time: datetime | None = None
    grace = timedelta(seconds=checkpoint_seconds * 2 + 5)

    def fail(number: int, message: str) -> VerifyReport:
        report.problems.append(f"line {number}: {message}")
        return report

    number = 0
    for number, line in enumerate(_read_lines(audit_path(data_dir)), start=1):
        try:
            record = json.loads(line)
        except ValueError:
            return fail(number, "not a JSON record (damaged or tampered)")
        if not isinstance(record, dict):
            return fail(number, "not a JSON object (damaged or tampered)")
        if record.get("prev_hash") != prev:
            return fail(number, "hash chain broken: a record before or at this line was edited, inserted, "
                                "removed or reordered")
        if is_checkpoint(record):
            seq = record.get("seq")
            expected_seq = (last_checkpoint or {}).get("seq", 0) + 1
            if not _check_signature(record, public_key):
                return fail(number, f"checkpoint #{seq}: bad signature (forged, or signed by another key)")
            if seq != expected_seq or record.get("previous_checkpoint") != last_checkpoint_hash:
                return fail(number, f"checkpoint #{seq}: expected #{expected_seq} (a checkpoint is missing)")
            if record.get("records") != report.records or record.get("sealed") != since_checkpoint:
                return fail(number, f"checkpoint #{seq}: seals {record.get('sealed')} records but "
                                    f"{since_checkpoint} precede it")
            if since_checkpoint > checkpoint_every:
                return fail(number, f"missing checkpoint: {since_checkpoint} records sealed at once "
                                    f"(at most {checkpoint_every} allowed)")
            when = _parse_time(record.get("time"))
            if record.get("recovered"):
                report.notes.append(f"checkpoint #{seq} sealed {since_checkpoint} records late, after an "
                                    f"unclean shutdown")
            elif first_unsealed_time and when and when - first_unsealed_time > grace:
                return fail(number, f"missing checkpoint: checkpoint #{seq} came "
                                    f"{int((when - first_unsealed_time).total_seconds())} s after the first "
                                    f"record it seals (at most {checkpoint_seconds:g} s allowed)")
            report.checkpoints += 1
            last_checkpoint, last_checkpoint_hash = record, line_hash(line)
            since_checkpoint, first_unsealed_time = 0, None
        else:
            report.records += 1
            since_checkpoint += 1
            if first_unsealed_time is None:
                first_unsealed_time = _parse_time(record.get("time"))
        prev = line_hash(line)

    report.unsealed = since_checkpoint
    if since_checkpoint > checkpoint_every:
        return fail(number, f"missing checkpoint: the last {since_checkpoint} records are not sealed")
    head = _read_head(data_dir)
    if head is not None:
        if not _check_signature(head, public_key):
            report.problems.append(f"{HEAD_FILE}: bad signature")
        elif last_checkpoint is None or head.get("seq", 0) > last_checkpoint.get("seq", 0):
            report.problems.append(
                f"log cut: checkpoint #{head.get('seq')} recorded in {HEAD_FILE} is missing from the log "
                f"(it ends at checkpoint #{(last_checkpoint or {}).get('seq', 0)}, line {number})")
        elif head.get("seq") == last_checkpoint.get("seq") and head != last_checkpoint:
            report.problems.append(f"{HEAD_FILE}: differs from checkpoint #{head.get('seq')} in the log")
    elif report.checkpoints:
        report.problems.append(f"{HEAD_FILE} is missing although the log has checkpoints")
    if since_checkpoint:
        moment = now or datetime.now(UTC)
        age = (moment - first_unsealed_time).total_seconds() if first_unsealed_time else 0.0
        report.notes.append(f"{since_checkpoint} newest records are not sealed by a checkpoint yet "
                            f"(oldest {int(age)} s old)")
    return report


def _read_head(data_dir: Path) -> dict[str, Any] | None:
    try:
        head = json.loads(head_path(data_dir).read_bytes())
    except FileNotFoundError:
        return None
    except ValueError:
        return {"signature": ""}
    return head if isinstance(head, dict) else {"signature": ""}
