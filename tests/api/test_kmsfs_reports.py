"""KmsfsReportAccess (the kmsfs extension operation for directory-key mode), in-process: one audit
record per reported access, authorization on the master key under each directory's context,
refusal for a disabled key, and strict validation (every refusal audited)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from keyservice import errors
from keyservice.audit import index as audit_index
from keyservice.audit import questions, review
from keyservice.audit.records import read_records
from keyservice.context import RequestContext
from tests.api.test_authorization import T0, World, key_policy

CIPHERDIR = "ab" * 16
DIR_A, DIR_B = "0a" * 16, "0b" * 16


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    w = World(tmp_path)
    yield w
    w.service.close()


def _report(dir_id: str = DIR_A, **changes: Any) -> dict[str, Any]:
    return {"Operation": "open", "Path": "/docs/a.txt", "Uid": 1000, "User": "alice", "Gid": 1000,
            "Pid": 4242, "Process": "cat", "Time": T0.timestamp() - 3.5, "FileId": "11" * 16,
            "DirectoryId": dir_id} | changes


def _records(world: World) -> list[dict[str, Any]]:
    return list(read_records(world.data_dir))


def test_one_record_per_reported_access(world: World) -> None:
    key = world.key()
    reports = [_report(), _report(DIR_B, Operation="create", Path="/b/new.txt")]
    assert world.admin.call("KmsfsReportAccess", {"KeyId": key, "CipherdirId": CIPHERDIR,
                                                  "Reports": reports}) == {"KeyId": key, "Recorded": 2}
    records = _records(world)
    batch = records[-1]
    assert batch["operation"] == "KmsfsReportAccess" and batch["outcome"] == "success"
    assert batch["caller"]["keyservice"]["reports"] == 2
    opened, created = records[-3], records[-2]
    assert opened["operation"] == "KmsfsReportedOpen" and created["operation"] == "KmsfsReportedCreate"
    assert opened["key_id"] == key and opened["principal"] == batch["principal"]
    assert opened["encryption_context"] == {"kmsfs:purpose": "directory", "kmsfs:cipherdir": CIPHERDIR,
                                            "kmsfs:directory-id": DIR_A}
    caller = opened["caller"]
    assert (caller["path"], caller["uid"], caller["user"], caller["pid"], caller["process"]) == (
        "/docs/a.txt", 1000, "alice", 4242, "cat")
    assert caller["accessed_at"] == datetime.fromtimestamp(T0.timestamp() - 3.5, UTC).strftime(
        "%Y-%m-%dT%H:%M:%S.500Z")
    assert caller["reported_by"] == "mount" and caller["authorized_by"] == "directory-key"
    assert caller["report_batch"] == batch["caller"]["keyservice"]["report_batch"]
    assert created["caller"]["path"] == "/b/new.txt"


def test_an_empty_batch_is_a_probe(world: World) -> None:
    key = world.key()
    assert world.admin.call("KmsfsReportAccess", {"KeyId": key, "CipherdirId": CIPHERDIR,
                                                  "Reports": []})["Recorded"] == 0


def test_disabled_key_refuses_reports(world: World) -> None:
    key = world.key()
    world.admin.call("DisableKey", {"KeyId": key})
    with pytest.raises(errors.DisabledException):
        world.admin.call("KmsfsReportAccess",
                         {"KeyId": key, "CipherdirId": CIPHERDIR, "Reports": [_report()]})
    assert not [r for r in _records(world) if r["operation"] == "KmsfsReportedOpen"]
    assert _records(world)[-1]["outcome"] == "error"


def test_reporter_needs_decrypt_under_each_directory_context(world: World) -> None:
    """Bob may Decrypt only under directory A's context: a batch naming B is refused whole."""
    key = world.key(Policy=key_policy({
        "Effect": "Allow", "Principal": {"AWS": world.bob_arn}, "Action": "kms:Decrypt", "Resource": "*",
        "Condition": {"StringEquals": {"kms:EncryptionContext:kmsfs:directory-id": DIR_A}}}))
    assert world.bob.call("KmsfsReportAccess", {"KeyId": key, "CipherdirId": CIPHERDIR,
                                                "Reports": [_report()]})["Recorded"] == 1
    world.bob.denied("KmsfsReportAccess", {"KeyId": key, "CipherdirId": CIPHERDIR,
                                           "Reports": [_report(), _report(DIR_B)]})
    assert sum(r["operation"] == "KmsfsReportedOpen" for r in _records(world)) == 1


@pytest.mark.parametrize("params", [
    {"CipherdirId": "XY" * 16, "Reports": []},
    {"CipherdirId": CIPHERDIR, "Reports": {}},
    {"CipherdirId": CIPHERDIR, "Reports": [_report() for _ in range(1001)]},
    {"CipherdirId": CIPHERDIR, "Reports": [_report(Operation="delete")]},
    {"CipherdirId": CIPHERDIR, "Reports": [_report(Time="yesterday")]},
    {"CipherdirId": CIPHERDIR, "Reports": [_report(Time=T0.timestamp() + 3600)]},
    {"CipherdirId": CIPHERDIR, "Reports": [_report(Time=float("nan"))]},
    {"CipherdirId": CIPHERDIR, "Reports": [_report(FileId="zz")]},
    {"CipherdirId": CIPHERDIR, "Reports": [_report(Path="x" * 5000)]},
    {"CipherdirId": CIPHERDIR, "Reports": [_report(Uid=True)]},
    {"CipherdirId": CIPHERDIR, "Reports": ["not an object"]},
])
def test_malformed_reports_are_refused_and_audited(world: World, params: dict[str, Any]) -> None:
    key = world.key()
    with pytest.raises(errors.ValidationException):
        world.admin.call("KmsfsReportAccess", {"KeyId": key, **params})
    last = _records(world)[-1]
    assert last["operation"] == "KmsfsReportAccess" and last["error_code"] == "ValidationException"
    assert not [r for r in _records(world) if r["operation"] == "KmsfsReportedOpen"]


def test_reported_records_carry_the_unix_socket_peer(world: World) -> None:
    """Over the Unix socket the batch's peer (SO_PEERCRED) is on every reported record too: the
    mount that reported is known by the kernel, not only by what it says."""
    key = world.key()
    peer = {"uid": 0, "gid": 0, "pid": 31337, "comm": "kmsfs"}
    ctx = RequestContext("r", "unix:/run/keyservice.sock", world.admin.principal, peer=peer)
    world.service.call("KmsfsReportAccess", {"KeyId": key, "CipherdirId": CIPHERDIR,
                                             "Reports": [_report()]}, ctx)
    reported, batch = _records(world)[-2:]
    assert reported["operation"] == "KmsfsReportedOpen" and reported["peer"] == peer
    assert batch["peer"] == peer
    world.admin.call("KmsfsReportAccess", {"KeyId": key, "CipherdirId": CIPHERDIR, "Reports": [_report()]})
    assert "peer" not in _records(world)[-2]  # TCP: no peer field, as on every other record


def test_reported_accesses_count_as_opens_and_creates_in_every_summary(world: World) -> None:
    """`audit files` and `--top` (index and scan) and the key timeline count a directory-key
    mount's reported opens and creates like strict mode's Decrypt and GenerateDataKey."""
    key = world.key()
    reports = [_report(), _report(Time=T0.timestamp() - 2), _report(Operation="truncate"),
               _report(Operation="create", Path="/docs/b.txt")]
    world.admin.call("KmsfsReportAccess", {"KeyId": key, "CipherdirId": CIPHERDIR, "Reports": reports})
    rows = {r["path"]: r for r in review.files_summary(read_records(world.data_dir))}
    assert (rows["/docs/a.txt"]["opens"], rows["/docs/a.txt"]["created"]) == (3, 0)
    assert (rows["/docs/b.txt"]["opens"], rows["/docs/b.txt"]["created"]) == (0, 1)
    audit_index.reindex(world.data_dir)
    seen: list[str] = []
    for scan in (False, True):
        top = questions.top(world.data_dir, 5, warn=seen.append, scan=scan)
        got = {r["path"]: (r["opens"], r["created"]) for r in top.files}
        assert got == {"/docs/a.txt": (3, 0), "/docs/b.txt": (0, 1)}, scan
        timeline = questions.key_timeline(world.data_dir, key, warn=seen.append, scan=scan)
        assert timeline["uses"] == 4, scan  # the four reported uses of the key are counted
    assert not seen
