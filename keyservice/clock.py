"""Injected time.

Every decision that depends on "now" (creation dates, audit timestamps, and in later issues
deletion windows, rotation schedules and import expiry) reads a ``Clock`` handed in by the
caller, so tests can move time forward instead of sleeping.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Protocol


class Clock(Protocol):
    def now(self) -> datetime:
        """The current time as a timezone-aware UTC datetime."""
        ...


class SystemClock:
    """The real wall clock."""

    def now(self) -> datetime:
        return datetime.now(UTC)


class FixedClock:
    """A clock that only moves when told to (``advance`` / ``set``)."""

    def __init__(self, start: datetime | None = None) -> None:
        start = start or datetime(2026, 1, 1, tzinfo=UTC)
        if start.tzinfo is None:
            raise ValueError("FixedClock needs a timezone-aware datetime")
        self._now = start.astimezone(UTC)

    def now(self) -> datetime:
        return self._now

    def set(self, when: datetime) -> None:
        if when.tzinfo is None:
            raise ValueError("FixedClock needs a timezone-aware datetime")
        self._now = when.astimezone(UTC)

    def advance(self, delta: timedelta) -> None:
        self._now += delta


class OffsetClock:
    """The system clock shifted by an offset, so real time still flows in long-running tests."""

    def __init__(self, offset: timedelta = timedelta(0)) -> None:
        self.offset = offset

    def now(self) -> datetime:
        return datetime.now(UTC) + self.offset

    def advance(self, delta: timedelta) -> None:
        self.offset += delta


class FileOffsetClock:
    """TEST ONLY: the system clock plus a number of seconds read from a file on every call.

    ``keyservice serve --clock-offset-file FILE`` lets tests against a real server process jump
    days ahead (deletion windows, rotation periods, material expiry) by writing e.g. ``864000``
    into FILE, without sleeping. A missing or unparsable file means no offset. Never use it in
    production: whoever can write the file can move the service's notion of time.
    """

    def __init__(self, path: str) -> None:
        self.path = path

    def offset(self) -> timedelta:
        try:
            with open(self.path) as handle:
                return timedelta(seconds=float(handle.read().strip() or 0))
        except (OSError, ValueError):
            return timedelta(0)

    def now(self) -> datetime:
        return datetime.now(UTC) + self.offset()
