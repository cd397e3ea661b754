"""The audit log: durable appends, fail-closed writes, offline queries, partial lines, hash chain."""

from __future__ import annotations

import json
import os
import stat
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from keyservice.audit import log as audit_log
from keyservice.audit import review as audit_review
from keyservice.audit import verify as audit_verify
from keyservice.audit.records import FIELDS, build_record
from keyservice.context import Principal, RequestContext
from keyservice.errors import KMSInternalException, NotFoundException

SIGNER = Ed25519PrivateKey.generate()
T0 = datetime(2026, 3, 1, 12, 0, 0, 123000, tzinfo=UTC)
KEY_A = "arn:aws:kms:us-east-1:111122223333:key/aaaaaaaa-0000-4000-8000-000000000001"
KEY_B = "arn:aws:kms:us-east-1:111122223333:key/bbbbbbbb-0000-4000-8000-000000000002"
ALICE = Principal("111122223333", "arn:aws:iam::111122223333:user/alice", "AKIAALICE00000000000")
BOB = Principal("111122223333", "arn:aws:iam::111122223333:user/bob", "AKIABOB0000000000000")


def ctx(principal: Principal | None = ALICE, path: str | None = None) -> RequestContext:
    caller: dict[str, object] = (
        {} if path is None else {"path": path, "uid": 1000, "pid": 42, "process": "cat"}
    )
    return RequestContext("req-1", "127.0.0.1", principal, "test-agent", caller)


def write_sample(data_dir: Path) -> None:
    log = audit_log.AuditLog(data_dir)
    log.append(build_record(when=T0, ctx=ctx(), operation="CreateKey", key_arn=KEY_A, key_version=1))
    log.append(
        build_record(
            when=T0 + timedelta(minutes=1),
            ctx=ctx(path="/docs/report.txt"),
            operation="Decrypt",
            key_arn=KEY_A,
            key_version=1,
            encryption_context={"kmsfs:file": "f1"},
        )
    )
    log.append(
        build_record(
            when=T0 + timedelta(minutes=2),
            ctx=ctx(BOB, path="/docs/sub/x"),
            operation="Encrypt",
            key_arn=KEY_B,
            requested_key_id="alias/bob",
            alias_name="alias/bob",
            error=NotFoundException("nope"),
        )
    )
    log.append(
        build_record(
            when=T0 + timedelta(minutes=3),
            ctx=ctx(None),
            operation="ListKeys",
            error=NotFoundException("refused"),
        )
    )
    log.close()


def test_record_fields_and_file_modes(tmp_path: Path) -> None:
    write_sample(tmp_path)
    path = tmp_path / "audit" / "audit.log"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    lines = path.read_text().splitlines()
    assert len(lines) == 4
    first = json.loads(lines[0])
    assert list(first) == list(FIELDS)
    assert first["time"] == "2026-03-01T12:00:00.123Z"
    assert first["outcome"] == "success" and first["error_code"] is None
    assert first["principal"] == ALICE.arn and first["access_key_id"] == ALICE.access_key_id
    assert first["caller"] is None
    third = json.loads(lines[2])
    assert third["outcome"] == "error" and third["error_code"] == "NotFoundException"
    assert third["error_message"] == "nope"
    assert third["caller"] == {"path": "/docs/sub/x", "uid": 1000, "pid": 42, "process": "cat"}
    fourth = json.loads(lines[3])
    assert fourth["principal"] is None and fourth["access_key_id"] is None


def test_every_append_is_fsynced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log = audit_log.AuditLog(tmp_path)
    calls: list[int] = []
    real = os.fsync
    monkeypatch.setattr(audit_log.os, "fsync", lambda fd: (calls.append(fd), real(fd)))
    log.append(build_record(when=T0, ctx=ctx(), operation="ListKeys"))
    log.append(build_record(when=T0, ctx=ctx(), operation="ListKeys"))
    assert len(calls) == 2
    log.close()


def test_write_failure_fails_closed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log = audit_log.AuditLog(tmp_path)

    def broken(fd: int) -> None:
        raise OSError(5, "EIO")

    monkeypatch.setattr(audit_log.os, "fsync", broken)
    with pytest.raises(KMSInternalException):
        log.append(build_record(when=T0, ctx=ctx(), operation="ListKeys"))
    log.close()


def test_query_filters(tmp_path: Path) -> None:
    write_sample(tmp_path)

    def ops(**kw: object) -> list[str]:
        return [r["operation"] for r in audit_review.query(tmp_path, **kw)]  # type: ignore[arg-type]

    assert ops() == ["CreateKey", "Decrypt", "Encrypt", "ListKeys"]
    assert ops(key=KEY_A) == ["CreateKey", "Decrypt"]
    assert ops(key=KEY_A.rsplit("/", 1)[1]) == ["CreateKey", "Decrypt"]
    assert ops(key="alias/bob") == ["Encrypt"]
    assert ops(key="arn:aws:kms:us-east-1:111122223333:alias/bob") == ["Encrypt"]
    assert ops(operation="decrypt") == ["Decrypt"]
    assert ops(since=T0 + timedelta(minutes=1)) == ["Decrypt", "Encrypt", "ListKeys"]
    assert ops(until=T0 + timedelta(minutes=1)) == ["CreateKey"]
    assert ops(file="/docs/report.txt") == ["Decrypt"]
    assert ops(file="/docs") == ["Decrypt", "Encrypt"]
    assert ops(file="/docs/") == ["Decrypt", "Encrypt"]
    assert ops(file="/doc") == []
    assert ops(principal=BOB.arn) == ["Encrypt"]
    assert ops(principal=ALICE.access_key_id) == ["CreateKey", "Decrypt"]
    assert ops(key=KEY_A, operation="Decrypt", file="/docs") == ["Decrypt"]


def test_partial_last_line_is_tolerated_and_dropped(tmp_path: Path) -> None:
    write_sample(tmp_path)
    path = tmp_path / "audit" / "audit.log"
    with path.open("ab") as f:
        f.write(b'{"version":1,"time":"2026-03-01T12:')
    assert len(list(audit_review.query(tmp_path))) == 4
    # A restarted writer drops the torn fragment (its request was never answered) and continues.
    log = audit_log.AuditLog(tmp_path, signer=SIGNER, now=lambda: T0)
    log.append(build_record(when=T0, ctx=ctx(), operation="GenerateRandom"))
    log.close()
    assert [r["operation"] for r in audit_review.query(tmp_path)][-1] == "GenerateRandom"
    assert b'"2026-03-01T12:\n' not in path.read_bytes()
    report = verify(tmp_path)
    assert report.ok, report.problems
    assert any("late" in note for note in report.notes)  # the 4 records were sealed by recovery


def test_concurrent_appends_stay_whole(tmp_path: Path) -> None:
    log = audit_log.AuditLog(tmp_path)

    def worker(n: int) -> None:
        for i in range(25):
            log.append(build_record(when=T0, ctx=ctx(), operation=f"Op{n}-{i}"))

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    log.close()
    assert len(list(audit_review.query(tmp_path))) == 100


def test_format_table(tmp_path: Path) -> None:
    write_sample(tmp_path)
    table = audit_review.format_table(audit_review.query(tmp_path))
    lines = table.splitlines()
    assert lines[0].split() == [
        "TIME",
        "OPERATION",
        "OUTCOME",
        "PRINCIPAL",
        "KEY",
        "FILE",
        "PROCESS",
        "ERROR",
    ]
    assert len(lines) == 5
    assert "/docs/report.txt" in lines[2] and "pid=42" in lines[2] and "cat" in lines[2]
    assert "aaaaaaaa-0000-4000-8000-000000000001:v1" in lines[2]
    assert "NotFoundException" in lines[3]


def test_parse_time() -> None:
    assert audit_review.parse_time("2026-03-01T12:00:00Z") == datetime(2026, 3, 1, 12, tzinfo=UTC)
    assert audit_review.parse_time("2026-03-01") == datetime(2026, 3, 1, tzinfo=UTC)
    assert audit_review.parse_time("2h", now=T0) == T0 - timedelta(hours=2)
    assert audit_review.parse_time("30m", now=T0) == T0 - timedelta(minutes=30)
    with pytest.raises(ValueError):
        audit_review.parse_time("last tuesday")


def test_parse_time_today_yesterday_utc_and_local(monkeypatch: pytest.MonkeyPatch) -> None:
    now = datetime(2026, 3, 1, 1, 30, tzinfo=UTC)
    assert audit_review.parse_time("today", now=now) == datetime(2026, 3, 1, tzinfo=UTC)
    assert audit_review.parse_time("Yesterday", now=now) == datetime(2026, 2, 28, tzinfo=UTC)
    # In a zone 5 h behind UTC, 01:30 UTC is 20:30 the day before: local midnights are 05:00 UTC.
    monkeypatch.setenv("TZ", "EST+5")
    time.tzset()
    try:
        assert audit_review.parse_time("today", now=now, local=True) == datetime(2026, 2, 28, 5, tzinfo=UTC)
        yesterday = audit_review.parse_time("yesterday", now=now, local=True)
        assert yesterday == datetime(2026, 2, 27, 5, tzinfo=UTC)
        assert audit_review.parse_time("2026-03-01T00:00", local=True) == datetime(2026, 3, 1, 5, tzinfo=UTC)
        assert audit_review.display_time("2026-03-01T05:00:00Z", local=True) == "2026-03-01T00:00:00-05:00"
        assert audit_review.display_time("2026-03-01T05:00:00Z", local=False) == "2026-03-01T05:00:00Z"
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()


def test_unparsable_lines_are_reported(tmp_path: Path) -> None:
    from keyservice.audit.records import audit_path

    path = audit_path(tmp_path)
    path.parent.mkdir(parents=True)
    path.write_text('{"operation": "Decrypt", "time": "2026-03-01T00:00:00Z"}\nnot json\n[1]\n'
                    '{"operation": "Encrypt", "time": "2026-03-01T00:00:01Z"}\n')
    unparsable: list[int] = []
    records = list(audit_review.query(tmp_path, unparsable=unparsable))
    assert [r["operation"] for r in records] == ["Decrypt", "Encrypt"] and unparsable == [2, 3]


def test_missing_log_reads_empty(tmp_path: Path) -> None:
    assert list(audit_review.query(tmp_path)) == []


def verify(data_dir: Path, **kwargs: object) -> audit_verify.VerifyReport:
    return audit_verify.verify(data_dir, SIGNER.public_key(), **kwargs)  # type: ignore[arg-type]


def test_group_commit_shares_fsyncs_and_keeps_every_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = audit_log.AuditLog(tmp_path, signer=SIGNER, checkpoint_every=1000, now=lambda: T0)
    calls: list[int] = []
    real = os.fsync

    def slow_fsync(fd: int) -> None:
        calls.append(fd)
        time.sleep(0.01)
        real(fd)

    monkeypatch.setattr(audit_log.os, "fsync", slow_fsync)

    def worker(n: int) -> None:
        for i in range(20):
            log.append(build_record(when=T0, ctx=ctx(), operation=f"Op{n}-{i}"))

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    log.close()
    assert len(list(audit_review.query(tmp_path))) == 160
    assert len(calls) < 120, f"{len(calls)} fsyncs for 160 records: no group commit"
    assert verify(tmp_path, checkpoint_every=1000).ok


def test_failed_fsync_rolls_back_unsynced_records(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log = audit_log.AuditLog(tmp_path, signer=SIGNER, now=lambda: T0)
    log.append(build_record(when=T0, ctx=ctx(), operation="Kept"))
    real = os.fsync
    monkeypatch.setattr(audit_log.os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(5, "EIO")))
    with pytest.raises(KMSInternalException):
        log.append(build_record(when=T0, ctx=ctx(), operation="Lost"))
    monkeypatch.setattr(audit_log.os, "fsync", real)
    log.append(build_record(when=T0, ctx=ctx(), operation="After"))
    log.close()
    assert [r["operation"] for r in audit_review.query(tmp_path)] == ["Kept", "After"]
    assert verify(tmp_path).ok


def test_files_summary_counts_pooled_creates_as_created(tmp_path: Path) -> None:
    """A pooled create is two records: the pool's GenerateDataKey (no path) and the create's claim
    (a Decrypt with the path and ``op: create``); they join by file id, and the claim is a create,
    not an open."""
    log = audit_log.AuditLog(tmp_path)
    pooled_ctx = RequestContext("r1", "127.0.0.1", ALICE, "kmsfs", {"pool": True, "uid": 0, "pid": 9,
                                                                     "process": "kmsfs"})
    tar = {"path": "/t/a.py", "uid": 1000, "user": "alice", "pid": 42, "process": "tar"}
    cat = {**tar, "pid": 43, "process": "cat"}
    records = [
        (pooled_ctx, "GenerateDataKey", "f1", None),
        (RequestContext("r2", "127.0.0.1", ALICE, "kmsfs", {**tar, "op": "create"}), "Decrypt", "f1", None),
        (RequestContext("r3", "127.0.0.1", ALICE, "kmsfs", {**tar, "op": "create"}), "Decrypt", "f1", None),
        (RequestContext("r4", "127.0.0.1", ALICE, "kmsfs", cat), "Decrypt", "f1", None),
        (RequestContext("r5", "127.0.0.1", ALICE, "kmsfs", {**tar, "path": "/t/b.py"}), "GenerateDataKey",
         "f2", None),
        (RequestContext("r6", "127.0.0.1", ALICE, "kmsfs", {**tar, "path": "/t/c.py", "op": "create"}),
         "Decrypt", "f3", NotFoundException("disabled")),
    ]
    for n, (context, operation, file_id, error) in enumerate(records):
        log.append(build_record(when=T0 + timedelta(seconds=n), ctx=context, operation=operation,
                                      key_arn=KEY_A, key_version=1, error=error,
                                      encryption_context={"kmsfs:file-id": file_id}))
    log.close()
    rows = {r["path"]: r for r in audit_review.files_summary(audit_review.query(tmp_path))}
    assert set(rows) == {"/t/a.py", "/t/b.py", "/t/c.py"}  # the pool's record has no path: no row
    a = rows["/t/a.py"]
    assert (a["created"], a["opens"], a["denied"], a["user"], a["processes"]) == (1, 1, 0, "alice",
                                                                                ["tar", "cat"])
    assert (rows["/t/b.py"]["created"], rows["/t/b.py"]["opens"]) == (1, 0)  # a direct create
    assert (rows["/t/c.py"]["created"], rows["/t/c.py"]["denied"]) == (0, 1)  # a refused claim
    joined = [r["request_id"] for r in audit_review.query(tmp_path, file_id="F1")]
    assert joined == ["r1", "r2", "r3", "r4"]  # the pooled GenerateDataKey joins its file
    table = audit_review.format_files(audit_review.files_summary(audit_review.query(tmp_path)))
    assert "PROCESS" in table.splitlines()[0] and "tar,cat" in table
