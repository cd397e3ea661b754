"""The only module that imports a FUSE binding: mfusepy on libfuse3 if available, else fusepy.

Why one module: switching binding must be a one-file change. Which one is used is decided here,
once, at import: mfusepy (a maintained fusepy fork) when it is installed and ``libfuse.so.3`` is
present, otherwise fusepy on libfuse2. ``KMSFS_FUSE=fusepy`` forces the fallback (benchmarks,
debugging). ``BINDING`` and ``LIBFUSE`` name what was chosen (the mount log prints them).

What differs between the two, and is absorbed here rather than in operations.py:

- mfusepy ignores ``Operations.__call__`` (fusepy dispatches every operation through it, and
  kmsfs translates domain errors to errno there): ``FUSE`` hands mfusepy a proxy whose methods
  go through ``__call__``, so the error mapping is identical.
- mfusepy finds libfuse2 first when both libraries are installed: the libfuse3 path is passed
  to it explicitly.
- mfusepy gives libfuse a zeroed stat (inode 0: readdir(3) skips it) for each name readdir
  returns: the proxy returns ``(name, None, 0)`` instead, i.e. no stat, like fusepy.
- libfuse3 passes renameat2 flags, which mfusepy drops (RENAME_EXCHANGE would become a plain
  rename): ``FUSE`` passes them on to ``Operations.rename``.
- libfuse3 asks the kernel for AUTO_INVAL_DATA and HANDLE_KILLPRIV by default; both are turned
  off in ``init`` so the kernel behaves as it did with libfuse2 (see ``_CAP_*``).
- libfuse3 drops the file handle of ``truncate`` in mfusepy; ``FUSE`` passes it on, as fusepy's
  ``ftruncate`` does on libfuse2.
- Mount options: ``IO_OPTIONS`` are the request-size options for the chosen library (libfuse2:
  ``big_writes`` and 128 KiB reads, its maximum; libfuse3 has no ``big_writes``, negotiates
  ``max_pages`` itself and writes up to 1 MiB per request by default). ``use_ino`` and
  mtime-only utimens (``flag_utime_omit_ok`` on libfuse2) work on both.
- Reads still arrive as 128 KiB requests on libfuse3: the kernel caps the mount's read-ahead at
  its default, which libfuse cannot raise. ``raise_readahead`` sets it to 1 MiB through sysfs
  (root only) on the first getattr.
- Both bindings copy request data (``string_at`` for writes, ``memmove`` for reads): ``FUSE``
  passes views of libfuse's buffers instead (write data, and the read reply through
  ``Operations.read_into``), still through ``__call__``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import functools
import logging
import os
import shutil
from typing import Any


def _load_mfusepy() -> Any:
    if os.environ.get("KMSFS_FUSE", "").lower() == "fusepy":
        raise ImportError("KMSFS_FUSE=fusepy")
    lib = os.environ.get("FUSE_LIBRARY_PATH") or ctypes.util.find_library("fuse3")
    if not lib:
        raise ImportError("libfuse3 not found")
    if os.geteuid() != 0 and not shutil.which("fusermount3"):  # root mounts without it
        raise ImportError("libfuse3 needs fusermount3 to mount as a user")
    saved = os.environ.get("FUSE_LIBRARY_PATH")
    os.environ["FUSE_LIBRARY_PATH"] = lib
    try:
        import mfusepy
    finally:
        if saved is None:
            del os.environ["FUSE_LIBRARY_PATH"]
    if mfusepy.fuse_version_major != 3:
        raise ImportError(f"{lib} is not libfuse3")
    return mfusepy


try:
    _binding = _load_mfusepy()
    BINDING = "mfusepy"
    IO_OPTIONS: dict[str, object] = {}  # libfuse3: no big_writes; max_write is 1 MiB by default
except (ImportError, OSError, AttributeError):
    import fuse as _binding  # type: ignore[no-redef]

    BINDING = "fusepy"
    IO_OPTIONS = {"big_writes": True, "max_read": 131072}  # libfuse2 clamps requests to 128 KiB

LIBFUSE = (f"{_binding.fuse_version_major}.{_binding.fuse_version_minor}"
           if hasattr(_binding, "fuse_version_major") else "2")
FuseOSError = _binding.FuseOSError
LoggingMixIn = _binding.LoggingMixIn
Operations = _binding.Operations
fuse_exit = _binding.fuse_exit
fuse_get_context = _binding.fuse_get_context

__all__ = ["BINDING", "FUSE", "IO_OPTIONS", "LIBFUSE", "FuseOSError", "LoggingMixIn", "Operations",
           "fuse_exit", "fuse_get_context"]


# fuse_common.h (libfuse 3): capabilities libfuse3 asks for by default and libfuse2 did not.
# AUTO_INVAL_DATA: the kernel drops a file's cached pages whenever its mtime changes (every write).
# HANDLE_KILLPRIV: the kernel leaves clearing setuid/setgid on write/truncate/chown to the
# filesystem, which kmsfs does not do (its daemon writes the backing file with CAP_FSETID).
_CAP_AUTO_INVAL_DATA = 1 << 12
_CAP_HANDLE_KILLPRIV = 1 << 20
# Read-ahead window of a kmsfs mount (libfuse3): one full-size (1 MiB, max_pages) read request.
READAHEAD_KIB = 1024


class _CallDispatch:
    """What mfusepy sees as the Operations object: every implemented operation goes through the
    object's ``__call__`` (the one error-translation point), everything else is passed through."""

    def __init__(self, operations: Any) -> None:
        self._ops = operations

    def init_with_config(self, conn: Any, config: Any) -> None:
        """libfuse3 only: keep libfuse2's kernel contract where libfuse3 changed its defaults."""
        if conn is not None:
            conn.want &= ~(_CAP_AUTO_INVAL_DATA | _CAP_HANDLE_KILLPRIV)
        self._ops("init", "/")

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._ops, name)
        if (callable(value) and not name.startswith("_") and hasattr(Operations, name)
                and not getattr(value, "libfuse_ignore", False)):
            value = functools.partial(self._ops.__call__, name)
            if name == "readdir":
                value = functools.partial(_readdir_no_stat, value)
        self.__dict__[name] = value  # resolved once: later lookups skip __getattr__
        return value


def _readdir_no_stat(readdir: Any, path: str, fh: Any) -> list[tuple[str, None, int]]:
    """mfusepy fills a zeroed stat for a bare name; with use_ino that is inode 0, which readdir(3)
    skips (an empty listing). ``(name, None, 0)`` passes no stat, as fusepy does."""
    return [(name, None, 0) for name in readdir(path, fh)]


def raise_readahead(mountpoint: str, kib: int = READAHEAD_KIB) -> None:
    """Raise the read-ahead window of the FUSE mount at ``mountpoint`` to ``kib`` KiB (root only).

    Why: the kernel caps a FUSE mount's read-ahead at its default 128 KiB (libfuse can only lower
    the value the kernel proposes), so a sequential read reaches the daemon as 128 KiB requests
    even though libfuse3 negotiates 1 MiB ones (``max_pages``), and the per-request cost
    dominates cold sequential reads. The window is a property of the mount's backing device
    info, settable in ``/sys/class/bdi/MAJOR:MINOR/read_ahead_kb`` (the device number is found
    in /proc/self/mountinfo: asking the mount itself would wait for this initialising daemon).
    Files opened afterwards read ahead up to 1 MiB per request. A hint only: never lowered,
    errors (not root, no sysfs) ignored; no data or security property depends on it.
    """
    try:
        device = None
        with open("/proc/self/mountinfo", encoding="utf-8") as mounts:
            for line in mounts:
                fields = line.split()
                if len(fields) > 4 and _unescape_mount(fields[4]) == mountpoint:
                    device = fields[2]  # the last (topmost) mount at that path wins
        if device is None:
            return
        knob = f"/sys/class/bdi/{device}/read_ahead_kb"
        with open(knob, encoding="ascii") as current:
            if int(current.read()) >= kib:
                return
        with open(knob, "w", encoding="ascii") as new:
            new.write(str(kib))
    except (OSError, ValueError) as exc:
        logging.getLogger("kmsfs").debug("read-ahead of %s left unchanged: %s", mountpoint, exc)


def _unescape_mount(field: str) -> str:
    """/proc/self/mountinfo writes space, tab, newline and backslash as octal escapes."""
    for escaped, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(escaped, char)
    return field


# PyMemoryView_FromMemory(char *, Py_ssize_t, int): a memoryview over C memory in one call (the
# callbacks' buffer pointers are passed as they are: no ctypes.cast, no array type per size).
_memory_view = ctypes.pythonapi.PyMemoryView_FromMemory
_memory_view.argtypes = (ctypes.POINTER(ctypes.c_byte), ctypes.c_ssize_t, ctypes.c_int)
_memory_view.restype = ctypes.py_object
_PYBUF_WRITE = 0x200


def _c_buffer(buf: Any, size: int) -> memoryview:
    """A writable byte view of the C buffer ``buf`` points to (no copy).

    Valid only during the callback that received ``buf``: nothing may keep it (or a slice of
    it) afterwards. kmsfs's read and write paths only use it within the call."""
    return memoryview(b"") if not size else _memory_view(buf, size, _PYBUF_WRITE)  # type: ignore[no-any-return]


class FUSE(_binding.FUSE):  # type: ignore[misc,name-defined]
    """The binding's FUSE with a C-callback-level answer for ``security.*`` getxattr, and reads
    and writes that do not copy the request data.

    Why getxattr: once getxattr is implemented, the kernel asks ``security.capability`` before
    every write(2) (FUSE-NOTES), e.g. ~19,000 times for an untar of 3,400 files. kmsfs never
    stores ``security.*`` attributes (operations.py answers ENODATA for them too), so this
    answers straight from the ctypes callback: no name decoding, no dispatch, no exception.

    Why read/write: both bindings copy every request (``ctypes.string_at`` of the written data,
    ``memmove`` of the returned bytes), 1 MiB / 128 KiB each time. Here a write hands kmsfs a
    view of libfuse's buffer, which it seals from directly, and a read has kmsfs decrypt into
    the reply buffer (``read_into``). Both still go through ``Operations.__call__``, the single
    errno-translation point.
    """

    def __init__(self, operations: Any, mountpoint: str, **kwargs: Any) -> None:
        # Resolved now: once mounted, resolving it would ask this (still initialising) daemon.
        self._mountpoint = os.path.realpath(mountpoint)
        self._readahead_pending = True
        self._dispatch = operations  # Operations.__call__: every operation's entry point
        self._read_into = callable(getattr(operations, "read_into", None))
        if BINDING == "mfusepy":
            operations = _CallDispatch(operations)
        super().__init__(operations, mountpoint, **kwargs)

    def _path(self, path: bytes | None) -> str | None:
        return None if path is None else path.decode(self.encoding, getattr(self, "errors", "strict"))

    def read(self, path: bytes | None, buf: Any, size: int, offset: int, fip: Any) -> int:
        if not self._read_into:
            return int(super().read(path, buf, size, offset, fip))
        fh = fip.contents if self.raw_fi else fip.contents.fh
        return int(self._dispatch("read_into", self._path(path), _c_buffer(buf, size), offset, fh))

    def write(self, path: bytes | None, buf: Any, size: int, offset: int, fip: Any) -> int:
        fh = fip.contents if self.raw_fi else fip.contents.fh
        return int(self._dispatch("write", self._path(path), _c_buffer(buf, size), offset, fh))

    def getattr_fuse_3(self, path: bytes, buf: Any, fip: Any) -> int:
        """libfuse3: the first getattr also raises the mount's read-ahead (``raise_readahead``).

        Why here and not in ``init``: the kernel applies the INIT reply (which resets the
        read-ahead window) only after ``init`` returns, and holds every other request until it
        has. Any open needs a lookup, i.e. a getattr, first, so every file opened on this mount
        starts with the larger window (the kernel copies it into the file at open)."""
        if self._readahead_pending:
            self._readahead_pending = False
            raise_readahead(self._mountpoint)
        return int(super().getattr_fuse_3(path, buf, fip) or 0)

    def getxattr(self, path: bytes, name: bytes, value: Any, size: int, *args: Any) -> int:
        if name.startswith(b"security."):
            return -errno.ENODATA
        return int(super().getxattr(path, name, value, size, *args))

    def rename_fuse_3(self, old: bytes, new: bytes, flags: int) -> int:
        """renameat2 flags reach libfuse3 (libfuse2 refused them: EINVAL); mfusepy would drop them
        and turn RENAME_EXCHANGE into a plain rename that destroys the target, so they are passed
        on to ``Operations.rename`` here (the core does NOREPLACE and EXCHANGE with renameat2)."""
        return int(self._dispatch("rename", self._path(old), self._path(new), flags) or 0)

    def truncate_fuse_3(self, path: bytes | None, length: int, fip: Any) -> int:
        """libfuse3 passes the open file to truncate (ftruncate); mfusepy would drop it."""
        if fip:
            return int(self.ftruncate(path, length, fip) or 0)
        return int(super().truncate_fuse_3(path, length, fip) or 0)
