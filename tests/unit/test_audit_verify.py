"""Tamper evidence of the audit log: every kind of tampering is found by ``audit_verify.verify``,
even by an attacker who recomputes the hash chain after editing (only the signing key,
which they do not have, could hide it)."""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from keyservice.audit import verify as audit_verify
from keyservice.audit.log import AuditLog
from keyservice.audit.records import (
    GENESIS_HASH,
    audit_path,
    build_record,
    head_path,
    key_fingerprint,
    line_hash,
    signed_bytes,
)
from keyservice.context import Principal, RequestContext

SIGNER = Ed25519PrivateKey.generate()
ALICE = Principal("111122223333", "arn:aws:iam::111122223333:user/alice", "AKIAALICE00000000000")
T0 = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)
EVERY = 5


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now


def write_log(
    data_dir: Path, count: int, clock: Clock | None = None, *, every: int = EVERY, close: bool = True
) -> AuditLog:
    clock = clock or Clock()
    log = AuditLog(data_dir, signer=SIGNER, checkpoint_every=every, checkpoint_seconds=60, now=clock)
    for n in range(count):
        ctx = RequestContext(f"req-{n}", "127.0.0.1", ALICE, "test", {})
        log.append(build_record(when=clock(), ctx=ctx, operation=f"Op{n}"))
    if close:
        log.close()
    return log


def lines(data_dir: Path) -> list[dict]:
    return [json.loads(line) for line in audit_path(data_dir).read_text().splitlines()]


def store(data_dir: Path, records: list[dict], *, rechain: bool) -> None:
    """Write records back; with ``rechain`` recompute every prev_hash like a careful attacker."""
    out, prev = [], GENESIS_HASH
    for record in records:
        if rechain:
            record = {**record, "prev_hash": prev}
        line = json.dumps(record, separators=(",", ":"), ensure_ascii=False).encode()
        out.append(line)
        prev = line_hash(line)
    audit_path(data_dir).write_bytes(b"".join(line + b"\n" for line in out))


def verify(data_dir: Path, **kwargs: object) -> audit_verify.VerifyReport:
    return audit_verify.verify(data_dir, SIGNER.public_key(), checkpoint_every=EVERY, now=T0, **kwargs)  # type: ignore[arg-type]


def test_intact_log_verifies(tmp_path: Path) -> None:
    write_log(tmp_path, 12)
    report = verify(tmp_path)
    assert report.ok, report.problems
    assert (report.records, report.checkpoints, report.unsealed) == (12, 3, 0)  # 5 + 5 + final 2 at close
    assert report.fingerprint == key_fingerprint(SIGNER.public_key())
    head = json.loads(head_path(tmp_path).read_text())
    assert head == lines(tmp_path)[-1] and head["seq"] == 3


def _edit(records: list[dict]) -> list[dict]:
    records[2] = {**records[2], "operation": "Nothing"}
    return records


def _delete(records: list[dict]) -> list[dict]:
    return records[:2] + records[3:]


def _reorder(records: list[dict]) -> list[dict]:
    records[1], records[2] = records[2], records[1]
    return records


def _insert(records: list[dict]) -> list[dict]:
    return records[:3] + [{**records[2], "request_id": "forged"}] + records[3:]


def _drop_checkpoint(records: list[dict]) -> list[dict]:
    return [r for r in records if r.get("seq") != 1]


def _forge_checkpoint(records: list[dict]) -> list[dict]:
    forger = Ed25519PrivateKey.generate()
    records = _edit(records)
    for n, record in enumerate(records):
        if record.get("type") == "checkpoint":
            body = {k: v for k, v in record.items() if k != "signature"}
            sig = forger.sign(signed_bytes(body))
            records[n] = {**body, "signature": base64.b64encode(sig).decode()}
    return records


@pytest.mark.parametrize("rechain", [False, True], ids=["naive", "rechained"])
@pytest.mark.parametrize(
    "tamper",
    [_edit, _delete, _reorder, _insert, _drop_checkpoint, _forge_checkpoint],
    ids=["edited", "deleted", "reordered", "inserted", "checkpoint-removed", "checkpoint-forged"],
)
def test_tampering_is_detected(
    tmp_path: Path, tamper: Callable[[list[dict]], list[dict]], rechain: bool
) -> None:
    write_log(tmp_path, 12)
    store(tmp_path, tamper(lines(tmp_path)), rechain=rechain)
    report = verify(tmp_path)
    assert not report.ok
    assert report.problems[0].startswith("line ")


def test_first_bad_record_is_named(tmp_path: Path) -> None:
    write_log(tmp_path, 12)
    records = lines(tmp_path)
    store(tmp_path, _edit(records), rechain=False)
    assert verify(tmp_path).problems[0].startswith("line 4:")  # the line after the edited one


@pytest.mark.parametrize(
    "keep", [6, 4, 0], ids=["cut-at-checkpoint-1", "cut-inside-first-segment", "emptied"]
)
def test_cut_tail_past_a_checkpoint_is_detected(tmp_path: Path, keep: int) -> None:
    write_log(tmp_path, 12)
    store(tmp_path, lines(tmp_path)[:keep], rechain=False)
    report = verify(tmp_path)
    assert not report.ok and "log cut" in report.problems[0]


def test_cut_of_unsealed_records_is_within_the_documented_window(tmp_path: Path) -> None:
    """Records after the last checkpoint can be cut unseen: at most EVERY-1 records / 60 s."""
    log = write_log(tmp_path, 7, close=False)  # checkpoint after 5; 2 unsealed
    report = verify(tmp_path)
    assert report.ok and report.unsealed == 2 and any("not sealed" in n for n in report.notes)
    log._stop.set()
    log._signer = None  # simulate a crash: no final checkpoint
    log.close()


def test_missing_checkpoint_by_count(tmp_path: Path) -> None:
    write_log(tmp_path, 12, every=10)  # written with a laxer setting than the verifier expects
    report = verify(tmp_path)
    assert not report.ok and "missing checkpoint" in report.problems[0]


def test_missing_checkpoint_by_time(tmp_path: Path) -> None:
    clock = Clock()
    log = AuditLog(tmp_path, signer=SIGNER, checkpoint_every=EVERY, checkpoint_seconds=60, now=clock)
    log._stop.set()  # the timer thread that should have sealed in time is stopped
    ctx = RequestContext("r", "127.0.0.1", ALICE, "test", {})
    log.append(build_record(when=clock(), ctx=ctx, operation="Early"))
    clock.now += timedelta(hours=1)
    log.append(build_record(when=clock(), ctx=ctx, operation="Late"))
    log.close()
    report = verify(tmp_path)
    assert not report.ok and "missing checkpoint" in report.problems[0]


def test_timer_seals_idle_records(tmp_path: Path) -> None:
    clock = Clock()
    log = AuditLog(tmp_path, signer=SIGNER, checkpoint_every=EVERY, checkpoint_seconds=0.2, now=clock)
    log.append(build_record(when=clock(), ctx=RequestContext("r", "", ALICE, "", {}), operation="One"))
    clock.now += timedelta(seconds=1)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not head_path(tmp_path).exists():
        time.sleep(0.05)
    assert head_path(tmp_path).exists(), "the timer did not write a checkpoint"
    log.close()
    assert verify(tmp_path, checkpoint_seconds=0.2).ok


def test_wrong_public_key_fails(tmp_path: Path) -> None:
    write_log(tmp_path, 3)
    report = audit_verify.verify(tmp_path, Ed25519PrivateKey.generate().public_key())
    assert not report.ok and "bad signature" in report.problems[0]


def test_head_file_rollback_and_removal(tmp_path: Path) -> None:
    write_log(tmp_path, 12)
    head_path(tmp_path).unlink()
    assert "missing" in verify(tmp_path).problems[0]


def test_concurrent_appends_never_overfill_a_checkpoint(tmp_path: Path) -> None:
    log = AuditLog(tmp_path, signer=SIGNER, checkpoint_every=EVERY, checkpoint_seconds=60, now=Clock())

    def worker(n: int) -> None:
        for i in range(25):
            log.append(
                build_record(when=T0, ctx=RequestContext(f"{n}-{i}", "", ALICE, "", {}), operation="Op")
            )

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    log.close()
    report = verify(tmp_path)
    assert report.ok, report.problems
    assert report.records == 200 and report.checkpoints == 40
