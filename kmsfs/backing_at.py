"""fd-relative access to the backing tree: no path string ever reaches the backing filesystem.

Why: the backing directory is untrusted storage (docs/SECURITY.md). Someone who can write it may
replace any backing directory by a symlink while the filesystem is mounted; the kernel keeps its
cached entries (the type seen through the mount did not change) and a daemon that hands
``cipherdir + "/" + path`` to the kernel would follow that symlink onto host files, as root.
Here every component is opened relative to its parent's descriptor with ``O_NOFOLLOW``
(``openat(parent, name, O_PATH|O_NOFOLLOW|O_DIRECTORY)``), starting from a descriptor of the
cipherdir held for the mount's life, and every operation is the ``*at`` form on (directory fd,
single name). A symlink anywhere on the way fails the operation with ENOTDIR (an intermediate
component) or is operated on as the symlink itself (the last one); ``.`` and ``..`` never appear.

It also lifts the PATH_MAX limit on cipherdir + path: no string longer than one name is built.

Objects whose operation has no ``*at`` form that refuses symlinks (chmod, the xattr calls) are
first pinned as an ``O_PATH|O_NOFOLLOW`` descriptor and then addressed as ``/proc/self/fd/N``:
that magic link resolves to exactly the pinned inode (a symlink stays the symlink), never by
name, so a swap after the open cannot redirect it (libfuse's passthrough_hp does the same).
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat

# A directory on the way: never a symlink, never opened for reading.
_DIR_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# The last component when it is pinned (any type, a symlink itself).
_PIN_FLAGS = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC

RENAME_NOREPLACE = 1  # linux/fs.h
RENAME_EXCHANGE = 2
RENAME_WHITEOUT = 4

_libc = ctypes.CDLL(None, use_errno=True)
_renameat2 = _libc.renameat2
_renameat2.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint)
_renameat2.restype = ctypes.c_int
_fallocate = _libc.fallocate
_fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
_fallocate.restype = ctypes.c_int


def names_of(rel: str) -> list[str]:
    """The components of a mount path (``/a/b`` -> ``[a, b]``); refuses ``.`` and ``..``.

    The kernel never sends them, but the core is also driven directly: a ``..`` would climb out
    of the cipherdir through the root descriptor."""
    names = [n for n in rel.split("/") if n]
    for name in names:
        if name in (".", ".."):
            raise OSError(errno.EINVAL, "dot component in path", rel)
    return names


def open_parent(root_fd: int, names: list[str]) -> tuple[int, str]:
    """The directory holding the last of ``names`` (opened component by component with
    O_NOFOLLOW from ``root_fd``) and that last name; the cipherdir itself is ``(root_fd, ".")``.

    The returned descriptor is ``root_fd`` itself or a new one the caller closes."""
    if not names:
        return root_fd, "."
    fd = root_fd
    try:
        for name in names[:-1]:
            child = os.open(name, _DIR_FLAGS, dir_fd=fd)
            if fd != root_fd:
                os.close(fd)
            fd = child
    except BaseException:
        if fd != root_fd:
            os.close(fd)
        raise
    return fd, names[-1]


def pin(dir_fd: int, name: str) -> int:
    """An O_PATH descriptor of ``name`` in ``dir_fd`` itself (a symlink is not followed)."""
    return os.open(name, _PIN_FLAGS, dir_fd=dir_fd)


def proc_path(fd: int) -> str:
    """The magic link that names exactly the inode of ``fd`` (even an O_PATH one)."""
    return f"/proc/self/fd/{fd}"


def chmod_at(dir_fd: int, name: str, mode: int) -> None:
    """chmod of ``name`` itself; a symlink has no mode on Linux (EOPNOTSUPP, as fchmodat says)."""
    fd = pin(dir_fd, name)
    try:
        if stat.S_ISLNK(os.fstat(fd).st_mode):
            raise OSError(errno.EOPNOTSUPP, "symlinks have no mode", name)
        os.chmod(proc_path(fd), mode)
    finally:
        os.close(fd)


def chown_at(dir_fd: int, name: str, uid: int, gid: int) -> None:
    """fchownat(AT_SYMLINK_NOFOLLOW): a symlink's own owner, never its target's."""
    os.chown(name, uid, gid, dir_fd=dir_fd, follow_symlinks=False)


def lstat_at(dir_fd: int, name: str) -> os.stat_result:
    return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)


def listdir_at(dir_fd: int, name: str) -> list[str]:
    fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        return os.listdir(fd)
    finally:
        os.close(fd)


def renameat2(old_dir: int, old: str, new_dir: int, new: str, flags: int = 0) -> None:
    """rename(2) between two directory descriptors; ``flags`` as renameat2 (NOREPLACE, EXCHANGE)."""
    if not flags:
        os.rename(old, new, src_dir_fd=old_dir, dst_dir_fd=new_dir)
        return
    if _renameat2(old_dir, os.fsencode(old), new_dir, os.fsencode(new), flags) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), old)


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) on a backing descriptor (os.posix_fallocate has no mode)."""
    if _fallocate(fd, mode, offset, length) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def xattr_path(dir_fd: int, name: str) -> tuple[int, str]:
    """A pinned descriptor of ``name`` and its /proc path for the xattr calls (caller closes)."""
    fd = pin(dir_fd, name)
    return fd, proc_path(fd)
