"""Deferred commits: the audit guarantee on the HTTP server's event loop.

The event loop must not block on the audit ``fsync``. Requests run inside ``deferred_commits()``,
where ``AuditLog.append`` writes the line and hands back a ``CommitTicket`` instead of waiting;
the server awaits ``AsyncCommitter.wait`` before it sends the reply. The rule is the same as for a
direct ``append``: no reply leaves before its record is on disk.
"""


from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

from keyservice.errors import KMSInternalException


class _Log(Protocol):
    """What a ticket needs of ``log.AuditLog`` (which imports this module, not the reverse)."""

    def _commit(self, end: int, epoch: int) -> None: ...
    def _publish(self, seq: int, line: bytes) -> None: ...


@dataclass(frozen=True)
class CommitTicket:
    """A written, not yet durable record: durable once ``log`` has synced up to ``end``."""

    log: _Log
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


def pending_tickets() -> list[CommitTicket] | None:
    """The ticket list of the enclosing ``deferred_commits`` block, or None outside one."""
    return _deferred.get()


def not_recorded() -> KMSInternalException:
    """What a request gets when its record cannot be made durable (fail closed)."""
    return KMSInternalException("The request could not be recorded in the audit log.")


def commit_all(tickets: list[CommitTicket]) -> None:
    """Make deferred records durable, in order; a failure is ``not_recorded`` (fail closed)."""
    try:
        for ticket in tickets:
            ticket.commit()
    except (OSError, ValueError) as exc:
        raise not_recorded() from exc


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
        if tickets:
            await self.submit(tickets)

    def submit(self, tickets: list[CommitTicket]) -> asyncio.Future[None]:
        """``wait`` without a coroutine, for a caller on the event loop that goes on in a callback
        (the HTTP server's direct path): a future that is done once every ticket is durable, or
        failed with KMSInternalException if one was lost."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if not tickets:
            future.set_result(None)
            return future
        with self._ready:
            if self._stopping:
                future.set_exception(not_recorded())
                return future
            self._queue.append((tickets, future))
            if self._idle:
                self._ready.notify()
        return future

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
                    commit_all(tickets)
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
