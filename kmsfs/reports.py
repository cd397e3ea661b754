"""Open reports (directory-key mode): every open and create goes to the key service's audit, in batches.

Why: with directory keys (kmsfs/dirkeys.py) opens and creates whose directory key is cached make
no request, so the service would not see them. The mount queues one report per access (path, uid,
user, gid, pid, process, time, file id, directory id) and a background thread sends them with the
key service's extension operation ``KmsfsReportAccess`` (docs/PROTOCOL.md), signed like every
request, one batch per master key, at most every ``interval`` seconds (sooner when a batch is full).

Fail closed: ``check()`` raises ``PermissionError`` (EACCES) while the oldest undelivered report is
older than ``deadline`` seconds; the mount calls it before every open and create, so a service
that cannot be reached (or refuses reports) stops new opens within the deadline. Reports are
never dropped while the mount lives: they stay queued and go out when the service answers again.
A refusal (AccessDenied, key disabled or pending deletion) also calls ``on_refused(key_arn)``: the
mount drops its cached directory keys for that key at once.
"""

from __future__ import annotations

import errno
import json
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from kmsfs.keyclient import KeyServiceError, KeyServiceUnavailable

log = logging.getLogger("kmsfs")

DEFAULT_DEADLINE = 10.0
DEFAULT_INTERVAL = 1.0
BATCH_MAX = 500  # reports per request (the service accepts 1,000)
BATCH_BYTES = 160 * 1024  # the service accepts request bodies up to 256 KiB
RETRY_AFTER = 0.5

Send = Callable[[str, list[dict[str, Any]]], None]


def report_of(operation: str, caller: dict[str, Any] | None, path: str, file_id: bytes, dir_id: bytes,
              when: float | None = None) -> dict[str, Any]:
    """One report as the service takes it (docs/PROTOCOL.md, KmsfsReportAccess)."""
    caller = caller or {}
    return {"Operation": operation, "Path": str(caller.get("path") or path)[:4096],
            "Uid": int(caller.get("uid", -1)), "User": str(caller.get("user", ""))[:256],
            "Gid": int(caller.get("gid", -1)), "Pid": int(caller.get("pid", -1)),
            "Process": str(caller.get("process", ""))[:256],
            "Time": round(time.time() if when is None else when, 3),
            "FileId": file_id.hex(), "DirectoryId": dir_id.hex()}


class OpenReporter:
    """A queue of reports and the thread that delivers them (see the module docstring)."""

    def __init__(self, send: Send, *, deadline: float = DEFAULT_DEADLINE,
                 interval: float = DEFAULT_INTERVAL,
                 on_refused: Callable[[str], Any] | None = None) -> None:
        self._send = send
        self.deadline = deadline
        self.interval = min(interval, deadline / 4)
        self._on_refused = on_refused
        self._pending: deque[tuple[float, str, dict[str, Any]]] = deque()  # (queued at, key ARN, report)
        self._cond = threading.Condition()
        self._closing = False
        self._thread: threading.Thread | None = None
        self.delivered = 0
        self.requests = 0
        self._refused_logged = False

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="kmsfs-reports", daemon=True)
        self._thread.start()

    def add(self, key_arn: str, report: dict[str, Any]) -> None:
        with self._cond:
            self._pending.append((time.monotonic(), key_arn, report))
            if len(self._pending) >= BATCH_MAX:
                self._cond.notify()

    def pending(self) -> int:
        with self._cond:
            return len(self._pending)

    def check(self) -> None:
        """Refuse (EACCES) while a report is overdue: audit cannot be guaranteed (fail closed)."""
        pending = self._pending
        if pending and time.monotonic() - pending[0][0] > self.deadline:
            raise PermissionError(errno.EACCES, "open reports overdue: the key service has not "
                                  f"recorded accesses for {self.deadline:g} s (fail closed)")

    def _batch(self) -> tuple[str, list[dict[str, Any]]]:
        """The oldest reports of one key ARN, up to BATCH_MAX and about BATCH_BYTES (lock held)."""
        arn = self._pending[0][1]
        batch: list[dict[str, Any]] = []
        size = 0
        for _, key_arn, report in self._pending:
            if key_arn != arn:
                continue
            size += len(json.dumps(report)) + 1
            if batch and (len(batch) >= BATCH_MAX or size > BATCH_BYTES):
                break
            batch.append(report)
        return arn, batch

    def _delivered(self, arn: str, batch: list[dict[str, Any]]) -> None:
        sent = {id(r) for r in batch}
        with self._cond:
            self._pending = deque(p for p in self._pending if id(p[2]) not in sent)
            self.delivered += len(batch)

    def _run(self) -> None:
        while True:
            with self._cond:
                if not self._pending and not self._closing:
                    self._cond.wait(self.interval)
                if self._closing and not self._pending:
                    return
                if not self._pending:
                    continue
                if len(self._pending) < BATCH_MAX and not self._closing:
                    # let a batch build up for at most ``interval`` from its oldest report
                    wait = self.interval - (time.monotonic() - self._pending[0][0])
                    if wait > 0:
                        self._cond.wait(wait)
                arn, batch = self._batch()
            if not self._deliver(arn, batch):
                with self._cond:
                    if self._closing:
                        return
                    self._cond.wait(RETRY_AFTER)

    def _deliver(self, arn: str, batch: list[dict[str, Any]]) -> bool:
        self.requests += 1
        try:
            self._send(arn, batch)
        except KeyServiceError as exc:
            if exc.is_access_denied and self._on_refused is not None:
                self._on_refused(arn)
            if not self._refused_logged:
                log.error("open reports refused by the key service (%s); %d queued, new opens "
                          "fail after %g s", exc, self.pending(), self.deadline)
                self._refused_logged = True
            return False
        except KeyServiceUnavailable as exc:
            if not self._refused_logged:
                log.warning("open reports not delivered (%s); %d queued, retrying", exc, self.pending())
                self._refused_logged = True
            return False
        if self._refused_logged:
            log.info("open reports delivered again")
            self._refused_logged = False
        self._delivered(arn, batch)
        return True

    def close(self, timeout: float = 5.0) -> None:
        """Deliver what is queued (for at most ``timeout`` s), then stop; log what was left."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        left = self.pending()
        if left:
            log.error("%d open report(s) could not be delivered before the mount ended", left)
