"""Appending to the audit log: the hash chain, group commit, signed checkpoints.

This is the one module that writes the audit log, ``DATA_DIR/audit/<chain>/<segment>.log``
(specified in docs/AUDIT.md; ``segments`` knows the file names). A segment is sealed with a
``segment_end`` checkpoint and a new one begun when it reaches ``segment_bytes`` (256 MiB) or at
the first write of a new UTC day; the chain runs on across segments.
How a line is built and read back is ``records``'s; checking the log is ``verify``'s; reviewing
(filters, tables, summaries) is ``review``'s.

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
  which is sealed under the root key outside the log directory (``signing``). Whoever can
  rewrite the log cannot re-sign it, so a rewritten chain no longer matches its checkpoints;
* the newest checkpoint is also written to ``DATA_DIR/audit-head.json`` (outside the log
  directory), so cutting the tail of the log past a checkpoint is detected.

Records never hold plaintext, key material, data keys, secrets or ciphertext blobs: the
service builds them only from the fields of ``records.build_record``.
"""

from __future__ import annotations

import base64
import contextlib
import os
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from keyservice.audit import segments
from keyservice.audit.commit import CommitTicket, not_recorded, pending_tickets
from keyservice.audit.records import (
    CHECKPOINT_TYPE,
    CHECKPOINT_VERSION,
    DEFAULT_CHECKPOINT_EVERY,
    DEFAULT_CHECKPOINT_SECONDS,
    GENESIS_HASH,
    encode_line,
    format_time,
    head_path,
    is_checkpoint,
    line_hash,
    parse_line,
    parse_time,
    signed_bytes,
)
from keyservice.errors import KMSInternalException
from keyservice.files import write_atomic


def _split_lines(data: bytes) -> tuple[list[bytes], int]:
    """Complete lines (without newline) and the length of the part up to the last newline."""
    end = data.rfind(b"\n") + 1
    return (data[:end].split(b"\n")[:-1] if end else []), end


@dataclass
class _Tail:
    """What the writer must know of an existing log to continue it."""

    prev_hash: str = GENESIS_HASH
    records: int = 0  # request records since the start of the chain
    unsealed: int = 0  # request records after the last checkpoint
    checkpoint_seq: int = 0
    checkpoint_hash: str | None = None
    segment_end: bool = False  # the last line is a checkpoint that sealed its segment
    first_time: str | None = None  # time of the segment's first line


def _checkpoint_of(line: bytes) -> dict[str, Any] | None:
    if b'"checkpoint"' not in line:  # fast path: a record's line never is one
        return None
    record = parse_line(line)
    return record if record is not None and is_checkpoint(record) else None


def _scan(path: Path, before: bytes | None) -> tuple[_Tail, int]:
    """Read the open segment at start-up: its tail state and the length of its complete part.

    ``before`` is the last line of the previous segment (its ``segment_end`` checkpoint), from
    which the chain goes on."""
    tail = _Tail()
    if before is not None:
        tail.prev_hash = line_hash(before)
        previous = _checkpoint_of(before)
        if previous is not None:
            tail.records = int(previous.get("records", 0))
            tail.checkpoint_seq = int(previous.get("seq", 0))
            tail.checkpoint_hash = tail.prev_hash
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return tail, 0
    lines, complete = _split_lines(data)
    for line in lines:
        checkpoint = _checkpoint_of(line)
        if tail.first_time is None:
            record = parse_line(line) or {}
            tail.first_time = str(record.get("time", ""))
        if checkpoint is not None:
            tail.checkpoint_seq = int(checkpoint.get("seq", tail.checkpoint_seq))
            tail.checkpoint_hash = line_hash(line)
            tail.unsealed = 0
            tail.segment_end = bool(checkpoint.get("segment_end"))
        else:
            tail.records += 1
            tail.unsealed += 1
            tail.segment_end = False
        tail.prev_hash = line_hash(line)
    return tail, complete


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
        chain: str = segments.DEFAULT_CHAIN,
        segment_bytes: int = segments.DEFAULT_SEGMENT_BYTES,
        mirror: Callable[[list[bytes]], None] | None = None,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.chain = segments.check_chain(chain)
        self._dir = segments.chain_dir(data_dir, chain)
        for directory in (self._dir.parent, self._dir):
            directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            os.chmod(directory, 0o700)
        if chain == segments.DEFAULT_CHAIN:
            segments.migrate_legacy(self.data_dir)
        self._signer = signer
        self._every = checkpoint_every
        self._seconds = checkpoint_seconds
        self._segment_bytes = segment_bytes
        self._now = now or (lambda: datetime.now(UTC))
        self._lock = threading.Lock()  # the chain: writing lines, tail state
        self._sync_lock = threading.Lock()  # one fsync at a time; durable state; switching segments
        self._head_lock = threading.Lock()
        self._head_seq = 0
        existing = segments.segments(self.data_dir, chain)
        number = existing[-1][0] if existing else 1
        before = segments.last_line(existing[-2][1]) if len(existing) > 1 else None
        self.path = self._dir / segments.segment_name(number)
        self._tail, complete = _scan(self.path, before)
        self._fd = -1
        # Offsets are logical, counted over the segments this process has written: the current
        # file starts at ``_base``. ``_end`` is the end of the bytes written.
        self._base = 0
        self._end = complete
        self._open_segment(number)
        if os.fstat(self._fd).st_size > complete:
            # A crash left half a line. Its request was never answered (the reply waits for the
            # fsync), so the fragment is dropped rather than left to break the chain.
            os.ftruncate(self._fd, complete)
            os.fsync(self._fd)
        first = parse_time(self._tail.first_time)
        self._set_segment_day(first if first is not None else self._now())
        self._epoch = 0  # bumped when unsynced lines are cut back after a failed fsync
        self._durable_end = complete
        self._durable_tail = replace(self._tail)
        # With a store on PostgreSQL every durable line is also copied, in order, into its
        # append-only table before the request is answered (audit/pgmirror.py); None otherwise.
        self._mirror = mirror
        self._unshipped: list[tuple[int, bytes]] = []  # (file end after the line, line)
        self._shipped_end = complete
        if self._tail.segment_end:  # sealed before a crash or stop: the chain goes on in a new file
            self._open_segment(number + 1)
        self._first_unsealed: datetime | None = None
        self._stop = threading.Event()
        self._timer: threading.Thread | None = None
        if signer is not None:
            if self._tail.unsealed:
                # Records left unsealed by an unclean shutdown: seal them now, marked as late.
                self._seal(recovered=True)
            self._timer = threading.Thread(target=self._tick, name="audit-checkpoint", daemon=True)
            self._timer.start()

    # -- segments ---------------------------------------------------------------------------------
    def _open_segment(self, number: int) -> None:
        """Make segment ``number`` the one appended to (creating it); the old one is closed."""
        path = self._dir / segments.segment_name(number)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        if self._fd >= 0:
            os.close(self._fd)
            self._base = self._end
            self._set_segment_day(self._now())
            self._tail.first_time = None
            segments.fsync_dir(self._dir)
        self._fd, self._number, self.path = fd, number, path

    def _set_segment_day(self, when: datetime) -> None:
        """The open segment holds lines of ``when``'s UTC day: it is sealed at the next midnight."""
        day = when.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
        self._next_midnight = day + timedelta(days=1)

    def _rotation_due(self) -> bool:
        """The open segment is full, or holds lines of an earlier UTC day."""
        if self._end == self._base:
            return False
        return self._end - self._base >= self._segment_bytes or self._now() >= self._next_midnight

    def rotate(self) -> None:
        """Seal the open segment with a ``segment_end`` checkpoint and go on in a new one, if due.

        Holds both locks: no fsync runs on the old file while it is switched."""
        sealed = None
        with self._sync_lock:
            with self._lock:
                if self._fd < 0 or not self._rotation_due():
                    return
                try:
                    if self._signer is not None:
                        sealed = self._checkpoint_locked(segment_end=True)
                    os.fsync(self._fd)
                except OSError:
                    self._rollback_locked()
                    raise
                self._durable_end, self._durable_tail = self._end, replace(self._tail)
                self._open_segment(self._number + 1)
            if self._mirror is not None:
                self._ship()  # the seal (PostgreSQL mode), as any durable line
        if sealed is not None:
            self._publish(*sealed)

    # -- writing ----------------------------------------------------------------------------------
    def _write_locked(self, body: dict[str, Any]) -> bytes:
        """Append one line (not yet durable); on failure nothing of it stays in the file."""
        if self._fd < 0:
            raise OSError("the audit log is closed")
        body["prev_hash"] = self._tail.prev_hash
        line = encode_line(body)
        data = line + b"\n"
        try:
            if os.write(self._fd, data) != len(data):
                raise OSError("short write to the audit log")
        except OSError:
            # Take back whatever part reached the file (a full disk writes half a line): the
            # request fails, and the chain must go on from the last record that really exists.
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, self._end - self._base)
            raise
        self._end += len(data)
        self._tail.prev_hash = line_hash(line)
        if self._mirror is not None:
            self._unshipped.append((self._end, line))
        return line

    def _commit(self, end: int, epoch: int) -> None:
        """Return once the file is durable up to ``end``; raise if those bytes were lost."""
        with self._sync_lock:
            if self._epoch != epoch:
                raise OSError("the audit record was rolled back after a failed fsync")
            if self._durable_end < end:  # else another request's fsync covered this record
                with self._lock:
                    target, snapshot, fd = self._end, replace(self._tail), self._fd
                try:
                    os.fsync(fd)
                except OSError:
                    with self._lock:
                        self._rollback_locked()
                    raise
                self._durable_end, self._durable_tail = target, snapshot
            if self._mirror is not None and self._shipped_end < end:
                self._ship()

    def _ship(self) -> None:
        """Copy every durable line not yet mirrored; caller holds ``_sync_lock``. A failure fails the
        requests waiting on those lines (fail closed); the next commit tries them again."""
        assert self._mirror is not None
        with self._lock:
            batch = [(e, line) for e, line in self._unshipped if e <= self._durable_end]
        if not batch:
            return
        self._mirror([line for _, line in batch])
        with self._lock:
            del self._unshipped[: len(batch)]
            self._shipped_end = batch[-1][0]

    def _rollback_locked(self) -> None:
        """Cut the open segment back to its last durable byte (after a failed fsync)."""
        with contextlib.suppress(OSError):
            os.ftruncate(self._fd, self._durable_end - self._base)
        self._end = self._durable_end
        self._tail = replace(self._durable_tail)
        self._unshipped = [(e, line) for e, line in self._unshipped if e <= self._durable_end]
        self._epoch += 1

    def append(self, record: Mapping[str, Any], *, sync: bool = False) -> None:
        """Write one record and wait until it is durable; raise KMSInternalException if it cannot be.

        Inside ``deferred_commits()`` the wait is left to the caller, unless ``sync``: an intent
        record (``keyservice.write_ahead``) must be durable before the store write that follows.
        """
        try:
            if self._rotation_due():
                self.rotate()
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
            pending = None if sync else pending_tickets()
            if pending is not None:
                pending.append(ticket)
                return
            ticket.commit()
        except (OSError, ValueError, TypeError) as exc:
            raise not_recorded() from exc

    def _checkpoint_locked(self, *, recovered: bool = False, segment_end: bool = False) -> tuple[int, bytes]:
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
        if segment_end:
            checkpoint["segment_end"] = True
        checkpoint["signature"] = base64.b64encode(self._signer.sign(signed_bytes(checkpoint))).decode()
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
                write_atomic(head_path(self.data_dir, self.chain), line + b"\n")
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
            if self._rotation_due():
                with contextlib.suppress(OSError):  # the next append fails closed on it
                    self.rotate()

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

