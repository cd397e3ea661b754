"""``keyservice audit`` at scale, as an operator runs it (issue 17): the questions, reindex,
verify --since-last, prune with the root key, and what an edited index looks like from the CLI.

A real dev data directory (root key, sealed signing key) and a log written by the service's own
writer with small segments; every command is a ``python -m keyservice`` process.
"""

from __future__ import annotations

import json
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path

from keyservice import bootstrap
from keyservice.audit import index as audit_index
from keyservice.audit import segments
from keyservice.audit import signing as audit_signing
from keyservice.audit.log import AuditLog
from keyservice.audit.records import build_record
from keyservice.context import Principal, RequestContext
from keyservice.errors import DisabledException
from keyservice.store import rootkey
from tests.conftest import run_keyservice

ADMIN = Principal("111122223333", "arn:aws:iam::111122223333:root", "AKIAADMIN00000000000")
MOUNT = Principal("111122223333", "arn:aws:iam::111122223333:user/kmsfs", "AKIAKMSFS00000000000")
KEY = "arn:aws:kms:us-east-1:111122223333:key/11111111-2222-3333-4444-555555555555"
T0 = datetime(2026, 3, 1, 10, 0, tzinfo=UTC)


def make_data_dir(data_dir: Path) -> None:
    root_key = rootkey.create_root_config(data_dir, rootkey.RootKeySource.dev())
    bootstrap.initialize(data_dir, root_key, region="us-east-1", account_id="111122223333")
    now = {"t": T0}
    log = AuditLog(data_dir, signer=audit_signing.load_or_create(data_dir, root_key), now=lambda: now["t"],
                   segment_bytes=8000)

    def record(operation: str, n: int, *, error: bool = False, caller: dict | None = None) -> None:
        now["t"] += timedelta(seconds=5)
        principal = MOUNT if caller else ADMIN
        ctx = RequestContext(f"req-{n}", "127.0.0.1", principal, "kmsfs/test", caller or {})
        log.append(build_record(when=now["t"], ctx=ctx, operation=operation, key_arn=KEY, key_version=1,
                                error=DisabledException("disabled") if error else None))

    record("CreateKey", 0)
    for n in range(1, 60):
        disabled = 30 <= n < 40
        if n == 30:
            record("DisableKey", 1000)
        if n == 40:
            record("EnableKey", 1001)
        user = "alice" if n % 3 else "bob"
        record("Decrypt", n, error=disabled,
               caller={"path": f"/proj/f{n % 4}.txt", "uid": 1000, "user": user, "pid": 7, "process": "cat"})
    log.close()


def test_questions_reindex_verify_and_prune_from_the_cli(tmp_path: Path) -> None:
    data = tmp_path / "data"
    make_data_dir(data)
    d = str(data)
    assert len(segments.segments(data)) >= 4

    listed = run_keyservice("audit", "list", "--data-dir", d, "--file", "/proj/f1.txt", "--json")
    assert listed.returncode == 0, listed.stderr
    assert listed.stderr == ""  # the index was built silently and covered the log
    paths = {json.loads(line)["caller"]["path"] for line in listed.stdout.splitlines()}
    assert paths == {"/proj/f1.txt"}

    timeline = run_keyservice("audit", "key", KEY, "--data-dir", d)
    assert timeline.returncode == 0, timeline.stderr
    lines = timeline.stdout.splitlines()
    assert sum("DisableKey" in line for line in lines) == 1
    assert sum("DisabledException" in line for line in lines) == 10
    assert lines[-1].startswith("49 successful")  # 59 opens, 10 refused

    principals = run_keyservice("audit", "principals", KEY, "--data-dir", d, "--json")
    rows = [json.loads(line) for line in principals.stdout.splitlines()]
    counts = [(r["principal"], r["requests"], r["refused"]) for r in rows]
    assert counts == [(MOUNT.arn, 59, 10), (ADMIN.arn, 3, 0)]

    top = run_keyservice("audit", "files", "--data-dir", d, "--top", "1", "--json")
    assert json.loads(top.stdout)["users"][0]["user"] == "alice"

    # An edited index: the CLI says so, answers by a scan, and reindex repairs it.
    with sqlite3.connect(audit_index.index_path(data)) as conn:
        conn.execute("DELETE FROM rec WHERE id % 1099511627776 = 5")
    edited = run_keyservice("audit", "list", "--data-dir", d, "--file", "/proj/f1.txt", "--json")
    assert "does not match the log" in edited.stderr and edited.stdout == listed.stdout
    rebuilt = run_keyservice("audit", "reindex", "--data-dir", d)
    assert rebuilt.returncode == 0 and "indexed 62 records" in rebuilt.stdout, rebuilt.stdout + rebuilt.stderr
    again = run_keyservice("audit", "list", "--data-dir", d, "--file", "/proj/f1.txt", "--json")
    assert again.stderr == "" and again.stdout == listed.stdout

    full = run_keyservice("audit", "verify", "--data-dir", d)
    assert full.returncode == 0 and "62 records" in full.stdout, full.stdout + full.stderr
    incremental = run_keyservice("audit", "verify", "--data-dir", d, "--since-last")
    assert incremental.returncode == 0 and "0 records" in incremental.stdout, incremental.stdout

    refused = run_keyservice("audit", "prune", "--data-dir", d, "--dev", "--before", "2026-03-01T10:03:00Z")
    assert refused.returncode == 1 and "not exported" in refused.stderr and "Traceback" not in refused.stderr
    before = segments.segments(data)
    pruned = run_keyservice("audit", "prune", "--data-dir", d, "--dev", "--before", "2026-03-01T10:03:00Z",
                            "--force")
    assert pruned.returncode == 0 and "pruned through segment" in pruned.stdout, pruned.stdout + pruned.stderr
    assert len(segments.segments(data)) < len(before)
    checked = run_keyservice("audit", "verify", "--data-dir", d)
    assert checked.returncode == 0 and "were pruned" in checked.stdout, checked.stdout + checked.stderr
    assert "audit index rebuilt" in pruned.stdout
    after = run_keyservice("audit", "list", "--data-dir", d, "--json")
    assert after.returncode == 0 and after.stderr == "", after.stderr
    assert 0 < len(after.stdout.splitlines()) < 62
