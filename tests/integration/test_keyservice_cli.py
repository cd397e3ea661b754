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
import requests
from botocore.exceptions import ClientError, SSLError

from keyservice.http import tls
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
    data_dir: Path, log: Path, *args: str, env: dict[str, str] | None = None, ca: Path | None = None
) -> tuple[subprocess.Popen, str]:
    port = free_port()
    endpoint = f"https://127.0.0.1:{port}"
    process = spawn_keyservice(
        log, "serve", "--data-dir", str(data_dir), "--listen", f"127.0.0.1:{port}", *args, env=env
    )
    wait_healthy(process, endpoint, log, verify=str(ca or data_dir / "tls" / "ca.pem"))
    return process, endpoint


def _stop(process: subprocess.Popen) -> None:
    process.terminate()
    process.wait(timeout=10)


def _client(endpoint: str, creds: dict[str, str], ca_bundle: Path | str | None = None):
    return boto3.client(
        "kms",
        endpoint_url=endpoint,
        region_name=creds["region"],
        aws_access_key_id=creds["access_key_id"],
        aws_secret_access_key=creds["secret_access_key"],
        verify=str(ca_bundle or creds["ca_bundle"]),
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
        deadline = time.monotonic() + 30  # as conftest's start_dev_service: a loaded CI box starts slowly
        while not creds_file.exists() and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.05)
        creds = json.loads(creds_file.read_text())
        assert set(creds) >= {"endpoint", "region", "access_key_id", "secret_access_key"}
        assert creds["endpoint"] == f"https://127.0.0.1:{port}"
        assert Path(creds["ca_bundle"]).name == "ca.pem"
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
    assert creds["endpoint"].startswith("https://") and creds["ca_bundle"] == str(data_dir / "tls" / "ca.pem")
    assert creds["secret_access_key"] in out.stdout  # shown once, at creation
    assert key_file.exists() and oct(key_file.stat().st_mode & 0o777) == "0o600"
    again = run_keyservice("init", "--data-dir", str(data_dir), "--root-key-file", str(key_file))
    assert again.returncode == 1 and "already initialised" in again.stderr

    process, endpoint = _serve(data_dir, tmp_path / "serve.log", "--root-key-file", str(key_file))
    try:
        kms = _client(endpoint, creds, data_dir / "tls" / "ca.pem")
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
        ca = data_dir / "tls" / "ca.pem"
        kms = _client(endpoint, creds, ca)
        assert kms.create_key()["KeyMetadata"]["KeyState"] == "Enabled"
        with pytest.raises(ClientError):
            _client(endpoint, {**creds, "secret_access_key": "x" * 40}, ca).list_keys()
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


def test_tls_verification(tmp_path: Path, keyservice_dev) -> None:
    """The right CA works; another CA, or the system CAs, fail: verification is never skipped."""
    assert keyservice_dev.endpoint.startswith("https://")
    assert keyservice_dev.boto3_client().list_keys() is not None
    other = tls.generate(tmp_path / "other", ["127.0.0.1"])
    with pytest.raises(SSLError):
        keyservice_dev.boto3_client(verify=str(other.ca)).list_keys()
    with pytest.raises(SSLError):
        keyservice_dev.boto3_client(verify="/etc/ssl/certs/ca-certificates.crt").list_keys()
    with pytest.raises(requests.exceptions.SSLError):
        requests.get(keyservice_dev.endpoint + "/healthz", timeout=5, verify=str(other.ca))


def test_plain_http_only_on_loopback_and_on_request(tmp_path: Path) -> None:
    run = run_keyservice(
        "serve",
        "--dev",
        "--insecure-http",
        "--listen",
        f"0.0.0.0:{free_port()}",
        "--data-dir",
        str(tmp_path / "d"),
    )
    assert run.returncode == 1 and "loopback" in run.stderr
    log = tmp_path / "http.log"
    port = free_port()
    process = spawn_keyservice(
        log,
        "serve",
        "--dev",
        "--insecure-http",
        "--listen",
        f"127.0.0.1:{port}",
        "--data-dir",
        str(tmp_path / "d"),
        "--credentials-out",
        str(tmp_path / "c.json"),
    )
    try:
        wait_healthy(process, f"http://127.0.0.1:{port}", log, ready_file=tmp_path / "c.json")
        creds = json.loads((tmp_path / "c.json").read_text())
        assert creds["endpoint"] == f"http://127.0.0.1:{port}" and "ca_bundle" not in creds
    finally:
        _stop(process)


def test_operator_supplied_certificate(tmp_path: Path) -> None:
    files = tls.generate(tmp_path / "pki", ["127.0.0.1"])
    data_dir, key_file = tmp_path / "data", tmp_path / "root.key"
    init = run_keyservice(
        "init",
        "--no-tls",
        "--data-dir",
        str(data_dir),
        "--root-key-file",
        str(key_file),
        "--credentials-out",
        str(tmp_path / "admin.json"),
    )
    assert init.returncode == 0, init.stderr
    process, endpoint = _serve(
        data_dir,
        tmp_path / "serve.log",
        "--root-key-file",
        str(key_file),
        "--tls-cert",
        str(files.cert),
        "--tls-key",
        str(files.key),
        ca=files.ca,
    )
    try:
        creds = json.loads((tmp_path / "admin.json").read_text())
        assert _client(endpoint, creds, files.ca).list_keys()["Keys"] == []
        assert not (data_dir / "tls").exists()
    finally:
        _stop(process)


def test_region_is_fixed_at_creation(tmp_path: Path) -> None:
    """K17: a store serves the region it was created in; ARNs carry it; a server cannot switch."""
    service = start_dev_service(tmp_path, "--region", "eu-west-1")
    try:
        assert service.region == "eu-west-1"
        kms = service.boto3_client()
        arn = kms.create_key()["KeyMetadata"]["Arn"]
        assert arn.startswith("arn:aws:kms:eu-west-1:")
        with pytest.raises(ClientError) as excinfo:
            kms.describe_key(KeyId=arn.replace("eu-west-1", "us-east-1"))
        assert excinfo.value.response["Error"]["Code"] == "NotFoundException"
    finally:
        stop_dev_service(service)
    wrong = run_keyservice(
        "serve",
        "--dev",
        "--data-dir",
        str(service.data_dir),
        "--region",
        "us-east-1",
        "--listen",
        f"127.0.0.1:{free_port()}",
    )
    assert wrong.returncode == 1 and "serves region eu-west-1" in wrong.stderr


def test_audit_verify_command_finds_tampering(tmp_path: Path) -> None:
    """`keyservice audit verify` on a real server's log: intact -> 0; one edited record -> 1, naming the
    line; a pinned public key from elsewhere -> refused as a bad signature."""
    service = start_dev_service(tmp_path)
    try:
        kms = service.boto3_client()
        key_id = kms.create_key()["KeyMetadata"]["KeyId"]
        for _ in range(5):
            kms.encrypt(KeyId=key_id, Plaintext=b"x")
    finally:
        stop_dev_service(service)  # seals the log with a final checkpoint
    data_dir = str(service.data_dir)
    intact = run_keyservice("audit", "verify", "--data-dir", data_dir)
    assert intact.returncode == 0 and "OK" in intact.stdout, intact.stdout
    pinned = tmp_path / "pinned.pub"
    pinned.write_bytes((service.data_dir / "audit-signing.pub").read_bytes())
    assert (
        run_keyservice("audit", "verify", "--data-dir", data_dir, "--public-key", str(pinned)).returncode == 0
    )

    other = tmp_path / "other"
    other.mkdir()
    stop_dev_service(start_dev_service(other))
    foreign = run_keyservice(
        "audit",
        "verify",
        "--data-dir",
        data_dir,
        "--public-key",
        str(other / "keyservice-data" / "audit-signing.pub"),
    )
    assert foreign.returncode == 1 and "bad signature" in foreign.stderr

    log = service.data_dir / "audit" / "audit.log"
    lines = log.read_text().splitlines(keepends=True)
    encrypts = [n for n, line in enumerate(lines) if '"operation":"Encrypt"' in line]
    lines[encrypts[2]] = lines[encrypts[2]].replace('"outcome":"success"', '"outcome":"error"')
    log.write_text("".join(lines))
    tampered = run_keyservice("audit", "verify", "--data-dir", data_dir)
    assert tampered.returncode == 1
    assert f"TAMPERED: line {encrypts[2] + 2}:" in tampered.stderr, tampered.stderr
