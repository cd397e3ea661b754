"""Imported key material (SPEC K2, K3, K16): GetParametersForImport, ImportKeyMaterial,
DeleteImportedKeyMaterial, and ``expire``, which the scheduler calls at a material's ValidTo.

The owner wraps 256-bit material under a fresh RSA public key that only this service can undo:
RSAES-OAEP with SHA-1 or SHA-256, or RSA-AES key wrap (the material under a one-time AES-256 key
with AES-KWP, RFC 5649, after that AES key OAEP-wrapped under the RSA key). RSAES-PKCS1-v1_5,
which AWS retired in 2023, only when the operator starts the server with --allow-pkcs1-import.
The RSA private key is sealed under the root key, bound to its import token, and forgotten after
24 hours. The material is stored sealed like any other as version 1 of the key; a re-import must
be the *same* material (checked against KeyMaterialId, an HMAC of the material under the root key
kept even after the material is deleted), so every old ciphertext decrypts again.
"""

from __future__ import annotations

import os
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.keywrap import InvalidUnwrap, aes_key_unwrap_with_padding

from keyservice import envelope, errors, lifecycle
from keyservice.params import AuditInfo, get_bytes, get_enum, get_str, get_timestamp, null
from keyservice.store.base import import_key_aad
from keyservice.store.model import (
    DOES_NOT_EXPIRE,
    ENABLED,
    EXPIRES,
    PENDING_DELETION,
    PENDING_IMPORT,
    ImportParameters,
    KeyRecord,
    KeyVersionRecord,
)

if TYPE_CHECKING:
    from keyservice.service import KeyService

OAEP_SHA_1 = "RSAES_OAEP_SHA_1"
OAEP_SHA_256 = "RSAES_OAEP_SHA_256"
KEY_WRAP_SHA_1 = "RSA_AES_KEY_WRAP_SHA_1"
KEY_WRAP_SHA_256 = "RSA_AES_KEY_WRAP_SHA_256"
PKCS1_V1_5 = "RSAES_PKCS1_V1_5"
ALGORITHMS = (PKCS1_V1_5, OAEP_SHA_1, OAEP_SHA_256, KEY_WRAP_SHA_1, KEY_WRAP_SHA_256, "SM2PKE")
KEY_SPECS = ("RSA_2048", "RSA_3072", "RSA_4096", "SM2")
KEY_BITS = {"RSA_2048": 2048, "RSA_3072": 3072, "RSA_4096": 4096}
PARAMETERS_LIFETIME = timedelta(hours=24)
MAX_VALID_TO = timedelta(days=365)
TOKEN_VERSION = 1
TOKEN_ID_LEN = 32
MAX_BLOB = 6144


def _hash(algorithm: str) -> hashes.HashAlgorithm:
    return hashes.SHA1() if algorithm in (OAEP_SHA_1, KEY_WRAP_SHA_1) else hashes.SHA256()


def _oaep(algorithm: str) -> padding.OAEP:
    return padding.OAEP(mgf=padding.MGF1(algorithm=_hash(algorithm)), algorithm=_hash(algorithm), label=None)


def unwrap(algorithm: str, private_key: rsa.RSAPrivateKey, wrapped: bytes) -> bytes:
    """The material inside ``wrapped``; InvalidCiphertextException if it does not unwrap."""
    try:
        if algorithm in (OAEP_SHA_1, OAEP_SHA_256):
            return private_key.decrypt(wrapped, _oaep(algorithm))
        if algorithm in (KEY_WRAP_SHA_1, KEY_WRAP_SHA_256):
            size = private_key.key_size // 8
            aes_key = private_key.decrypt(wrapped[:size], _oaep(algorithm))
            return aes_key_unwrap_with_padding(aes_key, wrapped[size:])
        if algorithm == PKCS1_V1_5:
            return private_key.decrypt(wrapped, padding.PKCS1v15())
    except (ValueError, InvalidUnwrap):
        pass
    raise errors.InvalidCiphertextException(
        "The EncryptedKeyMaterial does not unwrap with the wrapping key and algorithm of this import token."
    )


def material_id(service: KeyService, key_id: str, material: bytes) -> str:
    """KeyMaterialId: 64 hex digits that identify the material without revealing it."""
    return service.root_mac(b"key-material-id", key_id.encode() + b"\x00" + material).hex()


def get_parameters_for_import(service: KeyService, params: dict[str, Any], info: AuditInfo) -> dict[str, Any]:
    key = service.key_param(params, info, allow_alias=False)
    algorithm = get_enum(params, "WrappingAlgorithm", ALGORITHMS)
    key_spec = get_enum(params, "WrappingKeySpec", KEY_SPECS)
    if algorithm is None:
        raise null("WrappingAlgorithm")
    if key_spec is None:
        raise null("WrappingKeySpec")
    if algorithm == "SM2PKE" or key_spec == "SM2":
        raise errors.UnsupportedOperationException("SM2 wrapping is only offered in China Regions.")
    if algorithm == PKCS1_V1_5 and not service.allow_pkcs1_import:
        raise errors.UnsupportedOperationException(
            "RSAES_PKCS1_V1_5 wrapping is retired (as by AWS in 2023); use RSAES_OAEP_SHA_256 or "
            "RSA_AES_KEY_WRAP_SHA_256, or start the server with --allow-pkcs1-import."
        )
    service.check_usable(key, "GetParametersForImport", info)
    private_key = rsa.generate_private_key(public_exponent=65537, key_size=KEY_BITS[key_spec])
    private_der = private_key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public_der = private_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    token_id = os.urandom(TOKEN_ID_LEN).hex()
    now = service.now()
    record = ImportParameters(
        token_id=token_id,
        key_id=key.key_id,
        wrapping_algorithm=algorithm,
        wrapping_key_spec=key_spec,
        sealed_private_key=service.seal(private_der, import_key_aad(token_id)),
        creation_date=now,
        valid_to=now + PARAMETERS_LIFETIME,
    )
    service.store.add_import_parameters(record)
    info.extra = {"wrapping_algorithm": algorithm, "wrapping_key_spec": key_spec}
    return {
        "KeyId": key.arn,
        "ImportToken": bytes([TOKEN_VERSION]) + bytes.fromhex(token_id),
        "PublicKey": public_der,
        "ParametersValidTo": record.valid_to,
    }


def _expiry(params: dict[str, Any], now: datetime) -> tuple[str, datetime | None]:
    model = get_enum(params, "ExpirationModel", (EXPIRES, DOES_NOT_EXPIRE))
    valid_to = get_timestamp(params, "ValidTo")
    if model is None:
        model = EXPIRES if valid_to is not None else DOES_NOT_EXPIRE
    if model == EXPIRES and valid_to is None:
        raise errors.ValidationException("ValidTo is required when ExpirationModel is KEY_MATERIAL_EXPIRES.")
    if model == DOES_NOT_EXPIRE and valid_to is not None:
        raise errors.ValidationException(
            "ValidTo must be omitted when ExpirationModel is KEY_MATERIAL_DOES_NOT_EXPIRE."
        )
    if valid_to is not None and not now < valid_to <= now + MAX_VALID_TO:
        raise errors.ValidationException("ValidTo must be in the future and at most 365 days from now.")
    return model, valid_to


def _parameters(service: KeyService, key: KeyRecord, token: bytes, now: datetime) -> ImportParameters:
    if len(token) != 1 + TOKEN_ID_LEN or token[0] != TOKEN_VERSION:
        raise errors.InvalidImportTokenException("The import token is not valid.")
    record = service.store.get_import_parameters(token[1:].hex())
    if record is None or record.key_id != key.key_id:
        raise errors.InvalidImportTokenException(
            "The import token is not valid or belongs to another KMS key."
        )
    if record.valid_to <= now:
        raise errors.ExpiredImportTokenException(
            "The import token has expired; call GetParametersForImport for a new one."
        )
    return record


def import_key_material(service: KeyService, params: dict[str, Any], info: AuditInfo) -> dict[str, Any]:
    key = service.key_param(params, info, allow_alias=False)
    token = get_bytes(params, "ImportToken", 1, MAX_BLOB)
    wrapped = get_bytes(params, "EncryptedKeyMaterial", 1, MAX_BLOB)
    assert token is not None and wrapped is not None
    now = service.now()
    model, valid_to = _expiry(params, now)
    import_type = get_enum(params, "ImportType", ("NEW_KEY_MATERIAL", "EXISTING_KEY_MATERIAL"))
    get_str(params, "KeyMaterialDescription", max_len=256)
    wanted_id = get_str(params, "KeyMaterialId", min_len=64, max_len=64)
    service.check_usable(key, "ImportKeyMaterial", info)
    if import_type == "NEW_KEY_MATERIAL" and key.material_id is not None:
        raise errors.UnsupportedOperationException(
            "Importing new key material into a key that already has material (rotation of imported keys) "
            "is not supported."
        )
    record = _parameters(service, key, token, now)
    private_der = service.unseal(record.sealed_private_key, import_key_aad(record.token_id))
    private_key = serialization.load_der_private_key(private_der, password=None)
    assert isinstance(private_key, rsa.RSAPrivateKey)
    material = unwrap(record.wrapping_algorithm, private_key, wrapped)
    if len(material) != envelope.MATERIAL_LEN:
        raise errors.IncorrectKeyMaterialException("Symmetric key material must be 256 bits (32 bytes).")
    new_id = material_id(service, key.key_id, material)
    if (key.material_id is not None and new_id != key.material_id) or (wanted_id and wanted_id != new_id):
        raise errors.IncorrectKeyMaterialException(
            "The key material is not the material previously imported into this KMS key."
        )
    state = lifecycle.effective_state(key, now)
    has_material = state != PENDING_IMPORT and service.store.latest_key_version(key.key_id) is not None
    version = None
    if not has_material:
        version = KeyVersionRecord(
            key_id=key.key_id,
            version=1,
            creation_date=now,
            sealed_material=service.seal_material(key.key_id, 1, material),
        )
    if state == PENDING_IMPORT:
        key.state = ENABLED
    key.valid_to = valid_to
    key.expiration_model = model
    key.material_id = new_id
    service.store.import_key_material(key, version)
    info.key_version = 1
    info.extra = {
        "expiration_model": model,
        "valid_to": valid_to.isoformat() if valid_to else None,
        "key_material_id": new_id,
        "wrapping_algorithm": record.wrapping_algorithm,
    }
    return {"KeyId": key.arn, "KeyMaterialId": new_id}


def _drop_material(service: KeyService, key: KeyRecord) -> None:
    if key.state != PENDING_DELETION:
        key.state = PENDING_IMPORT
    key.valid_to = None
    key.expiration_model = None
    service.store.delete_key_material(key)


def delete_imported_key_material(
    service: KeyService, params: dict[str, Any], info: AuditInfo
) -> dict[str, Any]:
    key = service.key_param(params, info, allow_alias=False)
    wanted_id = get_str(params, "KeyMaterialId", min_len=64, max_len=64)
    service.check_usable(key, "DeleteImportedKeyMaterial", info)
    if wanted_id is not None and wanted_id != key.material_id:
        raise errors.NotFoundException(f"Key material {wanted_id} is not associated with {key.arn}.")
    if service.store.latest_key_version(key.key_id) is not None or key.state != PENDING_IMPORT:
        _drop_material(service, key)
    result: dict[str, Any] = {"KeyId": key.arn}
    if key.material_id:
        result["KeyMaterialId"] = key.material_id
    return result


def expire(service: KeyService, key_id: str, now: datetime) -> bool:
    """Delete the material of ``key_id`` if its ValidTo has passed; audit it as
    ``DeleteExpiredKeyMaterial`` (the name CloudTrail uses). True if material was deleted."""
    with service.store.transaction():
        key = service.store.get_key(key_id)
        if key is None or not lifecycle.material_expired(key, now):
            return False
        valid_to = key.valid_to
        with service.intent_scope("DeleteExpiredKeyMaterial", key.arn) as request_id:
            _drop_material(service, key)
    service.audit_event(
        "DeleteExpiredKeyMaterial",
        key.arn,
        key_version=1,
        details={"valid_to": valid_to.isoformat() if valid_to else None, "key_material_id": key.material_id},
        request_id=request_id,
    )
    return True


HANDLERS = {
    "GetParametersForImport": get_parameters_for_import,
    "ImportKeyMaterial": import_key_material,
    "DeleteImportedKeyMaterial": delete_imported_key_material,
}
