"""One mount per cipherdir: an exclusive ``flock`` on ``CIPHERDIR/.kmsfs.lock`` held by the mount.

Why a lock and not only ``/proc/mounts``: two mounts of one cipherdir (from two mount namespaces,
or at two mount points) each keep their own view of sizes, pending size changes and per-file
locks, so concurrent writers through both would corrupt files. The kernel drops a ``flock`` when
its holder dies, so a killed mount never leaves a stale lock behind (unlike a pid file).

The lock file is in the cipherdir, which is untrusted storage: it is opened with ``O_NOFOLLOW``
and never written to. Someone who can write the cipherdir can hold the lock and so stop a mount
(a denial of service they can cause anyway by deleting files); they cannot make a mount unsafe.
Offline tools ask ``held_by_mount`` to say whether they coordinate with a live mount, and
``kmsfs_mounts`` is the one reader of /proc/mounts's kmsfs entries (the lock's message, upgrade,
the backing path of a mounted file).
"""

from __future__ import annotations

import fcntl
import os

LOCK_NAME = ".kmsfs.lock"


class AlreadyMounted(Exception):
    """The cipherdir is mounted already (message names where, when /proc/mounts says)."""


def kmsfs_mounts() -> list[tuple[str, str]]:
    """``(cipherdir, mount point)`` of every kmsfs mount in this mount namespace, as /proc/mounts
    names them (unescaped); none when it cannot be read."""
    found = []
    try:
        with open("/proc/mounts", encoding="utf-8") as mounts:
            for line in mounts:
                fields = line.split()
                if len(fields) > 2 and fields[2] == "fuse.kmsfs":
                    found.append((_unescape(fields[0]), _unescape(fields[1])))
    except OSError:
        pass
    return found


def mounted_at(cipherdir: str) -> list[str]:
    """The mount points of kmsfs mounts of ``cipherdir`` in this mount namespace."""
    source = os.path.realpath(cipherdir)
    return [target for mounted, target in kmsfs_mounts() if mounted == source]


def _unescape(field: str) -> str:
    """/proc/mounts escapes space, tab, newline and backslash as octal (\\040 ...)."""
    for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(code, char)
    return field


def acquire(cipherdir: str) -> int:
    """Take the cipherdir's mount lock; the returned fd holds it (inherited across fork)."""
    fd = os.open(os.path.join(cipherdir, LOCK_NAME),
                 os.O_RDONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        where = mounted_at(cipherdir)
        place = f" at {', '.join(where)}" if where else " (by a mount in another namespace or a tool)"
        raise AlreadyMounted(f"{cipherdir} is already mounted{place}; one mount per cipherdir") from None
    return fd


def held_by_mount(cipherdir: str) -> bool:
    """True while a live mount holds the cipherdir's lock."""
    try:
        fd = os.open(os.path.join(cipherdir, LOCK_NAME), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False
