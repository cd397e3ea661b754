"""Audit review at scale (issue 17): segments, verify across them, the index, export, prune.

Real files, real SQLite, the real writer; faults are injected only where a kill or an attacker
would strike (a cursor write that never happens, rows deleted from the index, a segment removed).
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from keyservice.audit import export as audit_export
from keyservice.audit import index as audit_index
from keyservice.audit import prune as audit_prune
from keyservice.audit import questions, review, segments
from keyservice.audit import verify as audit_verify
from keyservice.audit.log import AuditLog
from keyservice.audit.records import build_record, head_path, read_records
from keyservice.context import Principal, RequestContext
from keyservice.errors import DisabledException

SIGNER = Ed25519PrivateKey.generate()
PUBLIC = SIGNER.public_key()
ALICE = Principal("111122223333", "arn:aws:iam::111122223333:user/alice", "AKIAALICE00000000000")
BOB = Principal("111122223333", "arn:aws:iam::111122223333:user/bob", "AKIABOB0000000000000")
KEY = "arn:aws:kms:us-east-1:111122223333:key/11111111-2222-3333-4444-555555555555"
OTHER_KEY = "arn:aws:kms:us-east-1:111122223333:key/99999999-2222-3333-4444-555555555555"
T0 = datetime(2026, 3, 1, 22, 0, 0, tzinfo=UTC)


class Clock:
    def __init__(self, start: datetime = T0) -> None:
        self.now = start

    def __call__(self) -> datetime:
        return self.now


def open_log(data_dir: Path, clock: Clock, **kwargs: object) -> AuditLog:
    return AuditLog(data_dir, signer=SIGNER, checkpoint_every=10, now=clock, **kwargs)  # type: ignore[arg-type]


def write(log: AuditLog, clock: Clock, count: int, *, start: int = 0, step: timedelta = timedelta(seconds=1),
          key: str = KEY, principal: Principal = ALICE, user: str = "alice", error: bool = False) -> None:
    for n in range(start, start + count):
        clock.now += step
        ctx = RequestContext(f"req-{n}", "127.0.0.1", principal, "kmsfs/test",
                             {"path": f"/docs/d{n % 3}/f{n % 7}.txt", "user": user, "pid": 42,
                              "uid": 1000 if user == "alice" else 1001, "process": "cat"})
        log.append(build_record(when=clock.now, ctx=ctx, operation="Decrypt", key_arn=key, key_version=1,
                                error=DisabledException("disabled") if error else None,
                                encryption_context={"kmsfs:file-id": f"{n % 7:032x}"}))


def report(data_dir: Path, **kwargs: object) -> audit_verify.VerifyReport:
    return audit_verify.verify(data_dir, PUBLIC, checkpoint_every=10, **kwargs)  # type: ignore[arg-type]


def sealed_ok(data_dir: Path) -> None:
    files = segments.segments(data_dir)
    for _number, path in files[:-1]:
        last = json.loads(segments.last_line(path) or b"{}")
        assert last.get("type") == "checkpoint" and last.get("segment_end") is True, path


# --------------------------------------------------------------------------- segments


def test_rotation_by_size_survives_a_restart_and_verifies(tmp_path: Path) -> None:
    clock = Clock()
    log = open_log(tmp_path, clock, segment_bytes=4000)
    write(log, clock, 25)
    log.close()
    first = segments.segments(tmp_path)
    assert len(first) >= 3
    sizes = {p: p.stat().st_size for _n, p in first[:-1]}
    log = open_log(tmp_path, clock, segment_bytes=4000)  # a restart continues the chain
    write(log, clock, 25, start=25)
    log.close()
    files = segments.segments(tmp_path)
    assert len(files) > len(first)
    assert [n for n, _p in files] == list(range(1, len(files) + 1))
    assert all(p.stat().st_size == size for p, size in sizes.items())  # sealed: never written again
    sealed_ok(tmp_path)
    assert [r["request_id"] for r in read_records(tmp_path)] == [f"req-{n}" for n in range(50)]
    result = report(tmp_path)
    assert result.ok, result.problems
    assert result.records == 50 and result.segments == len(files)


def test_rotation_at_utc_midnight(tmp_path: Path) -> None:
    clock = Clock(datetime(2026, 3, 1, 23, 59, 10, tzinfo=UTC))
    log = open_log(tmp_path, clock)
    write(log, clock, 5, step=timedelta(seconds=20))  # 23:59:30 .. 00:00:50
    log.close()
    files = segments.segments(tmp_path)
    assert len(files) == 2
    days = {p: {r["time"][:10] for r in map(json.loads, p.read_text().splitlines()) if "type" not in r}
            for _n, p in files}  # request records (the seal itself is written after midnight)
    assert days[files[0][1]] == {"2026-03-01"} and days[files[1][1]] == {"2026-03-02"}
    sealed_ok(tmp_path)
    assert report(tmp_path).ok


def test_a_single_file_log_is_migrated_and_continued(tmp_path: Path) -> None:
    clock = Clock()
    log = open_log(tmp_path, clock)
    write(log, clock, 12)
    log.close()
    # Lay it out as before segments: audit/audit.log.
    legacy = tmp_path / "audit" / "audit.log"
    os.rename(segments.segments(tmp_path)[0][1], legacy)
    os.rmdir(tmp_path / "audit" / "main")
    assert segments.segments(tmp_path) == [(1, legacy)]
    assert report(tmp_path).ok  # readable before the writer migrates it
    before = legacy.read_bytes()
    log = open_log(tmp_path, clock)
    write(log, clock, 5, start=12)
    log.close()
    assert not legacy.exists()
    moved = tmp_path / "audit" / "main" / "0000000001.log"
    assert moved.read_bytes().startswith(before)  # the same bytes, continued
    result = report(tmp_path)
    assert result.ok and result.records == 17


def test_verify_finds_a_missing_or_unsealed_segment(tmp_path: Path) -> None:
    clock = Clock()
    log = open_log(tmp_path, clock, segment_bytes=3000)
    write(log, clock, 30)
    log.close()
    files = segments.segments(tmp_path)
    assert len(files) >= 4
    middle = files[1][1]
    saved = middle.read_bytes()
    middle.unlink()
    assert "segment 2 is missing" in report(tmp_path).problems[0]
    # Cut the seal off a segment that has a successor: the chain then breaks, or the seal is missed.
    lines = saved.splitlines(keepends=True)
    middle.write_bytes(b"".join(lines[:-1]))
    assert not report(tmp_path).ok
    middle.write_bytes(saved)
    assert report(tmp_path).ok


def test_verify_since_last_checks_only_the_new_part(tmp_path: Path) -> None:
    clock = Clock()
    log = open_log(tmp_path, clock, segment_bytes=4000)
    write(log, clock, 30)
    log.close()
    full = report(tmp_path)
    assert full.ok and full.positions["main"]["seq"] >= 3
    log = open_log(tmp_path, clock, segment_bytes=4000)
    write(log, clock, 15, start=30)
    log.close()
    later = report(tmp_path, since=full.positions)
    assert later.ok, later.problems
    assert later.records == 15
    # A forged new record is found by the incremental check too.
    newest = segments.segments(tmp_path)[-1][1]
    newest.write_bytes(newest.read_bytes().replace(b"req-44", b"req-99"))
    assert not report(tmp_path, since=full.positions).ok
    # A state naming a checkpoint no longer in the log is refused, not trusted.
    bogus = {"main": {**full.positions["main"], "hash": "0" * 64}}
    assert "verify in full" in report(tmp_path, since=bogus).problems[0]


# --------------------------------------------------------------------------- index


def sample(tmp_path: Path) -> None:
    clock = Clock()
    log = open_log(tmp_path, clock, segment_bytes=5000)
    write(log, clock, 20)
    write(log, clock, 5, start=20, key=OTHER_KEY, principal=BOB, user="bob")
    clock.now += timedelta(seconds=1)
    admin = RequestContext("disable-1", "10.0.0.1", ALICE, "aws-cli", {})
    log.append(build_record(when=clock.now, ctx=admin, operation="DisableKey", key_arn=KEY,
                            requested_key_id=KEY))
    write(log, clock, 4, start=25, error=True)  # opens refused while the key is disabled
    write(log, clock, 6, start=29, key=OTHER_KEY, principal=BOB, user="bob")
    log.close()


FILTERS = [
    questions.Filters(file="/docs/d1/f3.txt"),
    questions.Filters(file="/docs/d1"),
    questions.Filters(user="bob"),
    questions.Filters(user="1000", since=T0 + timedelta(seconds=5), until=T0 + timedelta(seconds=15)),
    questions.Filters(outcome="error"),
    questions.Filters(key=KEY.rsplit("/", 1)[1]),
    questions.Filters(principal=BOB.access_key_id),
    questions.Filters(operation="disablekey"),
    questions.Filters(file_id=f"{3:032x}"),
]


def warnings() -> tuple[list[str], questions.Warn]:
    seen: list[str] = []
    return seen, seen.append


@pytest.mark.parametrize("filters", FILTERS, ids=lambda f: ",".join(k for k, v in f.as_dict().items() if v))
def test_index_answers_like_a_scan(tmp_path: Path, filters: questions.Filters) -> None:
    sample(tmp_path)
    audit_index.reindex(tmp_path)
    seen, warn = warnings()
    from_index = list(questions.query(tmp_path, filters, warn=warn))
    assert not seen
    assert from_index == list(review.query(tmp_path, **filters.as_dict()))
    assert from_index  # every filter above matches something


def test_index_follows_new_records_and_is_rebuilt_after_deletion(tmp_path: Path) -> None:
    sample(tmp_path)
    seen, warn = warnings()
    assert len(list(questions.query(tmp_path, questions.Filters(), warn=warn))) == 36
    assert not seen  # built on first use
    assert audit_index.index_path(tmp_path).exists()
    clock = Clock(T0 + timedelta(hours=1))
    log = open_log(tmp_path, clock, segment_bytes=5000)
    write(log, clock, 3, start=100)
    log.close()
    seen.clear()
    assert len(list(questions.query(tmp_path, questions.Filters(), warn=warn))) == 39  # caught up
    assert not seen
    audit_index.index_path(tmp_path).unlink()
    assert len(list(questions.query(tmp_path, questions.Filters(user="alice"), warn=warn))) == 27
    assert not seen
    assert audit_index.index_path(tmp_path).exists()


@pytest.mark.parametrize("edit", [
    "DELETE FROM rec WHERE id % 1099511627776 = 3",
    "UPDATE rec SET id = id + 1000 WHERE id % 1099511627776 = 7",
    "UPDATE chains SET hash = '" + "0" * 64 + "'",
    "INSERT INTO chains (name, first_seq, seq, segment, offset, length, hash) "
    "VALUES ('ghost', 1, 0, 0, 0, 0, '')",
])
def test_an_edited_index_is_detected_and_the_answer_comes_from_a_scan(tmp_path: Path, edit: str) -> None:
    sample(tmp_path)
    audit_index.reindex(tmp_path)
    with sqlite3.connect(audit_index.index_path(tmp_path)) as conn:
        conn.execute(edit)
    seen, warn = warnings()
    records = list(questions.query(tmp_path, questions.Filters(user="alice"), warn=warn))
    assert "does not match the log" in seen[0]
    assert records == list(review.query(tmp_path, user="alice"))  # nothing hidden
    audit_index.reindex(tmp_path)
    seen.clear()
    assert list(questions.query(tmp_path, questions.Filters(user="alice"), warn=warn)) == records
    assert not seen


SEQ = "id % 1099511627776"  # a row's sequence number (its id is chain << 40 | seq)


@pytest.mark.parametrize("edit", [
    # a row of /docs/d0/f0.txt (request 0) moved to /docs/d1/f1.txt: the question about f1 would
    # show a record of f0 if it were not checked against the question after it is read
    "UPDATE rec SET path = (SELECT id FROM strings WHERE s = '/docs/d1/f1.txt') WHERE " + SEQ + " = 1",
    # a row pointed at the record of another row of the same file (request 7 -> request 1): one
    # of the two would be hidden
    "UPDATE rec SET (seg, off, len) = (SELECT seg, off, len FROM rec WHERE " + SEQ + " = 2) WHERE "
    + SEQ + " = 8",
    # a row pointed into the middle of a line
    "UPDATE rec SET off = off + 1, len = len - 2 WHERE " + SEQ + " = 2",
    # a row pointed at a checkpoint line (the 10 records before it are alice's)
    "UPDATE rec SET off = off + len + 1 WHERE " + SEQ + " = 10",
])
def test_a_row_pointing_at_the_wrong_line_is_detected(tmp_path: Path, edit: str) -> None:
    sample(tmp_path)
    audit_index.reindex(tmp_path)
    question = questions.Filters(user="alice")
    if "strings" in edit:
        question = questions.Filters(file="/docs/d1/f1.txt")
    honest = list(questions.query(tmp_path, question, warn=warnings()[1]))
    with sqlite3.connect(audit_index.index_path(tmp_path)) as conn:
        assert conn.execute(edit).rowcount == 1
    seen, warn = warnings()
    answer = list(questions.query(tmp_path, question, warn=warn))
    assert len(seen) == 1 and "does not match the log" in seen[0], seen
    assert answer == honest == list(review.query(tmp_path, **question.as_dict()))
    lines = list(questions.query_lines(tmp_path, question, warn=warn, records=False))
    assert [json.loads(line) for line, _record in lines] == honest


def test_a_log_cut_below_the_index_is_detected(tmp_path: Path) -> None:
    sample(tmp_path)
    audit_index.reindex(tmp_path)
    newest = segments.segments(tmp_path)[-1][1]
    data = newest.read_bytes()
    newest.write_bytes(data[: data.rstrip(b"\n").rfind(b"\n") + 1])  # the last line removed
    seen, warn = warnings()
    list(questions.query(tmp_path, questions.Filters(), warn=warn))
    assert "does not match the log" in seen[0]


def test_key_timeline_principals_and_top(tmp_path: Path) -> None:
    sample(tmp_path)
    audit_index.reindex(tmp_path)
    for scan in (False, True):
        seen, warn = warnings()
        timeline = questions.key_timeline(tmp_path, KEY, warn=warn, scan=scan)
        operations = [(e["operation"], e["outcome"]) for e in timeline["events"]]
        assert operations == [("DisableKey", "success")] + [("Decrypt", "error")] * 4
        assert timeline["uses"] == 20
        principals = questions.key_principals(tmp_path, OTHER_KEY, warn=warn, scan=scan)
        assert [(p["principal"], p["requests"]) for p in principals] == [(BOB.arn, 11)]
        top = questions.top(tmp_path, 2, warn=warn, scan=scan)
        assert [u["user"] for u in top.users] == ["alice", "bob"]
        assert top.users[0]["total"] == 24 and top.users[0]["refused"] == 4
        assert len(top.files) == 2
        assert not seen


# --------------------------------------------------------------------------- export


def exported_ids(path: Path) -> list[tuple[str, int]]:
    return [(r["chain"], r["seq"]) for r in map(json.loads, path.read_text().splitlines())]


def test_export_resumes_after_a_kill_between_output_and_cursor(tmp_path: Path, monkeypatch) -> None:
    data = tmp_path / "data"
    sample(data)
    out, cursor = tmp_path / "out.jsonl", tmp_path / "cursor.json"
    monkeypatch.setattr(audit_export, "_BATCH", 7)
    saves = {"n": 0}
    real_save = audit_export.Cursor.save

    def dies_on_third_save(self: audit_export.Cursor, path: Path) -> None:
        saves["n"] += 1
        if saves["n"] == 3:
            raise KeyboardInterrupt  # the process is gone: lines written, cursor not moved
        real_save(self, path)

    monkeypatch.setattr(audit_export.Cursor, "save", dies_on_third_save)
    with pytest.raises(KeyboardInterrupt), out.open("ab") as f:
        audit_export.export(data, f, cursor_path=cursor)
    assert len(exported_ids(out)) == 21  # 14 behind the cursor, 7 ahead of it
    monkeypatch.setattr(audit_export.Cursor, "save", real_save)
    with out.open("ab") as f:
        assert audit_export.export(data, f, cursor_path=cursor) == 36 - 14
    assert exported_ids(out) == [("main", n) for n in range(1, 37)]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["request_id"] for r in records] == [r["request_id"] for r in read_records(data)]
    # New records later: only they are exported.
    clock = Clock(T0 + timedelta(hours=2))
    log = open_log(data, clock, segment_bytes=5000)
    write(log, clock, 3, start=200)
    log.close()
    with out.open("ab") as f:
        assert audit_export.export(data, f, cursor_path=cursor) == 3
    assert exported_ids(out) == [("main", n) for n in range(1, 40)]


def test_export_killed_with_sigkill_loses_and_repeats_nothing(tmp_path: Path) -> None:
    data = tmp_path / "data"
    clock = Clock()
    log = open_log(data, clock, segment_bytes=200_000)
    write(log, clock, 3000, step=timedelta(milliseconds=10))
    log.close()
    out, cursor = tmp_path / "out.jsonl", tmp_path / "cursor.json"
    command = [sys.executable, "-m", "keyservice", "audit", "export", "--data-dir", str(data),
               "--output", str(out), "--cursor", str(cursor), "--follow"]
    child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (out.exists() and out.stat().st_size > 0):
            time.sleep(0.01)
        clock.now += timedelta(seconds=1)
        log = open_log(data, clock, segment_bytes=200_000)
        write(log, clock, 500, start=3000, step=timedelta(milliseconds=10))
        log.close()
        time.sleep(0.2)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    subprocess.run(command[:-1], check=True, timeout=120)  # resume, without --follow
    assert exported_ids(out) == [("main", n) for n in range(1, 3501)]


def test_export_since_skips_older_records(tmp_path: Path) -> None:
    sample(tmp_path)
    out = tmp_path / "out.jsonl"
    with out.open("ab") as f:
        audit_export.export(tmp_path, f, since=T0 + timedelta(seconds=30))
    times = [json.loads(line)["time"] for line in out.read_text().splitlines()]
    assert times and all(t >= "2026-03-01T22:00:30" for t in times)


# --------------------------------------------------------------------------- prune


def test_prune_removes_sealed_segments_and_verify_proves_the_rest(tmp_path: Path) -> None:
    clock = Clock()
    log = open_log(tmp_path, clock, segment_bytes=3000)
    write(log, clock, 40, step=timedelta(seconds=5))
    log.close()
    files = segments.segments(tmp_path)
    assert len(files) >= 5
    cut = T0 + timedelta(seconds=100)
    with pytest.raises(audit_prune.PruneRefused, match="not exported"):
        audit_prune.prune(tmp_path, SIGNER, cut)
    assert segments.segments(tmp_path) == files  # refused: nothing removed
    cursor = tmp_path / "cursor.json"
    with (tmp_path / "out.jsonl").open("ab") as f:
        audit_export.export(tmp_path, f, cursor_path=cursor)
    audit_index.reindex(tmp_path)
    exported = audit_export.Cursor.load(cursor).chains["main"]
    result = audit_prune.prune(tmp_path, SIGNER, cut, exported=exported)
    assert result.removed and result.record is not None
    assert all(not p.exists() for p in result.removed)
    assert audit_index.index_path(tmp_path).exists()
    remaining = segments.segments(tmp_path)
    assert remaining[0][0] == result.record["through_segment"] + 1
    checked = report(tmp_path)
    assert checked.ok, checked.problems
    assert checked.records + result.record["records"] == 40
    assert any("were pruned" in note for note in checked.notes)
    # An index built before the prune is not used (its rows of pruned records point nowhere);
    # rebuilt, it starts after the pruned part.
    seen, warn = warnings()
    assert len(list(questions.query(tmp_path, questions.Filters(), warn=warn))) == checked.records
    assert "were pruned after they were indexed" in seen[0]
    audit_index.reindex(tmp_path)
    seen.clear()
    assert len(list(questions.query(tmp_path, questions.Filters(), warn=warn))) == checked.records
    assert not seen
    # Removing one segment more than the record names breaks the chain.
    remaining[0][1].unlink()
    assert not report(tmp_path).ok


def test_prune_never_touches_the_open_segment_and_the_record_is_signed(tmp_path: Path) -> None:
    clock = Clock()
    log = open_log(tmp_path, clock, segment_bytes=3000)
    write(log, clock, 40, step=timedelta(seconds=5))
    log.close()
    newest = segments.segments(tmp_path)[-1]
    result = audit_prune.prune(tmp_path, SIGNER, T0 + timedelta(days=365), force=True)
    assert segments.segments(tmp_path) == [newest]
    assert result.record is not None
    record = json.loads(audit_prune.prune_path(tmp_path).read_text())
    record["records"] -= 1  # tampering with the prune record
    audit_prune.prune_path(tmp_path).write_text(json.dumps(record))
    assert "bad signature" in report(tmp_path).problems[0]


def test_head_of_another_chain_is_kept_apart(tmp_path: Path) -> None:
    clock = Clock()
    for chain in ("main", "node1:0"):
        log = AuditLog(tmp_path, signer=SIGNER, checkpoint_every=10, now=clock, chain=chain)
        write(log, clock, 12)
        log.close()
    assert head_path(tmp_path).exists() and head_path(tmp_path, "node1:0").exists()
    result = report(tmp_path)
    assert result.ok and result.records == 24
    times = [r["time"] for r in read_records(tmp_path)]
    assert times == sorted(times)  # merged by time
    audit_index.reindex(tmp_path)
    seen, warn = warnings()
    assert len(list(questions.query(tmp_path, questions.Filters(), warn=warn))) == 24
    assert not seen


@pytest.mark.parametrize("period", [
    (None, None),
    (datetime(2026, 3, 2, tzinfo=UTC), None),  # "today": whole days from the daily summary
    (datetime(2026, 3, 1, 13, tzinfo=UTC), None),  # hours at the start, then whole days
    (None, datetime(2026, 3, 3, 7, tzinfo=UTC)),  # whole days, then hours at the end
    (datetime(2026, 3, 1, 5, tzinfo=UTC), datetime(2026, 3, 1, 9, tzinfo=UTC)),  # inside one day
    (datetime(2026, 3, 1, 20, tzinfo=UTC), datetime(2026, 3, 3, 2, tzinfo=UTC)),  # hours, a day, hours
])
@pytest.mark.parametrize("catch_up", [False, True], ids=["reindex", "caught-up-in-steps"])
def test_top_over_days_and_hours_counts_like_a_scan(tmp_path: Path, period: tuple, catch_up: bool) -> None:
    clock = Clock(datetime(2026, 3, 1, 0, 0, 30, tzinfo=UTC))
    log = AuditLog(tmp_path, signer=SIGNER, checkpoint_every=10, now=clock)
    for n in range(3 * 24 * 3):  # three records an hour for three days
        clock.now += timedelta(minutes=20)
        user = ("alice", "bob", "carol")[n % 3]
        ctx = RequestContext(f"r{n}", "127.0.0.1", ALICE, "kmsfs/test",
                             {"path": f"/p/f{(n * 7) % 11}", "uid": 1000 + n % 3, "user": user})
        log.append(build_record(when=clock.now, ctx=ctx, operation="Decrypt", key_arn=KEY, key_version=1))
        log.checkpoint()
        if catch_up and n % 50 == 0:
            audit_index.update(tmp_path) if audit_index.index_path(tmp_path).exists() else \
                audit_index.reindex(tmp_path)
    log.close()
    if catch_up:  # another chain's records, behind: hours already summed get them too
        late = Clock(datetime(2026, 3, 1, 3, 0, 30, tzinfo=UTC))
        other = AuditLog(tmp_path, signer=SIGNER, checkpoint_every=10, now=late, chain="n1:w1")
        for n in range(30):
            late.now += timedelta(hours=1)
            ctx = RequestContext(f"late{n}", "127.0.0.1", ALICE, "kmsfs/test",
                                 {"path": "/p/late", "user": "dave"})
            other.append(build_record(when=late.now, ctx=ctx, operation="Decrypt", key_arn=KEY))
        other.close()
        audit_index.update(tmp_path)
    else:
        audit_index.reindex(tmp_path)
    since, until = period
    seen, warn = warnings()
    indexed = questions.top(tmp_path, 20, since=since, until=until, warn=warn)
    scanned = questions.top(tmp_path, 20, since=since, until=until, warn=warn, scan=True)
    assert not seen
    for got, want in ((indexed.files, scanned.files), (indexed.users, scanned.users)):
        assert sorted((r.get("path") or r.get("user"), r["total"]) for r in got) == \
            sorted((r.get("path") or r.get("user"), r["total"]) for r in want)


def test_intent_records_are_not_indexed_and_not_answered(tmp_path: Path) -> None:
    clock = Clock()
    log = open_log(tmp_path, clock)
    write(log, clock, 3)
    admin = RequestContext("disable-1", "10.0.0.1", ALICE, "aws-cli", {})
    intent = build_record(when=clock.now, ctx=admin, operation="DisableKey", key_arn=KEY)
    intent["outcome"] = "intent"  # the write-ahead line before the store changes
    log.append(intent)
    log.append(build_record(when=clock.now, ctx=admin, operation="DisableKey", key_arn=KEY))
    write(log, clock, 2, start=3)
    log.close()
    seen, warn = warnings()
    answered = list(questions.query(tmp_path, questions.Filters(operation="DisableKey"), warn=warn))
    assert [r["outcome"] for r in answered] == ["success"] and not seen
    assert len(list(questions.query(tmp_path, questions.Filters(), warn=warn))) == 6
    assert questions.key_timeline(tmp_path, KEY, warn=warn)["events"] == answered
    assert not seen


def test_an_index_of_an_older_format_is_rebuilt_on_first_use(tmp_path: Path) -> None:
    sample(tmp_path)
    audit_index.reindex(tmp_path)
    with sqlite3.connect(audit_index.index_path(tmp_path)) as conn:
        conn.execute("UPDATE meta SET v = '2' WHERE k = 'version'")
    seen, warn = warnings()
    answer = list(questions.query(tmp_path, questions.Filters(user="bob"), warn=warn))
    assert not seen and answer == list(review.query(tmp_path, user="bob"))
    with sqlite3.connect(audit_index.index_path(tmp_path)) as conn:
        (version,) = conn.execute("SELECT v FROM meta WHERE k = 'version'").fetchone()
    assert version == str(audit_index.INDEX_VERSION)
