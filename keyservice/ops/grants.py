"""Grants: CreateGrant, ListGrants, ListRetirableGrants, RetireGrant, RevokeGrant (SPEC K5).

A grant lets one principal (the grantee) perform some operations with one key, optionally only
under an encryption context constraint, without editing the key policy; ``policy.decide``
consults the caller's grants after the policies. Grants take effect when CreateGrant returns
(the store is read on every request), so grant tokens add no permission here; they are minted
and checked by ``authorize.py`` so that callers which pass them, as AWS SDK users do, work and
forged ones are refused.

Who may retire a grant follows AWS: its retiring principal, its grantee if the grant includes
RetireGrant, the account that issued it, or anyone a policy allows kms:RetireGrant on the key.
RevokeGrant is an ordinary permission (kms:RevokeGrant).
"""

from __future__ import annotations

import re
import secrets
from typing import TYPE_CHECKING, Any

from keyservice import envelope, errors
from keyservice.authz import authorize
from keyservice.params import (
    AuditInfo,
    constraint_failed,
    decode_marker,
    encode_marker,
    get_int,
    get_str,
    null,
    wire_name,
)
from keyservice.store.model import GrantRecord, KeyRecord

if TYPE_CHECKING:
    from keyservice.service import KeyService

GRANT_OPERATIONS = (
    "Decrypt", "Encrypt", "GenerateDataKey", "GenerateDataKeyWithoutPlaintext", "ReEncryptFrom",
    "ReEncryptTo", "Sign", "Verify", "GetPublicKey", "CreateGrant", "RetireGrant", "DescribeKey",
    "GenerateDataKeyPair", "GenerateDataKeyPairWithoutPlaintext", "GenerateMac", "VerifyMac",
    "DeriveSharedSecret",
)  # fmt: skip
# What a symmetric encryption key can do; the rest are for key types this service does not offer.
SYMMETRIC_GRANT_OPERATIONS = frozenset({
    "Decrypt", "Encrypt", "GenerateDataKey", "GenerateDataKeyWithoutPlaintext", "ReEncryptFrom",
    "ReEncryptTo", "CreateGrant", "RetireGrant", "DescribeKey", "GenerateDataKeyPair",
    "GenerateDataKeyPairWithoutPlaintext",
})  # fmt: skip
_PRINCIPAL = re.compile(r"^arn:aws:iam::\d{12}:(root|(user|role)/[\w+=,.@/-]+)$")
_GRANT_NAME = re.compile(r"^[a-zA-Z0-9:/_-]+$")
DEFAULT_LIMIT = 50


def _principal(params: dict[str, Any], name: str, *, required: bool) -> str | None:
    value = get_str(params, name, required=required, min_len=1, max_len=256)
    if value is not None and not _PRINCIPAL.match(value):
        raise errors.ValidationException(
            f"{wire_name(name)} {value[:256]!r} is not a valid principal: use an IAM ARN "
            "(arn:aws:iam::<account>:root, :user/<name> or :role/<name>)"
        )
    return value


def _operations(params: dict[str, Any]) -> tuple[str, ...]:
    value = params.get("Operations")
    if value is None:
        raise null("Operations")
    if not isinstance(value, list) or not value or len(value) > len(GRANT_OPERATIONS):
        raise errors.ValidationException("Operations must be a non-empty list of grant operations")
    for op in value:
        if op not in GRANT_OPERATIONS:
            raise constraint_failed(
                "Operations", f"satisfy enum value set: [{', '.join(GRANT_OPERATIONS)}]", str(op)[:64]
            )
        if op not in SYMMETRIC_GRANT_OPERATIONS:
            raise errors.ValidationException(
                f"Grant operation {op} is not valid for a symmetric encryption key"
            )
    return tuple(dict.fromkeys(value))  # de-duplicated, in order


def _constraints(params: dict[str, Any]) -> tuple[dict[str, str] | None, dict[str, str] | None]:
    """(EncryptionContextSubset, EncryptionContextEquals); at most one of them."""
    value = params.get("Constraints")
    if value is None:
        return None, None
    if not isinstance(value, dict) or set(value) - {"EncryptionContextSubset", "EncryptionContextEquals"}:
        raise errors.ValidationException(
            "Constraints must be an object with EncryptionContextSubset or EncryptionContextEquals"
        )
    subset = value.get("EncryptionContextSubset")
    equals = value.get("EncryptionContextEquals")
    if subset is not None and equals is not None:
        raise errors.ValidationException(
            "Specify either EncryptionContextSubset or EncryptionContextEquals in Constraints, not both"
        )
    subset = envelope.validate_context(subset, "encryptionContextSubset") if subset is not None else None
    equals = envelope.validate_context(equals, "encryptionContextEquals") if equals is not None else None
    return subset or None, equals or None


def _entry(service: KeyService, grant: GrantRecord) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "KeyId": service.key_arn(grant.key_id),
        "GrantId": grant.grant_id,
        "CreationDate": grant.creation_date,
        "GranteePrincipal": grant.grantee,
        "IssuingAccount": f"arn:aws:iam::{grant.issuing_account}:root",
        "Operations": list(grant.operations),
    }
    if grant.name:
        entry["Name"] = grant.name
    if grant.retiring_principal:
        entry["RetiringPrincipal"] = grant.retiring_principal
    constraints = grant.constraints()
    if constraints:
        entry["Constraints"] = constraints
    return entry


def _no_wider_than(
    parent: GrantRecord | None,
    operations: tuple[str, ...],
    subset: dict[str, str] | None,
    equals: dict[str, str] | None,
) -> None:
    """A grantee who may CreateGrant only through a grant cannot hand out more than that grant
    has: its operations at most, and a constraint at least as strict (AWS)."""
    if parent is None:
        raise errors.AccessDeniedException("The grant that allowed CreateGrant no longer exists.")
    wider = set(operations) - set(parent.operations)
    if wider:
        raise errors.AccessDeniedException(
            "A grant created through a grant cannot allow operations it does not have: "
            + ", ".join(sorted(wider))
        )
    new_context = equals if equals is not None else subset
    if parent.context_equals is not None and equals != parent.context_equals:
        raise errors.AccessDeniedException("The new grant must keep the EncryptionContextEquals constraint.")
    if parent.context_subset is not None and (
        new_context is None or any(new_context.get(k) != v for k, v in parent.context_subset.items())
    ):
        raise errors.AccessDeniedException(
            "The new grant's constraint must be at least as strict as its parent's."
        )


def create_grant(service: KeyService, params: dict[str, Any], info: AuditInfo) -> dict[str, Any]:
    key = service.key_param(params, info, allow_alias=False)
    grantee = _principal(params, "GranteePrincipal", required=True)
    retiring = _principal(params, "RetiringPrincipal", required=False)
    operations = _operations(params)
    subset, equals = _constraints(params)
    name = get_str(params, "Name", min_len=1, max_len=256)
    if name is not None and not _GRANT_NAME.match(name):
        raise errors.ValidationException("Name must match ^[a-zA-Z0-9:/_-]+$")
    assert grantee is not None
    decision = service.check_usable(key, "CreateGrant", info)
    if decision.grant_id:
        _no_wider_than(service.store.get_grant(decision.grant_id), operations, subset, equals)
    service.dry_run(params)
    if name is not None:  # AWS: a retried CreateGrant with the same name and fields is the same grant
        for existing in service.store.list_grants(key_id=key.key_id, grantee=grantee):
            if (existing.name, existing.retiring_principal, set(existing.operations)) == (
                name,
                retiring,
                set(operations),
            ) and (existing.context_subset, existing.context_equals) == (subset, equals):
                return {
                    "GrantId": existing.grant_id,
                    "GrantToken": authorize.grant_token(service, existing.grant_id),
                }
    grant = GrantRecord(
        grant_id=secrets.token_hex(32),
        key_id=key.key_id,
        grantee=grantee,
        operations=operations,
        issuing_account=service.account_id,
        creation_date=service.now(),
        retiring_principal=retiring,
        name=name,
        context_subset=subset,
        context_equals=equals,
    )
    service.store.create_grant(grant)
    info.extra = {"grant_id": grant.grant_id, "grantee": grantee, "operations": list(operations)}
    return {"GrantId": grant.grant_id, "GrantToken": authorize.grant_token(service, grant.grant_id)}


def _page(service: KeyService, params: dict[str, Any], **filters: Any) -> dict[str, Any]:
    limit = get_int(params, "Limit", 1, 1000) or DEFAULT_LIMIT
    after = decode_marker("grants", get_str(params, "Marker", min_len=1, max_len=1024))
    found = service.store.list_grants(after=after, limit=limit + 1, **filters)
    truncated = len(found) > limit
    found = found[:limit]
    result: dict[str, Any] = {"Grants": [_entry(service, g) for g in found], "Truncated": truncated}
    if truncated:
        result["NextMarker"] = encode_marker("grants", found[-1].grant_id)
    return result


def list_grants(service: KeyService, params: dict[str, Any], info: AuditInfo) -> dict[str, Any]:
    key = service.key_param(params, info, allow_alias=False)
    grant_id = get_str(params, "GrantId", min_len=1, max_len=128)
    grantee = get_str(params, "GranteePrincipal", min_len=1, max_len=256)
    service.check_usable(key, "ListGrants", info)
    return _page(service, params, key_id=key.key_id, grant_id=grant_id, grantee=grantee)


def list_retirable_grants(service: KeyService, params: dict[str, Any], info: AuditInfo) -> dict[str, Any]:
    retiring = _principal(params, "RetiringPrincipal", required=True)
    return _page(service, params, retiring_principal=retiring)


def _grant_of_key(service: KeyService, key: KeyRecord, grant_id: str) -> GrantRecord:
    grant = service.store.get_grant(grant_id)
    if grant is None or grant.key_id != key.key_id:
        raise errors.NotFoundException(f"Grant ID {grant_id[:128]} not found for key {key.arn}")
    return grant


def retire_grant(service: KeyService, params: dict[str, Any], info: AuditInfo) -> dict[str, Any]:
    token = get_str(params, "GrantToken", min_len=1, max_len=8192)
    grant_id = get_str(params, "GrantId", min_len=1, max_len=128)
    if token is not None:
        token_grant_id = authorize.grant_id_of_token(service, token)
        if token_grant_id is None:
            raise errors.InvalidGrantTokenException("The grant token is not valid.")
        if grant_id is not None and grant_id != token_grant_id:
            raise errors.ValidationException("GrantId does not match the grant named by GrantToken")
        grant = service.store.get_grant(token_grant_id)
        if grant is None:
            raise errors.NotFoundException("The grant named by the grant token no longer exists")
        key = service.find_key(grant.key_id, info, allow_alias=False)
        if (
            params.get("KeyId") is not None
            and service.key_param(params, AuditInfo(), allow_alias=False).key_id != key.key_id
        ):
            raise errors.ValidationException("KeyId does not match the key of the grant named by GrantToken")
    else:
        if grant_id is None or params.get("KeyId") is None:
            raise errors.ValidationException("Specify GrantToken, or both KeyId and GrantId")
        key = service.key_param(params, info, allow_alias=False)
        grant = _grant_of_key(service, key, grant_id)
    caller = info.principal.arn if info.principal is not None else ""
    by_the_grant = (
        caller == grant.retiring_principal
        or (caller == grant.grantee and "RetireGrant" in grant.operations)
        or caller == f"arn:aws:iam::{grant.issuing_account}:root"
    )
    service.check_usable(key, "RetireGrant", info, also_allowed=by_the_grant)
    service.dry_run(params)
    service.store.delete_grant(grant.grant_id)
    info.extra = {"grant_id": grant.grant_id}
    return {}


def revoke_grant(service: KeyService, params: dict[str, Any], info: AuditInfo) -> dict[str, Any]:
    key = service.key_param(params, info, allow_alias=False)
    grant_id = get_str(params, "GrantId", required=True, min_len=1, max_len=128)
    assert grant_id is not None
    service.check_usable(key, "RevokeGrant", info)
    grant = _grant_of_key(service, key, grant_id)
    service.dry_run(params)
    service.store.delete_grant(grant.grant_id)
    info.extra = {"grant_id": grant.grant_id}
    return {}


HANDLERS = {
    "CreateGrant": create_grant,
    "ListGrants": list_grants,
    "ListRetirableGrants": list_retirable_grants,
    "RetireGrant": retire_grant,
    "RevokeGrant": revoke_grant,
}
