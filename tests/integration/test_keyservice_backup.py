"""Backup while Encrypt load runs, restore into a new data directory: every acknowledged
ciphertext decrypts there, and every key acknowledged before the backup began is there."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import run_keyservice
from tests.integration.keyservice_nodes import Cluster, Load, init_cluster, wait_for

pytestmark = pytest.mark.integration


def test_backup_while_serving_then_restore(tmp_path: Path) -> None:
    cluster = init_cluster(tmp_path, None)
    restored: Cluster | None = None
    try:
        node = cluster.start_node("a", "--workers", "2")
        admin = cluster.client(node)
        key_id = admin.create_key()["KeyMetadata"]["KeyId"]
        load = Load([[cluster.client(node)] for _ in range(3)], key_id)
        created: list[tuple[float, str]] = []
        stop = threading.Event()

        def create_keys() -> None:
            creator = cluster.client(node)
            while not stop.is_set():
                new = creator.create_key()["KeyMetadata"]["KeyId"]
                created.append((time.monotonic(), new))

        creator = threading.Thread(target=create_keys, daemon=True)
        load.start()
        creator.start()
        try:
            wait_for(lambda: load.count() >= 40 and len(created) >= 3)
            started = time.monotonic()
            result = run_keyservice("backup", "--data-dir", str(node.data_dir), str(tmp_path / "backup"))
            assert result.returncode == 0, result.stderr
            at_backup = load.count()
            wait_for(lambda: load.count() >= at_backup + 40)
        finally:
            stop.set()
            load.stop()
            creator.join(30)
        manifest = json.loads((tmp_path / "backup" / "backup.json").read_text())
        assert set(manifest["audit_position"]) >= {"main"}
        assert not (tmp_path / "backup" / "audit").exists()  # no audit log, only its position

        result = run_keyservice("restore", str(tmp_path / "backup"), "--data-dir", str(tmp_path / "restored"))
        assert result.returncode == 0, result.stderr
        cluster.stop_all()
        restored = Cluster(tmp_path, tmp_path / "restored", cluster.root_key_file, cluster.credentials, None)
        new_node = restored.start_node("restored")
        client = restored.client(new_node)
        for acked in load.acked:
            reply = client.decrypt(CiphertextBlob=acked.ciphertext, EncryptionContext=acked.context)
            assert reply["Plaintext"] == acked.plaintext
        before = [k for when, k in created if when < started]
        assert before, "no key was acknowledged before the backup began"
        for made in before:
            assert client.describe_key(KeyId=made)["KeyMetadata"]["Enabled"]
        result = run_keyservice("audit", "verify", "--data-dir", str(new_node.data_dir))
        assert result.returncode == 0, result.stdout
        print(
            f"backup/restore: {len(load.acked)} ciphertexts checked, {len(before)} keys from before"
        )
    finally:
        cluster.stop_all()
        if restored is not None:
            restored.stop_all()


def test_restore_refuses_a_non_empty_directory_and_a_non_backup(tmp_path: Path) -> None:
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    result = run_keyservice("restore", str(tmp_path), "--data-dir", str(tmp_path / "new"))
    assert result.returncode == 1 and "not a keyservice backup" in result.stderr
    assert "Traceback" not in result.stderr
    result = run_keyservice("backup", "--data-dir", str(tmp_path / "nothing"), str(tmp_path / "out"))
    assert result.returncode == 1 and "not an initialised" in result.stderr
