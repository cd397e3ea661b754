"""Encrypted names: the one module that turns a plaintext name into its backing name and back.

Pure (no I/O, no FUSE): the filesystem core reads directory ids and side entries and hands their
bytes here. docs/FORMAT.md ("Names") is the byte-level twin of this module.

* The **name key** is a data key from the key service (``GenerateDataKey`` at ``kmsfs init``,
  wrapped in ``.kmsfs.json``). Three subkeys are derived from it with HKDF-SHA256, one per use:
  names (AES-SIV, 512-bit), symlink targets (AES-SIV, 512-bit) and directory-id tags (HMAC-SHA256).
* Every backing directory holds a **directory id** (16 random bytes) in a small file
  ``kmsfs.dirid`` (a file, not an xattr, so it survives copies that drop xattrs). Its tag proves
  it was made by a holder of the name key.
* A **name** is ``AES-SIV(name subkey, name, AD = [label, parent directory id])``, encoded
  base64url without padding. AES-SIV is deterministic (a lookup by plaintext name computes the
  backing name) and authenticated: a flipped bit, or an entry moved into another directory, fails.
* A name whose encoding is longer than ``MAX_BACKING_NAME`` is stored as a **long name**: the entry
  is named ``kmsfs.longname.<H>`` with ``H`` = base64url(SHA-256(encoded name)), and the encoded
  name itself lives in a side entry ``kmsfs.longname.<H>.name`` beside it. The side entry's hash is
  checked against the entry name, then the name is authenticated as usual, so swapping side
  entries between two long names is caught.
* A **symlink target** is ``AES-SIV(target subkey, target, AD = [label])``, base64url. POSIX keeps
  a symlink's inode across rename and link, so its target cannot be bound to a name or directory
  without breaking them; a symlink moved to another directory is still caught by its *name*.
  Encodings longer than a backing symlink may hold are stored by the core in a content-addressed
  side file (``long_target_name``).

A failure is one undetailed ``BadName``: which check failed is nobody's business but fsck's log.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESSIV
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

NAME_KEY_SIZE = 32
DIR_ID_SIZE = 16
DIRID_FILE = "kmsfs.dirid"
DIRID_VERSION = 1
_DIRID_TAG_SIZE = 16
DIRID_FILE_SIZE = 1 + DIR_ID_SIZE + _DIRID_TAG_SIZE  # 33
# A directory's wrapped directory key (``init --directory-keys``; kmsfs/dirkeys.py owns its format).
DIRKEY_FILE = "kmsfs.dirkey"
LONGNAME_PREFIX = "kmsfs.longname."
LONGNAME_SIDE_SUFFIX = ".name"
LONGTARGET_PREFIX = "kmsfs.longtarget."
# The longest backing name we create (NAME_MAX of every Linux filesystem we back onto).
MAX_BACKING_NAME = 255
# The longest symlink target a backing filesystem stores (PATH_MAX - 1).
MAX_BACKING_TARGET = 4095
NAME_MAX = 255
PATH_MAX = 4096

_NAME_LABEL = b"kmsfs-name-v1"
_TARGET_LABEL = b"kmsfs-symlink-v1"
_DIRID_LABEL = b"kmsfs-dirid-v1"
_HKDF_SALT = b"kmsfs-names"
_SHORT_NAME = re.compile(r"^[A-Za-z0-9_-]{22,}$")  # the shortest ciphertext (16-byte tag + 1) is 23
_LONG_NAME = re.compile(r"^kmsfs\.longname\.([A-Za-z0-9_-]{43})$")


class BadName(Exception):
    """A backing name, side entry, directory id or symlink target failed authentication."""


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    """Strict: only the canonical encoding decodes (the last character's unused bits are zero),
    so no two backing names stand for one ciphertext."""
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (ValueError, TypeError):
        raise BadName() from None
    if _b64(raw) != text:
        raise BadName()
    return raw


def _hash_name(encoded: str) -> str:
    return _b64(hashlib.sha256(encoded.encode("ascii")).digest())


def is_reserved(backing_name: str) -> bool:
    """Backing entries that are never a user's entry (directory ids, long-name side entries)."""
    return backing_name in (DIRID_FILE, DIRKEY_FILE) or (
        backing_name.startswith(("kmsfs.longname.", LONGTARGET_PREFIX)) and backing_name.endswith(
            (LONGNAME_SIDE_SUFFIX, ".target"))
    )


def long_side_name(backing_name: str) -> str:
    """The side entry holding the encoded name of long-name entry ``backing_name``."""
    return backing_name + LONGNAME_SIDE_SUFFIX


def is_long(backing_name: str) -> bool:
    return _LONG_NAME.match(backing_name) is not None


class NameCipher:
    """Names and symlink targets of one cipherdir, under its unwrapped name key."""

    def __init__(self, name_key: bytes) -> None:
        if len(name_key) != NAME_KEY_SIZE:
            raise ValueError("the name key must be 32 bytes")

        def derive(info: bytes, length: int) -> bytes:
            return HKDF(hashes.SHA256(), length, _HKDF_SALT, info).derive(name_key)

        self._names = AESSIV(derive(b"names", 64))
        self._targets = AESSIV(derive(b"symlink-targets", 64))
        self._dirid_mac = derive(b"directory-ids", 32)

    # ----------------------------------------------------------------- directory ids

    @staticmethod
    def new_dir_id() -> bytes:
        return os.urandom(DIR_ID_SIZE)

    def _dirid_tag(self, dir_id: bytes) -> bytes:
        return hmac.new(self._dirid_mac, _DIRID_LABEL + dir_id, hashlib.sha256).digest()[:_DIRID_TAG_SIZE]

    def dirid_file(self, dir_id: bytes) -> bytes:
        """The contents of ``kmsfs.dirid``: version(1) || dir id(16) || tag(16)."""
        if len(dir_id) != DIR_ID_SIZE:
            raise ValueError("a directory id is 16 bytes")
        return bytes([DIRID_VERSION]) + dir_id + self._dirid_tag(dir_id)

    def parse_dirid_file(self, data: bytes) -> bytes:
        """The directory id in ``kmsfs.dirid``'s contents; BadName if it is not one of ours."""
        if len(data) != DIRID_FILE_SIZE or data[0] != DIRID_VERSION:
            raise BadName()
        dir_id, tag = data[1 : 1 + DIR_ID_SIZE], data[1 + DIR_ID_SIZE :]
        if not hmac.compare_digest(tag, self._dirid_tag(dir_id)):
            raise BadName()
        return dir_id

    # ----------------------------------------------------------------- names

    def encrypt(self, dir_id: bytes, name: bytes) -> str:
        """The full encoded ciphertext of ``name`` in the directory ``dir_id`` (may be long)."""
        if not name or len(name) > NAME_MAX or b"/" in name or b"\0" in name or name in (b".", b".."):
            raise ValueError("not a valid file name")
        return _b64(self._names.encrypt(name, [_NAME_LABEL, dir_id]))

    def decrypt(self, dir_id: bytes, encoded: str) -> bytes:
        """The plaintext of an encoded name; BadName unless it was made for this directory."""
        if not _SHORT_NAME.match(encoded):
            raise BadName()
        try:
            return self._names.decrypt(_unb64(encoded), [_NAME_LABEL, dir_id])
        except (InvalidTag, ValueError):
            raise BadName() from None

    def backing_name(self, dir_id: bytes, name: bytes) -> tuple[str, str | None]:
        """(backing entry name, encoded name for its side entry or None if it needs none)."""
        encoded = self.encrypt(dir_id, name)
        if len(encoded) <= MAX_BACKING_NAME:
            return encoded, None
        return LONGNAME_PREFIX + _hash_name(encoded), encoded

    def plain_name(self, dir_id: bytes, backing_name: str, side: bytes | None = None) -> bytes:
        """The plaintext name of a backing entry; ``side`` is its side entry's contents (long names).

        BadName for anything that is not an authentic entry of this directory, including a long
        name whose side entry is missing, belongs to another entry, or was edited.
        """
        match = _LONG_NAME.match(backing_name)
        if match is None:
            return self.decrypt(dir_id, backing_name)
        if side is None:
            raise BadName()
        try:
            encoded = side.decode("ascii")
        except UnicodeDecodeError:
            raise BadName() from None
        if not hmac.compare_digest(_hash_name(encoded), match.group(1)):
            raise BadName()
        return self.decrypt(dir_id, encoded)

    # ----------------------------------------------------------------- symlink targets

    def encrypt_target(self, target: bytes) -> bytes:
        if not target or len(target) >= PATH_MAX or b"\0" in target:
            raise ValueError("not a valid symlink target")
        return _b64(self._targets.encrypt(target, [_TARGET_LABEL])).encode("ascii")

    def decrypt_target(self, stored: bytes) -> bytes:
        try:
            text = stored.decode("ascii")
        except UnicodeDecodeError:
            raise BadName() from None
        if not _SHORT_NAME.match(text):
            raise BadName()
        try:
            return self._targets.decrypt(_unb64(text), [_TARGET_LABEL])
        except (InvalidTag, ValueError):
            raise BadName() from None


def long_target_name(encoded_target: bytes) -> str:
    """Where a symlink target too long for a backing symlink is kept (content-addressed, in the
    cipherdir's ``.kmsfs.targets`` directory); the backing symlink then points to this name."""
    return LONGTARGET_PREFIX + _b64(hashlib.sha256(encoded_target).digest()) + ".target"


def needs_long_target(encoded_target: bytes) -> bool:
    return len(encoded_target) > MAX_BACKING_TARGET
