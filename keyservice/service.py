"""The key service façade: validate -> resolve the key -> check its state -> act -> audit.

No HTTP here. The HTTP layer verifies SigV4 (using the secret from ``authenticate``), decodes
JSON and base64, and calls ``call(operation, params, ctx)``; binary fields arrive and leave as
``bytes`` and timestamps leave as ``datetime``. Every ``call`` appends exactly one audit record,
success or error, before it returns or raises; if the record cannot be written the caller gets
``KMSInternalException`` instead of the result (fail closed).

Policy evaluation (K4/K5) is a later issue: today any authenticated principal of this account
may do everything. Key material is unsealed only inside the operation that needs it; there is
no cache.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import re
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from keyservice import envelope, errors, lifecycle, rootkey
from keyservice.audit import AuditLog, build_record
from keyservice.clock import Clock
from keyservice.context import Principal, RequestContext
from keyservice.model import (
    DISABLED,
    ENABLED,
    ENCRYPTION_ALGORITHM,
    KEY_SPEC,
    KEY_USAGE,
    MANAGER_CUSTOMER,
    ORIGIN_AWS_KMS,
    ORIGIN_EXTERNAL,
    AliasRecord,
    KeyRecord,
    KeyVersionRecord,
)
from keyservice.store import Store, material_aad, secret_aad

log = logging.getLogger(__name__)

DEFAULT_MAX_KEYS = 1000
MATERIAL_LEN = 32
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
class _AuditInfo:
    """What the current request touched, collected as the handler goes, for its audit record."""

    key_arn: str | None = None
    key_version: int | None = None
    requested_key_id: str | None = None
    alias_name: str | None = None
    encryption_context: dict[str, str] | None = None


Handler = Callable[[dict[str, Any], _AuditInfo], dict[str, Any]]


# --------------------------------------------------------------------------- parameter checks


def _field(name: str) -> str:
    """AWS reports members in lowerCamelCase: KeyId -> keyId."""
    return name[:1].lower() + name[1:]


def _null(name: str) -> errors.KMSError:
    return errors.ValidationException(
        f"1 validation error detected: Value null at '{_field(name)}' failed to satisfy constraint: "
        "Member must not be null"
    )


def _get_str(
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
            raise _null(name)
        return None
    if not isinstance(value, str):
        raise errors.ValidationException(f"{name} must be a string")
    if len(value) < min_len:
        raise errors.ValidationException(
            f"1 validation error detected: Value at '{_field(name)}' failed to satisfy constraint: "
            f"Member must have length greater than or equal to {min_len}"
        )
    if max_len is not None and len(value) > max_len:
        raise errors.ValidationException(
            f"1 validation error detected: Value at '{_field(name)}' failed to satisfy constraint: "
            f"Member must have length less than or equal to {max_len}"
        )
    return value


def _get_int(params: Mapping[str, Any], name: str, lo: int, hi: int, *, required: bool = False) -> int | None:
    value = params.get(name)
    if value is None:
        if required:
            raise _null(name)
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise errors.ValidationException(f"{name} must be an integer")
    if not lo <= value <= hi:
        bound = f"greater than or equal to {lo}" if value < lo else f"less than or equal to {hi}"
        raise errors.ValidationException(
            f"1 validation error detected: Value '{value}' at '{_field(name)}' failed to satisfy constraint: "
            f"Member must have value {bound}"
        )
    return value


def _get_bytes(
    params: Mapping[str, Any], name: str, lo: int, hi: int, *, required: bool = True
) -> bytes | None:
    value = params.get(name)
    if value is None:
        if required:
            raise _null(name)
        return None
    if not isinstance(value, bytes | bytearray):
        raise errors.ValidationException(f"{name} must be binary data")
    if not lo <= len(value) <= hi:
        raise errors.ValidationException(
            f"1 validation error detected: Value at '{_field(name)}' failed to satisfy constraint: "
            f"Member must have length between {lo} and {hi} bytes"
        )
    return bytes(value)


def _get_bool(params: Mapping[str, Any], name: str) -> bool:
    value = params.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise errors.ValidationException(f"{name} must be a boolean")
    return value


def _get_enum(params: Mapping[str, Any], name: str, allowed: tuple[str, ...]) -> str | None:
    value = _get_str(params, name)
    if value is not None and value not in allowed:
        raise errors.ValidationException(
            f"1 validation error detected: Value '{value}' at '{_field(name)}' failed to satisfy constraint: "
            f"Member must satisfy enum value set: [{', '.join(allowed)}]"
        )
    return value


def _check_grant_tokens(params: Mapping[str, Any]) -> None:
    tokens = params.get("GrantTokens")
    if tokens is None:
        return
    if not isinstance(tokens, list) or len(tokens) > 10 or not all(isinstance(t, str) for t in tokens):
        raise errors.ValidationException("GrantTokens must be a list of at most 10 strings")


def _encode_marker(kind: str, last: str) -> str:
    return base64.urlsafe_b64encode(f"{kind}:{last}".encode()).decode()


def _decode_marker(kind: str, marker: str | None) -> str | None:
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


def _canonical_uuid(text: str) -> str | None:
    try:
        value = uuid.UUID(text)
    except ValueError:
        return None
    return str(value) if str(value) == text.lower() else None


# --------------------------------------------------------------------------- the service


class KeyService:
    """The key service core, shared by every request thread."""

    def __init__(
        self,
        store: Store,
        audit_log: AuditLog,
        *,
        region: str,
        account_id: str,
        clock: Clock,
        root_key: bytes,
        max_keys: int = DEFAULT_MAX_KEYS,
    ) -> None:
        if len(root_key) != rootkey.ROOT_KEY_LEN:
            raise ValueError("the root key must be 32 bytes")
        self.store = store
        self.audit_log = audit_log
        self.region = region
        self.account_id = account_id
        self.clock = clock
        self.max_keys = max_keys
        self._root_key = bytes(root_key)
        self._handlers: dict[str, Handler] = {
            "CreateKey": self._create_key,
            "DescribeKey": self._describe_key,
            "ListKeys": self._list_keys,
            "UpdateKeyDescription": self._update_key_description,
            "EnableKey": self._enable_key,
            "DisableKey": self._disable_key,
            "CreateAlias": self._create_alias,
            "UpdateAlias": self._update_alias,
            "DeleteAlias": self._delete_alias,
            "ListAliases": self._list_aliases,
            "Encrypt": self._encrypt,
            "Decrypt": self._decrypt,
            "GenerateDataKey": self._generate_data_key,
            "GenerateDataKeyWithoutPlaintext": self._generate_data_key_without_plaintext,
            "GenerateRandom": self._generate_random,
        }

    @property
    def operations(self) -> frozenset[str]:
        """The AWS operation names ``call`` implements."""
        return frozenset(self._handlers)

    def close(self) -> None:
        self.store.close()
        self.audit_log.close()

    # ----------------------------------------------------------------- entry points

    def authenticate(self, access_key_id: str) -> tuple[str, Principal]:
        """The secret access key and principal of ``access_key_id``, or UnrecognizedClientException."""
        cred = self.store.get_credential(access_key_id) if access_key_id else None
        if cred is None or not cred.enabled:
            raise errors.UnrecognizedClientException("The security token included in the request is invalid.")
        try:
            secret = rootkey.unseal(self._root_key, cred.sealed_secret, secret_aad(access_key_id)).decode()
        except rootkey.UnsealError:
            log.error("credential %s does not unseal under the root key", access_key_id)
            raise errors.KMSInternalException("An internal error occurred.") from None
        return secret, Principal(
            account_id=cred.account_id, arn=cred.principal_arn, access_key_id=access_key_id
        )

    def call(self, operation: str, params: dict[str, Any], ctx: RequestContext) -> dict[str, Any]:
        """Run one AWS KMS operation for an authenticated caller and audit it."""
        info = _AuditInfo()
        try:
            handler = self._handlers.get(operation)
            if handler is None:
                raise errors.UnknownOperationException(f"Operation {operation[:128]!r} is not supported.")
            self._check_principal(ctx)
            if not isinstance(params, dict):
                raise errors.SerializationException("The request body must be a JSON object.")
            result = handler(params, info)
        except errors.KMSError as exc:
            self._audit(operation, ctx, info, exc)
            raise
        except Exception as exc:
            log.exception("internal error in %s", operation)
            internal = errors.KMSInternalException("An internal error occurred.")
            self._audit(operation, ctx, info, internal)
            raise internal from exc
        self._audit(operation, ctx, info, None)
        return result

    def record_refused(
        self,
        operation: str,
        ctx: RequestContext,
        error: errors.KMSError,
        *,
        access_key_id: str | None = None,
    ) -> None:
        """Audit a request refused before ``call`` (bad signature, unknown access key, bad body).

        ``access_key_id``: the key id the request claimed, recorded when ``ctx.principal`` is None.
        """
        self._audit(operation or "", ctx, _AuditInfo(), error, claimed_access_key_id=access_key_id)

    # ----------------------------------------------------------------- helpers

    def _audit(
        self,
        operation: str,
        ctx: RequestContext,
        info: _AuditInfo,
        error: errors.KMSError | None,
        *,
        claimed_access_key_id: str | None = None,
    ) -> None:
        record = build_record(
            when=self.clock.now(),
            ctx=ctx,
            operation=operation[:128],
            error=error,
            key_arn=info.key_arn,
            key_version=info.key_version,
            requested_key_id=info.requested_key_id[:MAX_KEY_ID] if info.requested_key_id else None,
            alias_name=info.alias_name,
            encryption_context=info.encryption_context,
            claimed_access_key_id=claimed_access_key_id[:128] if claimed_access_key_id else None,
        )
        self.audit_log.append(record)

    def _check_principal(self, ctx: RequestContext) -> None:
        principal = ctx.principal
        if principal is None:
            raise errors.AccessDeniedException("The request is not authenticated.")
        if principal.account_id != self.account_id:
            raise errors.AccessDeniedException(
                f"{principal.arn} is not authorized to access keys of account {self.account_id}."
            )

    def key_arn(self, key_id: str) -> str:
        return f"arn:aws:kms:{self.region}:{self.account_id}:key/{key_id}"

    def alias_arn(self, alias_name: str) -> str:
        return f"arn:aws:kms:{self.region}:{self.account_id}:{alias_name}"

    def _find_key(self, ident: str, info: _AuditInfo, *, allow_alias: bool) -> KeyRecord:
        """Resolve a key identifier (id, ARN, and if allowed alias name / alias ARN) to a key."""
        info.requested_key_id = ident
        resource = ident
        if ident.startswith("arn:"):
            parts = ident.split(":", 5)
            if len(parts) != 6 or parts[1] != "aws" or parts[2] != "kms":
                raise errors.NotFoundException(f"Invalid keyId '{ident}'")
            if parts[3] != self.region or parts[4] != self.account_id:
                raise errors.NotFoundException(
                    f"'{ident}' names a key of another region or account; this service is "
                    f"{self.region}/{self.account_id}"
                )
            resource = parts[5]
            if resource.startswith("key/"):
                resource = resource[4:]
            elif not resource.startswith("alias/"):
                raise errors.NotFoundException(f"Invalid keyId '{ident}'")
        if resource.startswith("alias/"):
            if not allow_alias:
                raise errors.NotFoundException(
                    f"Invalid keyId '{ident}': this operation takes a key id or key ARN, not an alias"
                )
            alias = self.store.get_alias(resource)
            info.alias_name = resource
            if alias is None:
                raise errors.NotFoundException(f"Alias {self.alias_arn(resource)} is not found.")
            resource = alias.target_key_id
        key_id = _canonical_uuid(resource)
        if key_id is None:
            raise errors.NotFoundException(f"Invalid keyId '{ident}'")
        key = self.store.get_key(key_id)
        if key is None:
            raise errors.NotFoundException(f"Key '{self.key_arn(key_id)}' does not exist")
        info.key_arn = key.arn
        return key

    def _key_param(self, params: Mapping[str, Any], info: _AuditInfo, *, allow_alias: bool) -> KeyRecord:
        ident = _get_str(params, "KeyId", required=True, min_len=1, max_len=MAX_KEY_ID)
        assert ident is not None
        return self._find_key(ident, info, allow_alias=allow_alias)

    def _metadata(self, key: KeyRecord) -> dict[str, Any]:
        meta: dict[str, Any] = {
            "AWSAccountId": key.account_id,
            "KeyId": key.key_id,
            "Arn": key.arn,
            "CreationDate": key.creation_date,
            "Enabled": key.enabled,
            "Description": key.description,
            "KeyUsage": key.key_usage,
            "KeyState": key.state,
            "Origin": key.origin,
            "KeyManager": key.key_manager,
            "KeySpec": key.key_spec,
            "CustomerMasterKeySpec": key.key_spec,
            "EncryptionAlgorithms": [ENCRYPTION_ALGORITHM],
            "MultiRegion": False,
        }
        if key.deletion_date is not None:
            meta["DeletionDate"] = key.deletion_date
        if key.origin == ORIGIN_EXTERNAL:
            meta["ExpirationModel"] = (
                "KEY_MATERIAL_EXPIRES" if key.valid_to is not None else "KEY_MATERIAL_DOES_NOT_EXPIRE"
            )
            if key.valid_to is not None:
                meta["ValidTo"] = key.valid_to
        return meta

    def _check_usable(self, key: KeyRecord, operation: str) -> None:
        lifecycle.check_usable(key, operation, self.clock.now())

    def _material(self, version: KeyVersionRecord) -> bytes:
        try:
            return rootkey.unseal(
                self._root_key, version.sealed_material, material_aad(version.key_id, version.version)
            )
        except rootkey.UnsealError:
            log.error("key material of %s v%d does not unseal", version.key_id, version.version)
            raise errors.KMSInternalException("An internal error occurred.") from None

    def _latest(self, key: KeyRecord, info: _AuditInfo) -> tuple[KeyVersionRecord, bytes]:
        version = self.store.latest_key_version(key.key_id)
        if version is None:
            raise errors.KMSInvalidStateException(f"{key.arn} has no key material.")
        info.key_version = version.version
        return version, self._material(version)

    def _context(
        self, params: Mapping[str, Any], info: _AuditInfo, name: str = "EncryptionContext"
    ) -> dict[str, str]:
        context = envelope.validate_context(params.get(name), _field(name))
        info.encryption_context = context
        return context

    @staticmethod
    def _check_algorithm(params: Mapping[str, Any]) -> None:
        algorithm = _get_enum(params, "EncryptionAlgorithm", ENCRYPTION_ALGORITHMS)
        if algorithm not in (None, ENCRYPTION_ALGORITHM):
            raise errors.InvalidKeyUsageException(
                f"Encryption algorithm {algorithm} is not supported by symmetric keys; use SYMMETRIC_DEFAULT."
            )

    @staticmethod
    def _dry_run(params: Mapping[str, Any]) -> None:
        if _get_bool(params, "DryRun"):
            raise errors.DryRunOperationException(
                "The request would have succeeded, but the DryRun flag is set."
            )

    @staticmethod
    def _no_recipient(params: Mapping[str, Any]) -> None:
        if params.get("Recipient") is not None:
            raise errors.UnsupportedOperationException(
                "Recipient (Nitro Enclaves attestation) is not supported."
            )

    # ----------------------------------------------------------------- keys

    def _create_key(self, params: dict[str, Any], info: _AuditInfo) -> dict[str, Any]:
        description = _get_str(params, "Description", max_len=MAX_DESCRIPTION) or ""
        usage = _get_enum(params, "KeyUsage", KEY_USAGES) or KEY_USAGE
        key_spec = _get_enum(params, "KeySpec", KEY_SPECS)
        cmk_spec = _get_enum(params, "CustomerMasterKeySpec", KEY_SPECS)
        if key_spec is not None and cmk_spec is not None:
            raise errors.ValidationException("Specify KeySpec or CustomerMasterKeySpec, not both.")
        spec = key_spec or cmk_spec or KEY_SPEC
        origin = _get_enum(params, "Origin", ORIGINS) or ORIGIN_AWS_KMS
        policy = _get_str(params, "Policy", min_len=1, max_len=MAX_POLICY)
        _get_bool(params, "BypassPolicyLockoutSafetyCheck")
        multi_region = _get_bool(params, "MultiRegion")
        tags = self._tags(params.get("Tags"))
        if usage != KEY_USAGE:
            raise errors.UnsupportedOperationException(
                f"KeyUsage {usage} is not supported; this service offers ENCRYPT_DECRYPT keys only."
            )
        if spec != KEY_SPEC:
            raise errors.UnsupportedOperationException(
                f"KeySpec {spec} is not supported; this service offers SYMMETRIC_DEFAULT keys only."
            )
        if origin == ORIGIN_EXTERNAL:
            raise errors.UnsupportedOperationException(
                "Origin EXTERNAL (imported key material) is not supported yet; use AWS_KMS."
            )
        if origin != ORIGIN_AWS_KMS:
            raise errors.UnsupportedOperationException(f"Origin {origin} is not supported; use AWS_KMS.")
        if multi_region:
            raise errors.UnsupportedOperationException("Multi-Region keys are not supported.")
        if params.get("CustomKeyStoreId") is not None or params.get("XksKeyId") is not None:
            raise errors.UnsupportedOperationException("Custom key stores are not supported.")
        if policy is not None:
            try:
                json.loads(policy)
            except ValueError:
                raise errors.MalformedPolicyDocumentException("The key policy is not valid JSON.") from None

        now = self.clock.now()
        key_id = str(uuid.uuid4())
        key = KeyRecord(
            key_id=key_id,
            arn=self.key_arn(key_id),
            account_id=self.account_id,
            region=self.region,
            description=description,
            state=ENABLED,
            origin=origin,
            key_manager=MANAGER_CUSTOMER,
            creation_date=now,
            key_usage=usage,
            key_spec=spec,
            policy=policy,
            tags=tags,
        )
        sealed = rootkey.seal(self._root_key, os.urandom(MATERIAL_LEN), material_aad(key_id, 1))
        self.store.create_key(
            key,
            KeyVersionRecord(key_id=key_id, version=1, creation_date=now, sealed_material=sealed),
            max_customer_keys=self.max_keys,
        )
        info.key_arn = key.arn
        info.key_version = 1
        return {"KeyMetadata": self._metadata(key)}

    @staticmethod
    def _tags(tags: object) -> list[dict[str, str]]:
        if tags is None:
            return []
        if not isinstance(tags, list) or len(tags) > 50:
            raise errors.TagException("Tags must be a list of at most 50 {TagKey, TagValue} objects.")
        seen: set[str] = set()
        result: list[dict[str, str]] = []
        for tag in tags:
            if not isinstance(tag, dict):
                raise errors.TagException("Each tag must be an object with TagKey and TagValue.")
            tag_key = _get_str(tag, "TagKey", required=True, min_len=1, max_len=128)
            tag_value = _get_str(tag, "TagValue", required=True, max_len=256)
            assert tag_key is not None and tag_value is not None
            if tag_key.startswith("aws:"):
                raise errors.TagException("Tag keys beginning with 'aws:' are reserved.")
            if tag_key in seen:
                raise errors.TagException(f"Duplicate tag key {tag_key!r}.")
            seen.add(tag_key)
            result.append({"TagKey": tag_key, "TagValue": tag_value})
        return result

    def _describe_key(self, params: dict[str, Any], info: _AuditInfo) -> dict[str, Any]:
        _check_grant_tokens(params)
        key = self._key_param(params, info, allow_alias=True)
        self._check_usable(key, "DescribeKey")
        return {"KeyMetadata": self._metadata(key)}

    def _list_keys(self, params: dict[str, Any], info: _AuditInfo) -> dict[str, Any]:
        limit = _get_int(params, "Limit", 1, 1000) or DEFAULT_LIST_LIMIT
        after = _decode_marker("keys", _get_str(params, "Marker", min_len=1, max_len=1024))
        keys = self.store.list_keys(after=after, limit=limit + 1)
        truncated = len(keys) > limit
        keys = keys[:limit]
        result: dict[str, Any] = {
            "Keys": [{"KeyId": k.key_id, "KeyArn": k.arn} for k in keys],
            "Truncated": truncated,
        }
        if truncated:
            result["NextMarker"] = _encode_marker("keys", keys[-1].key_id)
        return result

    def _update_key_description(self, params: dict[str, Any], info: _AuditInfo) -> dict[str, Any]:
        key = self._key_param(params, info, allow_alias=False)
        description = _get_str(params, "Description", required=True, max_len=MAX_DESCRIPTION)
        assert description is not None
        self._check_usable(key, "UpdateKeyDescription")
        key.description = description
        self.store.update_key(key)
        return {}

    def _enable_key(self, params: dict[str, Any], info: _AuditInfo) -> dict[str, Any]:
        key = self._key_param(params, info, allow_alias=False)
        self._check_usable(key, "EnableKey")
        if key.state != ENABLED:
            key.state = ENABLED
            self.store.update_key(key)
        return {}

    def _disable_key(self, params: dict[str, Any], info: _AuditInfo) -> dict[str, Any]:
        key = self._key_param(params, info, allow_alias=False)
        self._check_usable(key, "DisableKey")
        if key.state != DISABLED:
            key.state = DISABLED
            self.store.update_key(key)
        return {}

    # ----------------------------------------------------------------- aliases

    def _alias_name(self, params: Mapping[str, Any], info: _AuditInfo) -> str:
        name = _get_str(params, "AliasName", required=True, min_len=1, max_len=256)
        assert name is not None
        info.alias_name = name
        if not ALIAS_PATTERN.match(name):
            raise errors.ValidationException(
                f"1 validation error detected: Value '{name}' at 'aliasName' failed to satisfy constraint: "
                "Member must satisfy regular expression pattern: ^[a-zA-Z0-9:/_-]+$"
            )
        if not ALIAS_NAME.match(name):
            raise errors.InvalidAliasNameException(
                f"Alias name {name!r} is not valid: it must start with 'alias/' followed by letters, "
                "digits, '/', '_' or '-'."
            )
        if name.startswith(RESERVED_ALIAS_PREFIX):
            raise errors.NotAuthorizedException(
                "The alias/aws/ prefix is reserved for keys managed by the service."
            )
        return name

    def _target_key(self, params: Mapping[str, Any], info: _AuditInfo, operation: str) -> KeyRecord:
        target = _get_str(params, "TargetKeyId", required=True, min_len=1, max_len=MAX_KEY_ID)
        assert target is not None
        if target.startswith("alias/") or (target.startswith("arn:") and ":alias/" in target):
            info.requested_key_id = target
            raise errors.ValidationException("Aliases must refer to keys, not to other aliases.")
        alias_name = info.alias_name
        key = self._find_key(target, info, allow_alias=False)
        info.alias_name = alias_name
        if key.key_manager != MANAGER_CUSTOMER:
            raise errors.NotAuthorizedException("Aliases of service-managed keys cannot be changed.")
        self._check_usable(key, operation)
        return key

    def _create_alias(self, params: dict[str, Any], info: _AuditInfo) -> dict[str, Any]:
        name = self._alias_name(params, info)
        key = self._target_key(params, info, "CreateAlias")
        now = self.clock.now()
        try:
            self.store.create_alias(
                AliasRecord(name=name, target_key_id=key.key_id, creation_date=now, last_updated_date=now)
            )
        except errors.AlreadyExistsException:
            raise errors.AlreadyExistsException(
                f"An alias with the name {self.alias_arn(name)} already exists"
            ) from None
        return {}

    def _update_alias(self, params: dict[str, Any], info: _AuditInfo) -> dict[str, Any]:
        name = self._alias_name(params, info)
        if self.store.get_alias(name) is None:
            raise errors.NotFoundException(f"Alias {self.alias_arn(name)} is not found.")
        key = self._target_key(params, info, "UpdateAlias")
        self.store.update_alias(name, key.key_id, self.clock.now())
        return {}

    def _delete_alias(self, params: dict[str, Any], info: _AuditInfo) -> dict[str, Any]:
        name = self._alias_name(params, info)
        alias = self.store.get_alias(name)
        if alias is None:
            raise errors.NotFoundException(f"Alias {self.alias_arn(name)} is not found.")
        info.key_arn = self.key_arn(alias.target_key_id)
        self.store.delete_alias(name)
        return {}

    def _list_aliases(self, params: dict[str, Any], info: _AuditInfo) -> dict[str, Any]:
        key_id: str | None = None
        if params.get("KeyId") is not None:
            key_id = self._key_param(params, info, allow_alias=False).key_id
        limit = _get_int(params, "Limit", 1, 1000) or DEFAULT_LIST_LIMIT
        after = _decode_marker("aliases", _get_str(params, "Marker", min_len=1, max_len=1024))
        aliases = self.store.list_aliases(key_id=key_id, after=after, limit=limit + 1)
        truncated = len(aliases) > limit
        aliases = aliases[:limit]
        result: dict[str, Any] = {
            "Aliases": [
                {
                    "AliasName": a.name,
                    "AliasArn": self.alias_arn(a.name),
                    "TargetKeyId": a.target_key_id,
                    "CreationDate": a.creation_date,
                    "LastUpdatedDate": a.last_updated_date,
                }
                for a in aliases
            ],
            "Truncated": truncated,
        }
        if truncated:
            result["NextMarker"] = _encode_marker("aliases", aliases[-1].name)
        return result

    # ----------------------------------------------------------------- crypto

    def _encrypt(self, params: dict[str, Any], info: _AuditInfo) -> dict[str, Any]:
        context = self._context(params, info)
        key = self._key_param(params, info, allow_alias=True)
        plaintext = _get_bytes(params, "Plaintext", 1, MAX_PLAINTEXT)
        assert plaintext is not None
        _check_grant_tokens(params)
        self._check_algorithm(params)
        self._check_usable(key, "Encrypt")
        self._dry_run(params)
        version, material = self._latest(key, info)
        blob = envelope.seal_blob(material, key.key_id, version.version, plaintext, context)
        return {"CiphertextBlob": blob, "KeyId": key.arn, "EncryptionAlgorithm": ENCRYPTION_ALGORITHM}

    def _decrypt(self, params: dict[str, Any], info: _AuditInfo) -> dict[str, Any]:
        context = self._context(params, info)
        blob = _get_bytes(params, "CiphertextBlob", 1, MAX_CIPHERTEXT)
        assert blob is not None
        _check_grant_tokens(params)
        self._check_algorithm(params)
        self._no_recipient(params)
        wanted: KeyRecord | None = None
        if params.get("KeyId") is not None:
            wanted = self._key_param(params, info, allow_alias=True)
        parsed = envelope.parse_blob(blob)
        info.key_arn = self.key_arn(parsed.key_id)
        info.key_version = parsed.key_version
        if wanted is not None and wanted.key_id != parsed.key_id:
            raise errors.IncorrectKeyException(
                "The key ID in the request does not identify the KMS key that encrypted the ciphertext."
            )
        key = self.store.get_key(parsed.key_id)
        if key is None:
            raise errors.InvalidCiphertextException(envelope._UNDETAILED)
        self._check_usable(key, "Decrypt")
        version = self.store.get_key_version(key.key_id, parsed.key_version)
        if version is None:
            raise errors.InvalidCiphertextException(envelope._UNDETAILED)
        self._dry_run(params)
        plaintext = envelope.open_blob(self._material(version), parsed, context)
        return {"Plaintext": plaintext, "KeyId": key.arn, "EncryptionAlgorithm": ENCRYPTION_ALGORITHM}

    def _data_key(
        self, params: dict[str, Any], info: _AuditInfo, operation: str
    ) -> tuple[dict[str, Any], bytes]:
        context = self._context(params, info)
        key = self._key_param(params, info, allow_alias=True)
        spec = _get_enum(params, "KeySpec", tuple(DATA_KEY_SPECS))
        number = _get_int(params, "NumberOfBytes", 1, 1024)
        if spec is None and number is None:
            raise errors.ValidationException("Specify either KeySpec or NumberOfBytes.")
        if spec is not None and number is not None:
            raise errors.ValidationException("Specify either KeySpec or NumberOfBytes, not both.")
        size = DATA_KEY_SPECS[spec] if spec is not None else number
        assert size is not None
        _check_grant_tokens(params)
        self._no_recipient(params)
        self._check_usable(key, operation)
        self._dry_run(params)
        version, material = self._latest(key, info)
        data_key = os.urandom(size)
        blob = envelope.seal_blob(material, key.key_id, version.version, data_key, context)
        return {"CiphertextBlob": blob, "KeyId": key.arn}, data_key

    def _generate_data_key(self, params: dict[str, Any], info: _AuditInfo) -> dict[str, Any]:
        result, data_key = self._data_key(params, info, "GenerateDataKey")
        result["Plaintext"] = data_key
        return result

    def _generate_data_key_without_plaintext(
        self, params: dict[str, Any], info: _AuditInfo
    ) -> dict[str, Any]:
        result, _ = self._data_key(params, info, "GenerateDataKeyWithoutPlaintext")
        return result

    def _generate_random(self, params: dict[str, Any], info: _AuditInfo) -> dict[str, Any]:
        number = _get_int(params, "NumberOfBytes", 1, 1024, required=True)
        assert number is not None
        if params.get("CustomKeyStoreId") is not None:
            raise errors.UnsupportedOperationException("Custom key stores are not supported.")
        self._no_recipient(params)
        return {"Plaintext": os.urandom(number)}
