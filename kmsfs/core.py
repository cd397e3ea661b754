"""The filesystem core: plaintext operations over a cipherdir, free of FUSE.

Why a core apart from operations.py: everything here can be driven by plain Python tests, and the
FUSE adapter stays a thin layer whose only jobs are unpacking fusepy's arguments, collecting the
caller (uid/pid/process) and translating errors to errno in one place.

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
from dataclasses import dataclass, field
from typing import Any

from kmsfs.cipher import BlockCipher
from kmsfs.config import RESERVED_PREFIX, Config
from kmsfs.encfile import EncryptedFile
from kmsfs.format import (
    DATA_KEY_SIZE,
    FILE_ID_SIZE,
    FORMAT_VERSION,
    CorruptHeader,
    Header,
    encryption_context,
)
from kmsfs.headers import empty, plain_size_at, read_header, replace_empty, write_new
from kmsfs.holes import supports_sparse
from kmsfs.keyclient import KeyClient, KeyServiceError, KeyServiceUnavailable
from kmsfs.keypool import DataKeyPool, PooledKey
from kmsfs.nolinks import link_or_rename
from kmsfs.rwlock import SharedLock

log = logging.getLogger("kmsfs")

# Default bound on how long an open handle keeps using a key after it was revoked (seconds).
DEFAULT_REVALIDATE_AFTER = 30.0
TEMP_PREFIX = ".kmsfs-tmp-"
# How much of a file an open asks the kernel to read ahead while the key is being unwrapped.
PREFETCH_BYTES = 128 * 1024

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
                 sparse: bool | None = None, key_pool: DataKeyPool | None = None) -> None:
        self.root = os.path.realpath(cipherdir)
        self._root_slash = self.root.rstrip("/") + "/"
        # Held for the core's life: creates name their O_TMPFILE relative to it (no directory
        # open and close per create).
        self._root_fd = os.open(self.root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        weakref.finalize(self, os.close, self._root_fd)
        self.key_pool = key_pool
        self.config = config
        self.client = client
        self.revalidate_after = revalidate_after
        self.sparse = supports_sparse(self.root) if sparse is None else sparse
        self._lock = threading.Lock()
        self._inodes: dict[tuple[int, int], _Inode] = {}
        self._handles: dict[int, _Handle] = {}
        self._fh = itertools.count(1)
        self._as_root = os.geteuid() == 0

    # -- paths ------------------------------------------------------------------------------------
    def full(self, path: str) -> str:
        """Backing path of a mount path; reserved names in the root do not exist in the mount.

        Called on every path operation, hence plain string operations (the first component
        starts with the reserved prefix exactly when the relative path does: the prefix has no
        slash; ``root + "/" + rel`` is what ``os.path.join`` returns for a relative ``rel``)."""
        rel = path.lstrip("/")
        if not rel:
            return self.root
        if rel.startswith(RESERVED_PREFIX):
            raise FileNotFoundError(errno.ENOENT, "reserved name", path)
        return self._root_slash + rel

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
        """The backing file's attributes, with the plaintext size for regular files.

        The most frequent request (several per created file: the kernel re-asks after every
        write), so the dict is built in one literal rather than by a loop of ``getattr``."""
        handle = self._handles.get(fh) if fh else None
        full = self.full(path) if not handle else ""
        st = os.fstat(handle.fd) if handle else os.lstat(full)
        mode = st.st_mode
        return {"st_mode": mode, "st_ino": st.st_ino, "st_nlink": st.st_nlink, "st_uid": st.st_uid,
                "st_gid": st.st_gid,
                "st_size": plain_size_at(full, st, handle.fd if handle else None)
                if stat.S_ISREG(mode) else st.st_size,
                "st_blocks": st.st_blocks, "st_rdev": st.st_rdev, "st_atime": st.st_atime_ns,
                "st_mtime": st.st_mtime_ns, "st_ctime": st.st_ctime_ns}

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
        self._own(full, caller)  # before chmod: exact modes, also with set-id bits
        os.chmod(full, mode & 0o7777)

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
            self.release(path, self.create(path, mode, caller))
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
        full = self.full(path)
        if os.path.lexists(full):
            if flags & os.O_EXCL:
                raise FileExistsError(errno.EEXIST, "file exists", path)
            return self.open(path, flags & ~os.O_CREAT, caller)
        pooled = self.key_pool.take() if self.key_pool is not None else None
        if pooled is None:
            header, key = self._new_key(path, caller)
        else:  # generated ahead for a file id chosen then; claimed below, once the file exists
            header, key = Header(file_id=pooled.file_id, key_arn=pooled.key_arn,
                                 wrapped_key=pooled.wrapped_key, version=FORMAT_VERSION), pooled.key
        directory = os.path.dirname(full)
        fd, temp = _open_unnamed(directory)
        try:
            write_new(fd, header, key)  # xattr and in-file copy (kmsfs.headers)
            self._own(full, caller, fd)  # before chmod: chown clears set-id bits
            os.fchmod(fd, mode & 0o7777)
            if temp is None:
                _link_fd(fd, self._root_fd, full[len(self._root_slash):])
            else:
                link_or_rename(temp, full)  # (a rename where hard links are refused)
        except BaseException:
            os.close(fd)
            raise
        finally:
            if temp is not None:
                _unlink_quietly(temp)
        fh = self._register(fd, path, header, key, fresh=True)
        if pooled is not None:
            self._claim(pooled, path, caller, self._handles[fh].inode)
        return fh

    def open(self, path: str, flags: int, caller: Caller | None = None) -> int:
        """Open an existing file: read its header, unwrap its key through the service (F5)."""
        full = self.full(path)
        bflags = flags & ~_STRIP_FLAGS
        if bflags & os.O_ACCMODE == os.O_WRONLY:  # read-modify-write needs to read
            bflags = (bflags & ~os.O_ACCMODE) | os.O_RDWR
        fd = os.open(full, bflags | os.O_CLOEXEC)
        try:
            _prefetch(fd)
            header = _read_header(fd)
            key = self._unwrap(header, caller)
            fh = self._register(fd, path, header, key)
        except BaseException:
            os.close(fd)
            raise
        handle = self._handles[fh]
        with handle.inode.lock:
            settled = self._recover(full, handle)
        if settled is not None:
            log.warning("%s: completed an interrupted size change (size now %d)", path, settled)
        if flags & os.O_TRUNC and flags & os.O_ACCMODE != os.O_RDONLY:
            self.truncate(path, 0, fh)
        return fh

    def _recover(self, full: str, handle: _Handle) -> int | None:
        """Settle a size change a crash interrupted (inode lock held).

        Settling writes and truncates, so a handle opened read-only settles through a second,
        read-write descriptor of the same backing file."""
        if handle.efile.pending_marker() is None:
            return None
        if fcntl.fcntl(handle.fd, fcntl.F_GETFL) & os.O_ACCMODE != os.O_RDONLY:
            return handle.efile.recover()
        fd = os.open(full, os.O_RDWR | os.O_CLOEXEC)
        try:
            efile = handle.efile
            return EncryptedFile(fd, handle.inode.cipher, efile.file_id, efile.block_size,
                                 handle.inode.header.version, sparse=self.sparse).recover()
        finally:
            os.close(fd)

    def _unwrap(self, header: Header, caller: Caller | None) -> bytes:
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
        full = self.full(path)
        st = os.lstat(full)
        if not stat.S_ISREG(st.st_mode):
            raise IsADirectoryError(errno.EISDIR, "not a regular file") if stat.S_ISDIR(
                st.st_mode) else OSError(errno.EINVAL, "not a regular file")
        with self._lock:
            inode = self._inodes.get((st.st_dev, st.st_ino))
        fh = None
        if inode is not None:  # reuse the key already unwrapped for the open handles
            fd = os.open(full, os.O_RDWR | os.O_CLOEXEC)
            try:
                fh = self._register(fd, path, inode.header, None)
            except LookupError:
                os.close(fd)
        if fh is not None:
            try:
                self.truncate(path, length, fh, caller)
            finally:
                self.release(path, fh)
            return
        if length == 0:
            if inode is None:
                fd = os.open(full, os.O_RDWR | os.O_CLOEXEC)
                try:
                    empty(fd)  # no plaintext needed to empty a file
                finally:
                    os.close(fd)
                return
        fh = self.open(path, os.O_RDWR, caller)
        try:
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


UTIME_NOW = (1 << 30) - 1
UTIME_OMIT = (1 << 30) - 2


def _now_ns() -> int:
    return time.time_ns()


def _open_unnamed(directory: str) -> tuple[int, str | None]:
    """An O_TMPFILE in ``directory`` (no name yet), else a hidden temporary name."""
    try:
        return os.open(directory, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600), None
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
            raise
    temp = os.path.join(directory, TEMP_PREFIX + os.urandom(8).hex())
    return os.open(temp, os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_CLOEXEC, 0o600), temp


def _link_fd(fd: int, root_fd: int, rel: str) -> None:
    """linkat(AT_SYMLINK_FOLLOW) of /proc/self/fd/N: gives an O_TMPFILE its name atomically.

    ``rel`` is relative to the directory ``root_fd``. Python calls plain link() unless a dir fd is
    given, and link() would not follow the magic link.
    """
    os.link(f"/proc/self/fd/{fd}", rel, dst_dir_fd=root_fd, follow_symlinks=True)


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
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


def _read_header(fd: int) -> Header:
    return read_header(fd)  # the xattr, checked against (or replaced by) the in-file copy
