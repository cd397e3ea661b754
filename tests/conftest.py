"""Shared fixtures: a real ``keyservice serve --dev`` process on loopback, and boto3 clients for it."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
import urllib3

from keyservice.audit.records import read_records


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
    def ca_bundle(self) -> str | None:
        """The private CA of the dev server's TLS certificate (None for a plain-HTTP server)."""
        return self.credentials.get("ca_bundle")

    @property
    def http(self) -> requests.Session:
        """A requests session that trusts the server's private CA."""
        session = requests.Session()
        session.trust_env = False  # else REQUESTS_CA_BUNDLE in the environment beats session.verify
        if self.ca_bundle:
            session.verify = self.ca_bundle
        return session

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
            "verify": creds.get("ca_bundle"),
        } | overrides
        return boto3.client("kms", **kwargs)

    def audit_records(self, *, intents: bool = False) -> list[dict[str, Any]]:
        """The request records of the log, oldest first: one per request (checkpoint lines left
        out: every 100 records one appears, and a mount's key pool alone makes dozens of records;
        and, unless ``intents``, the intent records written before state changes)."""
        return list(read_records(self.data_dir, intents=intents))


def run_keyservice(
    *args: str, env: dict[str, str] | None = None, **kwargs: Any
) -> subprocess.CompletedProcess[str]:
    """Run one ``keyservice`` command to completion and capture its output."""
    return subprocess.run(
        [sys.executable, "-m", "keyservice", *args],
        capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=60, **kwargs,
    )  # fmt: skip


def spawn_keyservice(
    log_file: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """Start a long-running ``keyservice`` command with its output in ``log_file``."""
    with log_file.open("ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "keyservice", *args],
            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
        )  # fmt: skip


def wait_healthy(
    process: subprocess.Popen[bytes],
    endpoint: str,
    log_file: Path,
    ready_file: Path | None = None,
    verify: str | bool = True,
) -> None:
    """Wait until the server answers /healthz (and ``ready_file`` exists), or fail with its log."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"keyservice exited with {process.returncode}:\n{log_file.read_text()}")
        try:
            ready = ready_file is None or ready_file.exists()
            with warnings.catch_warnings():
                if verify is False:  # asked for on purpose (a name the certificate does not hold)
                    warnings.simplefilter("ignore", urllib3.exceptions.InsecureRequestWarning)
                if ready and requests.get(endpoint + "/healthz", timeout=1, verify=verify).ok:
                    return
        except OSError:  # not listening yet, or its CA file not written yet
            pass
        time.sleep(0.05)
    process.kill()
    process.wait()
    raise RuntimeError(f"keyservice did not become ready:\n{log_file.read_text()}")


def start_dev_service(base: Path, *extra: str) -> DevKeyService:
    """Start ``keyservice serve --dev`` on a free loopback port and wait until it is ready."""
    port = free_port()
    data_dir = base / "keyservice-data"
    creds = base / "credentials.json"
    log_file = base / "keyservice.log"
    endpoint = f"https://127.0.0.1:{port}"
    process = spawn_keyservice(
        log_file, "serve", "--dev", "--listen", f"127.0.0.1:{port}", "--data-dir", str(data_dir),
        "--credentials-out", str(creds), *extra,
    )  # fmt: skip
    wait_healthy(process, endpoint, log_file, ready_file=creds, verify=str(data_dir / "tls" / "ca.pem"))
    region = json.loads(creds.read_text())["region"]
    return DevKeyService(process, endpoint, region, creds, data_dir, log_file)


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


# ----------------------------------------------------------------------------- PostgreSQL


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[Any]:
    """One real PostgreSQL 15 server for the whole session (tests/pg_server.py), stopped at the end.

    Skipped only where PostgreSQL or psycopg is truly not installed, and then loudly: setup.sh
    installs both, so CI never skips.
    """
    from tests.pg_server import running_server

    with running_server() as server:
        yield server


@pytest.fixture
def pg_url(postgres_server: Any) -> str:
    """The URL of a fresh, empty database on the session's PostgreSQL server."""
    return postgres_server.create_database()
