"""Key policy operations: PutKeyPolicy, GetKeyPolicy, ListKeyPolicies (SPEC K4).

A key has exactly one policy, named ``default`` (as in AWS). A new policy must parse
(``policy.parse``) and, unless BypassPolicyLockoutSafetyCheck is set, must still let the caller
change the policy afterwards: otherwise a typo could make a key unmanageable for good.
CreateKey's ``Policy`` goes through ``validate_new_policy`` too.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from keyservice import errors
from keyservice.authz import authorize, policy
from keyservice.params import MAX_POLICY, AuditInfo, get_bool, get_int, get_str
from keyservice.store.model import KeyRecord

if TYPE_CHECKING:
    from keyservice.service import KeyService

POLICY_NAME = "default"


def _policy_name(params: dict[str, Any]) -> None:
    name = get_str(params, "PolicyName", min_len=1, max_len=128)
    if name is not None and name != POLICY_NAME:
        raise errors.NotFoundException(
            f"No such policy exists: {name[:128]!r}; the only key policy is 'default'."
        )


def validate_new_policy(
    service: KeyService, info: AuditInfo, key: KeyRecord, text: str, *, bypass: bool
) -> str:
    """Parse ``text`` as a key policy and run the lockout safety check; the text to store."""
    parsed = policy.parse(text, key_policy=True)
    if not bypass:
        authorize.check_lockout(service, info, key, parsed)
    return text


def put_key_policy(service: KeyService, params: dict[str, Any], info: AuditInfo) -> dict[str, Any]:
    key = service.key_param(params, info, allow_alias=False)
    _policy_name(params)
    text = get_str(params, "Policy", required=True, min_len=1, max_len=MAX_POLICY)
    bypass = get_bool(params, "BypassPolicyLockoutSafetyCheck")
    assert text is not None
    service.check_usable(key, "PutKeyPolicy", info)  # before parsing: no policy feedback to outsiders
    key.policy = validate_new_policy(service, info, key, text, bypass=bypass)
    service.store.update_key(key)
    return {}


def get_key_policy(service: KeyService, params: dict[str, Any], info: AuditInfo) -> dict[str, Any]:
    key = service.key_param(params, info, allow_alias=False)
    _policy_name(params)
    service.check_usable(key, "GetKeyPolicy", info)
    return {"Policy": authorize.key_policy_text(key), "PolicyName": POLICY_NAME}


def list_key_policies(service: KeyService, params: dict[str, Any], info: AuditInfo) -> dict[str, Any]:
    key = service.key_param(params, info, allow_alias=False)
    get_int(params, "Limit", 1, 1000)
    get_str(params, "Marker", min_len=1, max_len=320)
    service.check_usable(key, "ListKeyPolicies", info)
    return {"PolicyNames": [POLICY_NAME], "Truncated": False}


HANDLERS = {
    "PutKeyPolicy": put_key_policy,
    "GetKeyPolicy": get_key_policy,
    "ListKeyPolicies": list_key_policies,
}
