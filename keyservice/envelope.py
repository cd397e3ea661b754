"""The ciphertext blob of Encrypt / GenerateDataKey*, and the canonical encryption context.

A blob names its key and key version, so Decrypt needs no key id and old versions keep
decrypting after rotation (SPEC K6, K10). Layout (all integers big-endian)::

    offset  size  field
    0       1     format version, 0x01
    1       16    key id (the UUID's 16 bytes)
    17      4     key version (u32, >= 1)
    21      12    nonce (random)
    33      n+16  AES-256-GCM ciphertext of the n plaintext bytes, then the 16-byte tag

    AAD = blob[0:33] (the header, nonce included) || encode_context(encryption_context)

``encode_context`` is order-independent and unambiguous: ``u32 count`` then, for each pair
sorted by the UTF-8 bytes of the key, ``u32 len(key) | key | u32 len(value) | value``.
Naive concatenation would make {"ab": "c"} and {"a": "bc"} collide; length prefixes don't.
"""

from __future__ import annotations

import os
import struct
import uuid
from collections.abc import Mapping
from typing import NamedTuple

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from keyservice.errors import InvalidCiphertextException, ValidationException

BLOB_VERSION = 1
KEY_ID_LEN = 16
NONCE_LEN = 12
TAG_LEN = 16
HEADER_LEN = 1 + KEY_ID_LEN + 4 + NONCE_LEN  # 33
MIN_BLOB_LEN = HEADER_LEN + TAG_LEN
MATERIAL_LEN = 32

_HEADER = struct.Struct(">B16sI12s")
_U32 = struct.Struct(">I")

# AWS does not let the context grow without bound; 8 KiB encoded is plenty for file ids.
MAX_CONTEXT_BYTES = 8192

_UNDETAILED = (
    "The ciphertext is invalid, was not produced by this service, or does not match the encryption context."
)


class ParsedBlob(NamedTuple):
    key_id: str  # canonical lowercase UUID string
    key_version: int
    nonce: bytes
    ciphertext: bytes  # ciphertext + tag
    header: bytes  # the first HEADER_LEN bytes, part of the AAD


def encode_context(context: Mapping[str, str] | None) -> bytes:
    """Canonical, order-independent, length-prefixed UTF-8 encoding of an encryption context."""
    items = sorted(
        ((k.encode("utf-8"), v.encode("utf-8")) for k, v in (context or {}).items()),
        key=lambda kv: kv[0],
    )
    out = [_U32.pack(len(items))]
    for k, v in items:
        out += [_U32.pack(len(k)), k, _U32.pack(len(v)), v]
    return b"".join(out)


def validate_context(context: object, field: str = "encryptionContext") -> dict[str, str]:
    """Check that an encryption context is a map of strings within size; return it as a dict."""
    if context is None:
        return {}
    if not isinstance(context, Mapping):
        raise ValidationException(f"{field} must be a map of string to string")
    for k, v in context.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise ValidationException(f"{field} must be a map of string to string")
        if not k:
            raise ValidationException(f"{field} keys must not be empty")
    result = dict(context)
    # len(encode_context(result)), without building it: a count, then each key and value
    # length-prefixed (UTF-8 encoding raises here as it would there).
    encoded_len = _U32.size + sum(2 * _U32.size + len(k.encode("utf-8")) + len(v.encode("utf-8"))
                                  for k, v in result.items())
    if encoded_len > MAX_CONTEXT_BYTES:
        raise ValidationException(f"{field} is too large (at most {MAX_CONTEXT_BYTES} encoded bytes)")
    return result


def _header(key_id: str, key_version: int, nonce: bytes) -> bytes:
    if not 1 <= key_version <= 0xFFFFFFFF:
        raise ValueError("key version out of range")
    if len(nonce) != NONCE_LEN:
        raise ValueError("nonce must be 12 bytes")
    return _HEADER.pack(BLOB_VERSION, uuid.UUID(key_id).bytes, key_version, nonce)


def seal_blob(
    material: bytes,
    key_id: str,
    key_version: int,
    plaintext: bytes,
    context: Mapping[str, str] | None,
    *,
    nonce: bytes | None = None,
) -> bytes:
    """Encrypt ``plaintext`` under one key version's material; ``nonce`` only for test vectors."""
    if len(material) != MATERIAL_LEN:
        raise ValueError("key material must be 32 bytes")
    header = _header(key_id, key_version, nonce if nonce is not None else os.urandom(NONCE_LEN))
    nonce_bytes = header[HEADER_LEN - NONCE_LEN : HEADER_LEN]
    return header + AESGCM(material).encrypt(nonce_bytes, plaintext, header + encode_context(context))


def parse_blob(blob: bytes) -> ParsedBlob:
    """Split a blob into its fields; anything malformed raises InvalidCiphertextException."""
    if not isinstance(blob, bytes | bytearray) or len(blob) < MIN_BLOB_LEN:
        raise InvalidCiphertextException(_UNDETAILED)
    version, key_bytes, key_version, nonce = _HEADER.unpack_from(blob, 0)
    if version != BLOB_VERSION or key_version == 0:
        raise InvalidCiphertextException(_UNDETAILED)
    blob = bytes(blob)
    key_hex = key_bytes.hex()  # str(uuid.UUID(bytes=...)), without building the UUID
    return ParsedBlob(
        key_id=f"{key_hex[:8]}-{key_hex[8:12]}-{key_hex[12:16]}-{key_hex[16:20]}-{key_hex[20:]}",
        key_version=key_version,
        nonce=nonce,
        ciphertext=blob[HEADER_LEN:],
        header=blob[:HEADER_LEN],
    )


def open_blob(material: bytes, parsed: ParsedBlob, context: Mapping[str, str] | None) -> bytes:
    """Decrypt a parsed blob; a wrong key, tampering or a context mismatch all raise the same error."""
    try:
        aad = parsed.header + encode_context(context)
        return AESGCM(material).decrypt(parsed.nonce, parsed.ciphertext, aad)
    except InvalidTag:
        raise InvalidCiphertextException(_UNDETAILED) from None
