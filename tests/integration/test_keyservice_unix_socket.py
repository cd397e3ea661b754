"""The Unix-socket listener with real processes: ``keyservice serve --listen unix:PATH`` beside a
TCP listener, kmsfs's client and a real mount over it, and a local attacker on the socket.

What must hold: every request on the socket is SigV4-verified exactly as on TCP (unsigned and
badly signed requests refused with AWS errors, garbage with a 400 and ``__type``, all audited);
the audit record carries the connecting process's uid/gid/pid from SO_PEERCRED (``peer``) and on
TCP it has no such field; the socket gets the configured mode and group; an existing path is
replaced only if it is a stale socket; the file is removed at shutdown.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import shutil
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from keyservice.http.sigv4 import sign_request
from kmsfs.keyclient import KeyClient, load_credentials
from tests.conftest import (
    DevKeyService,
    free_port,
    run_keyservice,
    spawn_keyservice,
    stop_dev_service,
    wait_healthy,
)
from tests.integration.hostile_helpers import exchange, request_bytes
from tests.integration.kmsfs_mount_helpers import daemon_pid, kmsfs_init, mounted, requires_fuse

pytestmark = pytest.mark.integration

TARGET = "TrentService.ListKeys"


def _other_group() -> int | None:
    """A group other than ours to hand the socket to (needs root), or None."""
    if os.geteuid() != 0:
        return None
    for name in ("nogroup", "daemon", "adm", "users"):
        try:
            gid = grp.getgrnam(name).gr_gid
        except KeyError:
            continue
        if gid != os.getegid():
            return gid
    return None


def _other_user() -> int | None:
    """A user other than ourselves to own the socket (needs root), or None."""
    if os.geteuid() != 0:
        return None
    for name in ("nobody", "daemon"):
        try:
            return pwd.getpwnam(name).pw_uid
        except KeyError:
            continue
    return None


def start_unix_service(base: Path, *extra: str, tcp: bool = True) -> tuple[DevKeyService, Path]:
    """``serve --dev`` on a Unix socket in ``base`` (and, with ``tcp``, plain HTTP on loopback)."""
    sock_path = base / "ks.sock"
    data_dir, creds, log_file = base / "keyservice-data", base / "credentials.json", base / "keyservice.log"
    port = free_port()
    listen = ["--listen", f"unix:{sock_path}"]
    if tcp:
        listen += ["--listen", f"127.0.0.1:{port}", "--insecure-http"]
    process = spawn_keyservice(
        log_file, "serve", "--dev", *listen, "--data-dir", str(data_dir), "--credentials-out", str(creds),
        *extra,
    )  # fmt: skip
    if tcp:
        wait_healthy(process, f"http://127.0.0.1:{port}", log_file, ready_file=creds)
    else:
        _wait_for(lambda: creds.exists() or process.poll() is not None)
        assert process.poll() is None, log_file.read_text()
    region = json.loads(creds.read_text())["region"]
    endpoint = f"http://127.0.0.1:{port}" if tcp else f"unix://{sock_path}"
    return DevKeyService(process, endpoint, region, creds, data_dir, log_file), sock_path


def _wait_for(done: Any, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def unix_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[DevKeyService, Path]]:
    base = tmp_path_factory.mktemp("unix-ks")
    group, user = _other_group(), _other_user()
    extra = ["--socket-mode", "0660"] + (["--socket-group", str(group)] if group is not None else [])
    extra += ["--socket-owner", str(user)] if user is not None else []
    service, sock_path = start_unix_service(base, *extra)
    try:
        yield service, sock_path
    finally:
        stop_dev_service(service)
    assert not sock_path.exists(), "the socket file outlived the server"


def _client(service: DevKeyService, sock_path: Path) -> KeyClient:
    creds = load_credentials(service.credentials_file)
    return KeyClient(f"unix://{sock_path}", service.region, creds)


def _record(service: DevKeyService, request_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 10
    while True:
        found = [r for r in service.audit_records() if r["request_id"] == request_id]
        if found or time.monotonic() > deadline:
            assert len(found) == 1, found
            return found[0]
        time.sleep(0.05)


def _last_record(service: DevKeyService, operation: str) -> dict[str, Any]:
    return [r for r in service.audit_records() if r["operation"] == operation][-1]


def test_socket_has_the_configured_mode_and_group(unix_service: tuple[DevKeyService, Path]) -> None:
    _, sock_path = unix_service
    info = os.lstat(sock_path)
    assert stat.S_ISSOCK(info.st_mode)
    assert stat.S_IMODE(info.st_mode) == 0o660
    user, group = _other_user(), _other_group()
    assert info.st_uid == (user if user is not None else os.geteuid())
    assert info.st_gid == (group if group is not None else os.getegid())


def test_signed_requests_work_and_the_audit_names_the_peer(unix_service: tuple[DevKeyService, Path]) -> None:
    service, sock_path = unix_service
    client = _client(service, sock_path)
    try:
        key = client.call("CreateKey", {})["KeyMetadata"]["Arn"]
        caller = {"uid": 4242, "pid": 7, "path": "/x"}
        plaintext, blob, _ = client.generate_data_key(key, {"f": "1"}, caller=caller)
        assert client.decrypt(blob, {"f": "1"}, caller=caller) == plaintext
    finally:
        client.close()
    record = _last_record(service, "Decrypt")
    assert record["outcome"] == "success"
    # The header says whom the client acts for; the peer is who actually connected: this process.
    assert record["caller"] == {"uid": 4242, "pid": 7, "path": "/x"}
    assert record["peer"]["pid"] == os.getpid()
    assert record["peer"]["uid"] == os.geteuid() and record["peer"]["gid"] == os.getegid()
    assert record["peer"]["exe"] == os.readlink(f"/proc/{os.getpid()}/exe")
    assert record["source_address"] == f"unix:{sock_path}"
    # The same service over TCP: no peer field at all.
    kms = service.boto3_client(verify=None)
    kms.list_keys()
    tcp = _last_record(service, "ListKeys")
    assert "peer" not in tcp and tcp["source_address"] == "127.0.0.1"


def _signed(service: DevKeyService, body: bytes, *, secret: str | None = None) -> dict[str, str]:
    creds = service.credentials
    headers = {"Host": "localhost", "Content-Type": "application/x-amz-json-1.1", "X-Amz-Target": TARGET}
    headers.update(sign_request(
        method="POST", url="http://localhost/", headers=headers, body=body,
        access_key_id=creds["access_key_id"], secret_access_key=secret or creds["secret_access_key"],
        region=service.region,
    ))
    return headers


@pytest.mark.parametrize("how", ["unsigned", "wrong secret", "signed for another host"])
def test_unsigned_or_badly_signed_requests_are_refused_and_audited(
    unix_service: tuple[DevKeyService, Path], how: str
) -> None:
    """The socket is no authentication bypass: the same refusals as on TCP."""
    service, sock_path = unix_service
    body = b"{}"
    if how == "unsigned":
        headers = {"Host": "localhost", "Content-Type": "application/x-amz-json-1.1", "X-Amz-Target": TARGET}
        expected = "MissingAuthenticationTokenException"
    elif how == "wrong secret":
        headers = _signed(service, body, secret="x" * 40)
        expected = "InvalidSignatureException"
    else:
        headers = {**_signed(service, body), "Host": "127.0.0.1"}
        expected = "InvalidSignatureException"
    reply = exchange(str(sock_path), [request_bytes("POST", "/", headers, body)])
    assert reply.status == 400 and reply.error()["__type"] == expected, reply
    record = _record(service, reply.request_id)
    assert record["outcome"] == "error" and record["error_code"] == expected
    assert record["principal"] is None
    assert record["peer"]["pid"] == os.getpid() and record["peer"]["uid"] == os.geteuid()


@pytest.mark.parametrize("garbage", [
    b"\x00\xff\x16\x03\x01 not http\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\n" + b"A" * 300 * 1024,  # headers past the 256 KiB limit
])
def test_a_hostile_peer_sending_garbage_gets_an_aws_error_and_an_audit_record(
    unix_service: tuple[DevKeyService, Path], garbage: bytes
) -> None:
    service, sock_path = unix_service
    reply = exchange(str(sock_path), [garbage])
    assert reply.status in (400, 431)
    assert reply.error()["__type"] in ("SerializationException", "RequestHeaderFieldsTooLargeException")
    record = _record(service, reply.request_id)
    assert record["outcome"] == "error" and record["peer"]["pid"] == os.getpid()
    assert record["source_address"] == f"unix:{sock_path}"
    # The server is still there for the next client.
    assert exchange(str(sock_path), [b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n"]).status == 200


def _serve_unix(path: Path, data_dir: Path) -> subprocess.CompletedProcess[str]:
    return run_keyservice("serve", "--dev", "--listen", f"unix:{path}", "--data-dir", str(data_dir))


def test_a_path_that_is_not_a_socket_is_refused_and_left_alone(tmp_path: Path) -> None:
    for make in ("file", "symlink", "directory"):
        path = tmp_path / f"taken-{make}"
        if make == "file":
            path.write_text("precious")
        elif make == "symlink":
            path.symlink_to(tmp_path / "elsewhere")
        else:
            path.mkdir()
        result = _serve_unix(path, tmp_path / "d")
        assert result.returncode == 1, result.stdout + result.stderr
        assert "is not a socket" in result.stderr and "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert path.is_symlink() if make == "symlink" else path.exists()
    assert (tmp_path / "taken-file").read_text() == "precious"


def test_a_live_socket_is_refused_and_a_stale_one_replaced(tmp_path: Path) -> None:
    path = tmp_path / "ks.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as live:
        live.bind(str(path))
        live.listen(1)
        result = _serve_unix(path, tmp_path / "d")
        assert result.returncode == 1 and "a server is listening on it" in result.stderr, result.stderr
        assert stat.S_ISSOCK(os.lstat(path).st_mode)
    # Closed without unlinking: what a killed server leaves behind.
    assert stat.S_ISSOCK(os.lstat(path).st_mode)
    service, sock_path = start_unix_service(tmp_path, tcp=False)
    try:
        assert sock_path == path
        assert stat.S_IMODE(os.lstat(path).st_mode) == 0o600  # the default mode
        client = _client(service, sock_path)
        try:
            assert "Keys" in client.call("ListKeys", {})
        finally:
            client.close()
    finally:
        stop_dev_service(service)
    assert not path.exists()


def test_init_records_a_unix_endpoint_and_serve_warns_when_it_is_not_served(tmp_path: Path) -> None:
    data, creds, sock_path = tmp_path / "d", tmp_path / "c.json", tmp_path / "ks.sock"
    made = run_keyservice("init", "--data-dir", str(data), "--root-key-file", str(tmp_path / "rk"),
                          "--endpoint", f"unix://{sock_path}", "--credentials-out", str(creds))
    assert made.returncode == 0, made.stderr
    assert f"--listen unix:{sock_path}" in made.stdout
    assert json.loads(creds.read_text())["endpoint"] == f"unix://{sock_path}"
    bad = run_keyservice("init", "--data-dir", str(tmp_path / "d2"), "--root-key-file", str(tmp_path / "rk2"),
                         "--endpoint", "unix://host/ks.sock")
    assert bad.returncode == 1 and "unix:///ABSOLUTE/PATH" in bad.stderr, bad.stderr
    log = tmp_path / "serve.log"
    for listen, warned in ((f"127.0.0.1:{free_port()}", True), (f"unix:{sock_path}", False)):
        text = _serve_until_listening(log, "--data-dir", str(data), "--root-key-file", str(tmp_path / "rk"),
                                      "--listen", listen)
        assert ("will not find it" in text) == warned, text


def _serve_until_listening(log: Path, *args: str) -> str:
    """Start ``keyservice serve ARGS``, stop it once it announced itself; its output."""
    log.write_text("")
    process = spawn_keyservice(log, "serve", *args)
    try:
        _wait_for(lambda: "keyservice listening on" in log.read_text() or process.poll() is not None)
    finally:
        process.terminate()
        process.wait(timeout=20)
    return log.read_text()


def test_socket_options_without_a_unix_listener_are_a_usage_error(tmp_path: Path) -> None:
    result = run_keyservice("serve", "--dev", "--socket-mode", "0660", "--data-dir", str(tmp_path / "d"))
    assert result.returncode == 1 and "need --listen unix:PATH" in result.stderr, result.stderr
    bad = run_keyservice("serve", "--dev", "--listen", f"unix:{tmp_path}/s", "--socket-mode", "rw",
                         "--data-dir", str(tmp_path / "d"))
    assert bad.returncode == 1 and "not an octal mode" in bad.stderr, bad.stderr
    assert not (tmp_path / "s").exists()


def test_workers_share_the_unix_socket(tmp_path: Path) -> None:
    service, sock_path = start_unix_service(tmp_path, "--workers", "2", tcp=False)
    try:
        for _ in range(6):
            client = _client(service, sock_path)  # a new connection each time: any worker may take it
            try:
                assert "Keys" in client.call("ListKeys", {})
            finally:
                client.close()
        records = [r for r in service.audit_records() if r["operation"] == "ListKeys"]
        assert len(records) == 6 and all(r["peer"]["pid"] == os.getpid() for r in records)
        # Ready means one worker answers; the other may still be starting on a loaded machine.
        deadline = time.monotonic() + 30
        while len(list((service.data_dir / "run").glob("w*.pid"))) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(list((service.data_dir / "run").glob("w*.pid"))) == 2
    finally:
        stop_dev_service(service)
    assert not sock_path.exists()


@requires_fuse
def test_a_mount_over_the_unix_socket_is_audited_with_the_daemon_as_peer(
    unix_service: tuple[DevKeyService, Path], tmp_path: Path
) -> None:
    service, sock_path = unix_service
    client = _client(service, sock_path)
    try:
        key = client.call("CreateKey", {})["KeyMetadata"]["KeyId"]
    finally:
        client.close()
    cipher, plain = tmp_path / "cipher", tmp_path / "plain"
    endpoint = f"unix://{sock_path}"
    # The operator's credentials file for a co-located mount names the socket as its endpoint.
    creds = tmp_path / "creds-unix.json"
    creds.write_text(json.dumps({**service.credentials, "endpoint": endpoint}))
    kmsfs_init(cipher, endpoint, key, creds)
    with mounted(cipher, plain, creds, "--key-pool", "0"):
        (plain / "hello.txt").write_text("over the unix socket")
        pid = daemon_pid(cipher, plain)
        subprocess.run(["sync"], check=True)
        assert (plain / "hello.txt").read_text() == "over the unix socket"
    records = [r for r in service.audit_records()
               if (r.get("caller") or {}).get("path") == "/hello.txt" and r["outcome"] == "success"]
    assert {r["operation"] for r in records} >= {"GenerateDataKey"}, records
    for record in records:
        assert record["peer"]["pid"] == pid, record  # the mount daemon itself connected
        assert record["peer"]["uid"] == os.geteuid()
        assert record["source_address"] == f"unix:{sock_path}"


NOBODY_PROBE = """
import json, socket, sys
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
try:
    sock.connect(sys.argv[1])
except PermissionError:
    print(json.dumps("EACCES"))
    raise SystemExit
sock.sendall(b"POST / HTTP/1.1\\r\\nHost: localhost\\r\\nX-Amz-Target: TrentService.ListKeys\\r\\n"
             b"Content-Length: 2\\r\\n\\r\\n{}")
data = b""
while b"\\r\\n\\r\\n" not in data or len(data.split(b"\\r\\n\\r\\n", 1)[1]) < int(
        data.lower().split(b"content-length: ", 1)[1].split(b"\\r\\n", 1)[0]):
    data += sock.recv(65536)
head, body = data.split(b"\\r\\n\\r\\n", 1)
request_id = head.lower().split(b"x-amzn-requestid: ", 1)[1].split(b"\\r\\n", 1)[0].decode()
print(json.dumps({"request_id": request_id, "body": json.loads(body)}))
"""


# The probe runs as another user, so with a Python that user may execute (not the venv's, under /root).
SYSTEM_PYTHON = "/usr/bin/python3"


@pytest.mark.skipif(os.geteuid() != 0 or _other_user() is None or not os.access(SYSTEM_PYTHON, os.X_OK),
                    reason="needs root and /usr/bin/python3 to run a probe as another user")
def test_another_local_user_is_kept_out_by_the_mode_and_named_in_the_audit_when_let_in() -> None:
    """A local attacker as another user: with the default 0600 the kernel refuses the connection;
    with the socket opened to everyone it connects, is refused like any unsigned client, and the
    audit names its uid (the peer), which no header can fake."""
    nobody = _other_user()
    assert nobody is not None
    base = Path(tempfile.mkdtemp(prefix="kmsfs-unix-"))  # /tmp/...: a directory others can traverse
    try:
        base.chmod(0o755)
        service, sock_path = start_unix_service(base, tcp=False)
        try:
            def probe() -> Any:
                return json.loads(subprocess.run(
                    [SYSTEM_PYTHON, "-c", NOBODY_PROBE, str(sock_path)], capture_output=True, text=True,
                    timeout=30, user=nobody, check=True,
                ).stdout)  # fmt: skip

            assert probe() == "EACCES"
            sock_path.chmod(0o666)
            answer = probe()
            assert answer["body"]["__type"] == "MissingAuthenticationTokenException", answer
            record = _record(service, answer["request_id"])
            assert record["peer"]["uid"] == nobody and record["principal"] is None
        finally:
            stop_dev_service(service)
    finally:
        shutil.rmtree(base, ignore_errors=True)
