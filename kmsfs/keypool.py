"""A pool of pre-generated data keys for creates (``kmsfs mount --key-pool N``, off by default).

Why: creating a file needs a fresh data key from the service (GenerateDataKey), one network
round trip per create. Untarring thousands of small files is then bound by the service's
latency, not by the filesystem. The pool asks for the keys ahead of time, in background threads
with several requests in flight, so a create takes a key without waiting.

What stays the same: every file still gets its own data key from the service, bound (through
the encryption context) to a file id chosen *before* the key is generated, exactly as a direct
create does; every key is used at most once (``take`` removes it); every later open of the file
unwraps the key through the service (Decrypt), which is audited with the path and the process.

How a pooled create is audited, twice: the key's GenerateDataKey is recorded when it is
generated, with ``caller = {"pool": true, ...}`` (the daemon, no path yet), and, once a create has
used the key, a **claim** — a Decrypt of that file's wrapped key carrying the create's own caller
(path, uid, user, pid, process and ``"op": "create"``) — is sent by a background thread, so the
service records the create with its path exactly like an open. Both records carry the file id in
their encryption context, so they join (``keyservice audit list --file-id``). The claim is off the
create's critical path: the create returns first, the claim follows within a round trip.

The claim is also a check. Its plaintext must equal the pooled key (constant-time compare); a
refusal (key disabled, access denied) or a mismatch is reported to the create's handle through
``on_refused`` (the core then fails that handle's I/O like a failed revalidation) and empties the
pool. An unreachable service delays the claim, never the create: it is retried with a backoff
until it is answered or the mount ends, and at unmount whatever is still unclaimed is logged by
path and file id (never dropped silently). Claims are never batched: one Decrypt, one record, per
create. The number of keys taken but not yet claimed is bounded by the pool size (the pool stops
refilling while that many claims are outstanding), so a slow service throttles pooled creates
back to direct ones instead of letting unaudited creates pile up.

Plaintext data keys wait in the daemon's memory (never on disk) until used or discarded; entries
older than ``max_age`` seconds (the mount's ``--revalidate-after``) are discarded, and a refusal
from the service empties the pool at once, so revocation reaches creates within the same bound as
it reaches open handles.
"""

from __future__ import annotations

import collections
import hmac
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kmsfs.format import DATA_KEY_SIZE, FILE_ID_SIZE, encryption_context
from kmsfs.keyclient import KeyServiceError, KeyServiceUnavailable

log = logging.getLogger("kmsfs")

# The mount's default ``--key-pool``: off. With its claims, a pooled create costs the service two
# requests instead of one; on a 2-core machine running both the service and the mount, untar of
# 7,733 files measured the same with the pool off and at 32 (docs/PERFORMANCE.md), and a create
# right after a key is disabled succeeds with a pooled key until some refusal is seen. The pool
# pays where the service is far away (round trip >> its CPU per request): then use 32 (64
# measured the same), which bounds the plaintext keys waiting in memory and the unclaimed creates.
DEFAULT_SIZE = 0
SUGGESTED_SIZE = 32
# Requests kept in flight while refilling: enough to hide the round trip, few enough not to
# starve the FUSE threads of the GIL on a small machine.
REFILL_THREADS = 2
# Claims are sent by one thread, in create order: one round trip (~1.4 ms) each is faster than
# creates arrive on the backing store (~0.6 ms of inode creation plus the writes of the file).
CLAIM_THREADS = 1
_BACKOFF = 1.0
# Retry schedule for a claim the service could not answer: doubling, capped.
_CLAIM_RETRY_FIRST = 0.5
_CLAIM_RETRY_MAX = 10.0
# How long unmount waits for outstanding claims before logging them as unaudited.
DRAIN_TIMEOUT = 15.0

Generate = Callable[[str, dict[str, str], dict[str, Any] | None], tuple[bytes, bytes, str]]
Decrypt = Callable[[bytes, dict[str, str], dict[str, Any] | None, str | None], bytes]
OnRefused = Callable[[BaseException, bool], None]


class ClaimMismatch(KeyServiceError):
    """The service unwrapped a pooled file's key to something other than the pooled key.

    A service error (not an access refusal): the FUSE layer answers EIO and logs it."""

    def __init__(self) -> None:
        super().__init__("ClaimMismatch", "the service unwrapped the created file's key to a different key")


@dataclass(frozen=True)
class PooledKey:
    """One unused data key, generated for ``file_id``."""

    file_id: bytes
    key: bytes = field(repr=False)
    wrapped_key: bytes = field(repr=False)
    key_arn: str
    generated_at: float


@dataclass
class _Claim:
    """A pooled key in use by a file whose create has not been audited with its path yet."""

    entry: PooledKey
    caller: dict[str, Any]
    on_refused: OnRefused
    attempts: int = 0
    due: float = 0.0


class DataKeyPool:
    """Keeps up to ``size`` unused data keys ready; ``take`` never waits for the service."""

    def __init__(self, generate: Generate, decrypt: Decrypt, key_arn: str, size: int, max_age: float,
                 *, threads: int = REFILL_THREADS, drain_timeout: float = DRAIN_TIMEOUT) -> None:
        self._generate = generate
        self._decrypt = decrypt
        self._key_arn = key_arn
        self.size = size
        self.max_age = max_age
        self.drain_timeout = drain_timeout
        self._threads_wanted = max(1, threads)
        self._keys: collections.deque[PooledKey] = collections.deque()
        self._claims: collections.deque[_Claim] = collections.deque()
        self._claiming = 0  # claims taken off the queue, request in flight
        # One lock, two conditions: refill threads wait on ``_cond``, claim threads on
        # ``_claim_cond``, so a create wakes only the thread that has work (each wakeup costs the
        # FUSE threads GIL time).
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._claim_cond = threading.Condition(self._lock)
        self._pending = 0
        self._closed = False
        self._draining = False
        self._paused_until = 0.0
        self._threads: list[threading.Thread] = []
        self._claim_threads: list[threading.Thread] = []
        self._caller = {"pool": True, "uid": os.getuid(), "pid": os.getpid(), "process": "kmsfs"}

    def start(self) -> None:
        for n in range(self._threads_wanted):
            thread = threading.Thread(target=self._refill, name=f"kmsfs-keypool-{n}", daemon=True)
            thread.start()
            self._threads.append(thread)
        for n in range(CLAIM_THREADS):
            thread = threading.Thread(target=self._claim_loop, name=f"kmsfs-keyclaim-{n}", daemon=True)
            thread.start()
            self._claim_threads.append(thread)

    def close(self) -> None:
        """Stop refilling, forget every unused key, send the outstanding claims (bounded wait)."""
        with self._cond:
            self._closed = True
            self._keys.clear()
            self._cond.notify_all()
        for thread in self._threads:
            thread.join(5)
        with self._cond:
            self._draining = True
            for claim in self._claims:
                claim.due = 0.0  # one more attempt each now, no backoff
            self._claim_cond.notify_all()
        deadline = time.monotonic() + self.drain_timeout
        for thread in self._claim_threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        with self._cond:
            left, self._claims = list(self._claims), collections.deque()
        for claim in left:
            log.error("create of %s (file id %s) not audited with its path: the key service did not "
                      "answer its claim before unmount (its GenerateDataKey was audited)",
                      claim.caller.get("path"), claim.entry.file_id.hex())

    def take(self) -> PooledKey | None:
        """An unused key (removed from the pool), or None if none is ready (create directly).

        The caller must ``claim`` the key once a file uses it."""
        now = time.monotonic()
        with self._cond:
            while self._keys:
                entry = self._keys.popleft()
                if now - entry.generated_at < self.max_age:
                    self._cond.notify()
                    return entry
            self._cond.notify()
            return None

    def claim(self, entry: PooledKey, caller: dict[str, Any], on_refused: OnRefused) -> None:
        """Have the service audit (and confirm) the create that used ``entry``, in the background.

        ``caller`` is the create's caller (it must carry the ``path``); ``"op": "create"`` is
        added. ``on_refused(exc, mismatch)`` is called from the claim thread if the service
        refuses the Decrypt (``mismatch=False``) or returns another key (``mismatch=True``)."""
        with self._cond:
            self._claims.append(_Claim(entry, {**caller, "op": "create"}, on_refused))
            self._claim_cond.notify()

    def refused(self) -> None:
        """The service refused a request of this mount (a refill, a claim, an open, a
        revalidation): the key may be disabled or access revoked, so no create may use a key
        pooled before that. Drops every pooled key and pauses refilling."""
        with self._cond:
            self._keys.clear()  # revocation reaches creates at once
            self._paused_until = time.monotonic() + _BACKOFF

    def unclaimed(self) -> int:
        """Keys used by creates whose claim has not been answered yet."""
        with self._cond:
            return len(self._claims) + self._claiming

    def __len__(self) -> int:
        return len(self._keys)

    # -- refill -----------------------------------------------------------------------------------
    def _refill(self) -> None:
        while True:
            with self._cond:
                while not self._closed and (len(self._keys) + self._pending >= self.size
                                            or len(self._claims) + self._claiming >= self.size
                                            or time.monotonic() < self._paused_until):
                    paused = self._paused_until - time.monotonic()
                    self._cond.wait(timeout=max(0.05, paused) if paused > 0 else 1.0)
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
            if exc.is_access_denied:
                self.refused()
            else:
                with self._cond:
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

    # -- claims -----------------------------------------------------------------------------------
    def _next_claim(self) -> _Claim | None:
        """The oldest due claim (blocking), or None when the pool is closed and drained."""
        with self._cond:
            while True:
                if self._claims:
                    wait = self._claims[0].due - time.monotonic()
                    if wait <= 0:
                        self._claiming += 1
                        return self._claims.popleft()
                elif self._draining:
                    return None
                else:
                    wait = 1.0
                if self._draining and self._claims[0].attempts and self._claims[0].due > 0:
                    return None  # unmounting, the service is not answering: close() logs the rest
                self._claim_cond.wait(timeout=wait)

    def _claim_loop(self) -> None:
        while (claim := self._next_claim()) is not None:
            retry = self._send_claim(claim)
            with self._cond:
                self._claiming -= 1
                if retry:
                    delay = min(_CLAIM_RETRY_MAX, _CLAIM_RETRY_FIRST * 2 ** (claim.attempts - 1))
                    claim.due = time.monotonic() + delay
                    self._claims.appendleft(claim)  # keep create order
                    self._claim_cond.notify()
                else:
                    self._cond.notify()  # one claim fewer outstanding: a throttled refill may go on

    def _send_claim(self, claim: _Claim) -> bool:
        """One claim Decrypt; True if it must be retried (the service did not answer)."""
        entry = claim.entry
        claim.attempts += 1
        try:
            key = self._decrypt(entry.wrapped_key, encryption_context(entry.file_id), claim.caller,
                                entry.key_arn)
        except KeyServiceError as exc:
            self.refused()
            log.warning("%s: the key service refused the create's claim (%s); its handle is refused "
                        "and the key pool emptied", claim.caller.get("path"), exc)
            claim.on_refused(exc, False)
            return False
        except (KeyServiceUnavailable, OSError) as exc:
            if claim.attempts == 1 or claim.attempts % 10 == 0:
                log.warning("%s: claim of the create not answered yet (%s, attempt %d); retrying",
                            claim.caller.get("path"), exc, claim.attempts)
            return True
        if not hmac.compare_digest(key, entry.key):
            self.refused()
            log.error("%s: the key service unwrapped the created file's key to a different key; "
                      "its handle is refused and the key pool emptied", claim.caller.get("path"))
            claim.on_refused(ClaimMismatch(), True)
        elif claim.attempts > 1:
            log.info("%s: claim of the create answered after %d attempts", claim.caller.get("path"),
                     claim.attempts)
        return False
