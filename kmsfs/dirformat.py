"""Format version 4's pieces besides the header, as pure functions: ``kmsfs.dirkey`` and the local wrap.

Why apart from kmsfs/dirkeys.py: that module talks to the key service (through the client) and
caches keys; the bytes it reads and writes must not drift, so they live here, with no I/O, pinned
by tests/unit/test_format_v4.py (docs/FORMAT.md, "Version 4", is the prose twin; the header's own
directory-wrapped key field is parsed in kmsfs/format.py with the rest of the header).

``kmsfs.dirkey`` (all integers big-endian)::

    0  8  magic "KMSFSDK\\0"   8  1  version 01   9  16  directory id
    25 2  A = key ARN length  27 2  C = wrapped directory key length   29 A ARN   29+A C blob

A data key is wrapped locally under its directory key with AES-256-GCM, AAD = ``format.file_key_aad``
(label, version, file id, directory id).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from kmsfs.cipher import BlockCipher, IntegrityError
from kmsfs.format import (
    DATA_KEY_SIZE,
    DIR_ID_SIZE,
    MAX_KEY_ARN,
    MAX_WRAPPED_DIR_KEY,
    CorruptHeader,
    Header,
    file_key_aad,
)

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
