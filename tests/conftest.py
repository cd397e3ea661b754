"""Shared fixtures: a real ``keyservice serve --dev`` process on loopback, and boto3 clients for it."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class DevKeyService:
    """A running dev key service process and how to reach it."""

    process: subprocess.Popen[bytes]
    endpoint: str
    region: str
    credentials_file: Path
    data_dir: Path
    log_file: Path

    @property
    def credentials(self) -> dict[str, str]:
        return json.loads(self.credentials_file.read_text())

    def boto3_client(self, **overrides: Any) -> Any:
        import boto3

        creds = self.credentials
        kwargs: dict[str, Any] = {
            "endpoint_url": self.endpoint,
            "region_name": self.region,
            "aws_access_key_id": creds["access_key_id"],
            "aws_secret_access_key": creds["secret_access_key"],
        } | overrides
        return boto3.client("kms", **kwargs)

    def audit_records(self) -> list[dict[str, Any]]:
        path = self.data_dir / "audit" / "audit.log"
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def start_dev_service(base: Path, *extra: str) -> DevKeyService:
    """Start ``keyservice serve --dev`` and wait until it answers /healthz (or fail with its log)."""
    port = free_port()
    data_dir = base / "keyservice-data"
    creds = base / "credentials.json"
    log_file = base / "keyservice.log"
    cmd = [
        sys.executable,
        "-m",
        "keyservice",
        "serve",
        "--dev",
        "--listen",
        f"127.0.0.1:{port}",
        "--data-dir",
        str(data_dir),
        "--credentials-out",
        str(creds),
        *extra,
    ]
    log = log_file.open("ab")
    process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy())
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"keyservice exited with {process.returncode}:\n{log_file.read_text()}")
        try:
            if creds.exists() and requests.get(endpoint + "/healthz", timeout=1).ok:
                region = json.loads(creds.read_text())["region"]
                return DevKeyService(process, endpoint, region, creds, data_dir, log_file)
        except (requests.ConnectionError, ValueError, KeyError):
            pass
        time.sleep(0.1)
    process.kill()
    raise RuntimeError(f"keyservice did not become ready:\n{log_file.read_text()}")


def stop_dev_service(service: DevKeyService) -> None:
    service.process.terminate()
    try:
        service.process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        service.process.kill()
        service.process.wait()


@pytest.fixture(scope="session")
def keyservice_dev(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevKeyService]:
    service = start_dev_service(tmp_path_factory.mktemp("keyservice"))
    try:
        yield service
    finally:
        stop_dev_service(service)


@pytest.fixture
def kms(keyservice_dev: DevKeyService) -> Any:
    """A boto3 KMS client signed with the dev admin credentials."""
    return keyservice_dev.boto3_client()
