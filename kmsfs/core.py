"""The filesystem core: plaintext operations over a cipherdir, free of FUSE.

Why a core apart from operations.py: everything here can be driven by plain Python tests, and the
FUSE adapter stays a thin layer whose only jobs are unpacking fusepy's arguments, collecting the
caller (uid/pid/process) and translating errors to errno in one place.

Methods raise OSError (with an errno) or the domain errors: ``IntegrityError``, ``CorruptHeader``,
``KeyServiceError``, ``KeyServiceUnavailable``.

Key handling: every open() and create() talks to the key service (Decrypt / GenerateDataKey): that
request is the audited access. The plaintext data key is kept only while some handle of the inode
is open, in a per-inode record that also holds the lock all handles of that inode share.
"""

from __future__ import annotations

import errno
import itertools
import os
import stat
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from kmsfs.cipher import BlockCipher
from kmsfs.config import RESERVED_PREFIX, Config
from kmsfs.encfile import EncryptedFile
from kmsfs.format import (
    DATA_KEY_SIZE,
    DEFAULT_BLOCK_SIZE,
    FILE_ID_SIZE,
    HEADER_XATTR,
    CorruptHeader,
    Header,
    encryption_context,
    pack_header,
    parse_header,
    plain_size,
)
from kmsfs.keyclient import KeyClient

Caller = dict[str, Any]
_RESERVED_XATTR_PREFIX = "user.kmsfs."
# Flags the backing open must not see: we handle truncation and appends ourselves (pwrite on an
# O_APPEND fd ignores the offset on Linux), O_DIRECT fails on some backing filesystems.
_STRIP_FLAGS = (os.O_APPEND | os.O_TRUNC | os.O_CREAT | os.O_EXCL | getattr(os, "O_DIRECT", 0)
                | os.O_NOCTTY)


@dataclass
class _Inode:
    """Shared state of one open backing inode: the lock and the unwrapped data key."""

    header: Header
    cipher: BlockCipher
    lock: threading.RLock = field(default_factory=threading.RLock)
    refs: int = 0


@dataclass
class _Handle:
    fd: int
    path: str
    inode: _Inode
    ident: tuple[int, int]
    efile: EncryptedFile


class KmsfsCore:
    """Plaintext view of a cipherdir."""

    def __init__(self, cipherdir: str, config: Config, client: KeyClient) -> None:
        self.root = os.path.realpath(cipherdir)
        self.config = config
        self.client = client
        self._lock = threading.Lock()
        self._inodes: dict[tuple[int, int], _Inode] = {}
        self._handles: dict[int, _Handle] = {}
        self._fh = itertools.count(1)
        self._as_root = os.geteuid() == 0

    # -- paths ------------------------------------------------------------------------------------
    def full(self, path: str) -> str:
        """Backing path of a mount path; reserved names in the root do not exist in the mount."""
        rel = path.lstrip("/")
        if rel.split("/", 1)[0].startswith(RESERVED_PREFIX):
            raise FileNotFoundError(errno.ENOENT, "reserved name", path)
        return os.path.join(self.root, rel) if rel else self.root

    def _own(self, full: str, caller: Caller | None, fd: int | None = None) -> None:
        """When running as root, new entries belong to the requesting user (like a local fs)."""
        if not self._as_root or not caller or "uid" not in caller:
            return
        uid, gid = int(caller["uid"]), int(caller.get("gid", -1))
        if fd is not None:
            os.fchown(fd, uid, gid)
        else:
            os.lchown(full, uid, gid)

    # -- attributes -------------------------------------------------------------------------------
    def getattr(self, path: str, fh: int | None = None) -> dict[str, int]:
        handle = self._handles.get(fh) if fh else None
        st = os.fstat(handle.fd) if handle else os.lstat(self.full(path))
        attrs = {k: getattr(st, k) for k in ("st_mode", "st_ino", "st_nlink", "st_uid", "st_gid",
                                             "st_size", "st_blocks", "st_rdev")}
        attrs.update(st_atime=st.st_atime_ns, st_mtime=st.st_mtime_ns, st_ctime=st.st_ctime_ns)
        if stat.S_ISREG(st.st_mode):
            attrs["st_size"] = plain_size(st.st_size, DEFAULT_BLOCK_SIZE)
        return attrs

    def readdir(self, path: str) -> list[str]:
        names = os.listdir(self.full(path))
        if path.strip("/") == "":
            names = [n for n in names if not n.startswith(RESERVED_PREFIX)]
        return [".", "..", *names]

    def statfs(self, path: str) -> dict[str, int]:
        sv = os.statvfs(self.full(path))
        return {k: getattr(sv, k) for k in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail",
                                            "f_files", "f_ffree", "f_favail", "f_flag", "f_namemax")}

    def chmod(self, path: str, mode: int) -> None:
        os.chmod(self.full(path), mode & 0o7777)

    def chown(self, path: str, uid: int, gid: int) -> None:
        os.lchown(self.full(path), uid, gid)

    def utimens(self, path: str, times: tuple[int, int] | None) -> None:
        """Times in nanoseconds; UTIME_NOW / UTIME_OMIT honoured per field (tar sets mtime only)."""
        full = self.full(path)
        if times is None:
            os.utime(full, follow_symlinks=False)
            return
        now = None
        resolved = []
        st = None
        for value, attr in zip(times, ("st_atime_ns", "st_mtime_ns"), strict=True):
            if value == UTIME_NOW:
                now = now or _now_ns()
                resolved.append(now)
            elif value == UTIME_OMIT:
                st = st or os.lstat(full)
                resolved.append(getattr(st, attr))
            else:
                resolved.append(value)
        os.utime(full, ns=(resolved[0], resolved[1]), follow_symlinks=False)

    # -- namespace --------------------------------------------------------------------------------
    def mkdir(self, path: str, mode: int, caller: Caller | None = None) -> None:
        full = self.full(path)
        os.mkdir(full, 0o700)
        os.chmod(full, mode & 0o7777)
        self._own(full, caller)

    def rmdir(self, path: str) -> None:
        os.rmdir(self.full(path))

    def unlink(self, path: str) -> None:
        os.unlink(self.full(path))

    def rename(self, old: str, new: str) -> None:
        os.rename(self.full(old), self.full(new))

    def link(self, new: str, existing: str) -> None:
        os.link(self.full(existing), self.full(new), follow_symlinks=False)

    def symlink(self, new: str, target: str, caller: Caller | None = None) -> None:
        full = self.full(new)
        os.symlink(target, full)
        self._own(full, caller)

    def readlink(self, path: str) -> str:
        return os.readlink(self.full(path))

    def mknod(self, path: str, mode: int, dev: int, caller: Caller | None = None) -> None:
        if stat.S_ISREG(mode):  # a regular file needs a header: same as create
            self.release(self.create(path, mode, caller))
            return
        full = self.full(path)
        os.mknod(full, mode, dev)
        self._own(full, caller)

    # -- extended attributes (user xattrs pass through; the header is invisible) ------------------
    def getxattr(self, path: str, name: str) -> bytes:
        if name.startswith(_RESERVED_XATTR_PREFIX) or name.startswith("security."):
            raise OSError(errno.ENODATA, "no such attribute")
        return os.getxattr(self.full(path), name, follow_symlinks=False)

    def listxattr(self, path: str) -> list[str]:
        names = os.listxattr(self.full(path), follow_symlinks=False)
        return [n for n in names if not n.startswith(_RESERVED_XATTR_PREFIX)]

    def setxattr(self, path: str, name: str, value: bytes, options: int) -> None:
        if name.startswith(_RESERVED_XATTR_PREFIX):
            raise PermissionError(errno.EPERM, "reserved attribute")
        os.setxattr(self.full(path), name, value, options, follow_symlinks=False)

    def removexattr(self, path: str, name: str) -> None:
        if name.startswith(_RESERVED_XATTR_PREFIX):
            raise PermissionError(errno.EPERM, "reserved attribute")
        os.removexattr(self.full(path), name, follow_symlinks=False)

    # -- files ------------------------------------------------------------------------------------
    def create(self, path: str, mode: int, caller: Caller | None = None, flags: int = os.O_RDWR) -> int:
        """New file with a fresh data key from GenerateDataKey (F2); returns a handle."""
        full = self.full(path)
        file_id = os.urandom(FILE_ID_SIZE)
        key, blob, arn = self.client.generate_data_key(self.config.key_arn, encryption_context(file_id),
                                                       caller)
        if len(key) != DATA_KEY_SIZE:
            raise CorruptHeader("key service returned a data key of the wrong size")
        header = Header(file_id=file_id, key_arn=arn, wrapped_key=blob)
        fd = os.open(full, os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_CLOEXEC, 0o600)
        try:
            os.setxattr(fd, HEADER_XATTR, pack_header(header))
            os.fchmod(fd, mode & 0o7777)
            self._own(full, caller, fd)
        except BaseException:
            os.close(fd)
            os.unlink(full)
            raise
        return self._register(fd, path, header, key)

    def open(self, path: str, flags: int, caller: Caller | None = None) -> int:
        """Open an existing file: read its header, unwrap its key through the service (F5)."""
        full = self.full(path)
        bflags = flags & ~_STRIP_FLAGS
        if bflags & os.O_ACCMODE == os.O_WRONLY:  # read-modify-write needs to read
            bflags = (bflags & ~os.O_ACCMODE) | os.O_RDWR
        fd = os.open(full, bflags | os.O_CLOEXEC)
        try:
            header = _read_header(fd)
            key = self.client.decrypt(header.wrapped_key, header.encryption_context(), caller,
                                      key_id=header.key_arn)
            if len(key) != DATA_KEY_SIZE:
                raise CorruptHeader("unwrapped data key has the wrong size")
            fh = self._register(fd, path, header, key)
        except BaseException:
            os.close(fd)
            raise
        if flags & os.O_TRUNC and flags & os.O_ACCMODE != os.O_RDONLY:
            self.truncate(path, 0, fh)
        return fh

    def _register(self, fd: int, path: str, header: Header, key: bytes) -> int:
        st = os.fstat(fd)
        ident = (st.st_dev, st.st_ino)
        with self._lock:
            inode = self._inodes.get(ident)
            if inode is None or inode.header.file_id != header.file_id:
                inode = _Inode(header=header, cipher=BlockCipher(key))
                self._inodes[ident] = inode
            inode.refs += 1
            fh = next(self._fh)
            efile = EncryptedFile(fd, inode.cipher, header.file_id, header.block_size, header.version)
            self._handles[fh] = _Handle(fd=fd, path=path, inode=inode, ident=ident, efile=efile)
        return fh

    def _handle(self, fh: int | None) -> _Handle:
        handle = self._handles.get(fh) if fh else None
        if handle is None:
            raise OSError(errno.EBADF, "bad file handle")
        return handle

    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        handle = self._handle(fh)
        with handle.inode.lock:
            return handle.efile.read(offset, size)

    def write(self, path: str, data: bytes, offset: int, fh: int) -> int:
        handle = self._handle(fh)
        with handle.inode.lock:
            return handle.efile.write(offset, data)

    def truncate(self, path: str, length: int, fh: int | None = None, caller: Caller | None = None) -> None:
        if fh:
            handle = self._handle(fh)
            with handle.inode.lock:
                handle.efile.truncate(length)
            return
        full = self.full(path)
        st = os.lstat(full)
        if not stat.S_ISREG(st.st_mode):
            raise IsADirectoryError(errno.EISDIR, "not a regular file") if stat.S_ISDIR(
                st.st_mode) else OSError(errno.EINVAL, "not a regular file")
        with self._lock:
            inode = self._inodes.get((st.st_dev, st.st_ino))
        if inode is None and length == 0:
            os.truncate(full, 0)  # no plaintext needed to empty a file
            return
        if inode is not None:  # reuse the key already unwrapped for the open handles
            fd = os.open(full, os.O_RDWR | os.O_CLOEXEC)
            try:
                with inode.lock:
                    EncryptedFile(fd, inode.cipher, inode.header.file_id, inode.header.block_size,
                                  inode.header.version).truncate(length)
            finally:
                os.close(fd)
            return
        fh = self.open(path, os.O_RDWR, caller)
        try:
            self.truncate(path, length, fh)
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
            if handle.inode.refs <= 0 and self._inodes.get(handle.ident) is handle.inode:
                del self._inodes[handle.ident]
        os.close(handle.fd)

    def open_handles(self) -> int:
        return len(self._handles)


UTIME_NOW = (1 << 30) - 1
UTIME_OMIT = (1 << 30) - 2


def _now_ns() -> int:
    return time.time_ns()


def _read_header(fd: int) -> Header:
    try:
        raw = os.getxattr(fd, HEADER_XATTR)
    except OSError as exc:
        if exc.errno in (errno.ENODATA, errno.ENOTSUP):
            raise CorruptHeader("backing file has no kmsfs header") from None
        raise
    return parse_header(raw)
