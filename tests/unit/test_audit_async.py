"""Deferred audit commits for the event loop: no reply before its record is durable, group commit."""

from __future__ import annotations

import asyncio
import json
import os
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from keyservice.audit import commit as audit_commit
from keyservice.audit import log as audit_log
from keyservice.audit.records import audit_path, build_record, line_hash, read_records
from keyservice.context import Principal, RequestContext
from keyservice.errors import KMSInternalException

ALICE = Principal("111122223333", "arn:aws:iam::111122223333:user/alice", "AKIAALICE00000000000")
T0 = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)


def record(n: int) -> dict[str, object]:
    ctx = RequestContext(f"req-{n}", "127.0.0.1", ALICE, "test", {"path": f"/f{n}"})
    return build_record(when=T0, ctx=ctx, operation="Decrypt")


def count_fsyncs(monkeypatch: pytest.MonkeyPatch, delay: float = 0.0) -> list[int]:
    calls: list[int] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        calls.append(fd)
        time.sleep(delay)
        real(fd)

    monkeypatch.setattr(audit_log.os, "fsync", fsync)
    return calls


def test_deferred_append_returns_before_the_fsync_and_commit_makes_it_durable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = audit_log.AuditLog(tmp_path)
    calls = count_fsyncs(monkeypatch)
    with audit_commit.deferred_commits() as tickets:
        log.append(record(1))
    assert len(tickets) == 1 and calls == []
    log.append(record(2))  # outside the block: the blocking path, which covers both
    assert len(calls) == 1
    tickets[0].commit()  # already durable: no second fsync
    assert len(calls) == 1
    assert len(list(read_records(tmp_path))) == 2


def test_committer_shares_fsyncs_across_concurrent_requests(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = audit_log.AuditLog(tmp_path)
    calls = count_fsyncs(monkeypatch, delay=0.005)
    committer = audit_commit.AsyncCommitter()

    async def request(n: int) -> None:
        with audit_commit.deferred_commits() as tickets:
            log.append(record(n))
        await committer.wait(tickets)
        assert log._durable_end >= tickets[0].end  # the reply may go out now

    async def main() -> None:
        await asyncio.gather(*(request(n) for n in range(200)))

    asyncio.run(main())
    committer.close()
    assert len(list(read_records(tmp_path))) == 200
    assert len(calls) < 50, f"{len(calls)} fsyncs for 200 records: no group commit"


def test_failed_fsync_fails_every_waiting_request_and_rolls_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = audit_log.AuditLog(tmp_path)
    log.append(record(0))

    def broken(fd: int) -> None:
        raise OSError(5, "I/O error")

    monkeypatch.setattr(audit_log.os, "fsync", broken)
    committer = audit_commit.AsyncCommitter()

    async def request(n: int) -> str:
        with audit_commit.deferred_commits() as tickets:
            log.append(record(n))
        try:
            await committer.wait(tickets)
        except KMSInternalException as exc:
            return exc.message
        return "answered"

    async def main() -> list[str]:
        return list(await asyncio.gather(*(request(n) for n in range(1, 6))))

    outcomes = asyncio.run(main())
    committer.close()
    assert outcomes == ["The request could not be recorded in the audit log."] * 5
    monkeypatch.undo()
    assert [r["request_id"] for r in read_records(tmp_path)] == ["req-0"]
    log.append(record(9))  # the chain goes on from the last durable record
    assert [r["request_id"] for r in read_records(tmp_path)] == ["req-0", "req-9"]
    first, second = audit_path(tmp_path).read_bytes().splitlines()
    assert json.loads(second)["prev_hash"] == line_hash(first)


def test_submit_gives_a_future_that_is_done_once_durable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server's direct path waits through ``submit`` (a future and a callback, no coroutine)."""
    log = audit_log.AuditLog(tmp_path)
    calls = count_fsyncs(monkeypatch, delay=0.005)
    committer = audit_commit.AsyncCommitter()

    async def main() -> list[bool]:
        seen: list[bool] = []
        futures = []
        for n in range(20):
            with audit_commit.deferred_commits() as tickets:
                log.append(record(n))
            end = tickets[0].end
            future = committer.submit(tickets)
            future.add_done_callback(
                lambda f, end=end: seen.append(f.exception() is None and log._durable_end >= end)
            )
            futures.append(future)
        empty = committer.submit([])
        assert empty.done() and empty.exception() is None
        await asyncio.gather(*futures)
        return seen

    seen = asyncio.run(main())
    committer.close()
    assert seen == [True] * 20
    assert 1 <= len(calls) < 20


def test_submit_after_close_fails_closed(tmp_path: Path) -> None:
    log = audit_log.AuditLog(tmp_path)
    committer = audit_commit.AsyncCommitter()
    committer.close()

    async def main() -> BaseException | None:
        with audit_commit.deferred_commits() as tickets:
            log.append(record(1))
        future = committer.submit(tickets)
        await asyncio.sleep(0)
        return future.exception()

    error = asyncio.run(main())
    assert isinstance(error, KMSInternalException)
