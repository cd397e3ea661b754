"""``kmsfs mount``: check the cipherdir, mount point and key, then fork the daemon.

Why mount forks instead of letting libfuse daemonize: libfuse's own daemonizing happens after
fusepy has started nothing, but it cannot tell the parent "the mount is ready" or "it failed and
why". Here the parent forks before any thread or connection exists, the child mounts in the
foreground of its own session and writes one byte to a pipe from FUSE's ``init`` callback; the
parent returns 0 only after that byte (and ``os.path.ismount``), or prints the log tail and exits
non-zero.
"""

from __future__ import annotations

import argparse
import logging
import os
import secrets
import sys
import time

from kmsfs import mountlock
from kmsfs.cli.common import CliError, _build
from kmsfs.cli.serve import _serve, _setup_logging
from kmsfs.cli.umount import _is_dead_mount, _unmount
from kmsfs.config import Config
from kmsfs.format import FILE_ID_SIZE, encryption_context
from kmsfs.keyclient import KeyClient, KeyServiceError, KeyServiceUnavailable

MOUNT_TIMEOUT = 30.0
LOG_NAME = ".kmsfs.log"


def _check_service(client: KeyClient, config: Config) -> list[str]:
    """Fail fast on a wrong endpoint or bad credentials (a usage-only principal may not describe);
    return warnings when the key cannot be used now (every open would fail with EACCES)."""
    try:
        try:
            meta = client.describe_key(config.key_arn)
        except KeyServiceError as exc:
            if exc.code != "AccessDeniedException":
                raise CliError(f"cannot mount: key service refused: {exc}") from None
            meta = {}
        if meta and (meta.get("Enabled") is False or meta.get("KeyState", "Enabled") != "Enabled"):
            return [f"key {config.key_arn} is {meta.get('KeyState') or 'disabled'}: every open "
                    "and create will fail with EACCES"]
        return _probe_key(client, config)
    except KeyServiceUnavailable as exc:
        raise CliError(f"cannot mount: {exc}") from None
    finally:
        client.close()


def _probe_key(client: KeyClient, config: Config) -> list[str]:
    """Try the two operations a mount needs, the way it uses them (a file-id encryption context,
    so context-conditioned policies answer as they will for files). Audited as ``op: probe``."""
    context = encryption_context(secrets.token_bytes(FILE_ID_SIZE))
    caller = {"tool": "kmsfs mount", "process": "kmsfs", "op": "probe", "pid": os.getpid(),
              "uid": os.getuid()}
    try:
        _, blob, _ = client.generate_data_key(config.key_arn, context, caller)
    except KeyServiceError as exc:
        return [f"these credentials may not GenerateDataKey with {config.key_arn} ({exc}): "
                "creating files will fail with EACCES"]
    try:
        client.decrypt(blob, context, caller, key_id=config.key_arn)
    except KeyServiceError as exc:
        return [f"these credentials may not Decrypt with {config.key_arn} ({exc}): "
                "opening files will fail with EACCES"]
    return []


def _check_mountpoint_empty(mountpoint: str, nonempty: bool) -> None:
    """Refuse to hide files under a mount, as gocryptfs does, unless ``--nonempty``."""
    try:
        entries = os.listdir(mountpoint)
    except OSError as exc:
        raise CliError(f"mount point {mountpoint}: {exc.strerror}") from None
    if entries and not nonempty:
        raise CliError(f"mount point {mountpoint} is not empty ({len(entries)} entries would be hidden "
                       "under the mount); empty it, or pass --nonempty")


def _lock_cipherdir(cipherdir: str) -> int:
    try:
        return mountlock.acquire(cipherdir)
    except mountlock.AlreadyMounted as exc:
        raise CliError(str(exc)) from None


def _warn_unusable_key(warnings: list[str], strict: bool) -> None:
    for warning in warnings:
        if strict:
            raise CliError(f"refusing to mount (--strict): {warning}")
        print(f"kmsfs: warning: {warning}", file=sys.stderr)


def cmd_mount(args: argparse.Namespace) -> int:
    cipherdir = os.path.abspath(args.cipherdir)
    mountpoint = os.path.abspath(args.mountpoint)
    if _is_dead_mount(mountpoint):
        _unmount(mountpoint)  # a daemon killed with -9 left it: recover, then mount afresh
        print(f"recovered {mountpoint} from a dead kmsfs mount", file=sys.stderr)
    if not os.path.isdir(mountpoint):
        raise CliError(f"mount point {mountpoint} is not a directory")
    if os.path.ismount(mountpoint):
        raise CliError(f"{mountpoint} is already a mount point")
    _check_mountpoint_empty(mountpoint, args.nonempty)
    credentials = os.path.abspath(args.credentials) if args.credentials else None
    args.credentials = credentials  # the daemon runs in /
    config, client = _build(cipherdir, args)
    _warn_unusable_key(_check_service(client, config), args.strict)
    lock_fd = _lock_cipherdir(cipherdir)  # held by the mount (inherited by the daemon) for its life
    log_file = os.path.abspath(args.log) if args.log else os.path.join(cipherdir, LOG_NAME)
    if args.foreground:
        _setup_logging(args.log, args.verbose)
        _serve(cipherdir, mountpoint, credentials, args.allow_other, None, args.verbose, args)
        return 0
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid != 0:
        os.close(lock_fd)  # the daemon's copy keeps the lock
    if pid == 0:  # child: become the daemon
        os.close(read_fd)
        code = 0
        try:
            os.setsid()
            os.chdir("/")  # do not keep the caller's working directory busy
            devnull = os.open(os.devnull, os.O_RDWR)
            # O_NOFOLLOW: the default log lives in the cipherdir, which is untrusted storage; a
            # planted symlink must not make a root daemon append to some other file.
            logfd = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o600)
            os.dup2(devnull, 0)
            os.dup2(logfd, 1)
            os.dup2(logfd, 2)
            _setup_logging(None, args.verbose)  # stderr is the log file now
            _serve(cipherdir, mountpoint, credentials, args.allow_other, write_fd, args.verbose, args)
        except BaseException as exc:  # noqa: BLE001 - the daemon must report, never re-enter main
            logging.getLogger("kmsfs").error("mount failed: %s", exc, exc_info=True)
            code = 1
        finally:
            os._exit(code)
    os.close(write_fd)
    return _await_ready(pid, read_fd, mountpoint, log_file)


def _log_tail(log_file: str, lines: int = 10) -> str:
    """The last lines of the daemon log, never through a symlink planted in the cipherdir."""
    try:
        fd = os.open(log_file, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as exc:
        return f"(log unreadable: {exc.strerror})\n"
    with os.fdopen(fd, encoding="utf-8", errors="replace") as f:
        return "".join(f.read().splitlines(True)[-lines:])


def _await_ready(pid: int, read_fd: int, mountpoint: str, log_file: str) -> int:
    import select

    deadline = time.monotonic() + MOUNT_TIMEOUT
    got = b""
    while time.monotonic() < deadline:
        r, _, _ = select.select([read_fd], [], [], 0.2)
        if r:
            got = os.read(read_fd, 1)
            break
    os.close(read_fd)
    if got == b"R":
        while time.monotonic() < deadline and not os.path.ismount(mountpoint):
            time.sleep(0.05)
        if os.path.ismount(mountpoint):
            print(f"mounted at {mountpoint} (pid {pid}, log {log_file})")
            return 0
    done, status = os.waitpid(pid, os.WNOHANG)
    if done == 0:  # still running but not ready: give up on it
        os.kill(pid, 15)
    tail = ""
    try:
        tail = _log_tail(log_file)
    except OSError:
        pass
    raise CliError(f"mount of {mountpoint} failed (see {log_file})\n{tail}".rstrip())
