"""The filesystem core: plaintext operations over a cipherdir, free of FUSE.

Why a core apart from operations.py: everything here can be driven by plain Python tests, and the
FUSE adapter stays a thin layer whose only jobs are unpacking libfuse's arguments, collecting the
caller (uid/pid/process) and translating errors to errno in one place. kmsfs/inodes.py puts this
core in FUSE's inode terms; the methods taking a mount path are the same operations for tests
and tools, each resolving the path one name at a time (kmsfs/backing_at.py).

Backing access: every call is relative to a directory descriptor (``*_at``: directory fd + one
name, never followed if a symlink) or to a pinned ``O_PATH`` descriptor of the object itself
(``*_fd``); no path string reaches the backing filesystem (docs/SECURITY.md).

Methods raise OSError (with an errno) or the domain errors: ``IntegrityError``, ``CorruptHeader``,
``KeyServiceError``, ``KeyServiceUnavailable``.

Key handling: every open() and create() talks to the key service (Decrypt / GenerateDataKey): that
request is the audited access. A create may take a data key the pool generated ahead of time
(kmsfs/keypool.py); its path is then audited by a claim Decrypt sent right after the create, off
its critical path, and a refused claim fails the new handle like a refused revalidation. The
plaintext data key is kept only while some handle of the inode is open, in a per-inode record that
also holds the lock all handles of that inode share.

Revocation reaches open handles (F6): an inode's unwrapped key is trusted for ``revalidate_after``
seconds; the next read/write/truncate after that unwraps the header again (Decrypt). A refusal
(disabled, pending deletion, deleted, access denied) fails that operation and every later one on
the inode until a Decrypt succeeds again; a service *outage* keeps the key (open files keep
working, F9) and retries after the next interval. No background thread is involved.

Crash safety of create: the backing file is built as an O_TMPFILE (or under a hidden temporary
name) with its header set and mode applied, and only then linked under its name, so a visible
regular file always has a header whose key the service issued.

A header-only file (a valid header copied onto an empty file by someone with access to the
backing store) must not lend its data key to new contents: the first write into an empty file
that this daemon did not create itself starts a fresh file id and data key.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import itertools
import logging
import math
import os
import stat
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kmsfs.backing_at import (
    RENAME_EXCHANGE,
    RENAME_NOREPLACE,
    chmod_at,
    chown_at,
    lstat_at,
    names_of,
    open_parent,
    pin,
    proc_path,
    renameat2,
)
from kmsfs.cipher import BlockCipher
from kmsfs.config import RESERVED_PREFIX, Config
from kmsfs.encfile import EncryptedFile
from kmsfs.format import (
    DATA_KEY_SIZE,
    FILE_ID_SIZE,
    FORMAT_V4,
    FORMAT_VERSION,
    CorruptHeader,
    Header,
    encryption_context,
)
from kmsfs.headers import empty, plain_size_of, read_header, replace_empty, write_new
from kmsfs.holes import supports_sparse
from kmsfs.keyclient import KeyClient, KeyServiceError, KeyServiceUnavailable
from kmsfs.keypool import DataKeyPool, PooledKey
from kmsfs.nolinks import link_or_rename
from kmsfs.reports import report_of

if TYPE_CHECKING:
    from kmsfs.dirkeys import DirectoryKeys
    from kmsfs.reports import OpenReporter
from kmsfs.rwlock import SharedLock

log = logging.getLogger("kmsfs")

# Default bound on how long an open handle keeps using a key after it was revoked (seconds).
DEFAULT_REVALIDATE_AFTER = 30.0
TEMP_PREFIX = ".kmsfs-tmp-"
# How much of a file an open asks the kernel to read ahead while the key is being unwrapped.
PREFETCH_BYTES = 128 * 1024

Caller = dict[str, Any]
_RESERVED_XATTR_PREFIX = "user.kmsfs."
_ACL_PREFIX = "system.posix_acl_"
# Flags the backing open must not see: we handle truncation and appends ourselves (pwrite on an
# O_APPEND fd ignores the offset on Linux), O_DIRECT fails on some backing filesystems.
# O_NOFOLLOW is the caller's (the kernel resolved its symlinks): the backing open sets its own,
# and a reopen through /proc/self/fd must follow that magic link.
_STRIP_FLAGS = (os.O_APPEND | os.O_TRUNC | os.O_CREAT | os.O_EXCL | getattr(os, "O_DIRECT", 0)
                | os.O_NOCTTY | os.O_NOFOLLOW)


@dataclass
class _Inode:
    """Shared state of one open backing inode: the lock and the unwrapped data key."""

    header: Header
    cipher: BlockCipher
    lock: SharedLock = field(default_factory=SharedLock)  # reads share it, all else exclusive
    refs: int = 0
    checked_at: float = field(default_factory=time.monotonic)
    revoked: BaseException | None = None
    fresh: bool = False  # created by this daemon: its header is known to be ours
    files: list[EncryptedFile] = field(default_factory=list)


@dataclass
class _Handle:
    fd: int
    path: str
    inode: _Inode
    ident: tuple[int, int]
    efile: EncryptedFile


class KmsfsCore:
    """Plaintext view of a cipherdir."""

    def __init__(self, cipherdir: str, config: Config, client: KeyClient, *,
                 revalidate_after: float = DEFAULT_REVALIDATE_AFTER,
                 sparse: bool | None = None, key_pool: DataKeyPool | None = None,
                 dirkeys: DirectoryKeys | None = None, reporter: OpenReporter | None = None) -> None:
        """``dirkeys``: directory-key mode (new files are version 4, wrapped locally under their
        directory's key; kmsfs/dirkeys.py); ``reporter``: where that mode's opens and creates are
        reported (kmsfs/reports.py), None against a service without the extension."""
        self.root = os.path.realpath(cipherdir)
        # Held for the core's life: every backing access starts from it, one name at a time
        # (kmsfs/backing_at.py); no path string reaches the backing filesystem.
        self._root_fd = os.open(self.root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        root_st = os.fstat(self._root_fd)
        self._root_ident = (root_st.st_dev, root_st.st_ino)
        weakref.finalize(self, os.close, self._root_fd)
        self.key_pool = key_pool if dirkeys is None else None
        self.dirkeys = dirkeys
        self.reporter = reporter
        self.config = config
        self.client = client
        self.revalidate_after = revalidate_after
        self.sparse = supports_sparse(self.root) if sparse is None else sparse
        self._lock = threading.Lock()
        self._inodes: dict[tuple[int, int], _Inode] = {}
        self._handles: dict[int, _Handle] = {}
        self._fh = itertools.count(1)
        self._as_root = os.geteuid() == 0

    @property
    def root_fd(self) -> int:
        """The O_PATH descriptor of the cipherdir every backing access starts from."""
        return self._root_fd

    # -- paths ------------------------------------------------------------------------------------
    def _names(self, path: str) -> list[str]:
        """The components of a mount path; reserved names in the root do not exist in the mount."""
        names = names_of(path)
        if names and names[0].startswith(RESERVED_PREFIX):
            raise FileNotFoundError(errno.ENOENT, "reserved name", path)
        return names

    @contextlib.contextmanager
    def _at(self, path: str) -> Iterator[tuple[int, str]]:
        """(descriptor of the backing parent directory, last name) of a mount path, reached
        without following any symlink (kmsfs/backing_at.py); the cipherdir is ``(root, ".")``."""
        dir_fd, name = open_parent(self._root_fd, self._names(path))
        try:
            yield dir_fd, name
        finally:
            if dir_fd != self._root_fd:
                os.close(dir_fd)

    @contextlib.contextmanager
    def _pinned(self, path: str) -> Iterator[int]:
        """An O_PATH|O_NOFOLLOW descriptor of the backing object of a mount path."""
        with self._at(path) as (dir_fd, name):
            fd = pin(dir_fd, name)
        try:
            yield fd
        finally:
            os.close(fd)

    def _own(self, dir_fd: int, name: str, caller: Caller | None, fd: int | None = None) -> None:
        """New entries belong to the requesting user when running as root (like a local fs); the
        group is the parent directory's when that directory is setgid (the kernel's rule)."""
        if not self._as_root or not caller or "uid" not in caller:
            return
        uid, gid = int(caller["uid"]), int(caller.get("gid", -1))
        parent = os.fstat(dir_fd)
        if parent.st_mode & stat.S_ISGID:
            gid = parent.st_gid
        if fd is not None:
            os.fchown(fd, uid, gid)
        else:
            chown_at(dir_fd, name, uid, gid)

    # -- attributes (of a pinned O_PATH descriptor; the path forms below pin first) ---------------
    def stat_fd(self, fd: int) -> dict[str, int]:
        """The backing object's attributes, with the plaintext size for regular files.

        The most frequent request (several per created file: the kernel re-asks after every
        write), so the dict is built in one literal rather than by a loop of ``getattr``."""
        return attributes(os.fstat(fd), fd)

    def getattr(self, path: str, fh: int | None = None) -> dict[str, int]:
        handle = self._handles.get(fh) if fh else None
        if handle:
            return attributes(os.fstat(handle.fd), handle.fd)
        with self._pinned(path) as fd:
            return attributes(os.fstat(fd), fd)

    def readdir_fd(self, fd: int) -> list[str]:
        """The names in the directory ``fd`` (reserved names of the cipherdir's root left out)."""
        dfd = os.open(proc_path(fd), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            names = os.listdir(dfd)
            if self.is_root(dfd):
                names = [n for n in names if not n.startswith(RESERVED_PREFIX)]
        finally:
            os.close(dfd)
        return names

    def scan_fd(self, fd: int) -> list[tuple[str, int, int]]:
        """(name, inode number, type bits) of each entry of the directory ``fd``, "." and ".."
        first (reserved names of the cipherdir's root left out), for a FUSE readdir reply."""
        dfd = os.open(proc_path(fd), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            st = os.fstat(dfd)
            root = (st.st_dev, st.st_ino) == self._root_ident
            # ".." of the mount's root is the root itself: nothing above the cipherdir is asked
            up = st.st_ino if root else os.stat("..", dir_fd=dfd, follow_symlinks=False).st_ino
            out = [(".", st.st_ino, stat.S_IFDIR), ("..", up, stat.S_IFDIR)]
            with os.scandir(dfd) as entries:
                for entry in entries:
                    if root and entry.name.startswith(RESERVED_PREFIX):
                        continue
                    out.append((entry.name, entry.inode(), _DTYPE_MODE.get(_dtype(entry), 0)))
        finally:
            os.close(dfd)
        return out

    def handle_fd(self, fh: int) -> int:
        """The backing descriptor of an open handle (the inode layer pins a created file by it)."""
        return self._handle(fh).fd

    def is_root(self, fd: int) -> bool:
        st = os.fstat(fd)
        return (st.st_dev, st.st_ino) == self._root_ident

    def readdir(self, path: str) -> list[str]:
        with self._pinned(path) as fd:
            return [".", "..", *self.readdir_fd(fd)]

    def statfs_fd(self, fd: int) -> dict[str, int]:
        sv = os.statvfs(fd)
        return {k: getattr(sv, k) for k in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail",
                                            "f_files", "f_ffree", "f_favail", "f_flag", "f_namemax")}

    def statfs(self, path: str) -> dict[str, int]:
        with self._pinned(path) as fd:
            return self.statfs_fd(fd)

    def chmod_fd(self, fd: int, mode: int) -> None:
        """chmod of the pinned object; a symlink has no mode on Linux (EOPNOTSUPP)."""
        if stat.S_ISLNK(os.fstat(fd).st_mode):
            raise OSError(errno.EOPNOTSUPP, "symlinks have no mode")
        os.chmod(proc_path(fd), mode & 0o7777)

    def chmod(self, path: str, mode: int) -> None:
        with self._pinned(path) as fd:
            self.chmod_fd(fd, mode)

    def chown_fd(self, fd: int, uid: int, gid: int) -> None:
        """The magic link resolves to the pinned object itself (a symlink's own owner)."""
        os.chown(proc_path(fd), uid, gid)

    def chown(self, path: str, uid: int, gid: int) -> None:
        with self._at(path) as (dir_fd, name):
            chown_at(dir_fd, name, uid, gid)

    def utimens_fd(self, fd: int, times: tuple[int, int] | None) -> None:
        """Times in nanoseconds; UTIME_NOW / UTIME_OMIT honoured per field (tar sets mtime only)."""
        target = proc_path(fd)  # the pinned object itself, a symlink included
        if times is None:
            os.utime(target)
            return
        now = None
        resolved = []
        st = None
        for value, attr in zip(times, ("st_atime_ns", "st_mtime_ns"), strict=True):
            if value == UTIME_NOW:
                now = now or _now_ns()
                resolved.append(now)
            elif value == UTIME_OMIT:
                st = st or os.fstat(fd)
                resolved.append(getattr(st, attr))
            else:
                resolved.append(value)
        os.utime(target, ns=(resolved[0], resolved[1]))

    def utimens(self, path: str, times: tuple[int, int] | None) -> None:
        with self._pinned(path) as fd:
            self.utimens_fd(fd, times)

    # -- namespace (directory descriptor + one name) ----------------------------------------------
    def mkdir_at(self, dir_fd: int, name: str, mode: int, caller: Caller | None = None,
                 fill: Callable[[int], None] | None = None) -> None:
        """``fill(new directory fd)`` runs before owner and mode are applied (writes the
        directory id of a name-encrypting cipherdir: the new directory may be read-only)."""
        if os.fstat(dir_fd).st_mode & stat.S_ISGID:
            mode |= stat.S_ISGID  # a setgid directory's subdirectories inherit the bit
        os.mkdir(name, 0o700, dir_fd=dir_fd)
        if fill is not None:
            try:
                new_fd = os.open(name, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                                 dir_fd=dir_fd)
                try:
                    fill(new_fd)
                finally:
                    os.close(new_fd)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.rmdir(name, dir_fd=dir_fd)
                raise
        self._own(dir_fd, name, caller)  # before chmod: exact modes, also with set-id bits
        chmod_at(dir_fd, name, mode & 0o7777)

    def mkdir(self, path: str, mode: int, caller: Caller | None = None) -> None:
        with self._at(path) as (dir_fd, name):
            self.mkdir_at(dir_fd, name, mode, caller)

    def rmdir(self, path: str) -> None:
        with self._at(path) as (dir_fd, name):
            os.rmdir(name, dir_fd=dir_fd)

    def unlink(self, path: str) -> None:
        with self._at(path) as (dir_fd, name):
            os.unlink(name, dir_fd=dir_fd)

    @staticmethod
    def rename_at(old_dir: int, old_name: str, new_dir: int, new_name: str, flags: int = 0) -> None:
        """rename, with renameat2's RENAME_NOREPLACE and RENAME_EXCHANGE (others: EINVAL)."""
        if flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE):
            raise OSError(errno.EINVAL, "unsupported rename flags", old_name)
        renameat2(old_dir, old_name, new_dir, new_name, flags)

    def rename(self, old: str, new: str, flags: int = 0) -> None:
        with self._at(old) as (old_dir, old_name), self._at(new) as (new_dir, new_name):
            self.rename_at(old_dir, old_name, new_dir, new_name, flags)

    @staticmethod
    def link_fd(fd: int, new_dir: int, new_name: str) -> None:
        """A new name for the pinned object (linkat of its magic link, AT_SYMLINK_FOLLOW)."""
        os.link(proc_path(fd), new_name, dst_dir_fd=new_dir, follow_symlinks=True)

    def link(self, new: str, existing: str) -> None:
        with self._at(existing) as (old_dir, old_name), self._at(new) as (new_dir, new_name):
            os.link(old_name, new_name, src_dir_fd=old_dir, dst_dir_fd=new_dir, follow_symlinks=False)

    def symlink_at(self, dir_fd: int, name: str, target: str, caller: Caller | None = None) -> None:
        os.symlink(target, name, dir_fd=dir_fd)
        self._own(dir_fd, name, caller)

    def symlink(self, new: str, target: str, caller: Caller | None = None) -> None:
        with self._at(new) as (dir_fd, name):
            self.symlink_at(dir_fd, name, target, caller)

    @staticmethod
    def readlink_fd(fd: int) -> str:
        return os.readlink("", dir_fd=fd)  # readlinkat(fd, ""): the pinned symlink itself

    def readlink(self, path: str) -> str:
        with self._at(path) as (dir_fd, name):
            return os.readlink(name, dir_fd=dir_fd)

    def mknod_at(self, dir_fd: int, name: str, mode: int, dev: int, caller: Caller | None = None) -> None:
        if stat.S_ISREG(mode):  # a regular file needs a header: same as create
            self.release(name, self.create_at(dir_fd, name, name, mode, caller, os.O_RDWR | os.O_EXCL))
            return
        os.mknod(name, mode, dev, dir_fd=dir_fd)
        self._own(dir_fd, name, caller)

    def mknod(self, path: str, mode: int, dev: int, caller: Caller | None = None) -> None:
        with self._at(path) as (dir_fd, name):
            if stat.S_ISREG(mode):
                self.release(path, self.create_at(dir_fd, name, path, mode, caller, os.O_RDWR | os.O_EXCL))
                return
            self.mknod_at(dir_fd, name, mode, dev, caller)

    # -- extended attributes (user xattrs pass through; the header is invisible) ------------------
    # The xattr calls have no *at form: the pinned object is named by its /proc/self/fd link.
    # POSIX ACLs are refused (EOPNOTSUPP): stored on the backing file they would not be enforced
    # (the kernel checks permissions from the mode alone on this mount), and an ACL that is
    # shown but not enforced misleads whoever sets it.
    def getxattr_fd(self, fd: int, name: str) -> bytes:
        if name.startswith(_RESERVED_XATTR_PREFIX) or name.startswith("security."):
            raise OSError(errno.ENODATA, "no such attribute")
        if name.startswith(_ACL_PREFIX):
            raise OSError(errno.EOPNOTSUPP, "POSIX ACLs are not supported")
        return os.getxattr(proc_path(fd), name)

    def getxattr(self, path: str, name: str) -> bytes:
        with self._pinned(path) as fd:
            return self.getxattr_fd(fd, name)

    def listxattr_fd(self, fd: int) -> list[str]:
        names = os.listxattr(proc_path(fd))
        return [n for n in names if not n.startswith((_RESERVED_XATTR_PREFIX, _ACL_PREFIX))]

    def listxattr(self, path: str) -> list[str]:
        with self._pinned(path) as fd:
            return self.listxattr_fd(fd)

    def setxattr_fd(self, fd: int, name: str, value: bytes, options: int) -> None:
        _check_changeable_xattr(name)
        os.setxattr(proc_path(fd), name, value, options)

    def setxattr(self, path: str, name: str, value: bytes, options: int) -> None:
        with self._pinned(path) as fd:
            self.setxattr_fd(fd, name, value, options)

    def removexattr_fd(self, fd: int, name: str) -> None:
        _check_changeable_xattr(name)
        os.removexattr(proc_path(fd), name)

    def removexattr(self, path: str, name: str) -> None:
        with self._pinned(path) as fd:
            self.removexattr_fd(fd, name)

    # -- files ------------------------------------------------------------------------------------
    def _new_key(self, path: str, caller: Caller | None) -> tuple[Header, bytes]:
        """A fresh file id and data key (F2): GenerateDataKey bound to the file id, asked now for
        this caller (so the service audits it with the path). Creates may use the key pool first
        (``create``); a re-key of a planted file always asks here."""
        file_id = os.urandom(FILE_ID_SIZE)
        key, blob, arn = self.client.generate_data_key(self.config.key_arn, encryption_context(file_id),
                                                       caller)
        if len(key) != DATA_KEY_SIZE:
            raise CorruptHeader("key service returned a data key of the wrong size")
        return Header(file_id=file_id, key_arn=arn, wrapped_key=blob, version=FORMAT_VERSION), key

    def _claim(self, pooled: PooledKey, path: str, caller: Caller | None, inode: _Inode) -> None:
        """Have the service audit this create with its path (a claim Decrypt, in the background).

        Why: the pooled key's GenerateDataKey was audited without a path. If the service refuses
        the claim, the create's inode is treated like one whose revalidation was refused: I/O on
        it fails with EACCES until a Decrypt succeeds again (``_check_key`` re-asks after a
        second). If the service unwraps to a different key, the inode never works again and is
        dropped, so later opens start from the service's key."""
        assert self.key_pool is not None

        def refused(exc: BaseException, mismatch: bool) -> None:
            # Runs on the claim thread. revoked first: a reader that sees it raises it.
            inode.revoked = exc
            inode.checked_at = math.inf if mismatch else time.monotonic()
            if mismatch:
                with self._lock:
                    for ident, known in list(self._inodes.items()):
                        if known is inode:
                            del self._inodes[ident]

        self.key_pool.claim(pooled, {**(caller or {}), "path": path}, refused)

    def create(self, path: str, mode: int, caller: Caller | None = None, flags: int = os.O_RDWR) -> int:
        """New file with a fresh data key from GenerateDataKey (F2); returns a handle.

        The file becomes visible only once complete (header, mode, owner): O_TMPFILE + link, or a
        hidden temporary name + link. The link fails with EEXIST if the name exists (O_EXCL).
        """
        with self._at(path) as (dir_fd, name):
            return self.create_at(dir_fd, name, path, mode, caller, flags)

    def create_at(self, dir_fd: int, name: str, path: str, mode: int, caller: Caller | None = None,
                  flags: int = os.O_RDWR, dir_id: bytes | None = None) -> int:
        """``create`` of ``name`` in the directory ``dir_fd``; ``path`` is what the audit shows.
        ``dir_id``: that directory's id (needed in directory-key mode)."""
        if _exists_at(dir_fd, name):
            if flags & os.O_EXCL:
                raise FileExistsError(errno.EEXIST, "file exists", path)
            return self._open_at(dir_fd, name, path, flags & ~os.O_CREAT, caller)
        pooled = self.key_pool.take() if self.key_pool is not None else None
        if self.dirkeys is not None:
            if self.reporter is not None:
                self.reporter.check()  # fail closed while reports are overdue
            if dir_id is None:
                raise OSError(errno.EIO, "directory-key mode: the directory's id is unknown", path)
            header, key = self.dirkeys.new_file_key(dir_fd, dir_id, caller)
        elif pooled is None:
            header, key = self._new_key(path, caller)
        else:  # generated ahead for a file id chosen then; claimed below, once the file exists
            header, key = Header(file_id=pooled.file_id, key_arn=pooled.key_arn,
                                 wrapped_key=pooled.wrapped_key, version=FORMAT_VERSION), pooled.key
        fd, temp = _open_unnamed(dir_fd)
        try:
            write_new(fd, header, key)  # xattr and in-file copy (kmsfs.headers)
            self._own(dir_fd, name, caller, fd)  # before chmod: chown clears set-id bits
            os.fchmod(fd, mode & 0o7777)
            if temp is None:
                _link_fd(fd, dir_fd, name)
            else:
                link_or_rename(temp, name, dir_fd)  # (a rename where hard links are refused)
        except BaseException:
            os.close(fd)
            raise
        finally:
            if temp is not None:
                _unlink_quietly(dir_fd, temp)
        fh = self._register(fd, path, header, key, fresh=True)
        if pooled is not None:
            self._claim(pooled, path, caller, self._handles[fh].inode)
        self._report("create", header, path, caller)
        return fh

    def _report(self, operation: str, header: Header, path: str, caller: Caller | None) -> None:
        """Queue a directory-key access for the service's audit (kmsfs/reports.py)."""
        if self.reporter is not None and header.version == FORMAT_V4:
            dir_id = header.directory_wrapped.dir_id
            self.reporter.add(header.key_arn, report_of(operation, caller, path, header.file_id, dir_id))

    def open(self, path: str, flags: int, caller: Caller | None = None) -> int:
        """Open an existing file: read its header, unwrap its key through the service (F5)."""
        with self._at(path) as (dir_fd, name):
            return self._open_at(dir_fd, name, path, flags, caller)

    def open_fd(self, pinned: int, path: str, flags: int, caller: Caller | None = None) -> int:
        """``open`` of the pinned object (reopened through its /proc/self/fd link: exactly that
        inode, whatever its names are now); ``path`` is what the audit shows."""
        if not stat.S_ISREG(os.fstat(pinned).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", path)
        return self._open_at(None, proc_path(pinned), path, flags, caller)

    def _open_at(self, dir_fd: int | None, name: str, path: str, flags: int, caller: Caller | None) -> int:
        bflags = flags & ~_STRIP_FLAGS
        # read-modify-write needs to read; access mode 3 (Linux: ioctl only, after checking read
        # and write permission) cannot even read the header, so it is opened read-write too
        if bflags & os.O_ACCMODE in (os.O_WRONLY, os.O_ACCMODE):
            bflags = (bflags & ~os.O_ACCMODE) | os.O_RDWR
        if dir_fd is not None:
            bflags |= os.O_NOFOLLOW  # (a /proc/self/fd link must be followed: it is the inode)
        if self.reporter is not None:
            self.reporter.check()  # fail closed while reports are overdue
        fd = os.open(name, bflags | os.O_CLOEXEC, dir_fd=dir_fd)
        try:
            _prefetch(fd)
            header = _read_header(fd)
            key = self._unwrap(header, caller)
            fh = self._register(fd, path, header, key)
        except BaseException:
            os.close(fd)
            raise
        self._report("open", header, path, caller)
        handle = self._handles[fh]
        with handle.inode.lock:
            settled = self._recover(handle)
        if settled is not None:
            log.warning("%s: completed an interrupted size change (size now %d)", path, settled)
        if flags & os.O_TRUNC and flags & os.O_ACCMODE != os.O_RDONLY:
            self.truncate(path, 0, fh)
        return fh

    def _recover(self, handle: _Handle) -> int | None:
        """Settle a size change a crash interrupted (inode lock held).

        Settling writes and truncates, so a handle opened read-only settles through a second,
        read-write descriptor of the same backing inode (reopened through /proc/self/fd: the
        inode the handle holds, whatever its name is now)."""
        if handle.efile.pending_marker() is None:
            return None
        if fcntl.fcntl(handle.fd, fcntl.F_GETFL) & os.O_ACCMODE != os.O_RDONLY:
            return handle.efile.recover()
        fd = os.open(proc_path(handle.fd), os.O_RDWR | os.O_CLOEXEC)
        try:
            efile = handle.efile
            return EncryptedFile(fd, handle.inode.cipher, efile.file_id, efile.block_size,
                                 handle.inode.header.version, sparse=self.sparse).recover()
        finally:
            os.close(fd)

    def _unwrap(self, header: Header, caller: Caller | None) -> bytes:
        if header.version == FORMAT_V4:
            if self.dirkeys is None:  # planted: this cipherdir has no directory keys
                raise CorruptHeader("a directory-key (version 4) file in a cipherdir without them")
            return self.dirkeys.file_key(header, caller)
        try:
            key = self.client.decrypt(header.wrapped_key, header.encryption_context(), caller,
                                      key_id=header.key_arn)
        except KeyServiceError as exc:
            if exc.is_access_denied and self.key_pool is not None:
                self.key_pool.refused()  # revocation reaches pooled creates at once
            raise
        if len(key) != DATA_KEY_SIZE:
            raise CorruptHeader("unwrapped data key has the wrong size")
        return key

    def _register(self, fd: int, path: str, header: Header, key: bytes | None,
                  fresh: bool = False) -> int:
        """A handle on ``fd``; ``key=None`` means "reuse the open inode's key" (LookupError if gone)."""
        st = os.fstat(fd)
        ident = (st.st_dev, st.st_ino)
        with self._lock:
            inode = self._inodes.get(ident)
            if key is None and (inode is None or inode.header.file_id != header.file_id):
                raise LookupError("inode no longer open")
            if key is not None and (inode is None or inode.header.file_id != header.file_id):
                inode = _Inode(header=header, cipher=BlockCipher(key), fresh=fresh)
                self._inodes[ident] = inode
            else:  # a successful unwrap proves the key is usable again
                inode.revoked = None
                inode.checked_at = time.monotonic()
            inode.refs += 1
            fh = next(self._fh)
            efile = EncryptedFile(fd, inode.cipher, header.file_id, header.block_size, header.version,
                                  sparse=self.sparse)
            inode.files.append(efile)
            self._handles[fh] = _Handle(fd=fd, path=path, inode=inode, ident=ident, efile=efile)
        return fh

    def _register_copy(self, fd: int, path: str, header: Header, key: bytes | None) -> int:
        """``_register`` on a duplicate of ``fd`` (the handle owns and closes its own descriptor)."""
        copy = os.dup(fd)
        try:
            return self._register(copy, path, header, key)
        except BaseException:
            os.close(copy)
            raise

    def _handle(self, fh: int | None) -> _Handle:
        handle = self._handles.get(fh) if fh else None
        if handle is None:
            raise OSError(errno.EBADF, "bad file handle")
        return handle

    def _key_current(self, inode: _Inode) -> bool:
        """True while ``_check_key`` would return at once (no revalidation due, not revoked)."""
        return inode.revoked is None and time.monotonic() - inode.checked_at < self.revalidate_after

    def _check_key(self, handle: _Handle) -> None:
        """Revocation for open handles: re-unwrap the key once ``revalidate_after`` has passed.

        Called with the inode lock held. Refusals stick (every call re-asks once the interval
        passed); an unreachable service keeps the cached key.
        """
        inode = handle.inode
        now = time.monotonic()
        if inode.revoked is None and now - inode.checked_at < self.revalidate_after:
            return
        if inode.revoked is not None and now - inode.checked_at < min(1.0, self.revalidate_after):
            raise inode.revoked
        inode.checked_at = now
        header = inode.header
        try:
            self._unwrap(header, {"path": handle.path, "revalidate": True})
        except KeyServiceError as exc:
            if exc.is_access_denied:
                inode.revoked = exc
                raise
            inode.revoked = None
            log.warning("%s: revalidation failed (%s); keeping the key", handle.path, exc)
        except KeyServiceUnavailable as exc:
            log.warning("%s: key service unavailable for revalidation (%s); keeping the key",
                        handle.path, exc)
        else:
            inode.revoked = None

    def _rekey_if_planted(self, handle: _Handle, caller: Caller | None) -> None:
        """First write into an empty file we did not create: fresh file id and data key."""
        inode = handle.inode
        if inode.fresh or handle.efile.size() != 0:
            return
        if self.dirkeys is not None and inode.header.version == FORMAT_V4:
            self.dirkeys.file_key(inode.header, caller)  # its directory key, cached (or refused) now
            header, key = self.dirkeys.rekey(inode.header)  # same directory key, new file id and key
        else:
            header, key = self._new_key(handle.path, caller)
        fcntl.flock(handle.fd, fcntl.LOCK_EX)  # excludes a concurrent ``kmsfs rewrap``
        try:
            replace_empty(handle.fd, header, key)
        finally:
            fcntl.flock(handle.fd, fcntl.LOCK_UN)
        cipher = BlockCipher(key)
        inode.header, inode.cipher, inode.fresh = header, cipher, True
        inode.checked_at, inode.revoked = time.monotonic(), None
        for efile in inode.files:
            efile.rekey(cipher, header.file_id, header.version)
        log.info("%s: empty file got a fresh file id and data key", handle.path)

    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        out = bytearray(size)
        count = self.read_into(path, memoryview(out), offset, fh)
        return bytes(out) if count == size else bytes(out[:count])

    def read_into(self, path: str, out: memoryview, offset: int, fh: int) -> int:
        """Decrypt up to ``len(out)`` bytes at ``offset`` into ``out``; returns the count.

        Reads share the inode lock (see kmsfs.rwlock): concurrent readahead requests overlap
        their preads with each other's decryption. A read that finds the key due for
        revalidation (or revoked) takes the lock exclusively, as before, to ask the service.
        """
        handle = self._handle(fh)
        lock = handle.inode.lock
        lock.acquire_shared()
        try:
            if self._key_current(handle.inode):
                return handle.efile.read_into(offset, out)
        finally:
            lock.release_shared()
        with lock:
            self._check_key(handle)
            return handle.efile.read_into(offset, out)

    def write(self, path: str, data: bytes, offset: int, fh: int, caller: Caller | None = None) -> int:
        handle = self._handle(fh)
        with handle.inode.lock:
            self._check_key(handle)
            self._rekey_if_planted(handle, caller)
            return handle.efile.write(offset, data)

    def truncate(self, path: str, length: int, fh: int | None = None, caller: Caller | None = None) -> None:
        if fh:
            handle = self._handle(fh)
            with handle.inode.lock:
                self._check_key(handle)
                if length > 0:
                    self._rekey_if_planted(handle, caller)
                handle.efile.truncate(length)
            return
        with self._at(path) as (dir_fd, name):
            fd = os.open(name, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
        try:
            self._truncate_fd(fd, path, length, caller)
        finally:
            os.close(fd)

    def truncate_pinned(self, pinned: int, path: str, length: int, caller: Caller | None = None) -> None:
        """truncate of the pinned object without an open handle (reopened read-write)."""
        if not stat.S_ISREG(os.fstat(pinned).st_mode):
            return self._truncate_fd(pinned, path, length, caller)  # raises EISDIR / EINVAL
        fd = os.open(proc_path(pinned), os.O_RDWR | os.O_CLOEXEC)
        try:
            self._truncate_fd(fd, path, length, caller)
        finally:
            os.close(fd)

    def fallocate(self, path: str, mode: int, offset: int, length: int, fh: int,
                  caller: Caller | None = None) -> None:
        """fallocate(2) in plaintext terms, on an open handle.

        Mode 0 grows the file to ``offset + length`` if shorter (the new range reads as zeros,
        like a truncate up: blocks are sealed or left as holes, not preallocated).
        FALLOC_FL_KEEP_SIZE alone changes nothing a reader can see. PUNCH_HOLE (with KEEP_SIZE)
        and ZERO_RANGE make the range read as zeros by writing zeros (sealed blocks: a real
        hole in the backing file reads as zeros only where whole blocks were never written,
        docs/FORMAT.md), clamped to the file size unless ZERO_RANGE may grow it. Other modes
        (COLLAPSE_RANGE, INSERT_RANGE, ...) are EOPNOTSUPP."""
        if offset < 0 or length <= 0:
            raise OSError(errno.EINVAL, "bad fallocate range", path)
        known = FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE
        if mode & ~known or (mode & FALLOC_FL_PUNCH_HOLE and not mode & FALLOC_FL_KEEP_SIZE):
            raise OSError(errno.EOPNOTSUPP, "unsupported fallocate mode", path)
        handle = self._handle(fh)
        end = offset + length
        with handle.inode.lock:
            self._check_key(handle)
            size = handle.efile.size()
            if mode & (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE):
                stop = end if not mode & FALLOC_FL_KEEP_SIZE else min(end, size)
                if stop > offset:
                    self._rekey_if_planted(handle, caller)
                    chunk = bytes(min(stop - offset, 1 << 20))
                    for at in range(offset, stop, len(chunk)):
                        handle.efile.write(at, chunk[:stop - at])
            elif not mode & FALLOC_FL_KEEP_SIZE and end > size:
                self._rekey_if_planted(handle, caller)
                handle.efile.truncate(end)

    def _truncate_fd(self, fd: int, path: str, length: int, caller: Caller | None) -> None:
        """truncate(path) on the backing file ``fd`` (opened O_RDWR|O_NOFOLLOW, no handle yet)."""
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise IsADirectoryError(errno.EISDIR, "not a regular file") if stat.S_ISDIR(
                st.st_mode) else OSError(errno.EINVAL, "not a regular file")
        with self._lock:
            inode = self._inodes.get((st.st_dev, st.st_ino))
        if inode is not None:  # reuse the key already unwrapped for the open handles
            try:
                fh = self._register_copy(fd, path, inode.header, None)
            except LookupError:
                fh = None
            if fh is not None:
                try:
                    self.truncate(path, length, fh, caller)
                finally:
                    self.release(path, fh)
                return
        if length == 0 and inode is None:
            empty(fd)  # no plaintext needed to empty a file (a format-3 file keeps its prefix)
            return
        header = _read_header(fd)
        if self.reporter is not None:
            self.reporter.check()
        fh = self._register_copy(fd, path, header, self._unwrap(header, caller))
        self._report("truncate", header, path, caller)
        try:
            with self._handles[fh].inode.lock:
                self._recover(self._handles[fh])
            self.truncate(path, length, fh, caller)
        finally:
            self.release(path, fh)

    def fsync(self, path: str, datasync: int, fh: int) -> None:
        handle = self._handle(fh)
        (os.fdatasync if datasync else os.fsync)(handle.fd)

    def flush(self, path: str, fh: int) -> None:
        self._handle(fh)  # writes are already in the backing file (no write-back buffer)

    def release(self, path: str | None, fh: int) -> None:
        with self._lock:
            handle = self._handles.pop(fh, None)
            if handle is None:
                return
            handle.inode.refs -= 1
            if handle.efile in handle.inode.files:
                handle.inode.files.remove(handle.efile)
            if handle.inode.refs <= 0 and self._inodes.get(handle.ident) is handle.inode:
                del self._inodes[handle.ident]
        os.close(handle.fd)

    def open_handles(self) -> int:
        return len(self._handles)


def _dtype(entry: os.DirEntry[str]) -> str:
    """The entry's type from getdents' d_type, without a stat (lstat only where d_type is unknown)."""
    if entry.is_symlink():
        return "lnk"
    if entry.is_dir(follow_symlinks=False):
        return "dir"
    if entry.is_file(follow_symlinks=False):
        return "reg"
    return "other"


_DTYPE_MODE = {"lnk": stat.S_IFLNK, "dir": stat.S_IFDIR, "reg": stat.S_IFREG}


def attributes(st: os.stat_result, fd: int) -> dict[str, int]:
    """A backing stat as the mount shows it: the plaintext size for regular files (which needs
    the file's data offset, read through ``fd``: an open or an ``O_PATH`` descriptor of it)."""
    mode = st.st_mode
    return {"st_mode": mode, "st_ino": st.st_ino, "st_nlink": st.st_nlink, "st_uid": st.st_uid,
            "st_gid": st.st_gid,
            "st_size": plain_size_of(st, fd) if stat.S_ISREG(mode) else st.st_size,
            "st_blocks": st.st_blocks, "st_rdev": st.st_rdev, "st_atime": st.st_atime_ns,
            "st_mtime": st.st_mtime_ns, "st_ctime": st.st_ctime_ns}


FALLOC_FL_KEEP_SIZE = 0x01  # linux/falloc.h
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
UTIME_NOW = (1 << 30) - 1
UTIME_OMIT = (1 << 30) - 2


def _now_ns() -> int:
    return time.time_ns()


def _exists_at(dir_fd: int, name: str) -> bool:
    try:
        lstat_at(dir_fd, name)
    except FileNotFoundError:
        return False
    return True


def _open_unnamed(dir_fd: int) -> tuple[int, str | None]:
    """An O_TMPFILE in the directory ``dir_fd`` (no name yet), else a hidden temporary name in it."""
    try:
        return os.open(".", os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600, dir_fd=dir_fd), None
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
            raise
    temp = TEMP_PREFIX + os.urandom(8).hex()
    flags = os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC
    return os.open(temp, flags, 0o600, dir_fd=dir_fd), temp


def _link_fd(fd: int, dir_fd: int, name: str) -> None:
    """linkat(AT_SYMLINK_FOLLOW) of /proc/self/fd/N: gives an O_TMPFILE its name atomically.

    ``name`` is relative to the directory ``dir_fd``. Python calls plain link() unless a dir fd is
    given, and link() would not follow the magic link.
    """
    os.link(proc_path(fd), name, dst_dir_fd=dir_fd, follow_symlinks=True)


def _unlink_quietly(dir_fd: int, name: str) -> None:
    try:
        os.unlink(name, dir_fd=dir_fd)
    except OSError:
        pass


def _prefetch(fd: int) -> None:
    """Start reading the first blocks from disk while the key service unwraps the key.

    Why: an open waits ~1.5 ms for Decrypt; a cold read of the first blocks afterwards costs
    another ~0.3 ms. Asking the kernel for them now overlaps the two (a hint only: bounded to
    PREFETCH_BYTES, errors ignored).
    """
    try:
        os.posix_fadvise(fd, 0, PREFETCH_BYTES, os.POSIX_FADV_WILLNEED)
    except (OSError, AttributeError):
        pass


def _check_changeable_xattr(name: str) -> None:
    """setxattr and removexattr refuse kmsfs's own attributes (EPERM) and POSIX ACLs (EOPNOTSUPP)."""
    if name.startswith(_RESERVED_XATTR_PREFIX):
        raise PermissionError(errno.EPERM, "reserved attribute")
    if name.startswith(_ACL_PREFIX):
        raise OSError(errno.EOPNOTSUPP, "POSIX ACLs are not supported")


def _read_header(fd: int) -> Header:
    return read_header(fd)  # the xattr, checked against (or replaced by) the in-file copy
