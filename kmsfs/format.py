"""The on-disk format of kmsfs, as pure functions (no I/O): the header and the block layout.

Why pure: the format is the one thing that must never drift between versions, so it is kept in
one small module that the unit tests can pin with exact bytes. docs/FORMAT.md is its prose twin.

A backing file is the concatenation of encrypted blocks. Each plaintext block of ``block_size``
bytes (the last may be shorter, never empty) is stored as::

    nonce (12 random bytes) || AES-256-GCM ciphertext (same length as plaintext) || tag (16 bytes)

Its AAD binds the format version, the file id and the block number, so a block moved to another
position or another file fails authentication. Since format version 2 the AAD also carries a
*final* flag (STREAM-like): only the last block of a file is sealed as final, which authenticates
the plaintext size (a file cut at a block boundary, or with blocks appended, fails). The data
key lives, wrapped by the key service, in the header (extended attribute ``user.kmsfs.header``).
Since format version 3 the backing file also starts with a copy of that header and a state
record (``kmsfs.infile``), so copies that drop xattrs still decrypt; blocks start after it.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

HEADER_XATTR = "user.kmsfs.header"
MAGIC = b"KMSFS\x00"
FORMAT_V1 = 1
FORMAT_V2 = 2
FORMAT_V3 = 3  # version 2's blocks after an in-file prefix: header copy and state record
# Version 3's layout, the data key wrapped locally under a directory key (``init --directory-keys``)
FORMAT_V4 = 4
# The version new files are written in (directory-key cipherdirs write FORMAT_V4); readers accept
# READABLE_VERSIONS.
FORMAT_VERSION = FORMAT_V3
READABLE_VERSIONS = frozenset({FORMAT_V1, FORMAT_V2, FORMAT_V3, FORMAT_V4})
DEFAULT_BLOCK_SIZE = 4096
NONCE_SIZE = 12
TAG_SIZE = 16
BLOCK_OVERHEAD = NONCE_SIZE + TAG_SIZE
FILE_ID_SIZE = 16
DATA_KEY_SIZE = 32
MAX_KEY_ARN = 2048
MAX_WRAPPED_KEY = 6144
MAX_HEADER_SIZE = 8192
# Block sizes versions 1 to 3 accept. The field exists so a later version can vary it; the
# FUSE layer derives plaintext sizes from backing sizes without reading headers, so it is fixed.
_VALID_BLOCK_SIZES = frozenset({DEFAULT_BLOCK_SIZE})

# magic(6) version(u16) block_size(u32) file_id(16) arn_len(u16) blob_len(u16), big-endian.
_FIXED = struct.Struct(">6sHI16sHH")
_AAD = struct.Struct(">6sH16sQ")
AAD_SIZE = _AAD.size  # 32 (version 1)
_AAD_V2 = struct.Struct(">6sH16sQB")
AAD_V2_SIZE = _AAD_V2.size  # 33: version 1's fields plus the final-block flag
FINAL_FLAG = 0x01

# The size-change marker (version 2): set before a multi-step size change, removed after it.
# Value: preferred size u64, fallback size u64, then AES-GCM seal of nothing (nonce 12, tag 16)
# under the data key with AAD = MARKER_AAD_LABEL || file id || preferred || fallback.
RESIZE_XATTR = "user.kmsfs.resize"
_MARKER_SIZES = struct.Struct(">QQ")
MARKER_SIZE = _MARKER_SIZES.size + NONCE_SIZE + TAG_SIZE  # 44
MARKER_AAD_LABEL = b"KMSFS\x00resize"

ENCRYPTION_CONTEXT_KEY = "kmsfs:file-id"

# Version 4: the header's "wrapped key" field is a *directory-wrapped key*:
#   directory id (16) || C (u16) || wrapped directory key (C bytes, the service's CiphertextBlob)
#   || nonce (12) || AES-256-GCM(directory key, data key) (32) || tag (16)
# with AAD = FILE_KEY_AAD_LABEL || version (u16) || file id || directory id.
DIR_ID_SIZE = 16
MAX_WRAPPED_DIR_KEY = 4096
_DIR_WRAPPED_FIXED = DIR_ID_SIZE + 2
DIR_WRAPPED_OVERHEAD = _DIR_WRAPPED_FIXED + NONCE_SIZE + DATA_KEY_SIZE + TAG_SIZE  # 78
FILE_KEY_AAD_LABEL = b"KMSFS\x00filekey"


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
        """The context of a version 1-3 wrapped key (a version-4 key is wrapped locally: see
        ``directory_wrapped``, and its directory key's context is ``directory_context``)."""
        return encryption_context(self.file_id)

    @property
    def directory_wrapped(self) -> DirWrapped:
        """Version 4: the parsed "wrapped key" field (ValueError for other versions)."""
        if self.version != FORMAT_V4:
            raise ValueError("only a version-4 header has a directory-wrapped key")
        return parse_dir_wrapped(self.wrapped_key)


@dataclass(frozen=True)
class DirWrapped:
    """A version-4 data key: wrapped locally under the key of the directory it was created in,
    whose own wrapped key (a service CiphertextBlob) travels with it."""

    dir_id: bytes
    wrapped_dir_key: bytes
    sealed_key: bytes  # nonce (12) || ciphertext of the data key (32) || tag (16)


def pack_dir_wrapped(dir_id: bytes, wrapped_dir_key: bytes, sealed_key: bytes) -> bytes:
    if len(dir_id) != DIR_ID_SIZE:
        raise ValueError("a directory id is 16 bytes")
    if not 0 < len(wrapped_dir_key) <= MAX_WRAPPED_DIR_KEY:
        raise ValueError("wrapped directory key empty or too long")
    if len(sealed_key) != NONCE_SIZE + DATA_KEY_SIZE + TAG_SIZE:
        raise ValueError("sealed data key must be 60 bytes")
    return dir_id + len(wrapped_dir_key).to_bytes(2, "big") + wrapped_dir_key + sealed_key


def parse_dir_wrapped(raw: bytes) -> DirWrapped:
    """Strict parse of a version-4 wrapped-key field; ``CorruptHeader`` on any defect."""
    if len(raw) < DIR_WRAPPED_OVERHEAD + 1:
        raise CorruptHeader("directory-wrapped key too short")
    size = int.from_bytes(raw[DIR_ID_SIZE:_DIR_WRAPPED_FIXED], "big")
    if not 0 < size <= MAX_WRAPPED_DIR_KEY or len(raw) != DIR_WRAPPED_OVERHEAD + size:
        raise CorruptHeader("directory-wrapped key: bad length")
    start = _DIR_WRAPPED_FIXED + size
    return DirWrapped(bytes(raw[:DIR_ID_SIZE]), bytes(raw[_DIR_WRAPPED_FIXED:start]), bytes(raw[start:]))


def file_key_aad(file_id: bytes, dir_id: bytes, version: int = FORMAT_V4) -> bytes:
    """AAD of a locally wrapped data key: label, format version, file id, directory id."""
    if len(file_id) != FILE_ID_SIZE or len(dir_id) != DIR_ID_SIZE:
        raise ValueError("file id and directory id are 16 bytes")
    return FILE_KEY_AAD_LABEL + version.to_bytes(2, "big") + file_id + dir_id


def directory_context(cipherdir_id: str, dir_id: bytes) -> dict[str, str]:
    """The encryption context a directory key is wrapped under (GenerateDataKey / Decrypt)."""
    return {"kmsfs:purpose": "directory", "kmsfs:cipherdir": cipherdir_id,
            "kmsfs:directory-id": dir_id.hex()}


def encryption_context(file_id: bytes) -> dict[str, str]:
    """The KMS encryption context binding a wrapped data key to one file id."""
    return {ENCRYPTION_CONTEXT_KEY: file_id.hex()}


def pack_header(header: Header) -> bytes:
    """Serialise a header; refuses values the parser would refuse, so what we write we can read."""
    if header.version not in READABLE_VERSIONS:
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
    if version not in READABLE_VERSIONS:
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
    if version == FORMAT_V4:
        parse_dir_wrapped(wrapped)  # strict here too: what parses is usable
    return Header(file_id=file_id, key_arn=key_arn, wrapped_key=wrapped, block_size=block_size,
                  version=version)


def block_aad(file_id: bytes, block_no: int, version: int = FORMAT_VERSION, final: bool = False) -> bytes:
    """AAD of one block: magic, format version, file id, block number (u64) and, from version 2
    on, a flag byte that is 1 only for the file's last block (version 1 ignores ``final``)."""
    if len(file_id) != FILE_ID_SIZE:
        raise ValueError("file id must be 16 bytes")
    if version == FORMAT_V1:
        return _AAD.pack(MAGIC, version, file_id, block_no)
    return _AAD_V2.pack(MAGIC, version, file_id, block_no, FINAL_FLAG if final else 0)


def block_aad_prefix(file_id: bytes, version: int = FORMAT_VERSION) -> bytes:
    """The part of every block's AAD that does not depend on the block (magic, version, file id).

    Why: the per-block AAD is built tens of thousands of times a second on the I/O path; callers
    append ``block_no.to_bytes(8, "big")`` and, from version 2 on, the final-flag byte, which
    gives exactly ``block_aad`` (pinned by a unit test).
    """
    if len(file_id) != FILE_ID_SIZE:
        raise ValueError("file id must be 16 bytes")
    return MAGIC + version.to_bytes(2, "big") + file_id


def marker_aad(file_id: bytes, preferred: int, fallback: int) -> bytes:
    """AAD authenticating a size-change marker to one file id and its two sizes."""
    return MARKER_AAD_LABEL + file_id + _MARKER_SIZES.pack(preferred, fallback)


def pack_marker_sizes(preferred: int, fallback: int) -> bytes:
    return _MARKER_SIZES.pack(preferred, fallback)


def unpack_marker(raw: bytes) -> tuple[int, int, bytes]:
    """(preferred, fallback, seal) of a marker value; ``CorruptHeader`` if malformed."""
    if len(raw) != MARKER_SIZE:
        raise CorruptHeader("size-change marker has the wrong length")
    preferred, fallback = _MARKER_SIZES.unpack_from(raw)
    return preferred, fallback, bytes(raw[_MARKER_SIZES.size:])


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
