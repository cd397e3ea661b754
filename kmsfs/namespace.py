"""How the mount's names become backing names: plaintext (identity) or encrypted (kmsfs/names.py).

Why a strategy handed to the inode layer: every namespace operation arrives there as (parent
node, plaintext name), and only this module knows what that name is called in the backing
directory, which backing entries are bookkeeping (directory ids, long-name side entries), and in
which order side entries are written so a crash never leaves an entry without its name.

``PlainNames`` is the original layout: the backing name is the name, and names starting with
``.kmsfs`` in the root are reserved. ``EncryptedNames`` (docs/FORMAT.md, "Encrypted names"):

* each directory's id is read once from its ``kmsfs.dirid`` (openat on the node's descriptor,
  O_NOFOLLOW) and cached on the node; an *empty* directory without one gets one (a crash
  between mkdir and writing it); a non-empty one without a valid one lists nothing (EIO);
* a lookup computes the backing name, so it is authenticated by construction: an edited or moved
  backing entry is simply not found; a long name's side entry is checked against the name;
* a listing decrypts every backing entry and hides (and logs once, with the backing name) those
  that fail;
* a long name's side entry is written BEFORE its entry and removed AFTER the entry is gone (only
  if it is gone: rename onto a hard link of itself, RENAME_EXCHANGE and failures keep it);
* symlink targets are encrypted; one too long for a backing symlink lives in the root's
  ``.kmsfs.targets/`` (content-addressed, never removed: other symlinks may share it).
"""

from __future__ import annotations

import contextlib
import errno
import hmac
import logging
import os
import re
import threading
from collections.abc import Iterator
from typing import Protocol

from kmsfs.backing_at import RENAME_EXCHANGE, RENAME_NOREPLACE, pin
from kmsfs.config import RESERVED_PREFIX
from kmsfs.core import TEMP_PREFIX
from kmsfs.namekey import NameKey
from kmsfs.names import (
    DIRID_FILE,
    DIRID_FILE_SIZE,
    DIRKEY_FILE,
    MAX_BACKING_TARGET,
    BadName,
    NameCipher,
    is_long,
    is_reserved,
    long_side_name,
    long_target_name,
)

log = logging.getLogger("kmsfs")

TARGETS_DIR = ".kmsfs.targets"
_LONG_TARGET = re.compile(r"^kmsfs\.longtarget\.([A-Za-z0-9_-]{43})\.target$")
_DIRKEY_MAX = 8192  # a kmsfs.dirkey file is far smaller (kmsfs/dirkeys.py)
_SIDE_MAX = 512  # a side entry holds at most 362 characters (255-byte name)
_TARGET_MAX = 8192  # an encoded PATH_MAX-1 target is 5,482 characters
_LOGGED_MAX = 10000  # bad entries remembered (logged once each) before the memory starts over
_DIR_PIN = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class DirNode(Protocol):
    """What the strategies need of an inode-layer node."""

    fd: int
    ident: tuple[int, int]
    dir_id: bytes | None


def _exists(dir_fd: int, name: str) -> bool:
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


def _read_small(dir_fd: int, name: str, limit: int) -> bytes:
    """The contents of the regular file ``name`` in ``dir_fd`` (never through a symlink)."""
    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=dir_fd)
    try:
        return os.read(fd, limit + 1)
    finally:
        os.close(fd)


def _write_new(dir_fd: int, name: str, data: bytes, mode: int = 0o444) -> None:
    """A new small file (EEXIST if the name exists); removed again if writing it fails."""
    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode,
                 dir_fd=dir_fd)
    try:
        os.write(fd, data)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(name, dir_fd=dir_fd)
        raise
    os.close(fd)


@contextlib.contextmanager
def _dir_id_set_aside(dfd: int, tolerate: type[OSError]) -> Iterator[None]:
    """Take the directory ``dfd``'s id file out for the body (an rmdir of it, or a rename onto it:
    the id alone would make either fail with ENOTEMPTY), and put the same id back if the body
    fails; a failure to put it back that is a ``tolerate`` is ignored (the body's error wins)."""
    saved: list[tuple[str, bytes]] = []
    try:
        # the id, and (directory-key cipherdirs) the wrapped directory key beside it
        for name, limit in ((DIRID_FILE, DIRID_FILE_SIZE), (DIRKEY_FILE, _DIRKEY_MAX)):
            try:
                data = _read_small(dfd, name, limit)
                os.unlink(name, dir_fd=dfd)
            except FileNotFoundError:
                continue
            saved.append((name, data))
        yield
    except BaseException:
        for name, data in saved:
            with contextlib.suppress(tolerate):
                _write_new(dfd, name, data)
        raise


_CACHE_MAX = 1 << 16


def _remember(cache: dict, key: object, value: object) -> None:  # type: ignore[type-arg]
    """Bounded memo: emptied when full (the entries are cheap to recompute)."""
    if len(cache) >= _CACHE_MAX and key not in cache:
        cache.clear()
    cache[key] = value


class PlainNames:
    """Backing names are the names (cipherdirs made with ``--plaintext-names`` or before names)."""

    encrypted = False

    def reserved(self, in_root: bool, name: str) -> bool:
        return in_root and name.startswith(RESERVED_PREFIX)

    def find(self, parent: DirNode, name: str) -> tuple[int, str]:
        return pin(parent.fd, name), name

    def backing(self, parent: DirNode, name: str) -> str:
        return name

    @contextlib.contextmanager
    def new_entry(self, parent: DirNode, name: str) -> Iterator[str]:
        yield name

    @contextlib.contextmanager
    def old_entry(self, parent: DirNode, name: str) -> Iterator[str]:
        yield name

    @contextlib.contextmanager
    def replacing(self, parent: DirNode, backing: str, flags: int) -> Iterator[None]:
        yield

    def fill_dir(self, dir_fd: int) -> None:
        return None

    def rmdir(self, parent: DirNode, backing: str) -> None:
        os.rmdir(backing, dir_fd=parent.fd)

    def listing(self, node: DirNode, entries: list[tuple[str, int, int]], where: str
                ) -> list[tuple[str, int, int]]:
        return entries

    def target_out(self, target: str) -> str:
        return target

    def target_in(self, fd: int) -> str:
        return os.readlink("", dir_fd=fd)

    def symlink_size(self, fd: int, backing_size: int) -> int:
        return backing_size


class EncryptedNames:
    """AES-SIV names under the cipherdir's name key (see the module docstring)."""

    encrypted = True

    def __init__(self, key: NameKey | NameCipher, root_fd: int) -> None:
        self._key = key
        self._root_fd = root_fd
        st = os.fstat(root_fd)
        self._root_ident = (st.st_dev, st.st_ino)
        self._long = threading.RLock()  # long-name side entries: write/check/remove as one step
        # Directory ids by (device, inode, ctime): a directory the kernel forgot (and so a node the
        # inode layer dropped) is not read and authenticated again while it is unchanged; a new
        # directory on a reused inode number has another ctime, so it never meets a stale id.
        self._dir_ids: dict[tuple[int, int, int], bytes] = {}
        # (directory id, plaintext name) -> (backing name, encoded long name or None). Encryption
        # is deterministic, so an entry can never be stale; listings fill it, so the lookups that
        # follow a listing (ls -l, find) do not encrypt each name again.
        self._encoded: dict[tuple[bytes, str], tuple[str, str | None]] = {}
        # The reverse, (directory id, short backing name) -> plaintext name: decryption is as
        # deterministic (an authentic backing name of a directory has exactly one plaintext), so
        # this can never be stale either. Creates and lookups fill it, so a listing decrypts
        # only the names it has never seen (issue 16: one AES-SIV call per listed name was what
        # a cold find + ls -lR still paid over plaintext names). Names that fail are not kept.
        self._decoded: dict[tuple[bytes, str], str] = {}
        self._logged: set[tuple[tuple[int, int], str]] = set()
        self._log_lock = threading.Lock()

    def _cipher(self) -> NameCipher:
        key = self._key
        return key if isinstance(key, NameCipher) else key.cipher()

    def reserved(self, in_root: bool, name: str) -> bool:
        return False  # every plaintext name is encrypted: none collides with bookkeeping entries

    # -- directory ids ----------------------------------------------------------------------------
    def dir_id(self, node: DirNode) -> bytes:
        """The node's directory id (read once, then cached on the node)."""
        if node.dir_id is not None:
            return node.dir_id
        st = os.fstat(node.fd)
        stamp = (st.st_dev, st.st_ino, st.st_ctime_ns)
        known = self._dir_ids.get(stamp)
        if known is not None:
            node.dir_id = known
            return known
        cipher = self._cipher()
        try:
            data = _read_small(node.fd, DIRID_FILE, DIRID_FILE_SIZE)
        except FileNotFoundError:
            data = self._lazy_dir_id(node.fd, cipher)
        except OSError as exc:
            self._bad(node.ident, DIRID_FILE, f"unreadable ({exc.strerror})")
            raise OSError(errno.EIO, "directory id unreadable") from None
        try:
            node.dir_id = cipher.parse_dirid_file(data)
        except BadName:
            self._bad(node.ident, DIRID_FILE, "directory id fails authentication")
            raise OSError(errno.EIO, "directory id fails authentication") from None
        _remember(self._dir_ids, stamp, node.dir_id)
        return node.dir_id

    def _lazy_dir_id(self, dir_fd: int, cipher: NameCipher) -> bytes:
        """An empty directory without an id (a crash right after mkdir) gets one now."""
        dfd = os.open(f"/proc/self/fd/{dir_fd}", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            if [n for n in os.listdir(dfd) if not n.startswith(RESERVED_PREFIX)]:
                log.warning("backing directory without %s is not empty: its entries are hidden",
                            DIRID_FILE)
                raise OSError(errno.EIO, "directory id missing")
        finally:
            os.close(dfd)
        data = cipher.dirid_file(cipher.new_dir_id())
        try:
            _write_new(dir_fd, DIRID_FILE, data)
        except FileExistsError:  # another thread was first
            return _read_small(dir_fd, DIRID_FILE, DIRID_FILE_SIZE)
        return data

    def fill_dir(self, dir_fd: int) -> None:
        """Write a new directory's id (before its mode is applied: it may be read-only)."""
        cipher = self._cipher()
        _write_new(dir_fd, DIRID_FILE, cipher.dirid_file(cipher.new_dir_id()))

    def rmdir(self, parent: DirNode, backing: str) -> None:
        """Remove the id, then the directory; put the same id back if the rmdir fails."""
        dfd = os.open(backing, _DIR_PIN, dir_fd=parent.fd)
        try:
            with _dir_id_set_aside(dfd, FileExistsError):
                os.rmdir(backing, dir_fd=parent.fd)
        finally:
            os.close(dfd)

    @contextlib.contextmanager
    def replacing(self, parent: DirNode, backing: str, flags: int) -> Iterator[None]:
        """A rename onto ``backing``: an empty target directory holds its id, which would make
        the rename fail with ENOTEMPTY; the id goes first and comes back if the rename fails."""
        if flags & (RENAME_EXCHANGE | RENAME_NOREPLACE):
            yield
            return
        try:
            dfd = os.open(backing, _DIR_PIN, dir_fd=parent.fd)
        except OSError:  # no such entry, or not a directory: nothing to do
            yield
            return
        try:
            with _dir_id_set_aside(dfd, OSError):
                yield
        finally:
            os.close(dfd)

    # -- names ------------------------------------------------------------------------------------
    def _encode(self, parent: DirNode, name: str) -> tuple[str, str | None]:
        cipher = self._cipher()  # first: a revoked name key refuses even what is cached
        dir_id = self.dir_id(parent)
        known = self._encoded.get((dir_id, name))
        if known is not None:
            return known
        try:
            encoded = cipher.backing_name(dir_id, os.fsencode(name))
        except ValueError:  # longer than NAME_MAX: the kernel checks first, the core does too
            raise OSError(errno.ENAMETOOLONG, "name too long", name) from None
        _remember(self._encoded, (dir_id, name), encoded)
        if encoded[1] is None:
            _remember(self._decoded, (dir_id, encoded[0]), name)
        return encoded

    def backing(self, parent: DirNode, name: str) -> str:
        return self._encode(parent, name)[0]

    def find(self, parent: DirNode, name: str) -> tuple[int, str]:
        """A pinned descriptor of the entry ``name`` and its backing name; a long name's side
        entry must hold exactly this name (side entries swapped or edited: EIO, logged)."""
        backing, encoded = self._encode(parent, name)
        fd = pin(parent.fd, backing)
        if encoded is not None and not self._side_matches(parent, backing, encoded):
            os.close(fd)
            self._bad(parent.ident, long_side_name(backing), "side entry does not match its entry")
            raise OSError(errno.EIO, "long name's side entry does not match", name)
        return fd, backing

    @staticmethod
    def _side_matches(parent: DirNode, backing: str, encoded: str) -> bool:
        try:
            side = _read_small(parent.fd, long_side_name(backing), _SIDE_MAX)
        except OSError:
            return False
        return hmac.compare_digest(side, encoded.encode("ascii"))

    @contextlib.contextmanager
    def new_entry(self, parent: DirNode, name: str) -> Iterator[str]:
        """The backing name for a new entry ``name``; a long name's side entry exists before the
        body makes the entry, and is removed again if the body leaves no entry behind."""
        backing, encoded = self._encode(parent, name)
        if encoded is None:
            yield backing
            return
        with self._long:
            side = long_side_name(backing)
            if not self._side_matches(parent, backing, encoded):
                if _exists(parent.fd, backing):  # an entry whose side entry is not its own
                    self._bad(parent.ident, side, "side entry does not match its entry")
                    raise OSError(errno.EIO, "long name's side entry does not match", name)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(side, dir_fd=parent.fd)  # an orphan (crash): replace it
                _write_new(parent.fd, side, encoded.encode("ascii"))
            try:
                yield backing
            finally:
                if not _exists(parent.fd, backing):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(side, dir_fd=parent.fd)

    @contextlib.contextmanager
    def old_entry(self, parent: DirNode, name: str) -> Iterator[str]:
        """The backing name of an entry the body removes or moves; a long name's side entry is
        removed after, only if the entry is really gone."""
        backing, encoded = self._encode(parent, name)
        if encoded is None:
            yield backing
            return
        with self._long:
            try:
                yield backing
            finally:
                if not _exists(parent.fd, backing):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(long_side_name(backing), dir_fd=parent.fd)

    def listing(self, node: DirNode, entries: list[tuple[str, int, int]], where: str
                ) -> list[tuple[str, int, int]]:
        """The plaintext entries of a directory scan ("." and ".." kept, bookkeeping skipped,
        entries that fail authentication hidden and logged once)."""
        cipher = self._cipher()
        dir_id = self.dir_id(node)
        in_root = node.ident == self._root_ident
        decoded = self._decoded
        out = []
        for backing, ino, mode in entries:
            known = decoded.get((dir_id, backing))  # first: only names the cipher made are keys,
            if known is not None:                    # never ".", "..", bookkeeping or temp names
                out.append((known, ino, mode))
                continue
            if backing in (".", ".."):
                out.append((backing, ino, mode))
                continue
            if is_reserved(backing) or backing.startswith(TEMP_PREFIX) or (
                    in_root and backing.startswith(RESERVED_PREFIX)):
                continue
            side = None
            if is_long(backing):
                try:
                    side = _read_small(node.fd, long_side_name(backing), _SIDE_MAX)
                except OSError:
                    side = None
            try:
                plain = cipher.plain_name(dir_id, backing, side)
            except BadName:
                self._bad(node.ident, backing, f"name in {where} fails authentication")
                continue
            name = os.fsdecode(plain)
            _remember(self._encoded, (dir_id, name), (backing, side.decode("ascii") if side else None))
            if side is None:
                _remember(decoded, (dir_id, backing), name)
            out.append((name, ino, mode))
        return out

    # -- symlink targets --------------------------------------------------------------------------
    def target_out(self, target: str) -> str:
        """What the backing symlink holds for ``target`` (long encodings go to .kmsfs.targets)."""
        try:
            stored = self._cipher().encrypt_target(os.fsencode(target))
        except ValueError:
            raise OSError(errno.ENAMETOOLONG, "symlink target too long") from None
        if len(stored) <= MAX_BACKING_TARGET:
            return stored.decode("ascii")
        name = long_target_name(stored)
        try:
            os.mkdir(TARGETS_DIR, 0o700, dir_fd=self._root_fd)
        except FileExistsError:
            pass
        tfd = os.open(TARGETS_DIR, _DIR_PIN, dir_fd=self._root_fd)
        try:
            try:
                _write_new(tfd, name, stored)
            except FileExistsError:  # content-addressed: the same target is already there
                if _read_small(tfd, name, _TARGET_MAX) != stored:
                    os.unlink(name, dir_fd=tfd)
                    _write_new(tfd, name, stored)
        finally:
            os.close(tfd)
        return name

    def _stored_target(self, fd: int) -> bytes:
        raw = os.readlink(b"", dir_fd=fd)
        match = _LONG_TARGET.match(raw.decode("ascii", "replace"))
        if match is None:
            return raw
        tfd = os.open(TARGETS_DIR, _DIR_PIN, dir_fd=self._root_fd)
        try:
            stored = _read_small(tfd, raw.decode("ascii"), _TARGET_MAX)
        finally:
            os.close(tfd)
        if long_target_name(stored) != raw.decode("ascii"):
            raise BadName()
        return stored

    def target_in(self, fd: int) -> str:
        cipher = self._cipher()
        st = os.fstat(fd)
        try:
            return os.fsdecode(cipher.decrypt_target(self._stored_target(fd)))
        except (BadName, OSError) as exc:
            self._bad((st.st_dev, st.st_ino), "(symlink)", f"target fails authentication ({exc})")
            raise OSError(errno.EIO, "symlink target fails authentication") from None

    def symlink_size(self, fd: int, backing_size: int) -> int:
        """The plaintext target's length, from the encoded length (base64url of 16 + n bytes)."""
        try:
            stored = self._stored_target(fd)
        except (OSError, BadName, UnicodeDecodeError):
            return backing_size
        return max(0, len(stored) * 3 // 4 - 16)

    # -- logging ----------------------------------------------------------------------------------
    def _bad(self, dir_ident: tuple[int, int], backing: str, why: str) -> None:
        """Log a failing backing entry once (the set is bounded)."""
        key = (dir_ident, backing)
        with self._log_lock:
            if key in self._logged:
                return
            if len(self._logged) >= _LOGGED_MAX:
                self._logged.clear()
            self._logged.add(key)
        log.warning("hidden backing entry %r (directory inode %d): %s", backing, dir_ident[1], why)

