"""Request plumbing shared by every operation module: parameter checks with AWS's error wording,
list markers, and the per-request ``AuditInfo`` a handler fills in for its audit record.

Kept apart from the operations so that each operation-group module (keys, aliases, crypto,
rotation, deletion, import, tags) validates input the same way and reports errors the way
botocore expects (``1 validation error detected: ...`` with lowerCamelCase member names).
"""

from __future__ import annotations

import base64
import binascii
import re
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from keyservice import errors
from keyservice.context import Principal

# --------------------------------------------------------------------------- limits and enums

MAX_PLAINTEXT = 4096
MAX_CIPHERTEXT = 6144
MAX_DESCRIPTION = 8192
MAX_POLICY = 131072
MAX_KEY_ID = 2048
DEFAULT_LIST_LIMIT = 100

KEY_USAGES = ("ENCRYPT_DECRYPT", "SIGN_VERIFY", "GENERATE_VERIFY_MAC", "KEY_AGREEMENT")
KEY_SPECS = (
    "SYMMETRIC_DEFAULT",
    "RSA_2048",
    "RSA_3072",
    "RSA_4096",
    "ECC_NIST_P256",
    "ECC_NIST_P384",
    "ECC_NIST_P521",
    "ECC_SECG_P256K1",
    "HMAC_224",
    "HMAC_256",
    "HMAC_384",
    "HMAC_512",
    "SM2",
    "ML_DSA_44",
    "ML_DSA_65",
    "ML_DSA_87",
    "ECC_NIST_EDWARDS25519",
)
ORIGINS = ("AWS_KMS", "EXTERNAL", "AWS_CLOUDHSM", "EXTERNAL_KEY_STORE")
ENCRYPTION_ALGORITHMS = ("SYMMETRIC_DEFAULT", "RSAES_OAEP_SHA_1", "RSAES_OAEP_SHA_256", "SM2PKE")
DATA_KEY_SPECS = {"AES_128": 16, "AES_256": 32}

ALIAS_PATTERN = re.compile(r"^[a-zA-Z0-9:/_-]+$")
ALIAS_NAME = re.compile(r"^alias/[a-zA-Z0-9/_-]+$")
RESERVED_ALIAS_PREFIX = "alias/aws/"

_MARKER_PATTERN = re.compile(r"^[\u0020-\u00FF]*$")


@dataclass
class AuditInfo:
    """What the current request touched, collected as the handler goes, for its audit record."""

    key_arn: str | None = None
    key_version: int | None = None
    requested_key_id: str | None = None
    alias_name: str | None = None
    encryption_context: dict[str, str] | None = None
    # Facts without a field of their own in the audit record (e.g. ReEncrypt's source key); the
    # service records them under caller["keyservice"] until audit/records.py grows a field for them.
    extra: dict[str, Any] = field(default_factory=dict)
    # Not audited: the authenticated caller (authorization reads it; the audit record takes the
    # caller from the request context), and the keys this request was authorized on, so that
    # ``KeyService.call`` can refuse to return a key operation that skipped authorization.
    principal: Principal | None = None
    authorized_keys: set[str] = field(default_factory=set)
    # Where the request came from (aws:SourceIp in policy conditions); also not audited from here.
    source_address: str = ""
    # The Unix-socket peer (SO_PEERCRED), for records a handler writes itself (KmsfsReportAccess).
    peer: dict[str, object] | None = None


Handler = Callable[[dict[str, Any], AuditInfo], dict[str, Any]]


# --------------------------------------------------------------------------- parameter checks


def wire_name(name: str) -> str:
    """AWS reports members in lowerCamelCase: KeyId -> keyId."""
    return name[:1].lower() + name[1:]


def null(name: str) -> errors.KMSError:
    return errors.ValidationException(
        f"1 validation error detected: Value null at '{wire_name(name)}' failed to satisfy constraint: "
        "Member must not be null"
    )


def get_str(
    params: Mapping[str, Any],
    name: str,
    *,
    required: bool = False,
    min_len: int = 0,
    max_len: int | None = None,
) -> str | None:
    value = params.get(name)
    if value is None:
        if required:
            raise null(name)
        return None
    if not isinstance(value, str):
        raise errors.ValidationException(f"{name} must be a string")
    if len(value) < min_len:
        raise errors.ValidationException(
            f"1 validation error detected: Value at '{wire_name(name)}' failed to satisfy constraint: "
            f"Member must have length greater than or equal to {min_len}"
        )
    if max_len is not None and len(value) > max_len:
        raise errors.ValidationException(
            f"1 validation error detected: Value at '{wire_name(name)}' failed to satisfy constraint: "
            f"Member must have length less than or equal to {max_len}"
        )
    return value


def get_int(params: Mapping[str, Any], name: str, lo: int, hi: int, *, required: bool = False) -> int | None:
    value = params.get(name)
    if value is None:
        if required:
            raise null(name)
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise errors.ValidationException(f"{name} must be an integer")
    if not lo <= value <= hi:
        bound = f"greater than or equal to {lo}" if value < lo else f"less than or equal to {hi}"
        raise errors.ValidationException(
            f"1 validation error detected: Value '{value}' at '{wire_name(name)}' "
            "failed to satisfy constraint: "
            f"Member must have value {bound}"
        )
    return value


def get_bytes(
    params: Mapping[str, Any], name: str, lo: int, hi: int, *, required: bool = True
) -> bytes | None:
    value = params.get(name)
    if value is None:
        if required:
            raise null(name)
        return None
    if not isinstance(value, bytes | bytearray):
        raise errors.ValidationException(f"{name} must be binary data")
    if not lo <= len(value) <= hi:
        raise errors.ValidationException(
            f"1 validation error detected: Value at '{wire_name(name)}' failed to satisfy constraint: "
            f"Member must have length between {lo} and {hi} bytes"
        )
    return bytes(value)


def get_bool(params: Mapping[str, Any], name: str) -> bool:
    value = params.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise errors.ValidationException(f"{name} must be a boolean")
    return value


def get_enum(params: Mapping[str, Any], name: str, allowed: tuple[str, ...]) -> str | None:
    value = get_str(params, name)
    if value is not None and value not in allowed:
        raise errors.ValidationException(
            f"1 validation error detected: Value '{value}' at '{wire_name(name)}' "
            "failed to satisfy constraint: "
            f"Member must satisfy enum value set: [{', '.join(allowed)}]"
        )
    return value


def check_grant_tokens(params: Mapping[str, Any]) -> None:
    tokens = params.get("GrantTokens")
    if tokens is None:
        return
    if not isinstance(tokens, list) or len(tokens) > 10 or not all(isinstance(t, str) for t in tokens):
        raise errors.ValidationException("GrantTokens must be a list of at most 10 strings")


def encode_marker(kind: str, last: str) -> str:
    return base64.urlsafe_b64encode(f"{kind}:{last}".encode()).decode()


def decode_marker(kind: str, marker: str | None) -> str | None:
    if marker is None:
        return None
    if not _MARKER_PATTERN.match(marker):
        raise errors.InvalidMarkerException("The marker is not valid.")
    try:
        text = base64.urlsafe_b64decode(marker.encode()).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise errors.InvalidMarkerException("The marker is not valid.") from None
    prefix = kind + ":"
    if not text.startswith(prefix):
        raise errors.InvalidMarkerException("The marker is not valid.")
    return text[len(prefix) :]


def canonical_uuid(text: str) -> str | None:
    try:
        value = uuid.UUID(text)
    except ValueError:
        return None
    return str(value) if str(value) == text.lower() else None


def get_timestamp(params: Mapping[str, Any], name: str) -> datetime | None:
    """A timestamp member: epoch seconds on the wire (botocore's JSON protocol) -> aware UTC datetime."""
    value = params.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise errors.ValidationException(f"{name} must be a timestamp (epoch seconds)")
    try:
        return datetime.fromtimestamp(value, UTC)
    except (OverflowError, OSError, ValueError):
        raise errors.ValidationException(f"{name} is out of range") from None


def get_str_list(
    params: Mapping[str, Any], name: str, *, required: bool = False, max_items: int, max_len: int
) -> list[str] | None:
    """A list of non-empty strings (e.g. UntagResource's TagKeys)."""
    value = params.get(name)
    if value is None:
        if required:
            raise null(name)
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise errors.ValidationException(f"{name} must be a list of strings")
    if len(value) > max_items:
        raise errors.ValidationException(f"{name} must have at most {max_items} items")
    for item in value:
        if not 1 <= len(item) <= max_len:
            raise errors.ValidationException(
                f"1 validation error detected: Value at '{wire_name(name)}' failed to satisfy constraint: "
                f"Member must have length between 1 and {max_len}"
            )
    return list(value)
