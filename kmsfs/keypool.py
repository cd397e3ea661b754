"""A pool of pre-generated data keys for creates (``kmsfs mount --key-pool N``, off by default).

Why: creating a file needs a fresh data key from the service (GenerateDataKey), one network
round trip per create. Untarring thousands of small files is then bound by the service's
latency, not by the filesystem. The pool asks for the keys ahead of time, in background threads
with several requests in flight, so a create takes a key without waiting.

What stays the same: every file still gets its own data key from the service, bound (through
the encryption context) to a file id chosen *before* the key is generated, exactly as a direct
create does; every key is used at most once (``take`` removes it); every later open of the file
unwraps the key through the service (Decrypt), which is audited with the path and the process.

What changes, and why it is opt-in: a pooled key's GenerateDataKey is audited when it is
generated, with ``caller = {"pool": true, ...}`` (the daemon, no path), not with the path and
process of the create that later uses it. Plaintext data keys wait in the daemon's memory (never
on disk) until used or discarded; entries older than ``max_age`` seconds (the mount's
``--revalidate-after``) are discarded, and a refusal from the service (key disabled, access
denied) empties the pool at once, so revocation reaches creates within the same bound as it
reaches open handles.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kmsfs.format import DATA_KEY_SIZE, FILE_ID_SIZE, encryption_context
from kmsfs.keyclient import KeyServiceError, KeyServiceUnavailable

log = logging.getLogger("kmsfs")

# Requests kept in flight while refilling: enough to hide the round trip, few enough not to
# starve the FUSE threads of the GIL on a small machine.
REFILL_THREADS = 2
_BACKOFF = 1.0


@dataclass(frozen=True)
class PooledKey:
    """One unused data key, generated for ``file_id``."""

    file_id: bytes
    key: bytes
    wrapped_key: bytes
    key_arn: str
    generated_at: float


class DataKeyPool:
    """Keeps up to ``size`` unused data keys ready; ``take`` never waits for the service."""

    def __init__(self, generate: Callable[[str, dict[str, str], dict[str, Any] | None],
                                          tuple[bytes, bytes, str]],
                 key_arn: str, size: int, max_age: float, *, threads: int = REFILL_THREADS) -> None:
        self._generate = generate
        self._key_arn = key_arn
        self.size = size
        self.max_age = max_age
        self._threads_wanted = max(1, threads)
        self._keys: collections.deque[PooledKey] = collections.deque()
        self._cond = threading.Condition()
        self._pending = 0
        self._closed = False
        self._paused_until = 0.0
        self._threads: list[threading.Thread] = []
        self._caller = {"pool": True, "uid": os.getuid(), "pid": os.getpid(), "process": "kmsfs"}

    def start(self) -> None:
        for n in range(self._threads_wanted):
            thread = threading.Thread(target=self._refill, name=f"kmsfs-keypool-{n}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def close(self) -> None:
        """Stop refilling and forget every unused key."""
        with self._cond:
            self._closed = True
            self._keys.clear()
            self._cond.notify_all()
        for thread in self._threads:
            thread.join(5)

    def take(self) -> PooledKey | None:
        """An unused key (removed from the pool), or None if none is ready (create directly)."""
        now = time.monotonic()
        with self._cond:
            while self._keys:
                entry = self._keys.popleft()
                if now - entry.generated_at < self.max_age:
                    self._cond.notify()
                    return entry
            self._cond.notify()
            return None

    def __len__(self) -> int:
        return len(self._keys)

    def _refill(self) -> None:
        while True:
            with self._cond:
                while not self._closed and (len(self._keys) + self._pending >= self.size
                                            or time.monotonic() < self._paused_until):
                    self._cond.wait(timeout=max(0.05, self._paused_until - time.monotonic()))
                    self._expire()
                if self._closed:
                    return
                self._pending += 1
            entry = self._generate_one()
            with self._cond:
                self._pending -= 1
                if entry is not None and not self._closed:
                    self._keys.append(entry)

    def _expire(self) -> None:
        now = time.monotonic()
        while self._keys and now - self._keys[0].generated_at >= self.max_age:
            self._keys.popleft()

    def _generate_one(self) -> PooledKey | None:
        file_id = os.urandom(FILE_ID_SIZE)
        try:
            key, blob, arn = self._generate(self._key_arn, encryption_context(file_id), self._caller)
        except KeyServiceError as exc:
            with self._cond:
                if exc.is_access_denied:
                    self._keys.clear()  # revocation reaches creates at once
                self._paused_until = time.monotonic() + _BACKOFF
            log.warning("key pool: service refused GenerateDataKey (%s); creates ask directly", exc)
            return None
        except (KeyServiceUnavailable, OSError) as exc:
            with self._cond:
                self._paused_until = time.monotonic() + _BACKOFF
            log.warning("key pool: service unavailable (%s); creates ask directly", exc)
            return None
        if len(key) != DATA_KEY_SIZE:
            log.error("key pool: service returned a data key of the wrong size")
            return None
        return PooledKey(file_id, key, blob, arn, time.monotonic())
