"""The on-disk format of kmsfs, as pure functions (no I/O): the header and the block layout.

Why pure: the format is the one thing that must never drift between versions, so it is kept in
one small module that the unit tests can pin with exact bytes. docs/FORMAT.md is its prose twin.

A backing file is the concatenation of encrypted blocks. Each plaintext block of ``block_size``
bytes (the last may be shorter, never empty) is stored as::

    nonce (12 random bytes) || AES-256-GCM ciphertext (same length as plaintext) || tag (16 bytes)

Its AAD binds the format version, the file id and the block number, so a block moved to another
position or another file fails authentication. The data key lives, wrapped by the key service,
in the header, which is stored in the extended attribute ``user.kmsfs.header``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

HEADER_XATTR = "user.kmsfs.header"
MAGIC = b"KMSFS\x00"
FORMAT_VERSION = 1
DEFAULT_BLOCK_SIZE = 4096
NONCE_SIZE = 12
TAG_SIZE = 16
BLOCK_OVERHEAD = NONCE_SIZE + TAG_SIZE
FILE_ID_SIZE = 16
DATA_KEY_SIZE = 32
MAX_KEY_ARN = 2048
MAX_WRAPPED_KEY = 6144
MAX_HEADER_SIZE = 8192
# Block sizes format version 1 accepts. The field exists so a later version can vary it; the
# FUSE layer derives plaintext sizes from backing sizes without reading headers, so v1 fixes it.
_VALID_BLOCK_SIZES = frozenset({DEFAULT_BLOCK_SIZE})

# magic(6) version(u16) block_size(u32) file_id(16) arn_len(u16) blob_len(u16), big-endian.
_FIXED = struct.Struct(">6sHI16sHH")
_AAD = struct.Struct(">6sH16sQ")
AAD_SIZE = _AAD.size  # 32

ENCRYPTION_CONTEXT_KEY = "kmsfs:file-id"


class CorruptHeader(Exception):
    """The header xattr is missing, malformed, oversized or of an unknown version."""


@dataclass(frozen=True)
class Header:
    """Everything needed to open a file, given the key service: never contains a plaintext key."""

    file_id: bytes
    key_arn: str
    wrapped_key: bytes
    block_size: int = DEFAULT_BLOCK_SIZE
    version: int = FORMAT_VERSION

    def encryption_context(self) -> dict[str, str]:
        return encryption_context(self.file_id)


def encryption_context(file_id: bytes) -> dict[str, str]:
    """The KMS encryption context binding a wrapped data key to one file id."""
    return {ENCRYPTION_CONTEXT_KEY: file_id.hex()}


def pack_header(header: Header) -> bytes:
    """Serialise a header; refuses values the parser would refuse, so what we write we can read."""
    if header.version != FORMAT_VERSION:
        raise ValueError(f"cannot write format version {header.version}")
    if header.block_size not in _VALID_BLOCK_SIZES:
        raise ValueError(f"invalid block size {header.block_size}")
    if len(header.file_id) != FILE_ID_SIZE:
        raise ValueError("file id must be 16 bytes")
    arn = header.key_arn.encode("utf-8")
    if not 0 < len(arn) <= MAX_KEY_ARN:
        raise ValueError("key ARN empty or too long")
    if not 0 < len(header.wrapped_key) <= MAX_WRAPPED_KEY:
        raise ValueError("wrapped key empty or too long")
    fixed = _FIXED.pack(MAGIC, header.version, header.block_size, header.file_id, len(arn),
                        len(header.wrapped_key))
    return fixed + arn + header.wrapped_key


def parse_header(data: bytes) -> Header:
    """Parse and strictly validate a header; any defect is a single ``CorruptHeader``."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise CorruptHeader("header is not bytes")
    data = bytes(data)
    if len(data) > MAX_HEADER_SIZE:
        raise CorruptHeader("header too large")
    if len(data) < _FIXED.size:
        raise CorruptHeader("header too short")
    magic, version, block_size, file_id, arn_len, blob_len = _FIXED.unpack_from(data)
    if magic != MAGIC:
        raise CorruptHeader("bad magic")
    if version != FORMAT_VERSION:
        raise CorruptHeader(f"unknown format version {version}")
    if block_size not in _VALID_BLOCK_SIZES:
        raise CorruptHeader(f"invalid block size {block_size}")
    if not 0 < arn_len <= MAX_KEY_ARN or not 0 < blob_len <= MAX_WRAPPED_KEY:
        raise CorruptHeader("bad field length")
    if len(data) != _FIXED.size + arn_len + blob_len:
        raise CorruptHeader("header length mismatch")
    arn_raw = data[_FIXED.size:_FIXED.size + arn_len]
    try:
        key_arn = arn_raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CorruptHeader("key ARN is not UTF-8") from exc
    if not key_arn.isprintable():
        raise CorruptHeader("key ARN is not printable")
    wrapped = data[_FIXED.size + arn_len:]
    return Header(file_id=file_id, key_arn=key_arn, wrapped_key=wrapped, block_size=block_size,
                  version=version)


def block_aad(file_id: bytes, block_no: int, version: int = FORMAT_VERSION) -> bytes:
    """AAD of one block: magic, format version, file id, block number (u64)."""
    if len(file_id) != FILE_ID_SIZE:
        raise ValueError("file id must be 16 bytes")
    return _AAD.pack(MAGIC, version, file_id, block_no)


def stored_block_size(block_size: int = DEFAULT_BLOCK_SIZE) -> int:
    """Bytes one full block occupies in the backing file."""
    return block_size + BLOCK_OVERHEAD


def backing_size(plain_size: int, block_size: int = DEFAULT_BLOCK_SIZE) -> int:
    """Backing file length holding ``plain_size`` plaintext bytes."""
    if plain_size < 0:
        raise ValueError("negative size")
    full, rest = divmod(plain_size, block_size)
    return full * (block_size + BLOCK_OVERHEAD) + (rest + BLOCK_OVERHEAD if rest else 0)


def plain_size(backing: int, block_size: int = DEFAULT_BLOCK_SIZE) -> int:
    """Plaintext length of a backing file of ``backing`` bytes.

    A trailing fragment of at most BLOCK_OVERHEAD bytes (a torn write) holds no plaintext and is
    ignored here; reading never reaches it.
    """
    if backing < 0:
        raise ValueError("negative size")
    full, rest = divmod(backing, block_size + BLOCK_OVERHEAD)
    return full * block_size + max(0, rest - BLOCK_OVERHEAD)


def block_count(plain: int, block_size: int = DEFAULT_BLOCK_SIZE) -> int:
    """Number of blocks holding ``plain`` bytes."""
    return -(-plain // block_size)


def block_offset(block_no: int, block_size: int = DEFAULT_BLOCK_SIZE) -> int:
    """Offset of a block in the backing file."""
    return block_no * (block_size + BLOCK_OVERHEAD)


def block_range(offset: int, length: int, block_size: int = DEFAULT_BLOCK_SIZE) -> range:
    """The block numbers touched by plaintext bytes [offset, offset+length)."""
    if length <= 0:
        return range(0)
    return range(offset // block_size, (offset + length - 1) // block_size + 1)
