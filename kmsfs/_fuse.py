"""The only module that loads libfuse: a ctypes binding to libfuse3's low-level (inode) API.

Why our own binding (docs/PERFORMANCE.md, "Inode-based FUSE"): kmsfs needs the low-level API
(an inode per backing inode, lookup counts, forget: issue 11) with the operations the available
bindings leave out — ``fallocate`` and ``renameat2`` flags — and with libfuse's multithreaded
loop running synchronous handlers (the core blocks on the key service). pyfuse3 runs every
request as a trio task (a thread hop per blocking call) and has no fallocate; llfuse is
libfuse2-only (128 KiB requests, no rename flags); mfusepy and fusepy are path-based (hard links
become separate kernel inodes). This module is what those bindings are for the parts kmsfs uses:
the C structures of libfuse 3.12+ on x86-64 Linux, the reply functions, and the session.

It knows nothing of kmsfs: ``Session`` takes a table of Python callables keyed by the libfuse
operation name (``kmsfs/operations.py`` builds it) and runs the loop. Callbacks run on libfuse's
worker threads (ctypes takes the GIL for each; each thread keeps one Python thread state for its
life, see ``_keep_thread_state``); ctypes releases the GIL while libfuse waits for requests, and
the calls a handler makes (replies, directory entries) keep it (``_glib``, issue 19).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import platform
import threading
from collections.abc import Callable
from ctypes import (
    CFUNCTYPE,
    POINTER,
    Structure,
    c_char_p,
    c_double,
    c_int,
    c_int32,
    c_int64,
    c_size_t,
    c_uint,
    c_uint32,
    c_uint64,
    c_void_p,
)
from typing import Any

log = logging.getLogger("kmsfs")

if platform.machine() not in ("x86_64", "AMD64") or platform.system() != "Linux":
    raise ImportError("kmsfs's libfuse binding describes x86-64 Linux structures only")

_path = os.environ.get("FUSE_LIBRARY_PATH") or ctypes.util.find_library("fuse3")
if not _path:
    raise ImportError("libfuse3 not found (Debian: apt-get install libfuse3-3 fuse3)")
_lib = ctypes.CDLL(_path, use_errno=True)
# The same library, for the calls a handler makes while it runs: the reply functions (one
# non-blocking writev to /dev/fuse), fuse_add_direntry* (pure formatting, once per listed name)
# and fuse_req_ctx. Called through PyDLL they keep the GIL: a CDLL call releases and re-takes it,
# which under concurrent requests is a hand-off to another thread (a context switch) per reply
# and per directory entry. Safe because none of them blocks and libfuse never runs Python code
# while holding a lock they take (callbacks run outside the session and worker-loop locks).
_glib = ctypes.PyDLL(_path, use_errno=True)
_libc = ctypes.CDLL(None, use_errno=True)
LIBFUSE = "3"
BINDING = "kmsfs._fuse (ctypes, libfuse3 low-level)"

fuse_req_t = c_void_p
fuse_ino_t = c_uint64


class Stat(Structure):
    """struct stat, x86-64 glibc layout (144 bytes)."""

    _fields_ = [("st_dev", c_uint64), ("st_ino", c_uint64), ("st_nlink", c_uint64),
                ("st_mode", c_uint32), ("st_uid", c_uint32), ("st_gid", c_uint32), ("_pad0", c_int32),
                ("st_rdev", c_uint64), ("st_size", c_int64), ("st_blksize", c_int64),
                ("st_blocks", c_int64), ("st_atime", c_int64), ("st_atime_nsec", c_int64),
                ("st_mtime", c_int64), ("st_mtime_nsec", c_int64), ("st_ctime", c_int64),
                ("st_ctime_nsec", c_int64), ("_reserved", c_int64 * 3)]


class StatVfs(Structure):
    """struct statvfs, x86-64 glibc layout."""

    _fields_ = [("f_bsize", c_uint64), ("f_frsize", c_uint64), ("f_blocks", c_uint64),
                ("f_bfree", c_uint64), ("f_bavail", c_uint64), ("f_files", c_uint64),
                ("f_ffree", c_uint64), ("f_favail", c_uint64), ("f_fsid", c_uint64),
                ("f_flag", c_uint64), ("f_namemax", c_uint64), ("_spare", c_int * 6)]


class FileInfo(Structure):
    """struct fuse_file_info (libfuse 3.x)."""

    _fields_ = [("flags", c_int), ("writepage", c_uint, 1), ("direct_io", c_uint, 1),
                ("keep_cache", c_uint, 1), ("flush", c_uint, 1), ("nonseekable", c_uint, 1),
                ("flock_release", c_uint, 1), ("cache_readdir", c_uint, 1), ("noflush", c_uint, 1),
                ("padding", c_uint, 24), ("padding2", c_uint, 32), ("fh", c_uint64),
                ("lock_owner", c_uint64), ("poll_events", c_uint32)]


class EntryParam(Structure):
    """struct fuse_entry_param."""

    _fields_ = [("ino", fuse_ino_t), ("generation", c_uint64), ("attr", Stat),
                ("attr_timeout", c_double), ("entry_timeout", c_double)]


class ConnInfo(Structure):
    """struct fuse_conn_info (libfuse 3.x)."""

    _fields_ = [("proto_major", c_uint), ("proto_minor", c_uint), ("max_write", c_uint),
                ("max_read", c_uint), ("max_readahead", c_uint), ("capable", c_uint), ("want", c_uint),
                ("max_background", c_uint), ("congestion_threshold", c_uint), ("time_gran", c_uint),
                ("reserved", c_uint * 22)]


class Ctx(Structure):
    """struct fuse_ctx: who sent the request."""

    _fields_ = [("uid", c_uint32), ("gid", c_uint32), ("pid", c_int32), ("umask", c_uint32)]


class ForgetData(Structure):
    _fields_ = [("ino", fuse_ino_t), ("nlookup", c_uint64)]


class Args(Structure):
    _fields_ = [("argc", c_int), ("argv", POINTER(c_char_p)), ("allocated", c_int)]


_FI = POINTER(FileInfo)
# The operations kmsfs implements, in struct fuse_lowlevel_ops order; None marks a slot left
# NULL (libfuse answers ENOSYS or does the default).
_OPS: list[tuple[str, Any]] = [
    ("init", CFUNCTYPE(None, c_void_p, POINTER(ConnInfo))),
    ("destroy", CFUNCTYPE(None, c_void_p)),
    ("lookup", CFUNCTYPE(None, fuse_req_t, fuse_ino_t, c_char_p)),
    ("forget", CFUNCTYPE(None, fuse_req_t, fuse_ino_t, c_uint64)),
    ("getattr", CFUNCTYPE(None, fuse_req_t, fuse_ino_t, _FI)),
    ("setattr", CFUNCTYPE(None, fuse_req_t, fuse_ino_t, POINTER(Stat), c_int, _FI)),
    ("readlink", CFUNCTYPE(None, fuse_req_t, fuse_ino_t)),
    ("mknod", CFUNCTYPE(None, fuse_req_t, fuse_ino_t, c_char_p, c_uint32, c_uint64)),
    ("mkdir", CFUNCTYPE(None, fuse_req_t, fuse_ino_t, c_char_p, c_uint32)),
    ("unlink", CFUNCTYPE(None, fuse_req_t, fuse_ino_t, c_char_p)),
    ("rmdir", CFUNCTYPE(None, fuse_req_t, fuse_ino_t, c_char_p)),
    ("symlink", CFUNCTYPE(None, fuse_req_t, c_char_p, fuse_ino_t, c_char_p)),
    ("rename", CFUNCTYPE(None, fuse_req_t, fuse_ino_t, c_char_p, fuse_ino_t, c_char_p, c_uint)),
    ("link", CFUNCTYPE(None, fuse_req_t, fuse_ino_t, fuse_ino_t, c_char_p)),
    ("open", CFUNCTYPE(None, fuse_req_t, fuse_ino_t, _FI)),
    ("read", CFUNCTYPE(None, fuse_req_t, fuse_ino_t, c_size_t, c_int64, _FI)),
    ("write", CFUNCTYPE(None, fuse_req_t, fuse_ino_t, c_void_p, c_size_t, c_int64, _FI)),
    ("flush", CFUNCTYPE(None, fuse_req_t, fuse_ino_t, _FI)),
    ("release", CFUNCTYPE(None, fuse_req_t, fuse_ino_t, _FI)),
    ("fsync", CFUNCTYPE(None, fuse_req_t, fuse_ino_t, c_int, _FI)),
    ("opendir", CFUNCTYPE(None, fuse_req_t, fuse_ino_t, _FI)),
    ("readdir", CFUNCTYPE(None, fuse_req_t, fuse_ino_t, c_size_t, c_int64, _FI)),
    ("releasedir", CFUNCTYPE(None, fuse_req_t, fuse_ino_t, _FI)),
    ("fsyncdir", CFUNCTYPE(None, fuse_req_t, fuse_ino_t, c_int, _FI)),
    ("statfs", CFUNCTYPE(None, fuse_req_t, fuse_ino_t)),
    ("setxattr", CFUNCTYPE(None, fuse_req_t, fuse_ino_t, c_char_p, c_void_p, c_size_t, c_int)),
    ("getxattr", CFUNCTYPE(None, fuse_req_t, fuse_ino_t, c_char_p, c_size_t)),
    ("listxattr", CFUNCTYPE(None, fuse_req_t, fuse_ino_t, c_size_t)),
    ("removexattr", CFUNCTYPE(None, fuse_req_t, fuse_ino_t, c_char_p)),
    ("access", None),
    ("create", CFUNCTYPE(None, fuse_req_t, fuse_ino_t, c_char_p, c_uint32, _FI)),
    ("getlk", None), ("setlk", None), ("bmap", None), ("ioctl", None), ("poll", None),
    ("write_buf", None), ("retrieve_reply", None),
    ("forget_multi", CFUNCTYPE(None, fuse_req_t, c_size_t, POINTER(ForgetData))),
    ("flock", None),
    ("fallocate", CFUNCTYPE(None, fuse_req_t, fuse_ino_t, c_int, c_int64, c_int64, _FI)),
    ("readdirplus", CFUNCTYPE(None, fuse_req_t, fuse_ino_t, c_size_t, c_int64, _FI)),
    ("copy_file_range", None), ("lseek", None),
]


class LowLevelOps(Structure):
    _fields_ = [(name, proto if proto is not None else c_void_p) for name, proto in _OPS]


def _proto(lib: Any, name: str, restype: Any, *argtypes: Any) -> Any:
    fn = getattr(lib, name)
    fn.restype, fn.argtypes = restype, argtypes
    return fn


reply_err = _proto(_glib, "fuse_reply_err", c_int, fuse_req_t, c_int)
reply_none = _proto(_glib, "fuse_reply_none", None, fuse_req_t)
reply_entry = _proto(_glib, "fuse_reply_entry", c_int, fuse_req_t, POINTER(EntryParam))
reply_create = _proto(_glib, "fuse_reply_create", c_int, fuse_req_t, POINTER(EntryParam), _FI)
reply_attr = _proto(_glib, "fuse_reply_attr", c_int, fuse_req_t, POINTER(Stat), c_double)
reply_readlink = _proto(_glib, "fuse_reply_readlink", c_int, fuse_req_t, c_char_p)
reply_open = _proto(_glib, "fuse_reply_open", c_int, fuse_req_t, _FI)
reply_write = _proto(_glib, "fuse_reply_write", c_int, fuse_req_t, c_size_t)
reply_buf = _proto(_glib, "fuse_reply_buf", c_int, fuse_req_t, c_void_p, c_size_t)
reply_statfs = _proto(_glib, "fuse_reply_statfs", c_int, fuse_req_t, POINTER(StatVfs))
reply_xattr = _proto(_glib, "fuse_reply_xattr", c_int, fuse_req_t, c_size_t)
add_direntry = _proto(_glib, "fuse_add_direntry", c_size_t, fuse_req_t, c_void_p, c_size_t, c_char_p,
                      POINTER(Stat), c_int64)
add_direntry_plus = _proto(_glib, "fuse_add_direntry_plus", c_size_t, fuse_req_t, c_void_p, c_size_t,
                           c_char_p, POINTER(EntryParam), c_int64)
req_ctx = _proto(_glib, "fuse_req_ctx", POINTER(Ctx), fuse_req_t)
_session_new = _proto(_lib, "fuse_session_new", c_void_p, POINTER(Args), POINTER(LowLevelOps), c_size_t,
                      c_void_p)
_session_mount = _proto(_lib, "fuse_session_mount", c_int, c_void_p, c_char_p)
_session_unmount = _proto(_lib, "fuse_session_unmount", None, c_void_p)
_session_destroy = _proto(_lib, "fuse_session_destroy", None, c_void_p)
_session_exit = _proto(_lib, "fuse_session_exit", None, c_void_p)
_set_signal_handlers = _proto(_lib, "fuse_set_signal_handlers", c_int, c_void_p)
_remove_signal_handlers = _proto(_lib, "fuse_remove_signal_handlers", None, c_void_p)
_loop_cfg_create = _proto(_lib, "fuse_loop_cfg_create", c_void_p)
_loop_cfg_destroy = _proto(_lib, "fuse_loop_cfg_destroy", None, c_void_p)
_loop_cfg_set_max_threads = _proto(_lib, "fuse_loop_cfg_set_max_threads", None, c_void_p, c_uint)
_loop_cfg_set_idle_threads = _proto(_lib, "fuse_loop_cfg_set_idle_threads", None, c_void_p, c_uint)
_session_loop_mt = _proto(_lib, "fuse_session_loop_mt_312", c_int, c_void_p, c_void_p)

# fuse_common.h capabilities (conn.want)
CAP_ATOMIC_O_TRUNC = 1 << 3
CAP_AUTO_INVAL_DATA = 1 << 12
CAP_READDIRPLUS = 1 << 13
CAP_READDIRPLUS_AUTO = 1 << 14
CAP_POSIX_ACL = 1 << 19
CAP_HANDLE_KILLPRIV = 1 << 20
# fuse_lowlevel.h setattr to_set bits
SET_ATTR_MODE, SET_ATTR_UID, SET_ATTR_GID, SET_ATTR_SIZE = 1 << 0, 1 << 1, 1 << 2, 1 << 3
SET_ATTR_ATIME, SET_ATTR_MTIME, SET_ATTR_ATIME_NOW, SET_ATTR_MTIME_NOW = 1 << 4, 1 << 5, 1 << 7, 1 << 8

# PyMemoryView_FromMemory(char *, Py_ssize_t, int): a view of C memory without a copy (write
# data is handed to the core as a view of libfuse's buffer; valid during the callback only).
_memory_view = ctypes.pythonapi.PyMemoryView_FromMemory
_memory_view.argtypes = (c_void_p, ctypes.c_ssize_t, c_int)
_memory_view.restype = ctypes.py_object
_PYBUF_READ, _PYBUF_WRITE = 0x100, 0x200


def c_view(address: int, size: int, writable: bool = False) -> memoryview:
    """A byte view of ``size`` bytes of C memory at ``address`` (no copy; only during the call)."""
    if not size:
        return memoryview(b"")
    return _memory_view(address, size, _PYBUF_WRITE if writable else _PYBUF_READ)  # type: ignore[no-any-return]


def fill_stat(st: Stat, attrs: dict[str, int]) -> None:
    """A struct stat from the core's attribute dict (times in nanoseconds)."""
    st.st_ino = attrs["st_ino"]
    st.st_mode = attrs["st_mode"]
    st.st_nlink = attrs["st_nlink"]
    st.st_uid = attrs["st_uid"]
    st.st_gid = attrs["st_gid"]
    st.st_rdev = attrs.get("st_rdev", 0)
    st.st_size = attrs["st_size"]
    st.st_blocks = attrs.get("st_blocks", 0)
    st.st_blksize = 4096
    st.st_atime, st.st_atime_nsec = divmod(attrs["st_atime"], 1_000_000_000)
    st.st_mtime, st.st_mtime_nsec = divmod(attrs["st_mtime"], 1_000_000_000)
    st.st_ctime, st.st_ctime_nsec = divmod(attrs["st_ctime"], 1_000_000_000)


# Read-ahead window of a kmsfs mount: one full-size (1 MiB, max_pages) read request.
READAHEAD_KIB = 1024


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


_gil_state_ensure = ctypes.pythonapi.PyGILState_Ensure
_gil_state_ensure.restype = c_int
_gil_state_ensure.argtypes = ()
_threads_with_state: set[int] = set()
_get_ident = threading.get_ident


def _keep_thread_state() -> None:
    """Give the calling libfuse worker thread a Python thread state for its whole life.

    Why: ctypes enters every callback with ``PyGILState_Ensure`` and leaves it with
    ``PyGILState_Release``; on a thread Python did not create, that allocates a new thread state
    per request and destroys it after (a few microseconds each time), and everything keyed by
    the thread state starts over: ``threading.local`` data such as the adapter's reply buffers
    was allocated again (128 KiB, zeroed) for every read and listing. One extra
    ``PyGILState_Ensure`` per thread, never released, keeps the state: the worker threads live
    as long as the session (max idle threads = max threads)."""
    ident = _get_ident()
    if ident not in _threads_with_state:
        _gil_state_ensure()
        _threads_with_state.add(ident)


def _with_thread_state(handler: Callable[..., None]) -> Callable[..., None]:
    def call(*args: Any) -> None:
        if _get_ident() not in _threads_with_state:
            _keep_thread_state()
        handler(*args)

    return call


class Session:
    """One mount: ``handlers`` maps operation names of ``_OPS`` to Python callables taking the
    C arguments; each must reply (``reply_*``) exactly once, except init/destroy/forget."""

    def __init__(self, handlers: dict[str, Callable[..., None]], mountpoint: str, options: list[str],
                 debug: bool = False) -> None:
        self._ops = LowLevelOps()
        self._keep = []  # the C function objects must outlive the session
        for name, proto in _OPS:
            if proto is not None and name in handlers:
                cfunc = proto(_with_thread_state(handlers[name]))
                self._keep.append(cfunc)
                setattr(self._ops, name, cfunc)
        argv = [b"kmsfs", *([b"-d"] if debug else [])]
        if options:
            argv += [b"-o", ",".join(options).encode()]
        self._argv = (c_char_p * (len(argv) + 1))(*argv, None)
        args = Args(len(argv), self._argv, 0)
        self._se = _session_new(ctypes.byref(args), ctypes.byref(self._ops), ctypes.sizeof(LowLevelOps), None)
        if not self._se:
            raise OSError("libfuse refused the mount options: " + " ".join(a.decode() for a in argv[1:]))
        self._mountpoint = mountpoint
        self._mounted = False

    def run(self, threads: int = 10) -> None:
        """Mount and serve until unmounted or signalled (SIGINT/SIGTERM/SIGHUP), then clean up."""
        if _session_mount(self._se, os.fsencode(self._mountpoint)) != 0:
            _session_destroy(self._se)
            raise OSError(f"cannot mount {self._mountpoint}")
        self._mounted = True
        _set_signal_handlers(self._se)
        cfg = _loop_cfg_create()
        _loop_cfg_set_max_threads(cfg, threads)  # explicit: no "Ignoring invalid max threads" line
        _loop_cfg_set_idle_threads(cfg, threads)
        try:
            code = _session_loop_mt(self._se, cfg)
        finally:
            _loop_cfg_destroy(cfg)
            _remove_signal_handlers(self._se)
            _session_unmount(self._se)
            _session_destroy(self._se)
        if code not in (0,) and code > 0:
            log.info("FUSE loop ended by signal %d", code)
