"""Several audit chains (one per worker) and the signed digest over their heads: a whole chain
deleted, or rolled back together with its head file, is detected; records merge by time."""

from __future__ import annotations

import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from keyservice.audit import digest
from keyservice.audit.log import AuditLog
from keyservice.audit.records import audit_path, build_record, chains, head_path, read_records
from keyservice.audit.verify import verify
from keyservice.context import Principal, RequestContext

SIGNER = Ed25519PrivateKey.generate()
ALICE = Principal("111122223333", "arn:aws:iam::111122223333:user/alice", "AKIAALICE00000000000")
T0 = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)


def _write(data_dir: Path, chain: str, times: list[int]) -> None:
    log = AuditLog(
        data_dir, signer=SIGNER, checkpoint_every=3, checkpoint_seconds=60, chain=chain,
        now=lambda: T0 + timedelta(seconds=max(times) + 1),
    )  # fmt: skip
    for n in times:
        ctx = RequestContext(f"{chain}-{n}", "127.0.0.1", ALICE, "test", {})
        log.append(build_record(when=T0 + timedelta(seconds=n), ctx=ctx, operation="Decrypt"))
    log.close()


def _two_chains(tmp_path: Path) -> None:
    _write(tmp_path, "node1:w0", [0, 2, 4, 6])
    _write(tmp_path, "node1:w1", [1, 3, 5])


def test_each_worker_writes_its_own_chain_and_readers_merge_them_by_time(tmp_path: Path) -> None:
    _two_chains(tmp_path)
    assert chains(tmp_path) == ["node1:w0", "node1:w1"]
    assert audit_path(tmp_path, "node1:w0") == tmp_path / "audit" / "node1:w0" / "0000000001.log"
    for chain in chains(tmp_path):
        report = verify(tmp_path, SIGNER.public_key(), chain=chain)
        assert report.ok, report.problems
    ids = [r["request_id"] for r in read_records(tmp_path)]
    assert ids == [
        "node1:w0-0",
        "node1:w1-1",
        "node1:w0-2",
        "node1:w1-3",
        "node1:w0-4",
        "node1:w1-5",
        "node1:w0-6",
    ]


def test_the_digest_vouches_for_every_chain(tmp_path: Path) -> None:
    _two_chains(tmp_path)
    digest.write_digest(tmp_path, SIGNER)
    _write(tmp_path, "node1:w1", [7, 8, 9])  # the chain goes on: still intact
    digest.write_digest(tmp_path, SIGNER)
    count, problems = digest.verify_digests(tmp_path, SIGNER.public_key())
    assert (count, problems) == (2, [])


def test_a_whole_chain_removed_is_detected(tmp_path: Path) -> None:
    _two_chains(tmp_path)
    digest.write_digest(tmp_path, SIGNER)
    shutil.rmtree(tmp_path / "audit" / "node1:w1")
    head_path(tmp_path, "node1:w1").unlink()
    # Each remaining chain verifies on its own: only the digest sees the loss.
    assert all(verify(tmp_path, SIGNER.public_key(), chain=c).ok for c in chains(tmp_path))
    _, problems = digest.verify_digests(tmp_path, SIGNER.public_key())
    assert problems and "node1:w1" in problems[0] and "removed" in problems[0]


def test_a_chain_rolled_back_with_its_head_is_detected(tmp_path: Path) -> None:
    _write(tmp_path, "node1:w0", [0, 1, 2])
    old_log = audit_path(tmp_path, "node1:w0").read_bytes()
    old_head = head_path(tmp_path, "node1:w0").read_bytes()
    _write(tmp_path, "node1:w0", [3, 4, 5])
    digest.write_digest(tmp_path, SIGNER)
    audit_path(tmp_path, "node1:w0").write_bytes(old_log)  # a consistent older state
    head_path(tmp_path, "node1:w0").write_bytes(old_head)
    assert verify(tmp_path, SIGNER.public_key(), chain="node1:w0").ok
    _, problems = digest.verify_digests(tmp_path, SIGNER.public_key())
    assert problems and "rolled back" in problems[0]


def test_a_forged_or_removed_digest_is_detected(tmp_path: Path) -> None:
    _two_chains(tmp_path)
    for _ in range(3):
        digest.write_digest(tmp_path, SIGNER)
    lines = digest.digest_path(tmp_path).read_bytes().splitlines(keepends=True)
    digest.digest_path(tmp_path).write_bytes(lines[0] + lines[2])
    _, problems = digest.verify_digests(tmp_path, SIGNER.public_key())
    assert problems and "chain broken" in problems[0]
    other = Ed25519PrivateKey.generate()
    digest.digest_path(tmp_path).unlink()
    digest.write_digest(tmp_path, other)
    _, problems = digest.verify_digests(tmp_path, SIGNER.public_key())
    assert problems and "bad digest" in problems[0]
