"""Kill tests: a node, a worker or the database dies in the middle of a bounded load.

Every request that got a 200 must have its audit record and its ciphertext must decrypt
afterwards; ``keyservice audit verify`` stays clean (a killed writer's chain simply ends at its
last durable record); the survivors serve on. Counts are printed (pytest -s) for docs/OPERATIONS.md.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import run_keyservice
from tests.integration.keyservice_nodes import (
    Cluster,
    Load,
    audit_records_by_id,
    init_cluster,
    wait_for,
)
from tests.pg_server import running_server

pytestmark = pytest.mark.integration

THREADS = 4
BEFORE, AFTER = 80, 80  # acknowledged requests before the kill, and after it


def _check_everything_acknowledged_survived(
    cluster: Cluster, load: Load, decrypt_on: Any, data_dirs: list[Path]
) -> dict[str, int]:
    records = audit_records_by_id(data_dirs)
    missing = [a.request_id for a in load.acked if a.request_id not in records]
    assert missing == [], f"{len(missing)} acknowledged requests have no audit record"
    for acked in load.acked:
        record = records[acked.request_id]
        assert record["outcome"] == "success" and record["operation"] == acked.operation
        reply = decrypt_on.decrypt(CiphertextBlob=acked.ciphertext, EncryptionContext=acked.context)
        assert reply["Plaintext"] == acked.plaintext
    for data_dir in data_dirs:
        result = run_keyservice("audit", "verify", "--data-dir", str(data_dir))
        assert result.returncode == 0, result.stdout + result.stderr
    in_table = None
    if cluster.store_url:  # and every one of them is in the database's append-only table too
        from keyservice.audit.pgmirror import table_chains

        ids = {
            json.loads(line).get("request_id")
            for lines in table_chains(cluster.store_url).values()
            for line in lines
        }
        in_table = sum(1 for a in load.acked if a.request_id in ids)
        assert in_table == len(load.acked)
        assert "table chain" in result.stdout  # verify checked the table's chains too
    return {
        "acknowledged": len(load.acked),
        "records_found": len(load.acked) - len(missing),
        "records_in_table": in_table,
        "ciphertexts_checked": len(load.acked),
        "connection_errors": load.connection_errors,
    }


def test_a_node_killed_mid_load_loses_nothing_acknowledged(tmp_path: Path, pg_url: str) -> None:
    cluster = init_cluster(tmp_path, pg_url)
    try:
        a = cluster.start_node("a")
        b = cluster.start_node("b")
        admin_b = cluster.client(b)
        key_id = cluster.client(a).create_key()["KeyMetadata"]["KeyId"]
        load = Load([[cluster.client(a), cluster.client(b)] for _ in range(THREADS)], key_id)
        load.start()
        try:
            wait_for(lambda: load.count() >= BEFORE)
            a.kill()
            killed_at = load.count()
            wait_for(lambda: load.count() >= killed_at + AFTER)
        finally:
            load.stop()
        counts = _check_everything_acknowledged_survived(cluster, load, admin_b, [a.data_dir, b.data_dir])
        assert admin_b.describe_key(KeyId=key_id)["KeyMetadata"]["Enabled"]  # the survivor serves on
        print(f"node kill: {counts}, acknowledged before the kill: {killed_at}")
    finally:
        cluster.stop_all()


def _workers(parent_pid: int) -> list[int]:
    children = Path(f"/proc/{parent_pid}/task/{parent_pid}/children").read_text().split()
    return [int(pid) for pid in children]


def test_a_worker_killed_mid_load_on_sqlite_loses_nothing_acknowledged(tmp_path: Path) -> None:
    cluster = init_cluster(tmp_path, None)
    try:
        node = cluster.start_node("a", "--workers", "2")
        wait_for(lambda: len(_workers(node.process.pid)) == 2)
        admin = cluster.client(node)
        key_id = admin.create_key()["KeyMetadata"]["KeyId"]
        # One connection per client thread and endpoint: spread over both workers by the kernel.
        load = Load([[cluster.client(node)] for _ in range(THREADS)], key_id)
        load.start()
        try:
            wait_for(lambda: load.count() >= BEFORE)
            # The busiest worker (longest audit chain) surely holds client connections.
            chains = (node.data_dir / "audit").glob("*:w*/*.log")
            busiest = max(chains, key=lambda p: p.stat().st_size).parent.name.rsplit(":w", 1)[1]
            victim = int((node.data_dir / "run" / f"w{busiest}.pid").read_text())
            assert victim in _workers(node.process.pid)
            os.kill(victim, signal.SIGKILL)
            killed_at = load.count()
            wait_for(lambda: load.count() >= killed_at + AFTER)
        finally:
            load.stop()
        # The parent started the killed worker again; the node serves on with two workers.
        wait_for(lambda: len(_workers(node.process.pid)) == 2 and victim not in _workers(node.process.pid))
        counts = _check_everything_acknowledged_survived(cluster, load, admin, [node.data_dir])
        chains = sorted(p.name for p in (node.data_dir / "audit").iterdir() if p.is_dir())
        assert len(chains) == 2, chains  # one chain per worker
        print(f"worker kill (SQLite, 2 workers): {counts}, acknowledged before the kill: {killed_at}")
    finally:
        cluster.stop_all()


@pytest.fixture
def own_postgres() -> Any:
    """A PostgreSQL server of this test's own (it is killed mid-test)."""
    with running_server() as server:
        yield server


def test_postgres_killed_mid_load_fails_clearly_and_recovers(tmp_path: Path, own_postgres: Any) -> None:
    cluster = init_cluster(tmp_path, own_postgres.url())
    try:
        a = cluster.start_node("a")
        admin = cluster.client(a)
        key_id = admin.create_key()["KeyMetadata"]["KeyId"]
        load = Load([[cluster.client(a, read_timeout=30)] for _ in range(THREADS)], key_id)
        load.start()
        try:
            wait_for(lambda: load.count() >= BEFORE)
            own_postgres.kill()
            # While the database is away: clear 500 errors (never a hang, never a false success).
            wait_for(lambda: sum(load.server_errors.values()) >= 4, timeout=60)
            own_postgres.resume()
            resumed_at = load.count()
            wait_for(lambda: load.count() >= resumed_at + AFTER, timeout=60)
        finally:
            load.stop()
        assert set(load.server_errors) <= {"DependencyTimeoutException", "KMSInternalException"}, (
            load.server_errors
        )
        counts = _check_everything_acknowledged_survived(cluster, load, admin, [a.data_dir])
        print(f"database kill: {counts}, refused while down: {load.server_errors}")
    finally:
        cluster.stop_all()
