"""The thin FUSE adapter over ``KmsfsCore``: argument unpacking, the caller, and errno.

Why thin: fusepy turns any non-OSError into EINVAL and any BaseException into an aborted mount,
so exactly one place here (``__call__``, through which fusepy dispatches every operation)
translates domain errors to errno and logs them with the file path (and block):

    IntegrityError, CorruptHeader            -> EIO
    KeyServiceError (denied/disabled/state)  -> EACCES; other service errors -> EIO
                                                (a deleted key logs "key deleted: file unrecoverable")
    KeyServiceUnavailable                    -> EIO
    anything else unexpected                 -> EIO (logged with traceback)

``raw_fi`` mode is used so create() and open() see the open flags; handles travel in ``fi.fh``.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import pwd
from collections.abc import Callable
from typing import Any

from kmsfs._fuse import FuseOSError, Operations, fuse_get_context
from kmsfs.cipher import IntegrityError
from kmsfs.core import KmsfsCore
from kmsfs.format import CorruptHeader
from kmsfs.keyclient import KeyServiceError, KeyServiceUnavailable

log = logging.getLogger("kmsfs")


def translate(exc: BaseException, op: str, path: Any) -> int:
    """The single mapping from an exception to an errno (and its log line)."""
    if isinstance(exc, OSError) and exc.errno:
        return exc.errno
    if isinstance(exc, IntegrityError):
        log.error("%s %s: integrity failure in block %s: %s", op, path, exc.block, exc)
        return errno.EIO
    if isinstance(exc, CorruptHeader):
        log.error("%s %s: corrupt header: %s", op, path, exc)
        return errno.EIO
    if isinstance(exc, KeyServiceError):
        code = errno.EACCES if exc.is_access_denied else errno.EIO
        if exc.code == "NotFoundException":
            log.error("%s %s: key deleted: file unrecoverable (%s)", op, path, exc)
        elif exc.code == "KMSInvalidStateException" and "deletion" in exc.message.lower():
            log.error("%s %s: key pending deletion: access refused (%s)", op, path, exc)
        else:
            log.error("%s %s: key service refused: %s", op, path, exc)
        return code
    if isinstance(exc, KeyServiceUnavailable):
        log.error("%s %s: key service unavailable: %s", op, path, exc)
        return errno.EIO
    log.error("%s %s: unexpected error", op, path, exc_info=exc)
    return errno.EIO


@functools.lru_cache(maxsize=256)
def user_name(uid: int) -> str:
    """The local user name of ``uid`` ("" if it has none), cached: it is asked on every open."""
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return ""


def caller_info(path: str) -> dict[str, Any]:
    """The audited identity of the FUSE request: mount path, local uid/user/gid/pid, process name."""
    uid, gid, pid = fuse_get_context()
    try:  # raw os calls: a third of the cost of open() on this path (every create and open)
        fd = os.open(f"/proc/{pid}/comm", os.O_RDONLY | os.O_CLOEXEC)
        try:
            process = os.read(fd, 64).decode("utf-8", "replace").strip()
        finally:
            os.close(fd)
    except OSError:
        process = ""
    return {"path": path, "uid": uid, "user": user_name(uid), "gid": gid, "pid": pid, "process": process}


def _fh(fi: Any) -> int | None:
    """fusepy passes a fuse_file_info in raw_fi mode, None (or a NULL pointer) without a handle."""
    if fi is None or isinstance(fi, int):
        return fi
    fh = getattr(fi, "fh", None)
    return fh if fh else None


class KmsfsOperations(Operations):
    """fusepy Operations for kmsfs; every method delegates to the FUSE-free core."""

    flag_utime_omit_ok = 1  # see FUSE-NOTES: otherwise libfuse2 drops mtime-only utimens (tar)
    use_ns = True

    def __init__(self, core: KmsfsCore, on_ready: Callable[[], None] | None = None) -> None:
        self.core = core
        self._on_ready = on_ready

    def __call__(self, op: str, *args: Any) -> Any:
        try:
            return getattr(self, op)(*args)
        except FuseOSError:
            raise
        except Exception as exc:  # noqa: BLE001 - this is the one translation point
            raise FuseOSError(translate(exc, op, args[0] if args else None)) from None

    # -- lifecycle --------------------------------------------------------------------------------
    def init(self, path: str) -> None:
        log.info("mounted %s", self.core.root)
        if self._on_ready is not None:
            self._on_ready()

    def destroy(self, path: str) -> None:
        log.info("unmounted %s", self.core.root)

    # -- metadata ---------------------------------------------------------------------------------
    def getattr(self, path: str, fh: Any = None) -> dict[str, int]:
        return self.core.getattr(path, _fh(fh))

    def readdir(self, path: str, fh: Any) -> list[str]:
        return self.core.readdir(path)

    def statfs(self, path: str) -> dict[str, int]:
        return self.core.statfs(path)

    def chmod(self, path: str, mode: int) -> None:
        self.core.chmod(path, mode)

    def chown(self, path: str, uid: int, gid: int) -> None:
        self.core.chown(path, uid, gid)

    def utimens(self, path: str, times: tuple[int, int] | None = None) -> None:
        self.core.utimens(path, times)

    def mkdir(self, path: str, mode: int) -> None:
        self.core.mkdir(path, mode, caller_info(path))

    def rmdir(self, path: str) -> None:
        self.core.rmdir(path)

    def unlink(self, path: str) -> None:
        self.core.unlink(path)

    def rename(self, old: str, new: str, flags: int = 0) -> None:
        self.core.rename(old, new, flags)

    def link(self, target: str, source: str) -> None:
        self.core.link(target, source)

    def symlink(self, target: str, source: str) -> None:
        self.core.symlink(target, source, caller_info(target))

    def readlink(self, path: str) -> str:
        return self.core.readlink(path)

    def mknod(self, path: str, mode: int, dev: int) -> None:
        self.core.mknod(path, mode, dev, caller_info(path))

    def getxattr(self, path: str, name: str, position: int = 0) -> bytes:
        # The kernel may ask for security.capability before writes (FUSE-NOTES): answered here,
        # without a syscall or the error-translation path. No security.* xattr ever exists.
        if name.startswith("security."):
            raise FuseOSError(errno.ENODATA)
        return self.core.getxattr(path, name)

    def listxattr(self, path: str) -> list[str]:
        return self.core.listxattr(path)

    def setxattr(self, path: str, name: str, value: bytes, options: int, position: int = 0) -> None:
        self.core.setxattr(path, name, value, options)

    def removexattr(self, path: str, name: str) -> None:
        self.core.removexattr(path, name)

    # -- files ------------------------------------------------------------------------------------
    def create(self, path: str, mode: int, fi: Any = None) -> int:
        flags = getattr(fi, "flags", os.O_RDWR)
        fh = self.core.create(path, mode, caller_info(path), flags)
        if fi is None:
            return fh
        fi.fh = fh
        return 0

    def open(self, path: str, fi: Any) -> int:
        flags = fi if isinstance(fi, int) else fi.flags
        fh = self.core.open(path, flags, caller_info(path))
        if isinstance(fi, int):
            return fh
        fi.fh = fh
        return 0

    def read(self, path: str, size: int, offset: int, fi: Any) -> bytes:
        return self.core.read(path, size, offset, _fh(fi))

    def read_into(self, path: str, out: memoryview, offset: int, fi: Any) -> int:
        """``read`` into the kernel's reply buffer (called by ``_fuse.FUSE.read``; not a fusepy
        operation, but dispatched through ``__call__`` like one)."""
        return self.core.read_into(path, out, offset, _fh(fi))

    def write(self, path: str, data: bytes | memoryview, offset: int, fi: Any) -> int:
        return self.core.write(path, data, offset, _fh(fi))

    def truncate(self, path: str, length: int, fi: Any = None) -> None:
        fh = _fh(fi)
        self.core.truncate(path, length, fh, None if fh else caller_info(path))

    def fsync(self, path: str, datasync: int, fi: Any) -> None:
        self.core.fsync(path, datasync, _fh(fi))

    def fsyncdir(self, path: str, datasync: int, fh: Any) -> None:
        return None

    def flush(self, path: str, fi: Any) -> None:
        self.core.flush(path, _fh(fi))

    def release(self, path: str, fi: Any) -> None:
        self.core.release(path, _fh(fi))
