"""Export to syslog: RFC 5424 messages over TCP with TLS (RFC 5425), octet-counting framing (RFC 6587).

Why a module of its own: ``export`` knows what to send and the cursor; this module knows only
the wire: how one exported JSON line becomes one syslog message, and the TLS connection with
the CA check. ``SyslogOut`` stands where ``export`` writes a file: each ``write`` is one exported
line (``export`` writes them one at a time) and is sent before ``export`` moves its cursor.

A message (docs/AUDIT.md, "Export to a SIEM")::

    <PRI>1 TIME HOST keyservice - OPERATION [kmsfs@32473 chain="C" seq="N" outcome="O"] BOM{json}

PRI is facility authpriv (10) with severity info (6) for a success and warning (4) for a
refusal; TIME is the record's time; MSG is the exported JSON line in UTF-8 after a BOM. 32473
is the private enterprise number RFC 5612 reserves for documentation: the SD-ID is ours only by
convention.

Delivery: ``flush`` returns only once the receiver's TCP has acknowledged every byte (the send
queue is empty), and ``export`` moves its cursor after it, so a kill loses nothing. It may
repeat what was sent after the last cursor (TCP syslog has no application acknowledgement):
``chain`` and ``seq`` identify a record uniquely, for the receiver to drop repeats.
"""

from __future__ import annotations

import fcntl
import re
import socket
import ssl
import struct
import termios
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import orjson

FACILITY_AUTHPRIV = 10
SEVERITY_INFO = 6
SEVERITY_WARNING = 4
SD_ID = "kmsfs@32473"
APP_NAME = "keyservice"
BOM = b"\xef\xbb\xbf"
_PRINTABLE = re.compile(r"[^\x21-\x7e]")


class SyslogError(OSError):
    """The syslog receiver cannot be reached, or refused (TLS, certificate, connection lost)."""


def parse_url(url: str) -> tuple[str, int]:
    """``tcp+tls://host:port`` -> (host, port); ValueError for anything else."""
    parts = urlsplit(url)
    if parts.scheme != "tcp+tls" or not parts.hostname or parts.path not in ("", "/"):
        raise ValueError(f"--syslog {url!r}: expected tcp+tls://HOST:PORT (RFC 5425: syslog over TLS)")
    try:
        port = parts.port or 6514
    except ValueError:
        raise ValueError(f"--syslog {url!r}: bad port") from None
    return parts.hostname, port


def _header_field(text: object, limit: int) -> str:
    """A header field: printable US-ASCII without spaces, at most ``limit`` characters, ``-`` if empty."""
    value = _PRINTABLE.sub("_", str(text or ""))[:limit]
    return value or "-"


def _sd_value(text: object) -> str:
    return str(text).replace("\\", "\\\\").replace('"', '\\"').replace("]", "\\]")


def message(line: bytes, hostname: str) -> bytes:
    """The RFC 5424 message of one exported JSON line (a record with ``chain`` and ``seq``)."""
    record: dict[str, Any] = orjson.loads(line)
    outcome = str(record.get("outcome") or "-")
    severity = SEVERITY_INFO if outcome == "success" else SEVERITY_WARNING
    params = " ".join(f'{name}="{_sd_value(record.get(name, "-"))}"' for name in ("chain", "seq", "outcome"))
    head = (f"<{FACILITY_AUTHPRIV * 8 + severity}>1 {_header_field(record.get('time'), 64)} "
            f"{_header_field(hostname, 255)} {APP_NAME} - {_header_field(record.get('operation'), 32)} "
            f"[{SD_ID} {params}] ")
    return head.encode() + BOM + line


def frame(msg: bytes) -> bytes:
    """Octet-counting framing (RFC 6587 3.4.1, RFC 5425 4.3): ``LEN SP MSG``."""
    return str(len(msg)).encode() + b" " + msg


class SyslogOut:
    """A TLS connection to a syslog receiver that takes ``export``'s lines as a file would."""

    def __init__(self, url: str, *, ca_file: Path | None = None, cert_file: Path | None = None,
                 key_file: Path | None = None, timeout: float = 10.0) -> None:
        host, port = parse_url(url)
        context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if cert_file is not None:
            context.load_cert_chain(str(cert_file), str(key_file) if key_file else None)
        self.hostname = socket.gethostname()
        self.timeout = timeout
        self._pending: list[bytes] = []
        try:
            raw = socket.create_connection((host, port), timeout=timeout)
        except OSError as error:
            raise SyslogError(f"cannot connect to the syslog receiver {host}:{port}: {error}") from None
        try:
            self.sock = context.wrap_socket(raw, server_hostname=host)
        except (ssl.SSLError, OSError) as error:
            raw.close()
            raise SyslogError(f"TLS with the syslog receiver {host}:{port} failed: {error}") from None

    def write(self, data: bytes) -> int:
        """Queue one exported line (with its newline); sent at the next ``flush``."""
        self._pending.append(frame(message(data.rstrip(b"\n"), self.hostname)))
        return len(data)

    def flush(self) -> None:
        """Send every queued message (before ``export`` moves its cursor past them)."""
        if not self._pending:
            return
        data = b"".join(self._pending)
        self._pending.clear()
        try:
            self.sock.sendall(data)
            self._acknowledged()
        except OSError as error:
            raise SyslogError(f"the syslog receiver's connection failed: {error}") from None

    def _acknowledged(self) -> None:
        """Wait until the receiver's TCP has acknowledged every byte sent (the send queue is
        empty), reading what it sent meanwhile (TLS session tickets). Only then may ``export``
        move its cursor: a process killed with bytes unsent, or with bytes unread (the kernel
        then resets the connection and drops what it had not sent), would lose records the
        cursor had passed."""
        self._drain()
        deadline = time.monotonic() + self.timeout
        while _unacknowledged(self.sock) > 0:
            if time.monotonic() > deadline:
                raise SyslogError("the syslog receiver did not acknowledge what was sent "
                                  f"within {self.timeout:.0f} s")
            time.sleep(0.001)
            self._drain()

    def _drain(self) -> None:
        self.sock.setblocking(False)
        try:
            while True:
                if not self.sock.recv(65536):
                    raise SyslogError("the syslog receiver closed the connection")
        except (ssl.SSLWantReadError, BlockingIOError):
            pass
        finally:
            self.sock.settimeout(self.timeout)

    def seekable(self) -> bool:
        return False

    def close(self) -> None:
        try:
            self.flush()
        finally:
            self.sock.close()


def _unacknowledged(sock: socket.socket) -> int:
    """Bytes in the socket's send queue not yet acknowledged by the peer (Linux: SIOCOUTQ)."""
    return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"))[0]
