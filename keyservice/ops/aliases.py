"""Alias operations: CreateAlias, UpdateAlias, DeleteAlias, ListAliases.

Each needs permission on the key(s) involved (kms:CreateAlias on the target; kms:UpdateAlias on the
old and the new target; kms:DeleteAlias on the target); ListAliases is authorized by identity
policies alone.

``alias/aws/`` is reserved for service-managed keys (``default_keys.py``): customers cannot create,
repoint or delete such aliases, nor point their own aliases at service-managed keys
(NotAuthorizedException, as AWS answers).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from keyservice import errors
from keyservice.params import (
    ALIAS_NAME,
    ALIAS_PATTERN,
    DEFAULT_LIST_LIMIT,
    MAX_KEY_ID,
    RESERVED_ALIAS_PREFIX,
    AuditInfo,
    constraint_failed,
    decode_marker,
    encode_marker,
    get_int,
    get_str,
)
from keyservice.store.model import (
    MANAGER_CUSTOMER,
    AliasRecord,
    KeyRecord,
)

if TYPE_CHECKING:
    from keyservice.service import KeyService


def _alias_name(service: KeyService, params: Mapping[str, Any], info: AuditInfo) -> str:
    name = get_str(params, "AliasName", required=True, min_len=1, max_len=256)
    assert name is not None
    info.alias_name = name
    if not ALIAS_PATTERN.match(name):
        raise constraint_failed("AliasName", "satisfy regular expression pattern: ^[a-zA-Z0-9:/_-]+$", name)
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


def _target_key(service: KeyService, params: Mapping[str, Any], info: AuditInfo, operation: str) -> KeyRecord:
    target = get_str(params, "TargetKeyId", required=True, min_len=1, max_len=MAX_KEY_ID)
    assert target is not None
    if target.startswith("alias/") or (target.startswith("arn:") and ":alias/" in target):
        info.requested_key_id = target
        raise errors.ValidationException("Aliases must refer to keys, not to other aliases.")
    alias_name = info.alias_name
    key = service.find_key(target, info, allow_alias=False)
    info.alias_name = alias_name
    if key.key_manager != MANAGER_CUSTOMER:
        raise errors.NotAuthorizedException("Aliases of service-managed keys cannot be changed.")
    service.check_usable(key, operation, info)
    return key


def create_alias(service: KeyService, params: dict[str, Any], info: AuditInfo) -> dict[str, Any]:
    name = _alias_name(service, params, info)
    key = _target_key(service, params, info, "CreateAlias")
    now = service.clock.now()
    try:
        service.store.create_alias(
            AliasRecord(name=name, target_key_id=key.key_id, creation_date=now, last_updated_date=now)
        )
    except errors.AlreadyExistsException:
        raise errors.AlreadyExistsException(
            f"An alias with the name {service.alias_arn(name)} already exists"
        ) from None
    return {}


def _alias_not_found(service: KeyService, name: str) -> errors.NotFoundException:
    return errors.NotFoundException(f"Alias {service.alias_arn(name)} is not found.")


def _existing_alias(service: KeyService, name: str) -> AliasRecord:
    alias = service.store.get_alias(name)
    if alias is None:
        raise _alias_not_found(service, name)
    return alias


def update_alias(service: KeyService, params: dict[str, Any], info: AuditInfo) -> dict[str, Any]:
    name = _alias_name(service, params, info)
    alias = _existing_alias(service, name)
    current = service.load_key(alias.target_key_id)
    if current is not None:  # AWS needs kms:UpdateAlias on the old and on the new target
        service.authorize(current, "UpdateAlias", info)
    key = _target_key(service, params, info, "UpdateAlias")
    service.store.update_alias(name, key.key_id, service.clock.now())
    return {}


def delete_alias(service: KeyService, params: dict[str, Any], info: AuditInfo) -> dict[str, Any]:
    name = _alias_name(service, params, info)
    alias = _existing_alias(service, name)
    info.key_arn = service.key_arn(alias.target_key_id)
    key = service.load_key(alias.target_key_id)
    if key is None:
        raise _alias_not_found(service, name)
    service.check_usable(key, "DeleteAlias", info)
    service.store.delete_alias(name)
    return {}


def list_aliases(service: KeyService, params: dict[str, Any], info: AuditInfo) -> dict[str, Any]:
    key_id: str | None = None
    if params.get("KeyId") is not None:
        key_id = service.key_param(params, info, allow_alias=False).key_id
    limit = get_int(params, "Limit", 1, 1000) or DEFAULT_LIST_LIMIT
    after = decode_marker("aliases", get_str(params, "Marker", min_len=1, max_len=1024))
    aliases = service.store.list_aliases(key_id=key_id, after=after, limit=limit + 1)
    truncated = len(aliases) > limit
    aliases = aliases[:limit]
    result: dict[str, Any] = {
        "Aliases": [
            {
                "AliasName": a.name,
                "AliasArn": service.alias_arn(a.name),
                "TargetKeyId": a.target_key_id,
                "CreationDate": a.creation_date,
                "LastUpdatedDate": a.last_updated_date,
            }
            for a in aliases
        ],
        "Truncated": truncated,
    }
    if truncated:
        result["NextMarker"] = encode_marker("aliases", aliases[-1].name)
    return result


HANDLERS = {
    "CreateAlias": create_alias,
    "UpdateAlias": update_alias,
    "DeleteAlias": delete_alias,
    "ListAliases": list_aliases,
}
