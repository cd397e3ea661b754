"""``keyservice audit export --syslog tcp+tls://...``: RFC 5424 over TLS to a real local listener.

The listener is a small TLS server (Python's ssl, a certificate from a CA made for the test) that
reads octet-counted frames (RFC 6587) and keeps every message. The export runs as the operator
runs it, a ``python -m keyservice`` process; one is SIGKILLed mid-stream and a second resumes from
the cursor.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from keyservice.audit import syslog
from keyservice.audit.records import read_records
from tests.unit.test_audit_scale import Clock, open_log, sample, write

MESSAGE = re.compile(rb'^<(\d+)>1 (\S+) (\S+) keyservice - (\S+) \[kmsfs@32473 chain="([^"]*)" seq="(\d+)" '
                     rb'outcome="([^"]*)"\] \xef\xbb\xbf(\{.*\})$', re.S)


def _cert(subject: str, issuer_key: ec.EllipticCurvePrivateKey | None, issuer: x509.Name | None,
          ca: bool) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    now = dt.datetime.now(dt.UTC)
    builder = (x509.CertificateBuilder().subject_name(name).issuer_name(issuer or name)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - timedelta(minutes=5)).not_valid_after(now + timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if not ca:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]), critical=False)
    return key, builder.sign(issuer_key or key, hashes.SHA256())


def _pem(path: Path, *items: object) -> Path:
    data = b""
    for item in items:
        if isinstance(item, x509.Certificate):
            data += item.public_bytes(serialization.Encoding.PEM)
        else:
            data += item.private_bytes(serialization.Encoding.PEM,  # type: ignore[attr-defined]
                                       serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    path.write_bytes(data)
    return path


def make_ca(tmp_path: Path, name: str) -> tuple[Path, Path]:
    """(CA bundle, server cert+key PEM) of a CA named ``name`` and a server cert for 127.0.0.1."""
    ca_key, ca_cert = _cert(f"{name} test CA", None, None, ca=True)
    key, cert = _cert("127.0.0.1", ca_key, ca_cert.subject, ca=False)
    return _pem(tmp_path / f"{name}-ca.pem", ca_cert), _pem(tmp_path / f"{name}-server.pem", cert, key)


class Receiver:
    """A TLS syslog listener on 127.0.0.1 keeping every octet-counted message it receives."""

    def __init__(self, server_pem: Path) -> None:
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(server_pem)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.messages: list[bytes] = []
        self.errors: list[str] = []
        self.lock = threading.Lock()
        self.stopping = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"tcp+tls://127.0.0.1:{self.port}"

    def _serve(self) -> None:
        self.listener.settimeout(0.2)
        while not self.stopping:
            try:
                raw, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._client, args=(raw,), daemon=True).start()

    def _client(self, raw: socket.socket) -> None:
        try:
            conn = self.context.wrap_socket(raw, server_side=True)
        except (ssl.SSLError, OSError) as error:
            self.errors.append(str(error))
            raw.close()
            return
        buffer = b""
        with conn:
            while True:
                try:
                    data = conn.recv(65536)
                except (ssl.SSLError, OSError):
                    data = b""
                if not data:
                    return
                buffer += data
                while True:  # octet counting: LEN SP MSG
                    space = buffer.find(b" ")
                    if space < 0 or len(buffer) < space + 1 + int(buffer[:space]):
                        break
                    length = int(buffer[:space])
                    with self.lock:
                        self.messages.append(buffer[space + 1:space + 1 + length])
                    buffer = buffer[space + 1 + length:]

    def ids(self) -> list[tuple[str, int]]:
        with self.lock:
            return [(m.group(5).decode(), int(m.group(6))) for m in map(MESSAGE.match, self.messages) if m]

    def stop(self) -> None:
        self.stopping = True
        self.listener.close()
        self.thread.join(5)


def export(data: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "keyservice", "audit", "export", "--data-dir", str(data),
                           *args], capture_output=True, text=True, timeout=120, check=False)


def test_records_arrive_as_rfc5424_over_tls(tmp_path: Path) -> None:
    data = tmp_path / "data"
    sample(data)
    ca, server = make_ca(tmp_path, "good")
    receiver = Receiver(server)
    try:
        done = export(data, "--syslog", receiver.url, "--syslog-ca", str(ca), "--cursor", str(tmp_path / "c"))
        assert done.returncode == 0, done.stderr
        deadline = time.monotonic() + 10
        while len(receiver.messages) < 36 and time.monotonic() < deadline:
            time.sleep(0.05)
        records = list(read_records(data))
        assert len(receiver.messages) == len(records) == 36
        for n, (raw, record) in enumerate(zip(receiver.messages, records, strict=True), 1):
            m = MESSAGE.match(raw)
            assert m, raw[:200]
            pri, when, _host, msgid, chain, seq, outcome, body = m.groups()
            assert int(pri) == 10 * 8 + (6 if record["outcome"] == "success" else 4)
            assert when.decode() == record["time"] and msgid.decode() == record["operation"]
            assert (chain, int(seq), outcome.decode()) == (b"main", n, record["outcome"])
            assert json.loads(body) == {**record, "chain": "main", "seq": n}
        # Nothing new: a second run sends nothing.
        again = export(data, "--syslog", receiver.url, "--syslog-ca", str(ca), "--cursor",
                       str(tmp_path / "c"))
        assert again.returncode == 0 and len(receiver.messages) == 36
    finally:
        receiver.stop()


def test_a_receiver_certificate_from_another_ca_is_refused(tmp_path: Path) -> None:
    data = tmp_path / "data"
    sample(data)
    ca, _server = make_ca(tmp_path, "trusted")
    _other_ca, impostor = make_ca(tmp_path, "impostor")
    receiver = Receiver(impostor)
    try:
        done = export(data, "--syslog", receiver.url, "--syslog-ca", str(ca), "--cursor", str(tmp_path / "c"))
        assert done.returncode == 1, done.stderr
        assert "TLS with the syslog receiver" in done.stderr and "CERTIFICATE_VERIFY_FAILED" in done.stderr
        assert "Traceback" not in done.stderr and receiver.messages == []
        assert not (tmp_path / "c").exists()  # the cursor did not move
        plain = export(data, "--syslog", f"tcp://127.0.0.1:{receiver.port}")
        assert plain.returncode == 1 and "expected tcp+tls://" in plain.stderr
    finally:
        receiver.stop()


def test_export_killed_and_resumed_loses_nothing(tmp_path: Path) -> None:
    """SIGKILL mid-stream, then resume from the cursor: every record arrives; a repeat is only
    possible for the batch sent after the last cursor (at most 500), and carries the same
    (chain, seq) for the receiver to drop."""
    data = tmp_path / "data"
    clock = Clock()
    log = open_log(data, clock, segment_bytes=300_000)
    write(log, clock, 4000, step=timedelta(milliseconds=10))
    log.close()
    ca, server = make_ca(tmp_path, "good")
    receiver = Receiver(server)
    cursor = tmp_path / "cursor.json"
    args = ["--syslog", receiver.url, "--syslog-ca", str(ca), "--cursor", str(cursor)]
    try:
        command = [sys.executable, "-m", "keyservice", "audit", "export", "--data-dir", str(data), *args,
                   "--follow"]
        child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 60
            while len(receiver.messages) < 1200 and time.monotonic() < deadline:
                time.sleep(0.005)
            os.kill(child.pid, signal.SIGKILL)
        finally:
            child.kill()
            child.wait(10)
        before = len(receiver.ids())
        assert 0 < before, child.stderr.read() if child.stderr else ""
        clock.now += timedelta(seconds=1)
        log = open_log(data, clock, segment_bytes=300_000)
        write(log, clock, 50, start=10_000)  # written while the export was down
        log.close()
        done = export(data, *args)
        assert done.returncode == 0, done.stderr
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and len(set(receiver.ids())) < 4050:
            time.sleep(0.05)
        ids = receiver.ids()
        assert sorted(set(ids)) == [("main", n) for n in range(1, 4051)]  # nothing lost
        repeats = len(ids) - len(set(ids))
        assert repeats <= 500, repeats
        assert json.loads(cursor.read_text())["chains"]["main"]["seq"] == 4050
    finally:
        receiver.stop()


def test_message_format_escapes_and_limits() -> None:
    line = json.dumps({"time": "2026-01-01T00:00:00.000Z", "operation": "Decrypt Key", "outcome": "error",
                       "chain": 'a"b]c\\', "seq": 7}).encode()
    msg = syslog.message(line, "host name")
    assert msg.startswith(b'<84>1 2026-01-01T00:00:00.000Z host_name keyservice - Decrypt_Key '
                          b'[kmsfs@32473 chain="a\\"b\\]c\\\\" seq="7" outcome="error"] \xef\xbb\xbf{')
    assert syslog.frame(b"abc") == b"3 abc"
