#!/usr/bin/env python3
"""A minimal multithreaded fusepy passthrough: the pure-Python FUSE ceiling for the benchmark.

Why it exists: kmsfs is a fusepy filesystem, so the fastest it could ever be is a fusepy
filesystem that does no crypto and no key-service calls at all. ``scripts/bench.py`` mounts this
next to kmsfs, with the same FUSE options (multithreaded, big_writes, max_read 128 KiB, use_ino),
so the kmsfs/passthrough ratio isolates what kmsfs itself costs.

It implements what tar, fio, dd and rm need (and, for ``tar -d`` to pass, mtime-only utimens,
see FUSE-NOTES). It deliberately does not implement getxattr, so the kernel stops asking
``security.capability`` before every write. Usage: ``passthrough.py BACKING MOUNTPOINT`` (runs in
the foreground until unmounted).
"""

from __future__ import annotations

import errno
import os
import sys
from typing import Any

from fuse import FUSE, FuseOSError, Operations

UTIME_NOW = (1 << 30) - 1
UTIME_OMIT = (1 << 30) - 2
_STAT_KEYS = ("st_mode", "st_ino", "st_nlink", "st_uid", "st_gid", "st_size", "st_blocks", "st_rdev")


class Passthrough(Operations):
    """Every operation maps to one syscall on the backing path or file descriptor."""

    flag_utime_omit_ok = 1
    use_ns = True

    def __init__(self, root: str) -> None:
        self.root = os.path.realpath(root)

    def __call__(self, op: str, *args: Any) -> Any:
        try:
            return getattr(self, op)(*args)
        except OSError as exc:
            raise FuseOSError(exc.errno or errno.EIO) from None

    def _full(self, path: str) -> str:
        return os.path.join(self.root, path.lstrip("/"))

    def getattr(self, path: str, fi: Any = None) -> dict[str, int]:
        fh = getattr(fi, "fh", 0) if fi is not None else 0
        st = os.fstat(fh) if fh else os.lstat(self._full(path))
        attrs = {k: getattr(st, k) for k in _STAT_KEYS}
        attrs.update(st_atime=st.st_atime_ns, st_mtime=st.st_mtime_ns, st_ctime=st.st_ctime_ns)
        return attrs

    def readdir(self, path: str, fh: Any) -> list[str]:
        return [".", "..", *os.listdir(self._full(path))]

    def readlink(self, path: str) -> str:
        return os.readlink(self._full(path))

    def statfs(self, path: str) -> dict[str, int]:
        sv = os.statvfs(self._full(path))
        return {k: getattr(sv, k) for k in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail",
                                            "f_files", "f_ffree", "f_favail", "f_flag", "f_namemax")}

    def chmod(self, path: str, mode: int) -> None:
        os.chmod(self._full(path), mode & 0o7777)

    def chown(self, path: str, uid: int, gid: int) -> None:
        os.lchown(self._full(path), uid, gid)

    def utimens(self, path: str, times: tuple[int, int] | None = None) -> None:
        full = self._full(path)
        if times is None:
            os.utime(full, follow_symlinks=False)
            return
        st = os.lstat(full)
        now = None
        ns = []
        for value, old in zip(times, (st.st_atime_ns, st.st_mtime_ns), strict=True):
            if value == UTIME_NOW:
                now = now or __import__("time").time_ns()
                ns.append(now)
            else:
                ns.append(old if value == UTIME_OMIT else value)
        os.utime(full, ns=(ns[0], ns[1]), follow_symlinks=False)

    def mkdir(self, path: str, mode: int) -> None:
        os.mkdir(self._full(path), mode)

    def rmdir(self, path: str) -> None:
        os.rmdir(self._full(path))

    def unlink(self, path: str) -> None:
        os.unlink(self._full(path))

    def rename(self, old: str, new: str) -> None:
        os.rename(self._full(old), self._full(new))

    def link(self, target: str, source: str) -> None:
        os.link(self._full(source), self._full(target))

    def symlink(self, target: str, source: str) -> None:
        os.symlink(source, self._full(target))

    def mknod(self, path: str, mode: int, dev: int) -> None:
        os.mknod(self._full(path), mode, dev)

    def create(self, path: str, mode: int, fi: Any) -> int:
        flags = (fi.flags & ~os.O_APPEND) | os.O_CREAT
        fi.fh = os.open(self._full(path), flags | os.O_CLOEXEC, mode)
        return 0

    def open(self, path: str, fi: Any) -> int:
        flags = fi.flags & ~(os.O_APPEND | getattr(os, "O_DIRECT", 0))
        fi.fh = os.open(self._full(path), flags | os.O_CLOEXEC)
        return 0

    def read(self, path: str, size: int, offset: int, fi: Any) -> bytes:
        return os.pread(fi.fh, size, offset)

    def write(self, path: str, data: bytes, offset: int, fi: Any) -> int:
        return os.pwrite(fi.fh, data, offset)

    def truncate(self, path: str, length: int, fi: Any = None) -> None:
        fh = getattr(fi, "fh", 0) if fi is not None else 0
        if fh:
            os.ftruncate(fh, length)
        else:
            os.truncate(self._full(path), length)

    def flush(self, path: str, fi: Any) -> None:
        return None

    def fsync(self, path: str, datasync: int, fi: Any) -> None:
        (os.fdatasync if datasync else os.fsync)(fi.fh)

    def release(self, path: str, fi: Any) -> None:
        os.close(fi.fh)


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print(f"usage: {argv[0]} BACKING MOUNTPOINT", file=sys.stderr)
        return 2
    FUSE(Passthrough(argv[1]), argv[2], foreground=True, nothreads=False, raw_fi=True,
         big_writes=True, max_read=131072, use_ino=True, default_permissions=True,
         fsname="passthrough", subtype="passthrough")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
