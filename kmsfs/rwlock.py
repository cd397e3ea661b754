"""A per-inode reader/writer lock: many concurrent reads, or one writer.

Why: the FUSE loop is multithreaded and the kernel sends several readahead reads of one file at
once. Under one exclusive lock they ran strictly one after another, so the ``pread`` of one
request (often waiting for the disk) never overlapped the decryption of another. Reads change
nothing, so they may share the lock; anything that writes, truncates, recovers, re-keys or
revalidates the key takes it exclusively, so a reader never sees a half-written block (which
would fail authentication and read as EIO).

``with lock:`` is the exclusive side and is reentrant for its owner thread, exactly like the
``threading.RLock`` it replaces (existing callers are unchanged). ``with lock.shared():`` is the
read side; it is not reentrant (a reader must not take it twice: a waiting writer would block
the second acquisition), but the owner of the exclusive side may take it (it is then a no-op).
Waiting writers have priority over new readers, so a stream of reads cannot starve a write.
"""

from __future__ import annotations

import threading
from types import TracebackType


class SharedLock:
    """Reader/writer lock; ``with lock:`` is exclusive (reentrant), ``lock.shared()`` is shared."""

    __slots__ = ("_mutex", "_cond", "_readers", "_owner", "_depth", "_writers_waiting", "_waiting")

    def __init__(self) -> None:
        # State changes hold the plain mutex (C-level ``with``); the condition, over the same
        # mutex, is only used to wait and notify.
        self._mutex = threading.Lock()
        self._cond = threading.Condition(self._mutex)
        self._readers = 0
        self._owner: int | None = None
        self._depth = 0
        self._writers_waiting = 0
        self._waiting = 0  # threads inside _wait: release notifies only when someone waits

    def _wait(self) -> None:
        self._waiting += 1
        try:
            self._cond.wait()
        finally:
            self._waiting -= 1

    # -- exclusive side ---------------------------------------------------------------------------
    def acquire(self) -> bool:
        me = threading.get_ident()
        with self._mutex:
            if self._owner == me:
                self._depth += 1
                return True
            self._writers_waiting += 1
            try:
                while self._owner is not None or self._readers:
                    self._wait()
            finally:
                self._writers_waiting -= 1
            self._owner = me
            self._depth = 1
        return True

    def release(self, *_exc_info: object) -> None:
        with self._mutex:
            if self._owner != threading.get_ident():
                raise RuntimeError("cannot release a lock not held exclusively by this thread")
            self._depth -= 1
            if self._depth == 0:
                self._owner = None
                if self._waiting:
                    self._cond.notify_all()

    # ``with lock:`` calls these directly (one Python frame each way, on every read and write).
    __enter__ = acquire
    __exit__ = release

    # -- shared side ------------------------------------------------------------------------------
    def acquire_shared(self) -> None:
        me = threading.get_ident()
        with self._mutex:
            if self._owner == me:  # the exclusive owner reads under its own hold
                self._depth += 1
                return
            while self._owner is not None or self._writers_waiting:
                self._wait()
            self._readers += 1

    def release_shared(self) -> None:
        with self._mutex:
            if self._owner is not None and self._owner == threading.get_ident():
                self._depth -= 1
                return
            self._readers -= 1
            if not self._readers and self._waiting:
                self._cond.notify_all()

    def shared(self) -> _Shared:
        """``with lock.shared():`` holds the lock for reading."""
        return _Shared(self)


class _Shared:
    """The context manager of ``SharedLock.shared`` (a class: cheaper than a generator)."""

    __slots__ = ("_lock",)

    def __init__(self, lock: SharedLock) -> None:
        self._lock = lock

    def __enter__(self) -> None:
        self._lock.acquire_shared()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._lock.release_shared()
