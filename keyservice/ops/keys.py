"""Key operations: CreateKey, DescribeKey, ListKeys, UpdateKeyDescription, EnableKey, DisableKey.

CreateKey makes symmetric ENCRYPT_DECRYPT keys only: with fresh material (origin AWS_KMS, state
Enabled) or without (origin EXTERNAL, state PendingImport until ImportKeyMaterial). A key without a
``Policy`` gets AWS's default key policy (the account has full access). The quota on
customer keys is enforced by the store in the same transaction as the insert (SPEC K13).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from keyservice import errors
from keyservice.authz import policy as policy_module
from keyservice.ops import key_policies
from keyservice.params import (
    DEFAULT_LIST_LIMIT,
    KEY_SPECS,
    KEY_USAGES,
    MAX_DESCRIPTION,
    MAX_POLICY,
    ORIGINS,
    AuditInfo,
    check_grant_tokens,
    decode_marker,
    encode_marker,
    get_bool,
    get_enum,
    get_int,
    get_str,
)
from keyservice.store.model import (
    DISABLED,
    ENABLED,
    KEY_SPEC,
    KEY_USAGE,
    MANAGER_CUSTOMER,
    ORIGIN_AWS_KMS,
    ORIGIN_EXTERNAL,
    PENDING_IMPORT,
    KeyVersionRecord,
)

if TYPE_CHECKING:
    from keyservice.service import KeyService


def create_key(service: KeyService, params: dict[str, Any], info: AuditInfo) -> dict[str, Any]:
    description = get_str(params, "Description", max_len=MAX_DESCRIPTION) or ""
    usage = get_enum(params, "KeyUsage", KEY_USAGES) or KEY_USAGE
    key_spec = get_enum(params, "KeySpec", KEY_SPECS)
    cmk_spec = get_enum(params, "CustomerMasterKeySpec", KEY_SPECS)
    if key_spec is not None and cmk_spec is not None:
        raise errors.ValidationException("Specify KeySpec or CustomerMasterKeySpec, not both.")
    spec = key_spec or cmk_spec or KEY_SPEC
    origin = get_enum(params, "Origin", ORIGINS) or ORIGIN_AWS_KMS
    policy = get_str(params, "Policy", min_len=1, max_len=MAX_POLICY)
    bypass = get_bool(params, "BypassPolicyLockoutSafetyCheck")
    multi_region = get_bool(params, "MultiRegion")
    tags = parse_tags(params.get("Tags"))
    if usage != KEY_USAGE:
        raise errors.UnsupportedOperationException(
            f"KeyUsage {usage} is not supported; this service offers ENCRYPT_DECRYPT keys only."
        )
    if spec != KEY_SPEC:
        raise errors.UnsupportedOperationException(
            f"KeySpec {spec} is not supported; this service offers SYMMETRIC_DEFAULT keys only."
        )
    if origin not in (ORIGIN_AWS_KMS, ORIGIN_EXTERNAL):
        raise errors.UnsupportedOperationException(
            f"Origin {origin} is not supported; use AWS_KMS or EXTERNAL."
        )
    if multi_region:
        raise errors.UnsupportedOperationException("Multi-Region keys are not supported.")
    if params.get("CustomKeyStoreId") is not None or params.get("XksKeyId") is not None:
        raise errors.UnsupportedOperationException("Custom key stores are not supported.")
    now = service.clock.now()
    key = service.new_key_record(
        now,
        description=description,
        state=PENDING_IMPORT if origin == ORIGIN_EXTERNAL else ENABLED,
        origin=origin,
        key_manager=MANAGER_CUSTOMER,
        key_usage=usage,
        key_spec=spec,
        policy=policy_module.default_key_policy(service.account_id),
        tags=tags,
    )
    if policy is not None:  # parsed and lockout-checked against the key it will protect
        key.policy = key_policies.validate_new_policy(service, info, key, policy, bypass=bypass)
    first: KeyVersionRecord | None = None
    if origin == ORIGIN_AWS_KMS:  # imported keys get their material from ImportKeyMaterial
        first = service.fresh_version(key.key_id, 1, now)
        info.key_version = 1
    service.store.create_key(key, first, max_customer_keys=service.max_keys)
    info.key_arn = key.arn
    return {"KeyMetadata": service.metadata(key)}


def parse_tags(tags: object) -> list[dict[str, str]]:
    if tags is None:
        return []
    if not isinstance(tags, list) or len(tags) > 50:
        raise errors.TagException("Tags must be a list of at most 50 {TagKey, TagValue} objects.")
    seen: set[str] = set()
    result: list[dict[str, str]] = []
    for tag in tags:
        if not isinstance(tag, dict):
            raise errors.TagException("Each tag must be an object with TagKey and TagValue.")
        tag_key = get_str(tag, "TagKey", required=True, min_len=1, max_len=128)
        tag_value = get_str(tag, "TagValue", required=True, max_len=256)
        assert tag_key is not None and tag_value is not None
        if tag_key.startswith("aws:"):
            raise errors.TagException("Tag keys beginning with 'aws:' are reserved.")
        if tag_key in seen:
            raise errors.TagException(f"Duplicate tag key {tag_key!r}.")
        seen.add(tag_key)
        result.append({"TagKey": tag_key, "TagValue": tag_value})
    return result


def describe_key(service: KeyService, params: dict[str, Any], info: AuditInfo) -> dict[str, Any]:
    check_grant_tokens(params)
    key = service.key_param(params, info, allow_alias=True, create_default=True)
    service.check_usable(key, "DescribeKey", info)
    return {"KeyMetadata": service.metadata(key)}


def list_keys(service: KeyService, params: dict[str, Any], info: AuditInfo) -> dict[str, Any]:
    limit = get_int(params, "Limit", 1, 1000) or DEFAULT_LIST_LIMIT
    after = decode_marker("keys", get_str(params, "Marker", min_len=1, max_len=1024))
    keys = service.store.list_keys(after=after, limit=limit + 1)
    truncated = len(keys) > limit
    keys = keys[:limit]
    result: dict[str, Any] = {
        "Keys": [{"KeyId": k.key_id, "KeyArn": k.arn} for k in keys],
        "Truncated": truncated,
    }
    if truncated:
        result["NextMarker"] = encode_marker("keys", keys[-1].key_id)
    return result


def update_key_description(service: KeyService, params: dict[str, Any], info: AuditInfo) -> dict[str, Any]:
    key = service.key_param(params, info, allow_alias=False)
    description = get_str(params, "Description", required=True, max_len=MAX_DESCRIPTION)
    assert description is not None
    service.check_usable(key, "UpdateKeyDescription", info)
    key.description = description
    service.store.update_key(key)
    return {}


def _set_state(
    service: KeyService, params: dict[str, Any], info: AuditInfo, operation: str, state: str
) -> None:
    key = service.key_param(params, info, allow_alias=False)
    service.check_usable(key, operation, info)
    if key.state != state:
        key.state = state
        service.store.update_key(key)


def enable_key(service: KeyService, params: dict[str, Any], info: AuditInfo) -> dict[str, Any]:
    _set_state(service, params, info, "EnableKey", ENABLED)
    return {}


def disable_key(service: KeyService, params: dict[str, Any], info: AuditInfo) -> dict[str, Any]:
    _set_state(service, params, info, "DisableKey", DISABLED)
    return {}


HANDLERS = {
    "CreateKey": create_key,
    "DescribeKey": describe_key,
    "ListKeys": list_keys,
    "UpdateKeyDescription": update_key_description,
    "EnableKey": enable_key,
    "DisableKey": disable_key,
}
