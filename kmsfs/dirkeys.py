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

``kmsfs.dirkey``'s bytes and the local wrap are kmsfs/dirformat.py's (pure, no I/O). Nothing in
``kmsfs.dirkey`` is secret and nothing needs a MAC: the blob unwraps only under the context naming
this directory id, and the directory id must equal the directory's own (``kmsfs.dirid``).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Any

from kmsfs.cipher import BlockCipher
from kmsfs.dirformat import (
    DIRKEY_MAX,
    DirKeyFile,
    open_file_key,
    pack_dirkey_file,
    parse_dirkey_file,
    seal_file_key,
)
from kmsfs.format import (
    DATA_KEY_SIZE,
    DIR_ID_SIZE,
    FILE_ID_SIZE,
    FORMAT_V4,
    CorruptHeader,
    Header,
    directory_context,
    pack_dir_wrapped,
)
from kmsfs.keyclient import KeyClient, KeyServiceError
from kmsfs.names import DIRKEY_FILE

log = logging.getLogger("kmsfs")

DEFAULT_TTL = 300.0
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
        try:
            # not fsynced (a cost per directory): see _read_dirkey on a torn one. ``replace``: the
            # mount holds the cipherdir's lock and ``_fetch``, so there is no other writer.
            _place_dirkey(dir_fd, data, replace=replace, sync=False)
        except FileExistsError:
            stored = _read_dirkey(dir_fd)
            if stored is None or stored.dir_id != dir_id:
                raise CorruptHeader(f"{DIRKEY_FILE} belongs to another directory") from None
            return self._unwrap(dir_id, stored.key_arn, stored.wrapped, caller)
        if replace:
            log.warning("replaced an empty %s (a crash before it reached the disk)", DIRKEY_FILE)
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


def _place_dirkey(dir_fd: int, data: bytes, *, replace: bool, sync: bool) -> None:
    """Put ``data`` in place as ``kmsfs.dirkey`` whole: written under a temporary name first, then
    linked (FileExistsError if there is one) or, with ``replace``, renamed over it. The temporary
    never outlives the call."""
    temp = f".kmsfs-tmp-{os.urandom(8).hex()}"
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o444,
                 dir_fd=dir_fd)
    try:
        try:
            os.write(fd, data)
            if sync:
                os.fsync(fd)
        finally:
            os.close(fd)
        if replace:
            os.rename(temp, DIRKEY_FILE, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        else:
            os.link(temp, DIRKEY_FILE, src_dir_fd=dir_fd, dst_dir_fd=dir_fd, follow_symlinks=False)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(temp, dir_fd=dir_fd)


def _dir_caller(caller: dict[str, Any] | None, op: str) -> dict[str, Any]:
    return {**(caller or {}), "op": op}


def tool_file_key(client: KeyClient, cipherdir_id: str, header: Header, caller: dict[str, Any]) -> bytes:
    """The data key of a version-4 file for an offline tool (fsck): one Decrypt of its directory
    key, no cache. Raises what ``KeyClient.decrypt`` raises, or ``CorruptHeader``."""
    wrapped = header.directory_wrapped
    key = client.decrypt(wrapped.wrapped_dir_key, directory_context(cipherdir_id, wrapped.dir_id),
                         caller, key_id=header.key_arn)
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
                _place_dirkey(dfd, pack_dirkey_file(DirKeyFile(stored.dir_id, arn, blob)), replace=True,
                              sync=True)
            finally:
                os.close(dfd)
        except (OSError, CorruptHeader, KeyServiceError) as exc:
            failed.append((rel, str(exc)))
    return failed
