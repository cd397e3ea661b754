"""Helpers for kmsfs integration tests: run the CLI, mount, and always unmount."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

KMSFS = [sys.executable, "-m", "kmsfs"]


def fuse_available() -> bool:
    return os.path.exists("/dev/fuse") and bool(shutil.which("fusermount") or shutil.which("fusermount3"))


requires_fuse = pytest.mark.skipif(not fuse_available(), reason="needs /dev/fuse and fusermount")


def kmsfs(*args: str | os.PathLike[str], check: bool = True,
          timeout: float = 60) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([*KMSFS, *map(str, args)], capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"kmsfs {' '.join(map(str, args))} failed ({proc.returncode}):\n"
                             f"{proc.stdout}\n{proc.stderr}")
    return proc


def force_unmount(mountpoint: Path) -> None:
    """Unmount by every means available; used in teardown even when a test failed."""
    for cmd in (["fusermount", "-u", str(mountpoint)], ["fusermount3", "-u", str(mountpoint)],
                ["umount", str(mountpoint)], ["umount", "-l", str(mountpoint)],
                ["fusermount", "-uz", str(mountpoint)]):
        if not os.path.ismount(mountpoint):
            return
        if shutil.which(cmd[0]):
            subprocess.run(cmd, capture_output=True, check=False)
            time.sleep(0.05)


@contextlib.contextmanager
def mounted(cipherdir: Path, mountpoint: Path, credentials: Path) -> Iterator[Path]:
    """``kmsfs mount`` (which must return only once ready), then always unmount."""
    mountpoint.mkdir(parents=True, exist_ok=True)
    try:
        kmsfs("mount", cipherdir, mountpoint, "--credentials", credentials)
        assert os.path.ismount(mountpoint), "kmsfs mount returned before the mount was ready"
        yield mountpoint
    finally:
        if os.path.ismount(mountpoint):
            proc = kmsfs("umount", mountpoint, check=False)
            if proc.returncode != 0:
                force_unmount(mountpoint)
        force_unmount(mountpoint)
        assert not os.path.ismount(mountpoint)


def backing_files(cipherdir: Path) -> list[Path]:
    return [p for p in cipherdir.rglob("*") if p.is_file() and not p.name.startswith(".kmsfs")]
