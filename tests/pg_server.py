"""A real PostgreSQL 15 server for the tests, started in a temporary directory.

``initdb`` refuses to run as root, so as root the cluster is created and run by the ``postgres``
user; the socket goes in the temporary directory (``-k``) and the server listens on a free
loopback port with trust authentication (loopback only, for tests). ``stop`` shuts it down
(``pg_ctl stop -m immediate`` as a last resort) and removes the directory.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

BIN_DIRS = ("/usr/lib/postgresql/15/bin", "/usr/lib/postgresql/16/bin", "/usr/lib/postgresql/17/bin")


def find_bin() -> Path | None:
    """The directory holding initdb/pg_ctl/postgres, or None where PostgreSQL is not installed."""
    for candidate in BIN_DIRS:
        if Path(candidate, "initdb").exists():
            return Path(candidate)
    found = shutil.which("initdb")
    return Path(found).resolve().parent if found else None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class PostgresServer:
    """One throwaway PostgreSQL cluster; ``url(db)`` names a database on it."""

    def __init__(self, bin_dir: Path) -> None:
        self.bin_dir = bin_dir
        self.dir = Path(tempfile.mkdtemp(prefix="kmsfs-pg-"))
        self.data = self.dir / "data"
        self.port = _free_port()
        self.as_postgres = os.geteuid() == 0
        if self.as_postgres:
            shutil.chown(self.dir, "postgres", "postgres")
        self.dir.chmod(0o700)

    def _run(self, *argv: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        prefix = ["runuser", "-u", "postgres", "--"] if self.as_postgres else []
        return subprocess.run(
            [*prefix, *argv], check=check, capture_output=True, text=True, timeout=timeout, cwd=self.dir
        )

    def start(self) -> None:
        self._run(
            str(self.bin_dir / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres",
            "--no-sync", "-E", "UTF8", "--locale=C",
        )  # fmt: skip
        self.resume()

    def resume(self) -> None:
        """Start (again) the server of an existing cluster on the same port."""
        options = (
            f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off"
            " -c max_connections=300 -c shared_buffers=32MB"
        )
        result = self._run(
            str(self.bin_dir / "pg_ctl"), "-D", str(self.data), "-o", options, "-l",
            str(self.dir / "server.log"), "-w", "-t", "60", "start", check=False,
        )  # fmt: skip
        if result.returncode != 0:
            server_log = self.dir / "server.log"
            log = server_log.read_text(errors="replace") if server_log.exists() else ""
            raise RuntimeError(f"PostgreSQL did not start: {result.stderr}\n{log[-2000:]}")

    def pid(self) -> int:
        return int((self.data / "postmaster.pid").read_text().split()[0])

    def kill(self) -> None:
        """SIGKILL the postmaster (and so every backend): the database vanishes mid-load."""
        self._run(str(self.bin_dir / "pg_ctl"), "-D", str(self.data), "kill", "KILL", str(self.pid()))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.kill(self.pid(), 0)
            except (ProcessLookupError, FileNotFoundError, ValueError):
                break
            time.sleep(0.05)
        # Backends die with their postmaster; remove the pid file so `resume` can start again.
        time.sleep(0.5)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self) -> str:
        """A new empty database; returns its URL."""
        import psycopg

        name = "t_" + uuid.uuid4().hex[:12]
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.url(name)

    def stop(self) -> None:
        try:
            if (self.data / "postmaster.pid").exists():
                pg_ctl = str(self.bin_dir / "pg_ctl")
                data = str(self.data)
                result = self._run(pg_ctl, "-D", data, "-m", "fast", "-w", "-t", "20", "stop", check=False)
                if result.returncode != 0:
                    self._run(pg_ctl, "-D", data, "-m", "immediate", "stop", check=False)
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


@contextlib.contextmanager
def running_server() -> Iterator[PostgresServer]:
    """A started server, stopped on the way out (even after a failed test). Skips only where
    PostgreSQL or psycopg is truly not installed, and then loudly: setup.sh installs both."""
    import pytest

    bin_dir = find_bin()
    try:
        import psycopg  # noqa: F401
        import psycopg_pool  # noqa: F401
    except ImportError:
        bin_dir = None
    if bin_dir is None:
        message = (
            "POSTGRESQL TESTS SKIPPED: postgresql-15 or kmsfs[postgres] is not installed"
            " (run scripts/setup.sh)"
        )
        sys.stderr.write(f"\n*** {message} ***\n")
        pytest.skip(message)
    server = PostgresServer(bin_dir)
    try:
        server.start()
        yield server
    finally:
        server.stop()
