"""The thin FUSE adapter: libfuse low-level requests -> ``InodeFs`` -> replies, and errno.

Why thin: everything a request means lives in the FUSE-free ``InodeFs``/``KmsfsCore`` (which
the tests drive directly). Here: unpack the C arguments, collect the caller (uid/pid/process and
the audited path), reply, and translate errors to errno in exactly one place (``_guarded``):

    OSError                                  -> its errno (logged at debug level, rate-limited)
    IntegrityError, CorruptHeader            -> EIO
    KeyServiceError (denied/disabled/state)  -> EACCES; other service errors -> EIO
                                                (a deleted key logs "key deleted: file unrecoverable")
    KeyServiceUnavailable                    -> EIO
    anything else unexpected                 -> EIO (logged with traceback)
"""

from __future__ import annotations

import ctypes
import errno
import functools
import logging
import os
import pwd
import threading
import time
from collections.abc import Callable
from typing import Any

from kmsfs import _fuse
from kmsfs.cipher import IntegrityError
from kmsfs.core import UTIME_NOW, UTIME_OMIT
from kmsfs.format import CorruptHeader
from kmsfs.inodes import InodeFs, Node
from kmsfs.keyclient import KeyServiceError, KeyServiceUnavailable

log = logging.getLogger("kmsfs")

# How long the kernel may trust an entry or attributes without asking again (seconds). Changes
# made through the mount update the kernel's copy; the timeout bounds how long a change made
# directly in the backing store stays unseen (the same 1 s libfuse's path API used).
ATTR_TIMEOUT = 1.0
ENTRY_TIMEOUT = 1.0


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


class ErrnoLog:
    """Debug lines for errors answered with an errno, at most ``per_second`` a second.

    Why: an errno reply is normal (ENOENT on lookup) until a workload fails on one; then the
    daemon's debug log should say which request got which error, without a busy workload
    flooding the log. Suppressed lines are counted and reported with the next line."""

    def __init__(self, per_second: int = 50) -> None:
        self.per_second = per_second
        self._lock = threading.Lock()
        self._window = 0
        self._count = 0
        self._dropped = 0

    def note(self, op: str, what: Callable[[], str], code: int) -> None:
        if not log.isEnabledFor(logging.DEBUG):
            return
        now = int(time.monotonic())
        with self._lock:
            if now != self._window:
                self._window, self._count = now, 0
            self._count += 1
            if self._count > self.per_second:
                self._dropped += 1
                return
            dropped, self._dropped = self._dropped, 0
        log.debug("%s %s: %s%s", op, what(), errno.errorcode.get(code, code),
                  f" ({dropped} earlier errno lines suppressed)" if dropped else "")


@functools.lru_cache(maxsize=256)
def user_name(uid: int) -> str:
    """The local user name of ``uid`` ("" if it has none), cached: it is asked on every open."""
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return ""


def caller_info(path: str, uid: int, gid: int, pid: int) -> dict[str, Any]:
    """The audited identity of a request: mount path, local uid/user/gid/pid, process name."""
    try:  # raw os calls: a third of the cost of open() on this path (every create and open)
        fd = os.open(f"/proc/{pid}/comm", os.O_RDONLY | os.O_CLOEXEC)
        try:
            process = os.read(fd, 64).decode("utf-8", "replace").strip()
        finally:
            os.close(fd)
    except OSError:
        process = ""
    return {"path": path, "uid": uid, "user": user_name(uid), "gid": gid, "pid": pid, "process": process}


def _guarded(op: str) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """The one errno translation point: a handler that raises is answered with an errno."""

    def wrap(handler: Callable[..., None]) -> Callable[..., None]:
        @functools.wraps(handler)
        def run(self: KmsfsOperations, req: Any, *args: Any) -> None:
            try:
                handler(self, req, *args)
            except BaseException as exc:  # noqa: BLE001 - this is the one translation point
                describe = functools.partial(self.describe, args)
                code = translate(exc, op, describe() if not isinstance(exc, OSError) else "")
                if isinstance(exc, OSError):
                    self.errno_log.note(op, describe, code)
                _fuse.reply_err(req, code)

        return run

    return wrap


class KmsfsOperations:
    """libfuse low-level handlers for kmsfs (``handlers()`` is what ``_fuse.Session`` takes)."""

    def __init__(self, fs: InodeFs, mountpoint: str | None = None,
                 on_ready: Callable[[], None] | None = None) -> None:
        self.fs = fs
        self.core = fs.core
        self._mountpoint = os.path.realpath(mountpoint) if mountpoint else None
        self._on_ready = on_ready
        self._readahead_pending = mountpoint is not None
        self._buffers = threading.local()
        self.errno_log = ErrnoLog()

    def handlers(self) -> dict[str, Callable[..., None]]:
        names = ("init", "destroy", "lookup", "forget", "forget_multi", "getattr", "setattr", "readlink",
                 "mknod", "mkdir", "unlink", "rmdir", "symlink", "rename", "link", "open", "read",
                 "write", "flush", "release", "fsync", "opendir", "readdir", "releasedir", "fsyncdir",
                 "statfs", "setxattr", "getxattr", "listxattr", "removexattr", "create", "fallocate",
                 "readdirplus")
        return {name: getattr(self, name) for name in names}

    # -- helpers ----------------------------------------------------------------------------------
    def describe(self, args: tuple[Any, ...]) -> str:
        """The mount path a request is about, for log lines (best effort)."""
        try:
            path = self.fs.path_of(self.fs.node(int(args[0])))
        except (OSError, TypeError, ValueError, IndexError):
            return f"inode {args[0] if args else '?'}"
        if len(args) > 1 and isinstance(args[1], bytes):
            path = path.rstrip("/") + "/" + os.fsdecode(args[1])
        return path

    def _caller(self, req: Any, path: str) -> dict[str, Any]:
        ctx = _fuse.req_ctx(req).contents
        return caller_info(path, ctx.uid, ctx.gid, ctx.pid)

    def _entry(self, req: Any, node: Node, attrs: dict[str, int], fi: Any = None) -> None:
        entry = _fuse.EntryParam(ino=node.ino, generation=0, attr_timeout=ATTR_TIMEOUT,
                                 entry_timeout=ENTRY_TIMEOUT)
        _fuse.fill_stat(entry.attr, attrs)
        if fi is None:
            _fuse.reply_entry(req, ctypes.byref(entry))
        elif _fuse.reply_create(req, ctypes.byref(entry), fi) != 0:  # interrupted: nobody has it
            self.core.release(None, fi.contents.fh)

    def _attr(self, req: Any, attrs: dict[str, int]) -> None:
        st = _fuse.Stat()
        _fuse.fill_stat(st, attrs)
        _fuse.reply_attr(req, ctypes.byref(st), ATTR_TIMEOUT)

    def _buffer(self, size: int) -> Any:
        """A per-thread reply buffer of at least ``size`` bytes (reads and listings reuse it)."""
        buf = getattr(self._buffers, "buf", None)
        if buf is None or len(buf) < size:
            buf = (ctypes.c_char * max(size, 131072))()
            self._buffers.buf = buf
        return buf

    def _first_request(self) -> None:
        """Raise the mount's read-ahead once the kernel has applied the INIT reply (see
        ``_fuse.raise_readahead``): every open needs a lookup first."""
        self._readahead_pending = False
        if self._mountpoint:
            _fuse.raise_readahead(self._mountpoint)

    # -- lifecycle --------------------------------------------------------------------------------
    def init(self, userdata: Any, conn: Any) -> None:
        # AUTO_INVAL_DATA: the kernel would drop a file's cached pages on every mtime change.
        # HANDLE_KILLPRIV: the kernel would leave clearing setuid/setgid on write/truncate/chown
        # to the daemon, which writes with CAP_FSETID. POSIX_ACL: ACLs are refused (core.py).
        conn.contents.want &= ~(_fuse.CAP_AUTO_INVAL_DATA | _fuse.CAP_HANDLE_KILLPRIV | _fuse.CAP_POSIX_ACL)
        log.info("mounted %s", self.core.root)
        if self._on_ready is not None:
            self._on_ready()

    def destroy(self, userdata: Any) -> None:
        self.fs.forget_all()
        log.info("unmounted %s", self.core.root)

    # -- inodes -----------------------------------------------------------------------------------
    @_guarded("lookup")
    def lookup(self, req: Any, parent: int, name: bytes) -> None:
        if self._readahead_pending:
            self._first_request()
        node, attrs = self.fs.lookup(parent, os.fsdecode(name))
        self._entry(req, node, attrs)

    def forget(self, req: Any, ino: int, nlookup: int) -> None:
        self.fs.forget(ino, nlookup)
        _fuse.reply_none(req)

    def forget_multi(self, req: Any, count: int, forgets: Any) -> None:
        for i in range(count):
            self.fs.forget(forgets[i].ino, forgets[i].nlookup)
        _fuse.reply_none(req)

    @_guarded("getattr")
    def getattr(self, req: Any, ino: int, fi: Any) -> None:
        if self._readahead_pending:
            self._first_request()
        self._attr(req, self.fs.getattr(ino, fi.contents.fh if fi else None))

    @_guarded("setattr")
    def setattr(self, req: Any, ino: int, attr: Any, to_set: int, fi: Any) -> None:
        a = attr.contents
        changes: dict[str, Any] = {}
        if to_set & _fuse.SET_ATTR_MODE:
            changes["mode"] = a.st_mode & 0o7777
        if to_set & _fuse.SET_ATTR_UID:
            changes["uid"] = a.st_uid
        if to_set & _fuse.SET_ATTR_GID:
            changes["gid"] = a.st_gid
        if to_set & _fuse.SET_ATTR_SIZE:
            changes["size"] = a.st_size
        times = to_set & (_fuse.SET_ATTR_ATIME | _fuse.SET_ATTR_MTIME | _fuse.SET_ATTR_ATIME_NOW
                          | _fuse.SET_ATTR_MTIME_NOW)
        if times:
            changes["times"] = (
                UTIME_NOW if to_set & _fuse.SET_ATTR_ATIME_NOW else
                a.st_atime * 1_000_000_000 + a.st_atime_nsec if to_set & _fuse.SET_ATTR_ATIME else UTIME_OMIT,
                UTIME_NOW if to_set & _fuse.SET_ATTR_MTIME_NOW else
                a.st_mtime * 1_000_000_000 + a.st_mtime_nsec if to_set & _fuse.SET_ATTR_MTIME else UTIME_OMIT)
        fh = fi.contents.fh if fi else None
        caller = None
        if "size" in changes and not fh:
            caller = self._caller(req, self.fs.path_of(self.fs.node(ino)))
        self._attr(req, self.fs.setattr(ino, changes, fh, caller))

    @_guarded("readlink")
    def readlink(self, req: Any, ino: int) -> None:
        _fuse.reply_readlink(req, os.fsencode(self.fs.readlink(ino)))

    # -- namespace --------------------------------------------------------------------------------
    def _new_entry_caller(self, req: Any, parent: int, name: bytes) -> dict[str, Any]:
        return self._caller(req, self.fs.path_of(self.fs.node(parent), os.fsdecode(name)))

    @_guarded("mknod")
    def mknod(self, req: Any, parent: int, name: bytes, mode: int, rdev: int) -> None:
        caller = self._new_entry_caller(req, parent, name)
        self._entry(req, *self.fs.mknod(parent, os.fsdecode(name), mode, rdev, caller))

    @_guarded("mkdir")
    def mkdir(self, req: Any, parent: int, name: bytes, mode: int) -> None:
        caller = self._new_entry_caller(req, parent, name)
        self._entry(req, *self.fs.mkdir(parent, os.fsdecode(name), mode, caller))

    @_guarded("unlink")
    def unlink(self, req: Any, parent: int, name: bytes) -> None:
        self.fs.unlink(parent, os.fsdecode(name))
        _fuse.reply_err(req, 0)

    @_guarded("rmdir")
    def rmdir(self, req: Any, parent: int, name: bytes) -> None:
        self.fs.rmdir(parent, os.fsdecode(name))
        _fuse.reply_err(req, 0)

    @_guarded("symlink")
    def symlink(self, req: Any, target: bytes, parent: int, name: bytes) -> None:
        caller = self._new_entry_caller(req, parent, name)
        self._entry(req, *self.fs.symlink(os.fsdecode(target), parent, os.fsdecode(name), caller))

    @_guarded("rename")
    def rename(self, req: Any, parent: int, name: bytes, new_parent: int, new_name: bytes,
               flags: int) -> None:
        self.fs.rename(parent, os.fsdecode(name), new_parent, os.fsdecode(new_name), flags)
        _fuse.reply_err(req, 0)

    @_guarded("link")
    def link(self, req: Any, ino: int, new_parent: int, new_name: bytes) -> None:
        self._entry(req, *self.fs.link(ino, new_parent, os.fsdecode(new_name)))

    @_guarded("statfs")
    def statfs(self, req: Any, ino: int) -> None:
        sv = _fuse.StatVfs(**self.fs.statfs(ino))
        _fuse.reply_statfs(req, ctypes.byref(sv))

    # -- extended attributes ----------------------------------------------------------------------
    def _reply_sized(self, req: Any, data: bytes, size: int) -> None:
        """getxattr/listxattr: size 0 asks for the length; a too-small buffer is ERANGE."""
        if size == 0:
            _fuse.reply_xattr(req, len(data))
        elif len(data) > size:
            _fuse.reply_err(req, errno.ERANGE)
        else:
            _fuse.reply_buf(req, data, len(data))

    # The mount keeps no ``security.*`` attributes (labels, file capabilities): the backing
    # file's would describe the backing store, and a stored capability that the kernel never
    # honours misleads. They are answered EOPNOTSUPP here, without a syscall or the
    # error-translation path: the kernel asks security.capability before every write
    # (FUSE-NOTES), and ``ls -l`` asks security.selinux of every file unless the filesystem says
    # it has no labels (coreutils and libselinux then stop asking for the rest of the device:
    # one request per listing instead of one per name).
    @_guarded("getxattr")
    def getxattr(self, req: Any, ino: int, name: bytes, size: int) -> None:
        if name.startswith(b"security."):
            _fuse.reply_err(req, errno.EOPNOTSUPP)
            return
        self._reply_sized(req, self.fs.getxattr(ino, os.fsdecode(name)), size)

    @_guarded("listxattr")
    def listxattr(self, req: Any, ino: int, size: int) -> None:
        names = [n for n in self.fs.listxattr(ino) if not n.startswith("security.")]
        self._reply_sized(req, b"".join(os.fsencode(n) + b"\0" for n in names), size)

    @_guarded("setxattr")
    def setxattr(self, req: Any, ino: int, name: bytes, value: int, size: int, flags: int) -> None:
        if name.startswith(b"security."):
            _fuse.reply_err(req, errno.EOPNOTSUPP)
            return
        data = ctypes.string_at(value, size) if size else b""
        self.fs.setxattr(ino, os.fsdecode(name), data, flags)
        _fuse.reply_err(req, 0)

    @_guarded("removexattr")
    def removexattr(self, req: Any, ino: int, name: bytes) -> None:
        if name.startswith(b"security."):
            _fuse.reply_err(req, errno.EOPNOTSUPP)
            return
        self.fs.removexattr(ino, os.fsdecode(name))
        _fuse.reply_err(req, 0)

    # -- files ------------------------------------------------------------------------------------
    @_guarded("create")
    def create(self, req: Any, parent: int, name: bytes, mode: int, fi: Any) -> None:
        caller = self._new_entry_caller(req, parent, name)
        node, attrs, fh = self.fs.create(parent, os.fsdecode(name), mode, fi.contents.flags, caller)
        fi.contents.fh = fh
        self._entry(req, node, attrs, fi)

    @_guarded("open")
    def open(self, req: Any, ino: int, fi: Any) -> None:
        caller = self._caller(req, self.fs.path_of(self.fs.node(ino)))
        fi.contents.fh = self.fs.open(ino, fi.contents.flags, caller)
        if _fuse.reply_open(req, fi) != 0:  # interrupted: nobody has the handle
            self.core.release(None, fi.contents.fh)

    @_guarded("read")
    def read(self, req: Any, ino: int, size: int, offset: int, fi: Any) -> None:
        buf = self._buffer(size)
        view = memoryview(buf).cast("B")[:size]
        count = self.core.read_into(None, view, offset, fi.contents.fh)
        _fuse.reply_buf(req, buf, count)

    @_guarded("write")
    def write(self, req: Any, ino: int, data: int, size: int, offset: int, fi: Any) -> None:
        _fuse.reply_write(req, self.core.write(None, _fuse.c_view(data, size), offset, fi.contents.fh))

    @_guarded("flush")
    def flush(self, req: Any, ino: int, fi: Any) -> None:
        self.core.flush(None, fi.contents.fh)
        _fuse.reply_err(req, 0)

    @_guarded("release")
    def release(self, req: Any, ino: int, fi: Any) -> None:
        self.core.release(None, fi.contents.fh)
        _fuse.reply_err(req, 0)

    @_guarded("fsync")
    def fsync(self, req: Any, ino: int, datasync: int, fi: Any) -> None:
        self.core.fsync(None, datasync, fi.contents.fh)
        _fuse.reply_err(req, 0)

    @_guarded("fallocate")
    def fallocate(self, req: Any, ino: int, mode: int, offset: int, length: int, fi: Any) -> None:
        self.fs.fallocate(ino, mode, offset, length, fi.contents.fh)
        _fuse.reply_err(req, 0)

    # -- directories ------------------------------------------------------------------------------
    @_guarded("opendir")
    def opendir(self, req: Any, ino: int, fi: Any) -> None:
        fi.contents.fh = self.fs.opendir(ino)
        _fuse.reply_open(req, fi)

    @_guarded("readdir")
    def readdir(self, req: Any, ino: int, size: int, offset: int, fi: Any) -> None:
        buf = self._buffer(size)
        base = ctypes.addressof(buf)
        st = _fuse.Stat()
        used = 0
        for index, (name, inode, mode) in enumerate(self.fs.readdir(fi.contents.fh, offset), offset + 1):
            st.st_ino, st.st_mode = inode, mode
            need = _fuse.add_direntry(req, base + used, size - used, os.fsencode(name), ctypes.byref(st),
                                      index)
            if need > size - used:
                break
            used += need
        _fuse.reply_buf(req, buf, used)

    @_guarded("readdirplus")
    def readdirplus(self, req: Any, ino: int, size: int, offset: int, fi: Any) -> None:
        """readdir with each entry's attributes (FUSE_READDIRPLUS): the kernel fills its dentry
        and inode caches from the listing, so ``ls -l`` and ``find -type`` need no lookup per
        name. Each entry with a node id counts as one lookup, exactly as a lookup reply does
        (``InodeFs.lookup``, with the same name checks and pinning); one that does not fit in the
        reply is forgotten again. An entry that vanished since opendir, or whose side entry
        fails, is listed without attributes (node id 0: the kernel looks it up if asked)."""
        buf = self._buffer(size)
        base = ctypes.addressof(buf)
        entry = _fuse.EntryParam()
        used = 0
        counted: list[int] = []  # lookups this reply carries (undone if it is never sent)
        try:
            for index, (name, inode, mode) in enumerate(self.fs.readdir(fi.contents.fh, offset),
                                                        offset + 1):
                node = attrs = None
                if name not in (".", ".."):
                    try:
                        node, attrs = self.fs.lookup_listed(ino, name, inode, mode)
                    except OSError:
                        pass
                if node is None or attrs is None:
                    ctypes.memset(ctypes.byref(entry), 0, ctypes.sizeof(entry))
                    entry.attr.st_ino, entry.attr.st_mode = inode, mode
                else:
                    counted.append(node.ino)
                    entry.ino, entry.generation = node.ino, 0
                    entry.attr_timeout, entry.entry_timeout = ATTR_TIMEOUT, ENTRY_TIMEOUT
                    _fuse.fill_stat(entry.attr, attrs)
                need = _fuse.add_direntry_plus(req, base + used, size - used, os.fsencode(name),
                                               ctypes.byref(entry), index)
                if need > size - used:
                    if node is not None:
                        self.fs.forget(counted.pop(), 1)
                    break
                used += need
        except BaseException:
            for node_id in counted:
                self.fs.forget(node_id, 1)
            raise
        if _fuse.reply_buf(req, buf, used) != 0:  # interrupted: the kernel counted none of them
            for node_id in counted:
                self.fs.forget(node_id, 1)

    @_guarded("releasedir")
    def releasedir(self, req: Any, ino: int, fi: Any) -> None:
        self.fs.releasedir(fi.contents.fh)
        _fuse.reply_err(req, 0)

    @_guarded("fsyncdir")
    def fsyncdir(self, req: Any, ino: int, datasync: int, fi: Any) -> None:
        _fuse.reply_err(req, 0)
