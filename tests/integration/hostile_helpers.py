"""What an attacker of the key service's port uses: a plain-HTTP dev server on loopback, raw
requests (any bytes, any headers, signed with the real or a wrong secret, or not at all), and the
audit log read back by request id."""

from __future__ import annotations

import json
import select
import socket
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from keyservice.audit.records import audit_path
from tests.conftest import (
    DevKeyService,
    free_port,
    run_keyservice,
    spawn_keyservice,
    stop_dev_service,
    wait_healthy,
)

TIMEOUT = 15.0


def start_plain_service(base: Path, *extra: str) -> DevKeyService:
    """``keyservice serve --dev --insecure-http`` on a free loopback port (raw sockets need no TLS)."""
    port = free_port()
    data_dir, creds, log_file = base / "keyservice-data", base / "credentials.json", base / "keyservice.log"
    endpoint = f"http://127.0.0.1:{port}"
    process = spawn_keyservice(
        log_file, "serve", "--dev", "--insecure-http", "--listen", f"127.0.0.1:{port}",
        "--data-dir", str(data_dir), "--credentials-out", str(creds), *extra,
    )  # fmt: skip
    wait_healthy(process, endpoint, log_file, ready_file=creds)
    region = json.loads(creds.read_text())["region"]
    return DevKeyService(process, endpoint, region, creds, data_dir, log_file)


def serve_and_verify(base: Path, *extra: str) -> Iterator[tuple[DevKeyService, AuditTail]]:
    """A plain-HTTP server and its audit tail for a fixture; afterwards ``audit verify`` must pass."""
    service = start_plain_service(base, *extra)
    try:
        yield service, AuditTail(audit_path(service.data_dir))
    finally:
        stop_dev_service(service)
    report = run_keyservice("audit", "verify", "--data-dir", str(service.data_dir))
    assert report.returncode == 0, report.stdout + report.stderr


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def request_id(self) -> str:
        return self.headers.get("x-amzn-requestid", "")

    def error(self) -> dict[str, Any]:
        return json.loads(self.body)


def _parse(data: bytes) -> Reply:
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", len(body)))
    return Reply(status, headers, body[:length])


def connect(where: int | str, timeout: float = TIMEOUT) -> socket.socket:
    """A connection to the loopback port ``where``, or to the Unix socket at the path ``where``."""
    if isinstance(where, int):
        return socket.create_connection(("127.0.0.1", where), timeout=timeout)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(where)
    except BaseException:
        sock.close()
        raise
    return sock


def exchange(
    port: int | str, chunks: Iterable[bytes], *, timeout: float = TIMEOUT, head: bool = False
) -> Reply:
    """Send ``chunks`` on a fresh connection (to a loopback port, or a Unix socket's path),
    stopping early if the server answers first, then read one reply (``head``: a reply to HEAD,
    headers only). Raises TimeoutError if none comes within ``timeout``: the server hung."""
    deadline = time.monotonic() + timeout
    with connect(port, timeout) as sock:
        received = b""
        for chunk in chunks:
            readable, _, _ = select.select([sock], [], [], 0)
            if readable:
                break
            try:
                sock.sendall(chunk)
            except (BrokenPipeError, ConnectionResetError):
                break
        while True:
            complete = _complete(received, head)
            if complete is not None:
                return complete
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no complete reply within {timeout} s; got {received[:200]!r}")
            sock.settimeout(remaining)
            try:
                data = sock.recv(65536)
            except TimeoutError:
                raise TimeoutError(f"no complete reply within {timeout} s; got {received[:200]!r}") from None
            if not data:
                if received:
                    return _parse(received)
                raise ConnectionError("the server closed the connection without a reply")
            received += data


def _complete(data: bytes, head: bool = False) -> Reply | None:
    if b"\r\n\r\n" not in data:
        return None
    reply = _parse(data)
    if head:
        return reply
    head_length = data.index(b"\r\n\r\n") + 4
    wanted = int(reply.headers.get("content-length", "0"))
    return reply if len(data) - head_length >= wanted else None


def request_bytes(method: str, path: str, headers: dict[str, str], body: bytes) -> bytes:
    lines = [f"{method} {path} HTTP/1.1"]
    if not any(name.lower() == "host" for name in headers):
        lines.append("Host: 127.0.0.1")
    lines += [f"{name}: {value}" for name, value in headers.items()]
    lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def sign(
    service: DevKeyService, target: str, body: bytes, headers: dict[str, str] | None = None,
    *, secret: str | None = None,
) -> dict[str, str]:
    """SigV4 headers for POST / with ``body`` (``secret``: sign with a wrong one)."""
    creds = service.credentials
    all_headers = {"Content-Type": "application/x-amz-json-1.1", "X-Amz-Target": target, **(headers or {})}
    request = AWSRequest(method="POST", url=service.endpoint + "/", data=body, headers=all_headers)
    SigV4Auth(
        Credentials(creds["access_key_id"], secret or creds["secret_access_key"]), "kms", service.region
    ).add_auth(request)
    return {"Host": service.endpoint.split("//", 1)[1], **dict(request.headers.items())}


@dataclass
class AuditTail:
    """The audit log read incrementally: the records appended since the last look, by request id."""

    path: Path
    offset: int = 0
    by_id: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    def refresh(self) -> None:
        with self.path.open("rb") as f:
            f.seek(self.offset)
            data = f.read()
        end = data.rfind(b"\n") + 1
        self.offset += end
        for line in data[:end].split(b"\n")[:-1]:
            record = json.loads(line)  # every line must be valid UTF-8 JSON
            if record.get("type") != "checkpoint":
                self.by_id.setdefault(record.get("request_id", ""), []).append(record)

    def outcomes(self, request_id: str) -> list[dict[str, Any]]:
        """The request's records, intents left out (exactly one is the rule)."""
        self.refresh()
        return [r for r in self.by_id.pop(request_id, []) if r.get("outcome") != "intent"]


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")
