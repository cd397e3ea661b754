"""Console sessions, the failed-login limit and the login form's CSRF tokens, on a hand-moved clock."""

from __future__ import annotations

import pytest

from keyservice.console.sessions import (
    ABSOLUTE_SECONDS,
    IDLE_SECONDS,
    LoginLimiter,
    LoginTokens,
    SessionStore,
    TooManySessions,
)
from keyservice.context import Principal


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def _principal(akid: str = "AKIAEXAMPLE") -> Principal:
    return Principal("111122223333", f"arn:aws:iam::111122223333:user/{akid}", akid)


def test_a_session_expires_after_15_idle_minutes() -> None:
    clock = Clock()
    store = SessionStore(clock=clock)
    sid, session = store.create(_principal(), "127.0.0.1")
    clock.now += IDLE_SECONDS - 1
    assert store.get(sid) is session  # and this use restarts the idle timer
    clock.now += IDLE_SECONDS - 1
    assert store.get(sid) is session
    clock.now += IDLE_SECONDS + 1
    assert store.get(sid) is None
    assert store.get(sid) is None and len(store) == 0


def test_a_busy_session_still_ends_after_8_hours() -> None:
    clock = Clock()
    store = SessionStore(clock=clock)
    sid, _ = store.create(_principal(), "127.0.0.1")
    steps = 0
    while store.get(sid) is not None and steps < 100:  # a request every 10 minutes: never idle
        clock.now += 600
        steps += 1
    assert steps == ABSOLUTE_SECONDS // 600 + 1


def test_ids_are_fresh_and_only_their_hash_is_kept() -> None:
    store = SessionStore(clock=Clock())
    ids = {store.create(_principal(f"AKIA{i}"), "a")[0] for i in range(20)}
    assert len(ids) == 20 and all(len(i) >= 40 for i in ids)
    assert not ids & set(store._sessions)  # keyed by digest, not by the id itself
    assert store.get("not-a-session") is None and store.get("x" * 10_000) is None and store.get(None) is None


def test_logout_ends_the_session() -> None:
    store = SessionStore(clock=Clock())
    sid, session = store.create(_principal(), "a")
    assert store.end(sid) is session
    assert store.get(sid) is None and store.end(sid) is None


def test_sessions_are_bounded_in_all_and_per_access_key() -> None:
    clock = Clock()
    store = SessionStore(clock=clock, limit=5, per_key=2)
    first, _ = store.create(_principal("A"), "a")
    clock.now += 1
    second, _ = store.create(_principal("A"), "a")
    clock.now += 1
    third, _ = store.create(_principal("A"), "a")  # evicts A's oldest
    assert store.get(first) is None and store.get(second) and store.get(third)
    for name in ("B", "C", "D"):
        store.create(_principal(name), "a")
    assert len(store) == 5
    with pytest.raises(TooManySessions):
        store.create(_principal("E"), "a")
    clock.now += IDLE_SECONDS + 1  # expired sessions make room
    store.create(_principal("E"), "a")
    assert len(store) == 1


def test_failed_logins_block_an_address_for_the_window() -> None:
    clock = Clock()
    limiter = LoginLimiter(clock=clock, failures=5, window=300)
    for _ in range(4):
        limiter.failed("10.0.0.1")
    assert not limiter.blocked("10.0.0.1")
    limiter.failed("10.0.0.1")
    assert limiter.blocked("10.0.0.1")
    assert not limiter.blocked("10.0.0.2")
    clock.now += 301
    assert not limiter.blocked("10.0.0.1")


def test_the_limiter_is_bounded_and_has_a_global_backstop() -> None:
    clock = Clock()
    limiter = LoginLimiter(clock=clock, failures=5, window=300, max_addresses=100, global_failures=1000)
    for i in range(5000):
        limiter.failed(f"10.{i // 65536}.{i // 256 % 256}.{i % 256}")
    assert len(limiter._by_address) == 100
    assert limiter.blocked("192.0.2.1")  # 5000 failures from many addresses: everyone waits
    clock.now += 301
    assert not limiter.blocked("192.0.2.1")


def test_login_tokens_are_double_submitted_macs_that_expire() -> None:
    clock = Clock()
    tokens = LoginTokens(clock=clock, lifetime=3600)
    token = tokens.issue()
    assert tokens.valid(token, token)
    assert not tokens.valid(token, tokens.issue())  # cookie and form must match
    assert not tokens.valid(None, token) and not tokens.valid(token, None)
    nonce, issued, mac = token.split(".")
    forged = f"{nonce}.{issued}.{'0' * len(mac)}"
    assert not tokens.valid(forged, forged)
    assert not LoginTokens(clock=clock).valid(token, token)  # another process's key
    assert not tokens.valid("é" + token, "é" + token)
    clock.now += 3601
    assert not tokens.valid(token, token)


def test_flash_messages_are_bounded() -> None:
    _, session = SessionStore(clock=Clock()).create(_principal(), "a")
    for i in range(100):
        session.flash("ok", f"message {i}" + "x" * 10_000)
    assert len(session.flashes) == 5 and session.flashes[-1][1].startswith("message 99")
    assert all(len(text) <= 2000 for _, text in session.flashes)
