"""Helpers for kmsfs integration tests: run the CLI, mount, and always unmount."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

KMSFS = [sys.executable, "-m", "kmsfs"]


def fuse_available() -> bool:
    return os.path.exists("/dev/fuse") and bool(shutil.which("fusermount") or shutil.which("fusermount3"))


requires_fuse = pytest.mark.skipif(not fuse_available(), reason="needs /dev/fuse and fusermount")


def kmsfs(
    *args: str | os.PathLike[str], check: bool = True, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([*KMSFS, *map(str, args)], capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"kmsfs {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
        )
    return proc


def is_mounted(mountpoint: Path) -> bool:
    """From /proc/mounts: os.path.ismount says False for a dead FUSE mount (ENOTCONN)."""
    target = os.path.abspath(mountpoint).replace(" ", "\\040")
    try:
        with open("/proc/mounts", encoding="utf-8") as mounts:
            return any(line.split()[1] == target for line in mounts if len(line.split()) > 1)
    except OSError:
        return os.path.ismount(mountpoint)


def kmsfs_init(
    cipherdir: Path, endpoint: str, key_id: str, credentials: Path | str, *extra: object, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """``kmsfs init CIPHERDIR --endpoint E --key K --credentials C [extra...]``."""
    return kmsfs(
        "init",
        cipherdir,
        "--endpoint",
        endpoint,
        "--key",
        key_id,
        "--credentials",
        credentials,
        *map(str, extra),
        check=check,
    )


def force_unmount(mountpoint: Path) -> None:
    """Unmount by every means available; used in teardown even when a test failed (and after a
    daemon was killed, when the mount point answers ENOTCONN)."""
    for cmd in (
        ["fusermount", "-u", str(mountpoint)],
        ["fusermount3", "-u", str(mountpoint)],
        ["umount", str(mountpoint)],
        ["umount", "-l", str(mountpoint)],
        ["fusermount", "-uz", str(mountpoint)],
    ):
        if not is_mounted(mountpoint):
            return
        if shutil.which(cmd[0]):
            subprocess.run(cmd, capture_output=True, check=False)
            time.sleep(0.05)


@contextlib.contextmanager
def mounted(cipherdir: Path, mountpoint: Path, credentials: Path, *extra: str) -> Iterator[Path]:
    """``kmsfs mount`` (which must return only once ready), then always unmount."""
    mountpoint.mkdir(parents=True, exist_ok=True)
    try:
        kmsfs("mount", cipherdir, mountpoint, "--credentials", credentials, *extra)
        assert os.path.ismount(mountpoint), "kmsfs mount returned before the mount was ready"
        yield mountpoint
    finally:
        if os.path.ismount(mountpoint):
            proc = kmsfs("umount", mountpoint, check=False)
            if proc.returncode != 0:
                force_unmount(mountpoint)
        force_unmount(mountpoint)
        assert not is_mounted(mountpoint)


def backing_files(cipherdir: Path) -> list[Path]:
    """Regular backing files with a kmsfs header: not the cipherdir's own files, nor the directory
    ids and long-name side entries of encrypted names."""
    from kmsfs.names import is_reserved

    return [p for p in cipherdir.rglob("*") if p.is_file() and not p.name.startswith(".kmsfs")
            and not is_reserved(p.name)]


def daemon_pid(cipherdir: Path, mountpoint: Path) -> int:
    """The mount daemon's pid, from the ``mounted at ... (pid N`` line the log does not have: scan
    /proc for the kmsfs process serving this mount point."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"kmsfs" in b" ".join(cmd) and b"mount" in cmd and str(mountpoint).encode() in cmd:
            return int(entry)
    raise AssertionError(f"no kmsfs daemon for {mountpoint}")


def wait_for_records(
    fetch: Callable[[], list[dict[str, Any]]],
    done: Callable[[list[dict[str, Any]]], bool],
    timeout: float = 10,
) -> list[dict[str, Any]]:
    """Poll audit records until ``done``: a pooled create's claim (and the pool's own refills)
    are sent in the background, a round trip after the syscall returned."""
    deadline = time.monotonic() + timeout
    while True:
        records = fetch()
        if done(records):
            return records
        if time.monotonic() > deadline:
            raise AssertionError(f"audit records not there after {timeout} s: {records[-5:]}")
        time.sleep(0.05)


POOL_SIZE = 32  # the --key-pool the pool tests mount with (kmsfs.keypool.SUGGESTED_SIZE)


def wait_pool_full(service: Any, cipherdir: Path, mountpoint: Path, size: int = POOL_SIZE) -> int:
    """Wait until the mount's key pool has generated ``size`` keys (its GenerateDataKey records,
    ``caller.pool``, from the daemon's pid); returns that pid. Then the next create takes a
    pooled key, for certain."""
    pid = daemon_pid(cipherdir, mountpoint)

    def pooled(records: list[dict[str, Any]]) -> bool:
        mine = [r for r in records if (r.get("caller") or {}).get("pool") and r["caller"].get("pid") == pid
                and r.get("outcome") == "success"]
        return len(mine) >= size

    wait_for_records(service.audit_records, pooled)
    return pid


def data_offset(backing: Path) -> int:
    """Where block 0 starts in a backing file: after the format-3 prefix (0 for versions 1/2)."""
    from kmsfs.headers import data_offset as _data_offset

    fd = os.open(backing, os.O_RDONLY)
    try:
        return _data_offset(fd)
    finally:
        os.close(fd)


def backing_path(cipherdir: Path, plain: str, credentials: Path | str) -> Path:
    """The backing path of ``/plain/path`` in a name-encrypting cipherdir (``kmsfs path encrypt``,
    through the key service; its parent directories must exist)."""
    proc = kmsfs("path", "encrypt", cipherdir, plain, "--credentials", credentials)
    return Path(proc.stdout.strip())


def kill_daemon_during(cipherdir: Path, mnt: Path, credentials: Path, workload: str, *, rounds: int,
                       ready: str, first_sleep: float, step: float) -> None:
    """Mount, start ``workload`` (Python source, argv: mount point and round number) and, once it
    prints ``ready``, kill the mount daemon with SIGKILL after a growing pause; ``rounds`` times."""
    for round_no in range(rounds):
        with mounted(cipherdir, mnt, credentials):
            pid = daemon_pid(cipherdir, mnt)
            proc = subprocess.Popen([sys.executable, "-c", workload, str(mnt), str(round_no)],
                                    stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            assert proc.stdout is not None and proc.stdout.readline().strip() == ready
            time.sleep(first_sleep + step * round_no)
            os.kill(pid, signal.SIGKILL)
            proc.wait(timeout=30)
            force_unmount(mnt)
