"""Crypto operations: Encrypt, Decrypt, GenerateDataKey, GenerateDataKeyWithoutPlaintext, GenerateRandom.

New ciphertexts always use the key's newest version; Decrypt finds key and version in the blob
(SPEC K6, K10, K11). Naming ``alias/aws/kmsfs`` creates the service default key on first use.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from keyservice import envelope, errors
from keyservice.params import (
    DATA_KEY_SPECS,
    MAX_CIPHERTEXT,
    MAX_PLAINTEXT,
    AuditInfo,
    check_grant_tokens,
    get_bytes,
    get_enum,
    get_int,
)
from keyservice.store.model import (
    ENCRYPTION_ALGORITHM,
    KeyRecord,
    KeyVersionRecord,
)

if TYPE_CHECKING:
    from keyservice.service import KeyService


def encrypt(service: KeyService, params: dict[str, Any], info: AuditInfo) -> dict[str, Any]:
    context = service.context(params, info)
    key = service.key_param(params, info, allow_alias=True, create_default=True)
    plaintext = get_bytes(params, "Plaintext", 1, MAX_PLAINTEXT)
    assert plaintext is not None
    check_grant_tokens(params)
    service.check_algorithm(params)
    service.check_usable(key, "Encrypt", info)
    service.dry_run(params)
    version, material = service.latest_version(key, info)
    blob = envelope.seal_blob(material, key.key_id, version.version, plaintext, context)
    return {"CiphertextBlob": blob, "KeyId": key.arn, "EncryptionAlgorithm": ENCRYPTION_ALGORITHM}


def decrypt(service: KeyService, params: dict[str, Any], info: AuditInfo) -> dict[str, Any]:
    context = service.context(params, info)
    blob = get_bytes(params, "CiphertextBlob", 1, MAX_CIPHERTEXT)
    assert blob is not None
    check_grant_tokens(params)
    service.check_algorithm(params)
    service.no_recipient(params)
    wanted: KeyRecord | None = None
    if params.get("KeyId") is not None:
        wanted = service.key_param(params, info, allow_alias=True)
    parsed = envelope.parse_blob(blob)
    info.key_arn = service.key_arn(parsed.key_id)
    info.key_version = parsed.key_version
    key = blob_key(service, parsed, wanted)
    service.check_usable(key, "Decrypt", info)
    version = blob_version(service, key, parsed)
    service.dry_run(params)
    plaintext = envelope.open_blob(service.material(version), parsed, context)
    return {"Plaintext": plaintext, "KeyId": key.arn, "EncryptionAlgorithm": ENCRYPTION_ALGORITHM}


def blob_key(service: KeyService, parsed: envelope.ParsedBlob, wanted: KeyRecord | None) -> KeyRecord:
    """The key a ciphertext blob names (Decrypt and ReEncrypt authorize on it, never on KeyId).

    IncorrectKeyException if the request named another key; the undetailed
    InvalidCiphertextException if the key no longer exists."""
    if wanted is not None and wanted.key_id != parsed.key_id:
        raise errors.IncorrectKeyException(
            "The key ID in the request does not identify the KMS key that encrypted the ciphertext."
        )
    key = service.load_key(parsed.key_id)
    if key is None:
        raise errors.InvalidCiphertextException(envelope._UNDETAILED)
    return key


def blob_version(service: KeyService, key: KeyRecord, parsed: envelope.ParsedBlob) -> KeyVersionRecord:
    """The key version a blob was sealed under; InvalidCiphertextException if it is gone."""
    version = service.store.get_key_version(key.key_id, parsed.key_version)
    if version is None:
        raise errors.InvalidCiphertextException(envelope._UNDETAILED)
    return version


def _data_key(
    service: KeyService, params: dict[str, Any], info: AuditInfo, operation: str
) -> tuple[dict[str, Any], bytes]:
    context = service.context(params, info)
    key = service.key_param(params, info, allow_alias=True, create_default=True)
    spec = get_enum(params, "KeySpec", tuple(DATA_KEY_SPECS))
    number = get_int(params, "NumberOfBytes", 1, 1024)
    if spec is None and number is None:
        raise errors.ValidationException("Specify either KeySpec or NumberOfBytes.")
    if spec is not None and number is not None:
        raise errors.ValidationException("Specify either KeySpec or NumberOfBytes, not both.")
    size = DATA_KEY_SPECS[spec] if spec is not None else number
    assert size is not None
    check_grant_tokens(params)
    service.no_recipient(params)
    service.check_usable(key, operation, info)
    service.dry_run(params)
    version, material = service.latest_version(key, info)
    data_key = os.urandom(size)
    blob = envelope.seal_blob(material, key.key_id, version.version, data_key, context)
    return {"CiphertextBlob": blob, "KeyId": key.arn}, data_key


def generate_data_key(service: KeyService, params: dict[str, Any], info: AuditInfo) -> dict[str, Any]:
    result, data_key = _data_key(service, params, info, "GenerateDataKey")
    result["Plaintext"] = data_key
    return result


def generate_data_key_without_plaintext(
    service: KeyService, params: dict[str, Any], info: AuditInfo
) -> dict[str, Any]:
    result, _ = _data_key(service, params, info, "GenerateDataKeyWithoutPlaintext")
    return result


def generate_random(service: KeyService, params: dict[str, Any], info: AuditInfo) -> dict[str, Any]:
    number = get_int(params, "NumberOfBytes", 1, 1024, required=True)
    assert number is not None
    if params.get("CustomKeyStoreId") is not None:
        raise errors.UnsupportedOperationException("Custom key stores are not supported.")
    service.no_recipient(params)
    return {"Plaintext": os.urandom(number)}


HANDLERS = {
    "Encrypt": encrypt,
    "Decrypt": decrypt,
    "GenerateDataKey": generate_data_key,
    "GenerateDataKeyWithoutPlaintext": generate_data_key_without_plaintext,
    "GenerateRandom": generate_random,
}
