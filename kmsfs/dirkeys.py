"""Directory keys (``kmsfs init --directory-keys``): one service round trip per directory, not per file.

Why: in strict mode every create is a GenerateDataKey and every open a Decrypt; for trees of many
small files (untar, cat of every file) that round trip is most of the time. Here each directory
has an intermediate *directory key* from ``GenerateDataKey`` (encryption context: the cipherdir id
and the directory id, ``format.directory_context``), kept wrapped in the directory's
``kmsfs.dirkey`` file (a file, not an xattr: copies that drop xattrs keep it). The mount caches it
unwrapped for at most ``ttl`` seconds. Every file still gets its own fresh random data key,
wrapped *locally* under its directory's key (AES-256-GCM, AAD = label, version, file id and
directory id: ``format.file_key_aad``) in a version-4 header, which also carries the directory
key's wrapped form: a file is self-contained, so a rename to another directory (or an rmdir of its
first directory) changes nothing in it, and an open needs only the key of the directory the file
was *created* in (docs/FORMAT.md, "Version 4").

Revocation: an unwrapped directory key is used for at most ``ttl`` seconds, then unwrapped again
(Decrypt). ``drop(key_arn)`` forgets every directory key under a master key at once: called when
the service refuses an unwrap (Decrypt or GenerateDataKey) and by the open reporter when it
refuses a report for that key.

``kmsfs.dirkey`` (all integers big-endian; docs/FORMAT.md has the table)::

    0  8  magic "KMSFSDK\\0"   8  1  version 01   9  16  directory id
    25 2  A = key ARN length  27 2  C = wrapped directory key length   29 A ARN   29+A C blob

Nothing in it is secret and nothing needs a MAC: the blob unwraps only under the context naming
this directory id, and the directory id must equal the directory's own (``kmsfs.dirid``).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import struct
import threading
import time
from dataclasses import dataclass
from typing import Any

from kmsfs.cipher import BlockCipher, IntegrityError
from kmsfs.format import (
    DATA_KEY_SIZE,
    DIR_ID_SIZE,
    FILE_ID_SIZE,
    FORMAT_V4,
    MAX_KEY_ARN,
    MAX_WRAPPED_DIR_KEY,
    CorruptHeader,
    Header,
    directory_context,
    file_key_aad,
    pack_dir_wrapped,
)
from kmsfs.keyclient import KeyClient, KeyServiceError
from kmsfs.names import DIRKEY_FILE

log = logging.getLogger("kmsfs")

DEFAULT_TTL = 300.0
DIRKEY_MAGIC = b"KMSFSDK\x00"
DIRKEY_VERSION = 1
_DIRKEY_FIXED = struct.Struct(">8sB16sHH")  # magic, version, directory id, A, C
DIRKEY_MAX = _DIRKEY_FIXED.size + MAX_KEY_ARN + MAX_WRAPPED_DIR_KEY


@dataclass(frozen=True)
class DirKeyFile:
    """The contents of a ``kmsfs.dirkey`` file."""

    dir_id: bytes
    key_arn: str
    wrapped: bytes


def pack_dirkey_file(entry: DirKeyFile) -> bytes:
    arn = entry.key_arn.encode("utf-8")
    if len(entry.dir_id) != DIR_ID_SIZE or not 0 < len(arn) <= MAX_KEY_ARN or \
            not 0 < len(entry.wrapped) <= MAX_WRAPPED_DIR_KEY:
        raise ValueError("directory key file fields out of range")
    return _DIRKEY_FIXED.pack(DIRKEY_MAGIC, DIRKEY_VERSION, entry.dir_id, len(arn),
                              len(entry.wrapped)) + arn + entry.wrapped


def parse_dirkey_file(data: bytes) -> DirKeyFile:
    """Strict parse; ``CorruptHeader`` on any defect."""
    if len(data) < _DIRKEY_FIXED.size or len(data) > DIRKEY_MAX:
        raise CorruptHeader("directory key file has a bad length")
    magic, version, dir_id, arn_len, blob_len = _DIRKEY_FIXED.unpack_from(data)
    if magic != DIRKEY_MAGIC or version != DIRKEY_VERSION:
        raise CorruptHeader("directory key file: bad magic or version")
    if not 0 < arn_len <= MAX_KEY_ARN or not 0 < blob_len <= MAX_WRAPPED_DIR_KEY or \
            len(data) != _DIRKEY_FIXED.size + arn_len + blob_len:
        raise CorruptHeader("directory key file: bad lengths")
    try:
        arn = data[_DIRKEY_FIXED.size:_DIRKEY_FIXED.size + arn_len].decode("utf-8")
    except UnicodeDecodeError:
        raise CorruptHeader("directory key file: ARN is not UTF-8") from None
    if not arn.isprintable():
        raise CorruptHeader("directory key file: ARN is not printable")
    return DirKeyFile(dir_id, arn, bytes(data[_DIRKEY_FIXED.size + arn_len:]))


def seal_file_key(dir_key: BlockCipher, data_key: bytes, file_id: bytes, dir_id: bytes) -> bytes:
    """nonce || AES-GCM(directory key, data key) || tag, bound to the file id and directory id."""
    return dir_key.seal(data_key, file_key_aad(file_id, dir_id))


def open_file_key(dir_key: BlockCipher, header: Header) -> bytes:
    """The data key of a version-4 header; ``CorruptHeader`` if it does not authenticate."""
    wrapped = header.directory_wrapped
    try:
        key = dir_key.open(wrapped.sealed_key, file_key_aad(header.file_id, wrapped.dir_id))
    except IntegrityError:
        raise CorruptHeader("data key does not authenticate under its directory key") from None
    if len(key) != DATA_KEY_SIZE:
        raise CorruptHeader("data key has the wrong size")
    return key


@dataclass
class _Entry:
    cipher: BlockCipher
    dir_id: bytes
    key_arn: str
    wrapped: bytes
    at: float  # when the service last unwrapped (or generated) it


def _blob_id(wrapped: bytes) -> bytes:
    return hashlib.sha256(wrapped).digest()


class DirectoryKeys:
    """The mount's directory keys: created on first use per directory, cached for ``ttl`` s."""

    def __init__(self, client: KeyClient, key_arn: str, cipherdir_id: str, ttl: float = DEFAULT_TTL,
                 clock: Any = time.monotonic) -> None:
        self.client = client
        self.key_arn = key_arn
        self.cipherdir_id = cipherdir_id
        self.ttl = ttl
        self._clock = clock
        self._lock = threading.Lock()
        self._by_blob: dict[bytes, _Entry] = {}
        self._by_dir: dict[bytes, bytes] = {}  # directory id -> blob id of its kmsfs.dirkey
        self._fetch = threading.Lock()  # one unwrap per directory key at a time (no stampede)
        self.unwraps = 0  # service requests made (GenerateDataKey + Decrypt), for tests and logs

    # -- cache ------------------------------------------------------------------------------------
    def _fresh(self, blob_id: bytes | None) -> _Entry | None:
        if blob_id is None:
            return None
        with self._lock:
            entry = self._by_blob.get(blob_id)
            if entry is not None and self._clock() - entry.at >= self.ttl:
                del self._by_blob[blob_id]
                entry = None
            return entry

    def _keep(self, entry: _Entry, own_dir: bool) -> None:
        with self._lock:
            blob_id = _blob_id(entry.wrapped)
            self._by_blob[blob_id] = entry
            if own_dir:
                self._by_dir[entry.dir_id] = blob_id

    def drop(self, key_arn: str | None = None) -> int:
        """Forget every cached directory key (under ``key_arn``, or all); returns how many."""
        with self._lock:
            gone = [b for b, e in self._by_blob.items() if key_arn is None or e.key_arn == key_arn]
            for blob_id in gone:
                del self._by_blob[blob_id]
        if gone:
            log.warning("dropped %d cached directory key(s)%s", len(gone),
                        f" of {key_arn}" if key_arn else "")
        return len(gone)

    def cached(self) -> int:
        with self._lock:
            return len(self._by_blob)

    # -- the service ------------------------------------------------------------------------------
    def _unwrap(self, dir_id: bytes, key_arn: str, wrapped: bytes, caller: dict[str, Any] | None) -> _Entry:
        context = directory_context(self.cipherdir_id, dir_id)
        self.unwraps += 1
        try:
            key = self.client.decrypt(wrapped, context, _dir_caller(caller, "directory-key"), key_id=key_arn)
        except KeyServiceError as exc:
            if exc.is_access_denied:  # revoked: no other directory key of that key is used either
                self.drop(key_arn)
            raise
        if len(key) != DATA_KEY_SIZE:
            raise CorruptHeader("unwrapped directory key has the wrong size")
        return _Entry(BlockCipher(key), dir_id, key_arn, wrapped, self._clock())

    # -- creates ----------------------------------------------------------------------------------
    def new_file_key(self, dir_fd: int, dir_id: bytes, caller: dict[str, Any] | None = None
                     ) -> tuple[Header, bytes]:
        """A fresh file id and data key, wrapped under the key of the directory ``dir_fd`` (whose
        id is ``dir_id``): no round trip while that directory key is cached."""
        entry = self._for_dir(dir_fd, dir_id, caller)
        file_id = os.urandom(FILE_ID_SIZE)
        data_key = os.urandom(DATA_KEY_SIZE)
        sealed = seal_file_key(entry.cipher, data_key, file_id, dir_id)
        header = Header(file_id=file_id, key_arn=entry.key_arn,
                        wrapped_key=pack_dir_wrapped(dir_id, entry.wrapped, sealed), version=FORMAT_V4)
        return header, data_key

    def rekey(self, header: Header) -> tuple[Header, bytes]:
        """A fresh file id and data key under the directory key of ``header`` (a version-4 file
        being re-keyed, see core._rekey_if_planted), which must be cached."""
        wrapped = header.directory_wrapped
        entry = self._fresh(_blob_id(wrapped.wrapped_dir_key))
        if entry is None:
            raise CorruptHeader("directory key of a re-keyed file is not cached")
        file_id, data_key = os.urandom(FILE_ID_SIZE), os.urandom(DATA_KEY_SIZE)
        sealed = seal_file_key(entry.cipher, data_key, file_id, entry.dir_id)
        return Header(file_id=file_id, key_arn=entry.key_arn,
                      wrapped_key=pack_dir_wrapped(entry.dir_id, entry.wrapped, sealed),
                      version=FORMAT_V4), data_key

    def _for_dir(self, dir_fd: int, dir_id: bytes, caller: dict[str, Any] | None) -> _Entry:
        with self._lock:
            blob_id = self._by_dir.get(dir_id)
        entry = self._fresh(blob_id)
        if entry is not None:
            return entry
        with self._fetch:
            with self._lock:
                blob_id = self._by_dir.get(dir_id)
            entry = self._fresh(blob_id)
            if entry is not None:
                return entry
            stored = _read_dirkey(dir_fd)
            if stored is None or stored == _TORN:
                entry = self._create(dir_fd, dir_id, caller, replace=stored == _TORN)
            else:
                if stored.dir_id != dir_id:
                    raise CorruptHeader(f"{DIRKEY_FILE} belongs to another directory")
                entry = self._unwrap(dir_id, stored.key_arn, stored.wrapped, caller)
            self._keep(entry, own_dir=True)
            return entry

    def _create(self, dir_fd: int, dir_id: bytes, caller: dict[str, Any] | None,
                replace: bool = False) -> _Entry:
        """The directory's first key: GenerateDataKey, then ``kmsfs.dirkey`` written crash-safely
        (a complete temporary file linked under the name; EEXIST: another writer won, use its).
        ``replace``: the existing one is empty (a crash before its data reached the disk)."""
        self.unwraps += 1
        try:
            key, blob, arn = self.client.generate_data_key(
                self.key_arn, directory_context(self.cipherdir_id, dir_id),
                _dir_caller(caller, "directory-key"))
        except KeyServiceError as exc:
            if exc.is_access_denied:
                self.drop()
            raise
        if len(key) != DATA_KEY_SIZE:
            raise CorruptHeader("key service returned a directory key of the wrong size")
        data = pack_dirkey_file(DirKeyFile(dir_id, arn, blob))
        temp = f".kmsfs-tmp-{os.urandom(8).hex()}"
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o444,
                     dir_fd=dir_fd)
        try:
            try:
                os.write(fd, data)  # not fsynced (a cost per directory): see _read_dirkey on a torn one
            finally:
                os.close(fd)
            if replace:  # (the mount holds the cipherdir's lock and _fetch: no other writer)
                os.rename(temp, DIRKEY_FILE, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
                log.warning("replaced an empty %s (a crash before it reached the disk)", DIRKEY_FILE)
            else:
                os.link(temp, DIRKEY_FILE, src_dir_fd=dir_fd, dst_dir_fd=dir_fd, follow_symlinks=False)
        except FileExistsError:
            stored = _read_dirkey(dir_fd)
            if stored is None or stored.dir_id != dir_id:
                raise CorruptHeader(f"{DIRKEY_FILE} belongs to another directory") from None
            return self._unwrap(dir_id, stored.key_arn, stored.wrapped, caller)
        finally:
            with contextlib.suppress(OSError):
                os.unlink(temp, dir_fd=dir_fd)
        return _Entry(BlockCipher(key), dir_id, arn, blob, self._clock())

    # -- opens ------------------------------------------------------------------------------------
    def file_key(self, header: Header, caller: dict[str, Any] | None = None) -> bytes:
        """The data key of a version-4 file: local unwrap under its directory key (cached, else
        unwrapped now through the service). ``CorruptHeader`` if anything does not authenticate."""
        wrapped = header.directory_wrapped
        blob_id = _blob_id(wrapped.wrapped_dir_key)
        entry = self._fresh(blob_id)
        if entry is None:
            with self._fetch:
                entry = self._fresh(blob_id)
                if entry is None:
                    entry = self._unwrap(wrapped.dir_id, header.key_arn, wrapped.wrapped_dir_key, caller)
                    self._keep(entry, own_dir=False)
        return open_file_key(entry.cipher, header)


# What _read_dirkey returns for an empty kmsfs.dirkey: its data was not yet on disk when the
# machine stopped (it is written without fsync). Nothing can have been wrapped under a key that was
# never kept (every file carries its own copy of its directory key), so a new one replaces it.
_TORN = DirKeyFile(bytes(DIR_ID_SIZE), "-", b"-")


def _read_dirkey(dir_fd: int) -> DirKeyFile | None:
    """The directory's ``kmsfs.dirkey`` (never through a symlink), None if it has none, ``_TORN``
    if it is empty."""
    try:
        fd = os.open(DIRKEY_FILE, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise CorruptHeader(f"{DIRKEY_FILE} is a symlink") from None
        raise
    try:
        data = os.read(fd, DIRKEY_MAX + 1)
    finally:
        os.close(fd)
    return _TORN if not data else parse_dirkey_file(data)


def _dir_caller(caller: dict[str, Any] | None, op: str) -> dict[str, Any]:
    return {**(caller or {}), "op": op}


def tool_file_key(client: KeyClient, cipherdir_id: str, header: Header, caller: dict[str, Any]) -> bytes:
    """The data key of a version-4 file for an offline tool (fsck): one Decrypt of its directory
    key, no cache. Raises what ``KeyClient.decrypt`` raises, or ``CorruptHeader``."""
    wrapped = header.directory_wrapped
    try:
        key = client.decrypt(wrapped.wrapped_dir_key, directory_context(cipherdir_id, wrapped.dir_id),
                             caller, key_id=header.key_arn)
    except KeyServiceError:
        raise
    if len(key) != DATA_KEY_SIZE:
        raise CorruptHeader("unwrapped directory key has the wrong size")
    return open_file_key(BlockCipher(key), header)


def rewrap_dirkey_files(root: str, client: KeyClient, destination: str | None,
                        cipherdir_id: str) -> list[tuple[str, str]]:
    """``kmsfs rewrap`` of every ``kmsfs.dirkey`` under ``root``: ReEncrypt under ``destination``
    (or the key's newest version), same context; each file replaced atomically (a temporary and
    a rename). Returns (backing path, problem) for those that failed."""
    failed: list[tuple[str, str]] = []
    for directory, _, files in os.walk(root):
        if DIRKEY_FILE not in files:
            continue
        path = os.path.join(directory, DIRKEY_FILE)
        rel = "/" + os.path.relpath(path, root)
        try:
            dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                stored = _read_dirkey(dfd)
                if stored is None or stored == _TORN:
                    continue
                blob, arn = client.re_encrypt(stored.wrapped, directory_context(cipherdir_id, stored.dir_id),
                                              destination or stored.key_arn,
                                              {"tool": "kmsfs rewrap", "op": "directory-key", "path": rel})
                temp = f".kmsfs-tmp-{os.urandom(8).hex()}"
                fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                             0o444, dir_fd=dfd)
                try:
                    os.write(fd, pack_dirkey_file(DirKeyFile(stored.dir_id, arn, blob)))
                    os.fsync(fd)
                finally:
                    os.close(fd)
                os.rename(temp, DIRKEY_FILE, src_dir_fd=dfd, dst_dir_fd=dfd)
            finally:
                os.close(dfd)
        except (OSError, CorruptHeader, KeyServiceError) as exc:
            failed.append((rel, str(exc)))
    return failed
