"""Console sessions, login CSRF tokens and the failed-login rate limit: all bounded in memory.

Why server-side sessions: the browser holds only a random session id (in a ``Secure; HttpOnly;
SameSite=Strict`` cookie), never the access key secret, and logout or expiry ends the session for
sure. A session is created only by a successful login, so an unauthenticated client cannot grow
this table; it is capped anyway (``MAX_SESSIONS`` in all, ``MAX_SESSIONS_PER_KEY`` per access key,
the oldest of that key evicted first). The table is keyed by the SHA-256 of the id, so comparing
a presented id is a dict lookup on a hash (no timing signal about stored ids).

The login form cannot use a session's CSRF token (there is no session yet) and must not create
state per visitor: its token is stateless, a random nonce with an HMAC under a per-process key,
sent both in a cookie and in the form (double submit); both must match and the MAC must verify.
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from keyservice.context import Principal

IDLE_SECONDS = 15 * 60
ABSOLUTE_SECONDS = 8 * 60 * 60
MAX_SESSIONS = 1000
MAX_SESSIONS_PER_KEY = 10

# Failed logins per address: at most LOGIN_FAILURES within LOGIN_WINDOW seconds, then every login
# from that address (right or wrong) is refused until the window has passed.
LOGIN_FAILURES = 5
LOGIN_WINDOW = 300.0
MAX_TRACKED_ADDRESSES = 10_000
# All addresses together (a backstop when the attacker has many addresses).
GLOBAL_FAILURES = 200

LOGIN_TOKEN_SECONDS = 60 * 60
MAX_FLASHES = 5


def _digest(session_id: str) -> str:
    return hashlib.sha256(session_id.encode()).hexdigest()


@dataclass
class Session:
    """One logged-in browser. ``csrf`` must come back in every form it posts."""

    principal: Principal
    created: float
    last_seen: float
    csrf: str
    address: str
    tag: str  # a short public name of the session for the audit log (not the id)
    can_read_audit: bool = False
    flashes: list[tuple[str, str]] = field(default_factory=list)

    def flash(self, kind: str, text: str) -> None:
        """A message for the next page (``ok`` or ``error``); the newest MAX_FLASHES are kept."""
        self.flashes = [*self.flashes[-(MAX_FLASHES - 1):], (kind, text[:2000])]


class TooManySessions(Exception):
    """The session table is full of live sessions."""


class SessionStore:
    def __init__(self, *, clock: Callable[[], float] = time.monotonic, idle: float = IDLE_SECONDS,
                 absolute: float = ABSOLUTE_SECONDS, limit: int = MAX_SESSIONS,
                 per_key: int = MAX_SESSIONS_PER_KEY) -> None:
        self._clock = clock
        self.idle, self.absolute, self.limit, self.per_key = idle, absolute, limit, per_key
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._sessions)

    def create(self, principal: Principal, address: str) -> tuple[str, Session]:
        """A new session with a fresh id (never one the browser presented: no fixation)."""
        now = self._clock()
        session_id = secrets.token_urlsafe(32)
        session = Session(principal, now, now, secrets.token_urlsafe(32), address,
                          _digest(session_id)[:12])  # fmt: skip
        with self._lock:
            self._drop_expired(now)
            mine = sorted((s.created, d) for d, s in self._sessions.items()
                          if s.principal.access_key_id == principal.access_key_id)  # fmt: skip
            for _, digest in mine[: max(0, len(mine) - self.per_key + 1)]:
                del self._sessions[digest]
            if len(self._sessions) >= self.limit:
                raise TooManySessions("too many console sessions; try again later")
            self._sessions[_digest(session_id)] = session
        return session_id, session

    def get(self, session_id: str | None) -> Session | None:
        """The live session with this id (its idle timer restarted), or None."""
        if not session_id or len(session_id) > 128:
            return None
        now = self._clock()
        digest = _digest(session_id)
        with self._lock:
            session = self._sessions.get(digest)
            if session is None:
                return None
            if self._expired(session, now):
                del self._sessions[digest]
                return None
            session.last_seen = now
            return session

    def end(self, session_id: str | None) -> Session | None:
        if not session_id:
            return None
        with self._lock:
            return self._sessions.pop(_digest(session_id), None)

    def _expired(self, session: Session, now: float) -> bool:
        return now - session.last_seen > self.idle or now - session.created > self.absolute

    def _drop_expired(self, now: float) -> None:
        for digest in [d for d, s in self._sessions.items() if self._expired(s, now)]:
            del self._sessions[digest]


class LoginLimiter:
    """Failed logins per source address in a sliding window, bounded in memory (LRU)."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic, failures: int = LOGIN_FAILURES,
                 window: float = LOGIN_WINDOW, max_addresses: int = MAX_TRACKED_ADDRESSES,
                 global_failures: int = GLOBAL_FAILURES) -> None:
        self._clock = clock
        self.failures, self.window = failures, window
        self.max_addresses, self.global_failures = max_addresses, global_failures
        self._by_address: collections.OrderedDict[str, collections.deque[float]] = collections.OrderedDict()
        self._all: collections.deque[float] = collections.deque()
        self._lock = threading.Lock()

    def _trim(self, times: collections.deque[float], now: float) -> None:
        while times and now - times[0] > self.window:
            times.popleft()

    def blocked(self, address: str) -> bool:
        now = self._clock()
        with self._lock:
            self._trim(self._all, now)
            if len(self._all) >= self.global_failures:
                return True
            times = self._by_address.get(address)
            if times is None:
                return False
            self._trim(times, now)
            return len(times) >= self.failures

    def failed(self, address: str) -> None:
        now = self._clock()
        with self._lock:
            self._all.append(now)
            times = self._by_address.pop(address, None) or collections.deque(maxlen=self.failures)
            times.append(now)
            self._by_address[address] = times  # most recent last
            while len(self._by_address) > self.max_addresses:
                self._by_address.popitem(last=False)


class LoginTokens:
    """Stateless CSRF tokens for the login form: ``nonce.time.mac`` under a per-process key."""

    def __init__(self, *, clock: Callable[[], float] = time.time,
                 lifetime: float = LOGIN_TOKEN_SECONDS) -> None:
        self._key = secrets.token_bytes(32)
        self._clock = clock
        self.lifetime = lifetime

    def _mac(self, body: str) -> str:
        return hmac.new(self._key, body.encode(), hashlib.sha256).hexdigest()

    def issue(self) -> str:
        body = f"{secrets.token_urlsafe(16)}.{int(self._clock())}"
        return f"{body}.{self._mac(body)}"

    def valid(self, cookie: str | None, form: str | None) -> bool:
        if not cookie or not form or len(form) > 200:
            return False
        if not hmac.compare_digest(cookie.encode(), form.encode()):
            return False
        body, _, mac = form.rpartition(".")
        if not hmac.compare_digest(mac.encode(), self._mac(body).encode()):
            return False
        try:
            issued = int(body.rsplit(".", 1)[1])
        except (IndexError, ValueError):
            return False
        return 0 <= self._clock() - issued <= self.lifetime
