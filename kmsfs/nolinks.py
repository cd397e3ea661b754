"""Giving a finished temporary file its name on backing filesystems without hard links.

Why: ``create`` builds a file under a hidden temporary name and links it into place (``link``
fails with EEXIST like O_EXCL). exFAT, vfat and many FUSE-mounted stores refuse hard links
(EPERM/EOPNOTSUPP); there ``renameat2(RENAME_NOREPLACE)`` does the same atomically, and where the
filesystem does not offer that flag either, an existence check followed by ``rename`` (which can
race only with a concurrent create of the same name from outside the mount).
"""

from __future__ import annotations

import ctypes
import errno
import os

_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
_NO_LINKS = (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK)
_libc = ctypes.CDLL(None, use_errno=True)


def rename_noreplace(src: str, dst: str, dir_fd: int | None = None) -> None:
    """rename(src, dst) that fails with EEXIST if ``dst`` exists; both names relative to
    ``dir_fd`` when given (the core's fd-relative access), else to the working directory."""
    at = _AT_FDCWD if dir_fd is None else dir_fd
    try:
        renameat2 = _libc.renameat2
    except AttributeError:
        renameat2 = None
    if renameat2 is not None:
        if renameat2(at, os.fsencode(src), at, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise OSError(err, os.strerror(err), dst)
    try:
        os.stat(dst, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        os.rename(src, dst, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        return
    raise FileExistsError(errno.EEXIST, "file exists", dst)


def link_or_rename(src: str, dst: str, dir_fd: int | None = None) -> None:
    """``link`` (the temporary name stays for the caller to remove), else ``rename_noreplace``;
    names relative to ``dir_fd`` when given."""
    try:
        os.link(src, dst, src_dir_fd=dir_fd, dst_dir_fd=dir_fd, follow_symlinks=False)
    except OSError as exc:
        if exc.errno not in _NO_LINKS:
            raise
        rename_noreplace(src, dst, dir_fd)
