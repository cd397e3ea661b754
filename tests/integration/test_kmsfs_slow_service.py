"""A key service that accepts connections but stops answering (F9 "down or slow"): new opens
fail with EIO within --kms-timeout, already-open files keep working, no FUSE thread hangs, and
the mount recovers by itself when the service answers again. The stall is made by a TCP proxy
between kmsfs and a real key service, so TLS and the protocol are untouched."""

from __future__ import annotations

import errno
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import DevKeyService
from tests.integration.kmsfs_mount_helpers import kmsfs, mounted, requires_fuse

pytestmark = [pytest.mark.integration, requires_fuse]


class StallingProxy:
    """Forwards TCP to ``upstream``; while ``stalled`` is set, holds every byte it receives."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.stalled = threading.Event()
        self.closing = threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closing.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.upstream)
            for src, dst in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                while self.stalled.is_set() and not self.closing.is_set():
                    time.sleep(0.02)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.closing.set()
        self.listener.close()


@pytest.fixture
def proxy(keyservice_dev: DevKeyService) -> Iterator[StallingProxy]:
    port = int(keyservice_dev.endpoint.rsplit(":", 1)[1])
    proxy = StallingProxy(("127.0.0.1", port))
    try:
        yield proxy
    finally:
        proxy.close()


def test_slow_service_fails_new_opens_in_bounded_time(
    keyservice_dev: DevKeyService, proxy: StallingProxy, tmp_path: Path
) -> None:
    key_id = keyservice_dev.boto3_client().create_key()["KeyMetadata"]["KeyId"]
    cipher = tmp_path / "cipher"
    endpoint = f"https://127.0.0.1:{proxy.port}"
    creds = tmp_path / "credentials.json"  # the same principal, reached through the proxy
    creds.write_text(json.dumps({**keyservice_dev.credentials, "endpoint": endpoint}))
    kmsfs("init", cipher, "--endpoint", endpoint, "--key", key_id, "--credentials", creds)
    with mounted(cipher, tmp_path / "plain", creds, "--kms-timeout", "1") as plain:
        (plain / "held.txt").write_text("open before the stall")
        (plain / "other.txt").write_text("needs the service")
        with open(plain / "held.txt", "r+b") as held:
            proxy.stalled.set()
            start = time.monotonic()
            with pytest.raises(OSError) as opened:
                (plain / "other.txt").read_text()
            elapsed = time.monotonic() - start
            assert opened.value.errno == errno.EIO
            assert elapsed < 4, f"an open against a stalled service took {elapsed:.1f} s"
            assert held.read() == b"open before the stall"  # open files keep working
            held.write(b"!")
            held.flush()
            assert (plain / "held.txt").stat().st_size == len("open before the stall!")
            proxy.stalled.clear()
            deadline = time.monotonic() + 10
            while True:  # recovers by itself: a new connection once the stalled one timed out
                try:
                    assert (plain / "other.txt").read_text() == "needs the service"
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.2)
        assert (plain / "held.txt").read_text() == "open before the stall!"
