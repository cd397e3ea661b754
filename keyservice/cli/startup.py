"""What ``serve`` and ``init`` do around the service itself: check before creating, one server per
data directory, undo a failed start, and run in the background.

Why here and not in the service: these are operator concerns of one process (a port in use, a
typo in ``--listen``, a second server on the same data directory, ``eval "$(keyservice serve
--background)"``); the service below knows nothing of them.

One server per data directory: two servers on one data directory would each extend the audit hash
chain from their own idea of its tail, forking it, and ``audit verify`` would report TAMPERED from
then on. ``serve`` holds an exclusive ``flock`` on ``DATA_DIR/serve.lock`` for its whole life
(the kernel drops it when the process dies, so a crash leaves no stale lock). The offline commands
that write (``principal create`` ...) do not take it: they write only the SQLite store, whose own
locking coordinates them with a running server, and never the audit log.
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import socket
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from keyservice.cli.common import CliError

LOCK_NAME = "serve.lock"
LOG_NAME = "keyservice.log"


def check_listen(host: str, port: int) -> None:
    """Fail with one line if ``host:port`` cannot be listened on, before anything is created.

    The server binds again for real a moment later (a port taken in between is reported the same
    way, and undone the same way)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
    except socket.gaierror as exc:
        raise CliError(f"cannot listen on {host}:{port}: unknown host ({exc.strerror})") from None
    except OSError as exc:
        raise listen_error(host, port, exc) from None


def listen_error(host: str, port: int, exc: OSError) -> CliError:
    """The one line for a failed bind, saying what to do about the usual causes."""
    where = f"{host}:{port}"
    if exc.errno == errno.EADDRINUSE:
        return CliError(f"cannot listen on {where}: the port is in use (another keyservice? "
                        f"`ss -ltnp 'sport = :{port}'` shows who); pick another with --listen")
    if exc.errno == errno.EADDRNOTAVAIL:
        return CliError(f"cannot listen on {where}: this host has no address {host} "
                        "(`ip -br addr` lists them)")
    if exc.errno == errno.EACCES:
        return CliError(f"cannot listen on {where}: permission denied (ports below 1024 need root "
                        "or CAP_NET_BIND_SERVICE)")
    return CliError(f"cannot listen on {where}: {exc.strerror or exc}")


def check_data_dir_path(data_dir: Path) -> None:
    """One line if ``data_dir`` can be neither used nor created (a file in the way, a dangling
    symlink, an unwritable parent)."""
    if data_dir.exists():
        if not data_dir.is_dir():
            raise CliError(f"{data_dir} is not a directory")
        return
    probe = data_dir.absolute()
    while not probe.exists():
        if probe.is_symlink():
            raise CliError(f"cannot create {data_dir}: {probe} is a dangling symlink")
        probe = probe.parent
    if not probe.is_dir():
        raise CliError(f"cannot create {data_dir}: {probe} is not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise CliError(f"cannot create {data_dir}: {probe} is not writable")


def first_missing(path: Path) -> Path:
    """The outermost directory ``mkdir -p path`` would create (``path`` itself if it exists)."""
    probe = path.absolute()
    while not probe.parent.exists() and probe.parent != probe:
        probe = probe.parent
    return probe


def certificate_names(cert: Path) -> set[str] | None:
    """The DNS names and IP addresses a PEM certificate is valid for (None if unreadable)."""
    from cryptography import x509

    try:
        leaf = x509.load_pem_x509_certificate(cert.read_bytes())
        alt = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (OSError, ValueError, x509.ExtensionNotFound):
        return None
    ips = {str(ip) for ip in alt.get_values_for_type(x509.IPAddress)}
    return {*alt.get_values_for_type(x509.DNSName), *ips}


@contextmanager
def undo_on_failure(*paths: Path) -> Iterator[None]:
    """Remove, if the block fails, whatever it created at ``paths``: a path that did not exist is
    removed whole; in a directory that existed, only the entries that were not there before."""
    before: dict[Path, set[str] | None] = {}
    for path in paths:
        before[path] = set(os.listdir(path)) if path.is_dir() else (None if not path.exists() else set())
    try:
        yield
    except BaseException:
        for path, entries in before.items():
            if entries is None:
                _remove(path)
            elif path.is_dir():
                for name in set(os.listdir(path)) - entries:
                    _remove(path / name)
        raise


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except FileNotFoundError:
            pass


def lock_data_dir(data_dir: Path) -> int:
    """Take the data directory's server lock (the returned fd holds it) or fail with one line."""
    path = data_dir / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode("ascii", "replace").strip()
        os.close(fd)
        who = f" (pid {holder})" if holder.isdigit() else ""
        raise CliError(f"{data_dir} is in use by another keyservice serve{who}: one server per data "
                       "directory (two would fork the audit hash chain)") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def run_in_background(work: Callable[[Callable[[str, Path], None]], int]) -> int:
    """Run ``work(ready)`` in a daemon child; return once it is ready (0) or has failed (its code).

    The child calls ``ready(text, log_file)`` once it serves: ``text`` is printed on the parent's
    stdout (shell lines for ``eval``), and from then on the child's output goes to ``log_file``.
    Until then its errors reach the parent's stderr directly, as one line. The child never keeps
    the parent's stdout: ``eval "$(keyservice serve --background)"`` returns as soon as it is ready.
    """
    read_fd, write_fd = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the daemon
        os.close(read_fd)
        code = 1
        try:
            os.setsid()
            devnull = os.open(os.devnull, os.O_RDWR)
            os.dup2(devnull, 0)
            os.dup2(2, 1)  # never the parent's stdout, which may be a $(...) capture

            def ready(text: str, log_file: Path) -> None:
                log_fd = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o600)
                sys.stdout.flush()
                sys.stderr.flush()
                os.dup2(log_fd, 1)
                os.dup2(log_fd, 2)
                os.close(log_fd)
                os.chdir("/")
                os.write(write_fd, b"R" + text.encode())
                os.close(write_fd)

            code = work(ready)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    os.close(write_fd)
    chunks = []
    while chunk := os.read(read_fd, 65536):
        chunks.append(chunk)
    os.close(read_fd)
    message = b"".join(chunks)
    if message.startswith(b"R"):
        sys.stdout.write(message[1:].decode())
        sys.stdout.flush()
        return 0
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status) or 1
