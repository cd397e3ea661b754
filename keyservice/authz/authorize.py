"""Authorization glue (SPEC K4, K5): the one place where a request meets the policies.

``policy.py`` decides in the abstract; this module gathers, per request and fresh from the store
(no cache, so a principal or policy the offline CLI adds is effective at once), what the decision
needs: the key's policy, the caller's identity policies and the key's grants for the caller. It
is reached through exactly two doors:

* ``KeyService.check_usable`` / ``KeyService.authorize`` — every handler that touches a key
  calls ``check_usable(key, operation, info)`` before acting, which authorizes first and then
  checks the key state. Decrypt and ReEncrypt call it on the key named *inside the ciphertext
  blob*, never on a KeyId parameter.
* ``KeyService.call`` — operations that are not about one key (CreateKey, ListKeys, ...) are
  authorized by identity policies alone before the handler runs; and after any successful key
  operation ``call`` checks that its key was authorized (a missing check is a bug: it fails
  closed with KMSInternalException).

A denial is AccessDeniedException naming the principal, the action and the key, in AWS's words;
never the policy text.
"""

from __future__ import annotations

import base64
import binascii
import hmac
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from keyservice import errors
from keyservice.authz import policy
from keyservice.store.model import MANAGER_AWS, GrantRecord, KeyRecord

if TYPE_CHECKING:
    from keyservice.context import Principal
    from keyservice.params import AuditInfo
    from keyservice.store.base import Store



class KeyService(Protocol):
    """What authorization needs of the service core (``keyservice.service.KeyService``, which
    imports this module: authorization never imports the core back)."""

    store: Store
    account_id: str

    def root_mac(self, purpose: bytes, data: bytes) -> bytes: ...


# Operations not about one key: identity policies alone decide, on resource "*".
ACCOUNT_OPERATIONS = frozenset(
    {"CreateKey", "ListKeys", "ListAliases", "GenerateRandom", "ListRetirableGrants"}
)

# Operations whose IAM action is not simply "kms:<operation>".
_ACTION_OVERRIDES = {"ReEncrypt": "kms:ReEncrypt*"}

GRANT_TOKEN_PURPOSE = b"grant-token"


def action_of(operation: str) -> str:
    """The IAM action an operation needs (ReEncrypt needs two: see ``reencrypt.py``)."""
    return _ACTION_OVERRIDES.get(operation, f"kms:{operation}")


def key_policy_text(key: KeyRecord) -> str:
    """The key's policy; a key without one (not possible after schema 3) gets the default."""
    if key.policy:
        return key.policy
    if key.key_manager == MANAGER_AWS:
        return policy.aws_managed_key_policy(key.account_id)
    return policy.default_key_policy(key.account_id)


def _identity_policies(service: KeyService, principal: Principal) -> list[policy.Policy]:
    parsed = []
    for record in service.store.identity_policies(principal.arn):
        try:
            parsed.append(policy.parse(record.document, key_policy=False))
        except errors.MalformedPolicyDocumentException:  # validated when attached; never grants
            continue
    return parsed


def as_policy_grant(grant: GrantRecord, key_arn: str) -> policy.Grant:
    return policy.Grant(
        grant_id=grant.grant_id,
        key_arn=key_arn,
        grantee=grant.grantee,
        operations=frozenset(grant.operations),
        context_subset=grant.context_subset,
        context_equals=grant.context_equals,
    )


def denied(principal: Principal, action: str, resource: str, decision: policy.Decision) -> errors.KMSError:
    """AccessDeniedException in AWS's wording; names principal, action and key, never a policy."""
    why = decision.message().format(action=action)
    return errors.AccessDeniedException(
        f"User: {principal.arn} is not authorized to perform: {action} on resource: {resource} {why}"
    )


def decide_key(
    service: KeyService,
    principal: Principal,
    key: KeyRecord,
    action: str,
    context: Mapping[str, str],
    *,
    key_policy: policy.Policy | None = None,
    with_grants: bool = True,
) -> policy.Decision:
    """The decision for ``principal`` doing ``action`` on ``key`` (``key_policy``: a candidate
    policy to evaluate instead of the stored one, for the lockout check)."""
    if key_policy is None:
        try:
            key_policy = policy.parse(key_policy_text(key))
        except errors.MalformedPolicyDocumentException:
            # Only a hand-edited store gets here; deny rather than guess.
            return policy.Decision(False, "the stored key policy does not parse", "no-resource-allow")
    grants: Sequence[policy.Grant] = ()
    if with_grants:
        mine = service.store.list_grants(key_id=key.key_id, grantee=principal.arn)
        grants = [as_policy_grant(g, key.arn) for g in mine]
    request = policy.Request(
        principal_arn=principal.arn,
        account_id=principal.account_id,
        key_account_id=key.account_id,
        action=action,
        resource=key.arn,
        encryption_context=dict(context),
    )
    return policy.decide(key_policy, _identity_policies(service, principal), grants, request)


def authorize_key(
    service: KeyService,
    info: AuditInfo,
    key: KeyRecord,
    operation: str,
    *,
    action: str | None = None,
    context: Mapping[str, str] | None = None,
    also_allowed: bool = False,
) -> policy.Decision:
    """Raise AccessDeniedException unless the caller of this request may do ``operation`` on ``key``;
    else the decision (CreateGrant needs to know whether only a grant allowed it).

    ``context``: the encryption context conditions and grant constraints see (default: the
    request's). ``also_allowed``: the operation's own rule allows it regardless of policy
    (RetireGrant by the grant's retiring principal).
    """
    principal = _caller(info)
    action = action or action_of(operation)
    if context is None:
        context = info.encryption_context or {}
    decision = decide_key(service, principal, key, action, context)
    if not decision.allowed and not also_allowed:
        raise denied(principal, action, key.arn, decision)
    info.authorized_keys.add(key.key_id)
    return decision


def authorize_account(service: KeyService, info: AuditInfo, operation: str) -> None:
    """Operations not about one key: identity policies decide (the account root may do all)."""
    principal = _caller(info)
    action = action_of(operation)
    request = policy.Request(principal.arn, principal.account_id, service.account_id, action, "*")
    decision = policy.decide_identity(_identity_policies(service, principal), request)
    if not decision.allowed:
        raise denied(principal, action, "*", decision)


def check_lockout(service: KeyService, info: AuditInfo, key: KeyRecord, new_policy: policy.Policy) -> None:
    """PutKeyPolicy / CreateKey safety check: the caller must still be able to PutKeyPolicy under
    the new policy (grants do not count: they cannot give PutKeyPolicy)."""
    decision = decide_key(
        service, _caller(info), key, "kms:PutKeyPolicy", {}, key_policy=new_policy, with_grants=False
    )
    if not decision.allowed:
        raise errors.MalformedPolicyDocumentException(
            "The new key policy will not allow you to update the key policy in the future."
        )


def _caller(info: AuditInfo) -> Principal:
    if info.principal is None:  # call() refuses unauthenticated requests before any handler
        raise errors.AccessDeniedException("The request is not authenticated.")
    return info.principal


# --------------------------------------------------------------------------- grant tokens


def grant_token(service: KeyService, grant_id: str) -> str:
    """An opaque grant token: the grant id with a MAC under the root key, so only this service
    can mint one and a token names exactly one grant."""
    mac = service.root_mac(GRANT_TOKEN_PURPOSE, grant_id.encode()).hex()
    return base64.urlsafe_b64encode(f"{grant_id}.{mac}".encode()).decode().rstrip("=")


def grant_id_of_token(service: KeyService, token: str) -> str | None:
    """The grant id a token names, or None if it is not a token this service minted."""
    try:
        text = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return None
    grant_id, _, mac = text.partition(".")
    expected = service.root_mac(GRANT_TOKEN_PURPOSE, grant_id.encode()).hex()
    return grant_id if grant_id and hmac.compare_digest(mac, expected) else None


def check_grant_tokens(service: KeyService, params: Mapping[str, Any]) -> None:
    """Validate ``GrantTokens``: each must be a token this service minted for an existing grant.

    Grants here take effect as soon as CreateGrant returns, so a valid token adds no permission of
    its own (the grant is found by grantee); honouring a token means accepting it, and refusing
    forged or stale ones with InvalidGrantTokenException as AWS does.
    """
    tokens = params.get("GrantTokens")
    if tokens is None:
        return
    if not isinstance(tokens, list) or len(tokens) > 10 or not all(isinstance(t, str) for t in tokens):
        raise errors.ValidationException("GrantTokens must be a list of at most 10 strings")
    for token in tokens:
        if not 1 <= len(token) <= 8192:
            raise errors.ValidationException("Each grant token must be 1 to 8192 characters long")
        grant_id = grant_id_of_token(service, token)
        if grant_id is None or service.store.get_grant(grant_id) is None:
            raise errors.InvalidGrantTokenException("The grant token is not valid.")
