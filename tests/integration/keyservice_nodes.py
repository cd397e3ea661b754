"""Several ``keyservice serve`` nodes over one store, for the multi-node and kill tests.

``init_cluster`` runs ``keyservice init`` once (on PostgreSQL if a URL is given, else SQLite);
``Cluster.start_node`` copies the data directory for each further node (its sealed files and TLS
material, as an operator would) and starts ``serve`` on a free loopback port. ``stop_all`` ends
every node it started, even after a failed test.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
from botocore.config import Config

from tests.conftest import free_port, run_keyservice, spawn_keyservice, wait_healthy


@dataclass
class Node:
    name: str
    process: subprocess.Popen[bytes]
    endpoint: str
    data_dir: Path
    log: Path

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)


@dataclass
class Cluster:
    base: Path
    data_dir: Path  # the first node's; copied for the others
    root_key_file: Path
    credentials: dict[str, Any]
    store_url: str | None
    nodes: list[Node] = field(default_factory=list)

    def start_node(self, name: str, *extra: str, copy: bool = True) -> Node:
        data_dir = self.data_dir
        if copy and self.nodes:
            data_dir = self.base / f"data-{name}"
            if not data_dir.exists():
                shutil.copytree(self.data_dir, data_dir, ignore=shutil.ignore_patterns("audit"))
                (data_dir / "audit").mkdir(mode=0o700)
        port = free_port()
        endpoint = f"https://127.0.0.1:{port}"
        log = self.base / f"{name}.log"
        store = ("--store", self.store_url) if self.store_url else ()
        process = spawn_keyservice(
            log, "serve", "--data-dir", str(data_dir), "--root-key-file", str(self.root_key_file),
            "--listen", f"127.0.0.1:{port}", *store, *extra,
        )  # fmt: skip
        node = Node(name, process, endpoint, data_dir, log)
        self.nodes.append(node)
        wait_healthy(process, endpoint, log, verify=self.ca_bundle)
        return node

    @property
    def ca_bundle(self) -> str:
        return str(self.data_dir / "tls" / "ca.pem")

    def client(self, node: Node, **config: Any) -> Any:
        return boto3.client(
            "kms",
            endpoint_url=node.endpoint,
            region_name=self.credentials["region"],
            aws_access_key_id=self.credentials["access_key_id"],
            aws_secret_access_key=self.credentials["secret_access_key"],
            verify=self.ca_bundle,
            config=Config(retries={"total_max_attempts": 1}, **config),
        )

    def stop_all(self) -> None:
        for node in self.nodes:
            if node.process.poll() is None:
                node.process.terminate()
                try:
                    node.process.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    node.process.kill()
                    node.process.wait()


def init_cluster(base: Path, store_url: str | None) -> Cluster:
    data_dir = base / "data-a"
    root_key = base / "root.key"
    creds_file = base / "credentials.json"
    store = ("--store", store_url) if store_url else ()
    result = run_keyservice(
        "init", "--data-dir", str(data_dir), "--root-key-file", str(root_key),
        "--credentials-out", str(creds_file), *store,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return Cluster(base, data_dir, root_key, json.loads(creds_file.read_text()), store_url)


# ----------------------------------------------------------------------------- bounded load


@dataclass
class Acked:
    """One request that got a 200: what it returned, to be checked afterwards."""

    request_id: str
    operation: str
    ciphertext: bytes
    plaintext: bytes
    context: dict[str, str]


@dataclass
class Load:
    """Encrypt + GenerateDataKey from several client threads, each going round the given
    endpoints and moving to the next one on a connection error (as a failing-over client does)."""

    clients: list[list[Any]]  # per thread: one client per endpoint
    key_id: str
    acked: list[Acked] = field(default_factory=list)
    connection_errors: int = 0
    server_errors: dict[str, int] = field(default_factory=dict)
    _stop: Any = None
    _threads: list[Any] = field(default_factory=list)

    def start(self) -> None:
        import threading

        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(len(self.clients))
        ]
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(60)

    def count(self) -> int:
        with self._lock:
            return len(self.acked)

    def _run(self, index: int) -> None:
        import os
        import uuid

        from botocore.exceptions import ClientError, ConnectionError, HTTPClientError

        clients = self.clients[index]
        turn = index
        while not self._stop.is_set():
            client = clients[turn % len(clients)]
            context = {"load": uuid.uuid4().hex}
            try:
                if turn % 2:
                    plaintext = os.urandom(32)
                    reply = client.encrypt(KeyId=self.key_id, Plaintext=plaintext, EncryptionContext=context)
                    operation = "Encrypt"
                else:
                    reply = client.generate_data_key(
                        KeyId=self.key_id, KeySpec="AES_256", EncryptionContext=context
                    )
                    plaintext, operation = reply["Plaintext"], "GenerateDataKey"
            except (ConnectionError, HTTPClientError):
                with self._lock:
                    self.connection_errors += 1
                turn += 1  # the next endpoint
                continue
            except ClientError as error:
                code = error.response["Error"]["Code"]
                with self._lock:
                    self.server_errors[code] = self.server_errors.get(code, 0) + 1
                turn += 1
                continue
            if "CiphertextBlob" not in reply:  # a reply cut short by a killed server: not acknowledged
                with self._lock:
                    self.connection_errors += 1
                turn += 1
                continue
            acked = Acked(
                reply["ResponseMetadata"]["RequestId"], operation, reply["CiphertextBlob"], plaintext, context
            )
            with self._lock:
                self.acked.append(acked)
            turn += 2  # keep alternating operations on the same endpoint


def audit_records_by_id(data_dirs: list[Path]) -> dict[str, dict[str, Any]]:
    from keyservice.audit.records import read_records

    return {r["request_id"]: r for d in data_dirs for r in read_records(d)}


def wait_for(predicate: Any, timeout: float = 30.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.02)
