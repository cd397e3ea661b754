"""Holes in backing files: how format version 2 keeps sparse files sparse without trusting zeros.

Why a module of its own: telling a *real* hole (never written, reported by ``SEEK_HOLE``) apart
from a block an attacker overwrote with zeros is a property of the backing filesystem, not of the
format arithmetic. A non-final stored block reads as plaintext zeros only if

- all its stored bytes are zero, **and**
- its byte range overlaps a hole the backing filesystem reports (``lseek(SEEK_HOLE)``).

Writing zeros allocates the pages, so a zeroed-out block is data, not a hole: it fails
authentication and reads as EIO. Stored blocks (4124 bytes) are not page aligned, so a lone hole
block between two written blocks shares both its pages with data; the writer therefore never
leaves a hole run of exactly one block (it writes encrypted zeros there instead). Every block of a
run of two or more overlaps a whole hole page when the hole granularity is at most one page.
"""

from __future__ import annotations

import errno
import os

PAGE = 4096


def all_zero(data: bytes | bytearray | memoryview) -> bool:
    """True if every byte is zero (C-speed count, no Python loop)."""
    return bytes(data).count(0) == len(data)


def overlaps_hole(fd: int, offset: int, length: int) -> bool:
    """True if the backing filesystem reports a hole starting inside [offset, offset+length)."""
    try:
        hole = os.lseek(fd, offset, os.SEEK_HOLE)
    except OSError as exc:
        if exc.errno in (errno.ENXIO, errno.EINVAL):
            return False
        raise
    return hole < offset + length and hole < os.fstat(fd).st_size


def hole_granularity(directory: str) -> int | None:
    """Smallest hole the filesystem of ``directory`` reports, or None if it reports none.

    Probes with a throw-away O_TMPFILE (or a dotted temporary name) holding two bytes 1 MiB apart.
    """
    fd = None
    path = None
    try:
        try:
            fd = os.open(directory, os.O_TMPFILE | os.O_RDWR, 0o600)
        except OSError:
            path = os.path.join(directory, f".kmsfs-probe-{os.getpid()}")
            fd = os.open(path, os.O_CREAT | os.O_RDWR | os.O_TRUNC, 0o600)
        os.pwrite(fd, b"x", 0)
        os.pwrite(fd, b"x", 1 << 20)
        try:
            hole = os.lseek(fd, 0, os.SEEK_HOLE)
        except OSError:
            return None
        return hole if 0 < hole < (1 << 20) else None
    except OSError:
        return None
    finally:
        if fd is not None:
            os.close(fd)
        if path is not None:
            try:
                os.unlink(path)
            except OSError:
                pass


def supports_sparse(directory: str) -> bool:
    """Whether version-2 files in ``directory`` may keep holes (hole granularity ≤ one page)."""
    granularity = hole_granularity(directory)
    return granularity is not None and granularity <= PAGE
