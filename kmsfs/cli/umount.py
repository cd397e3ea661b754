"""``kmsfs umount``, and the unmounting and dead-mount detection ``mount`` reuses to recover a
mount whose daemon was killed."""

from __future__ import annotations

import argparse
import errno
import os
import shutil
import subprocess

from kmsfs.cli.common import CliError


def cmd_umount(args: argparse.Namespace) -> int:
    mountpoint = os.path.abspath(args.mountpoint)
    if not os.path.ismount(mountpoint) and not _is_dead_mount(mountpoint):
        raise CliError(f"{mountpoint} is not mounted")
    _unmount(mountpoint, lazy=getattr(args, "lazy", False))
    return 0


def _is_dead_mount(mountpoint: str) -> bool:
    """A FUSE mount whose daemon died (kill -9): every access answers ENOTCONN, so ``ismount``
    and ``isdir`` see neither a mount nor a directory; only unmounting recovers it."""
    try:
        os.stat(mountpoint)
    except OSError as exc:
        return exc.errno in (errno.ENOTCONN, errno.ECONNABORTED)
    return False


def _unmount(mountpoint: str, *, lazy: bool = False) -> None:
    attempts = [[t, "-uz" if lazy else "-u", mountpoint] for t in ("fusermount", "fusermount3")
                if shutil.which(t)]
    attempts.append(["umount", "-l", mountpoint] if lazy else ["umount", mountpoint])
    errors = []
    for cmd in attempts:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode == 0:
            return
        errors.append(f"{cmd[0]}: {proc.stderr.strip()}")
    raise _unmount_failure(mountpoint, errors)


def _unmount_failure(mountpoint: str, errors: list[str]) -> CliError:
    """One line: a busy mount (the usual case) says what to do; anything else lists the errors."""
    if any("busy" in error.lower() for error in errors):
        return CliError(f"{mountpoint} is busy: a process has a file open there or its working "
                        f"directory inside (fuser -vm {mountpoint} lists them); close them and retry, "
                        "or detach it now and let it finish when they close: "
                        f"kmsfs umount --lazy {mountpoint}")
    return CliError("unmount failed: " + "; ".join(" ".join(e.split()) for e in errors))
