"""The keyservice command as an operator uses it: dev mode restarts, real stores from `init`,
and a data directory that is useless without its root key (K14)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import boto3
import pytest
from botocore.exceptions import ClientError

from tests.conftest import (
    free_port,
    run_keyservice,
    spawn_keyservice,
    start_dev_service,
    stop_dev_service,
    wait_healthy,
)

pytestmark = pytest.mark.integration


def _serve(
    data_dir: Path, log: Path, *args: str, env: dict[str, str] | None = None
) -> tuple[subprocess.Popen, str]:
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    process = spawn_keyservice(
        log, "serve", "--data-dir", str(data_dir), "--listen", f"127.0.0.1:{port}", *args, env=env
    )
    wait_healthy(process, endpoint, log)
    return process, endpoint


def _stop(process: subprocess.Popen) -> None:
    process.terminate()
    process.wait(timeout=10)


def _client(endpoint: str, creds: dict[str, str]):
    return boto3.client(
        "kms",
        endpoint_url=endpoint,
        region_name=creds["region"],
        aws_access_key_id=creds["access_key_id"],
        aws_secret_access_key=creds["secret_access_key"],
    )


def test_dev_mode_reuses_its_data_dir(tmp_path: Path) -> None:
    first = start_dev_service(tmp_path)
    try:
        creds_before = first.credentials
        kms = first.boto3_client()
        key_id = kms.create_key(Description="survives restarts")["KeyMetadata"]["KeyId"]
        blob = kms.encrypt(KeyId=key_id, Plaintext=b"still here", EncryptionContext={"a": "b"})[
            "CiphertextBlob"
        ]
    finally:
        stop_dev_service(first)
    second = start_dev_service(tmp_path)
    try:
        creds_after = second.credentials
        assert (creds_after["access_key_id"], creds_after["secret_access_key"]) == (
            creds_before["access_key_id"],
            creds_before["secret_access_key"],
        )
        kms = second.boto3_client()
        assert kms.decrypt(CiphertextBlob=blob, EncryptionContext={"a": "b"})["Plaintext"] == b"still here"
        assert kms.describe_key(KeyId=key_id)["KeyMetadata"]["Description"] == "survives restarts"
        assert "WARNING! Dev mode" in second.log_file.read_text()
    finally:
        stop_dev_service(second)


def test_dev_mode_without_data_dir_is_temporary(tmp_path: Path) -> None:
    port = free_port()
    creds_file = tmp_path / "creds.json"
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "keyservice",
            "serve",
            "--dev",
            "--listen",
            f"127.0.0.1:{port}",
            "--credentials-out",
            str(creds_file),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        for _ in range(200):
            if creds_file.exists():
                break
            time.sleep(0.05)
        creds = json.loads(creds_file.read_text())
        assert set(creds) >= {"endpoint", "region", "access_key_id", "secret_access_key"}
        assert creds["endpoint"] == f"http://127.0.0.1:{port}"
        assert oct(creds_file.stat().st_mode & 0o777) == "0o600"
        assert _client(creds["endpoint"], creds).list_keys()["Keys"] == []
    finally:
        process.terminate()
        output = process.communicate(timeout=10)[0]
    data_dir = Path(output.split("data ")[1].split(")")[0])
    assert not data_dir.exists(), "the temporary store must be removed on exit"


def test_real_store_with_key_file(tmp_path: Path) -> None:
    data_dir, key_file, creds_file = (
        tmp_path / "data",
        tmp_path / "secret" / "root.key",
        tmp_path / "admin.json",
    )
    out = run_keyservice(
        "init",
        "--data-dir",
        str(data_dir),
        "--root-key-file",
        str(key_file),
        "--credentials-out",
        str(creds_file),
    )
    assert out.returncode == 0, out.stderr
    creds = json.loads(creds_file.read_text())
    assert creds["secret_access_key"] in out.stdout  # shown once, at creation
    assert key_file.exists() and oct(key_file.stat().st_mode & 0o777) == "0o600"
    again = run_keyservice("init", "--data-dir", str(data_dir), "--root-key-file", str(key_file))
    assert again.returncode == 1 and "already initialised" in again.stderr

    process, endpoint = _serve(data_dir, tmp_path / "serve.log", "--root-key-file", str(key_file))
    try:
        kms = _client(endpoint, creds)
        key_id = kms.create_key()["KeyMetadata"]["KeyId"]
        data_key = kms.generate_data_key(KeyId=key_id, KeySpec="AES_256")
        assert kms.decrypt(CiphertextBlob=data_key["CiphertextBlob"])["Plaintext"] == data_key["Plaintext"]
    finally:
        _stop(process)

    # K14: the data directory alone recovers nothing; neither secrets nor key material lie in it.
    for path in data_dir.rglob("*"):
        if path.is_file():
            raw = path.read_bytes()
            assert data_key["Plaintext"] not in raw, path
            assert creds["secret_access_key"].encode() not in raw, path
            assert key_file.read_text().strip().encode() not in raw, path
    other_key = tmp_path / "other.key"
    other_key.write_text(os.urandom(32).hex())
    wrong = run_keyservice(
        "serve",
        "--data-dir",
        str(data_dir),
        "--root-key-file",
        str(other_key),
        "--listen",
        f"127.0.0.1:{free_port()}",
    )
    assert wrong.returncode == 1 and "does not match" in wrong.stderr
    inside = run_keyservice(
        "init", "--data-dir", str(tmp_path / "d2"), "--root-key-file", str(tmp_path / "d2" / "root.key")
    )
    assert inside.returncode == 1 and "outside" in inside.stderr


def test_real_store_with_passphrase(tmp_path: Path) -> None:
    data_dir, creds_file = tmp_path / "data", tmp_path / "admin.json"
    env = {"KEYSERVICE_ROOT_PASSPHRASE": "correct horse battery staple"}
    out = run_keyservice("init", "--data-dir", str(data_dir), "--credentials-out", str(creds_file), env=env)
    assert out.returncode == 0, out.stderr
    creds = json.loads(creds_file.read_text())
    process, endpoint = _serve(data_dir, tmp_path / "serve.log", env=env)
    try:
        kms = _client(endpoint, creds)
        assert kms.create_key()["KeyMetadata"]["KeyState"] == "Enabled"
        with pytest.raises(ClientError):
            _client(endpoint, {**creds, "secret_access_key": "x" * 40}).list_keys()
    finally:
        _stop(process)
    wrong = run_keyservice(
        "serve",
        "--data-dir",
        str(data_dir),
        "--listen",
        f"127.0.0.1:{free_port()}",
        env={"KEYSERVICE_ROOT_PASSPHRASE": "wrong"},
    )
    assert wrong.returncode == 1 and "passphrase" in wrong.stderr
    missing = run_keyservice(
        "serve",
        "--data-dir",
        str(data_dir),
        "--listen",
        f"127.0.0.1:{free_port()}",
        env={"KEYSERVICE_ROOT_PASSPHRASE": ""},
        stdin=subprocess.DEVNULL,
    )
    assert missing.returncode == 1 and "KEYSERVICE_ROOT_PASSPHRASE" in missing.stderr
