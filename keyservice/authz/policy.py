"""Key policies, identity policies and grants: parsing and the allow/deny decision (SPEC K4, K5).

Pure: no store, no clock, no HTTP. The service gathers the key's policy, the caller's identity
policies and the key's grants, and asks ``decide`` once per request.

Evaluation follows AWS KMS for principals of the key's own account:

1. An explicit ``Deny`` that matches — in the key policy or an identity policy — wins.
2. An ``Allow`` in the key policy that names the caller (its ARN, or ``"*"``) allows.
3. An ``Allow`` in the key policy that names the *account* (``arn:aws:iam::<account>:root`` or
   the bare account id) delegates to identity policies: it allows if one of the caller's
   identity policies allows the action on this key. The account root user has every identity
   permission.
4. A grant for the caller that lists the operation, and whose constraints the encryption
   context satisfies, allows.
5. Otherwise: denied (default deny).

Supported language: ``Version``, ``Id``, ``Statement`` (object or list) with ``Sid``, ``Effect``,
``Principal`` (``"*"`` or ``{"AWS": ARN | account | "*" | [..]}``), ``Action`` / ``NotAction``
(``kms:Encrypt``, ``kms:*``, ``kms:Generate*``; case-insensitive), ``Resource`` (``"*"`` or
ARN patterns), and ``Condition`` with the operators StringEquals, StringNotEquals,
StringEqualsIgnoreCase, StringLike, StringNotLike, Bool, Null (each optionally with ``IfExists``,
and ``ForAnyValue:`` / ``ForAllValues:`` for multi-valued keys) on the keys
``kms:EncryptionContext:<name>``, ``kms:EncryptionContextKeys``, ``kms:CallerAccount``,
``aws:PrincipalArn`` and ``kms:GrantIsForAWSResource``. Anything else is refused as malformed
rather than silently ignored.
"""

from __future__ import annotations

import fnmatch
import functools
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from keyservice.errors import MalformedPolicyDocumentException

MAX_POLICY_BYTES = 32768
VERSIONS = ("2012-10-17", "2008-10-17")
_ACTION = re.compile(r"^(kms:[A-Za-z*?]+|\*)$", re.IGNORECASE)
_ACCOUNT = re.compile(r"^\d{12}$")
_OPERATORS = {
    "StringEquals", "StringNotEquals", "StringEqualsIgnoreCase", "StringNotEqualsIgnoreCase",
    "StringLike", "StringNotLike", "Bool", "Null",
}  # fmt: skip
_CONDITION_KEYS = re.compile(
    r"^(kms:EncryptionContext:.+|kms:EncryptionContextKeys|kms:CallerAccount|aws:PrincipalArn"
    r"|kms:GrantIsForAWSResource)$",
    re.IGNORECASE,
)

# Actions by kind: usage of key material versus administration of the key.
USAGE_ACTIONS = frozenset({
    "kms:Encrypt", "kms:Decrypt", "kms:ReEncryptFrom", "kms:ReEncryptTo", "kms:GenerateDataKey",
    "kms:GenerateDataKeyWithoutPlaintext", "kms:DescribeKey",
})  # fmt: skip


def _malformed(message: str) -> MalformedPolicyDocumentException:
    return MalformedPolicyDocumentException(message)


def _as_list(value: object, what: str) -> list[str]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items or not all(isinstance(v, str) and v for v in items):
        raise _malformed(f"{what} must be a non-empty string or list of strings")
    return list(items)


@dataclass(frozen=True)
class Condition:
    operator: str  # e.g. StringEquals
    key: str
    values: tuple[str, ...]
    if_exists: bool = False
    quantifier: str = ""  # "", "ForAnyValue", "ForAllValues"


@dataclass(frozen=True)
class Statement:
    effect: str
    principals: tuple[str, ...] | None  # None in identity policies
    actions: tuple[str, ...]
    not_actions: bool
    resources: tuple[str, ...]
    conditions: tuple[Condition, ...]
    sid: str = ""


@dataclass(frozen=True)
class Policy:
    statements: tuple[Statement, ...]
    text: str


@dataclass(frozen=True)
class Grant:
    """What the service stores of a grant, as far as the decision needs it."""

    grant_id: str
    key_arn: str
    grantee: str
    operations: frozenset[str]  # AWS operation names, e.g. "Decrypt"
    context_subset: Mapping[str, str] | None = None
    context_equals: Mapping[str, str] | None = None


@dataclass(frozen=True)
class Request:
    """One authorization question."""

    principal_arn: str
    account_id: str  # the caller's account
    key_account_id: str  # the account that owns the key
    action: str  # kms:Encrypt
    resource: str  # the key ARN
    encryption_context: Mapping[str, str] = field(default_factory=dict)

    @property
    def operation(self) -> str:
        return self.action.split(":", 1)[1]

    @property
    def is_account_root(self) -> bool:
        return self.principal_arn == f"arn:aws:iam::{self.account_id}:root"


@dataclass(frozen=True)
class Decision:
    allowed: bool
    reason: str
    # Why a denial happened, in the words AWS uses in AccessDeniedException messages (never the
    # policy text): "resource-deny", "identity-deny", "no-identity-allow" or "no-resource-allow".
    denial: str = ""
    grant_id: str = ""  # set when a grant (and nothing else) allowed the request

    def message(self) -> str:
        """The tail of an AccessDeniedException message for ``action`` (AWS's wording)."""
        return {
            "resource-deny": "with an explicit deny in a resource-based policy",
            "identity-deny": "with an explicit deny in an identity-based policy",
            "no-identity-allow": "because no identity-based policy allows the {action} action",
        }.get(self.denial, "because no resource-based policy allows the {action} action")


def _parse_principal(value: object) -> tuple[str, ...]:
    if value == "*":
        return ("*",)
    if not isinstance(value, dict) or set(value) - {"AWS"} or "AWS" not in value:
        raise _malformed('Principal must be "*" or {"AWS": ARN or list of ARNs}')
    principals = _as_list(value["AWS"], "Principal.AWS")
    for principal in principals:
        if principal != "*" and not _ACCOUNT.match(principal) and not principal.startswith("arn:aws:iam::"):
            raise _malformed(f'Principal {principal[:100]!r} is not an IAM ARN, an account id or "*"')
    return tuple(principals)


def _parse_conditions(value: object) -> tuple[Condition, ...]:
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise _malformed("Condition must be an object")
    conditions = []
    for raw_operator, body in value.items():
        quantifier, _, operator = raw_operator.rpartition(":")
        if quantifier not in ("", "ForAnyValue", "ForAllValues"):
            raise _malformed(f"unsupported condition set operator {quantifier!r}")
        if_exists = operator.endswith("IfExists")
        base = operator.removesuffix("IfExists")
        if base not in _OPERATORS:
            raise _malformed(f"unsupported condition operator {raw_operator!r}")
        if not isinstance(body, dict) or not body:
            raise _malformed(f"condition {raw_operator} must map condition keys to values")
        for key, values in body.items():
            if not _CONDITION_KEYS.match(key):
                raise _malformed(f"unsupported condition key {key!r}")
            items = [values] if isinstance(values, str | bool) else values
            if not isinstance(items, list) or not all(isinstance(v, str | bool) for v in items):
                raise _malformed(f"condition values for {key} must be strings")
            as_text = tuple(str(v).lower() if isinstance(v, bool) else v for v in items)
            conditions.append(Condition(base, key, as_text, if_exists, quantifier))
    return tuple(conditions)


def _parse_statement(raw: object, *, key_policy: bool) -> Statement:
    if not isinstance(raw, dict):
        raise _malformed("each Statement must be an object")
    allowed = {"Sid", "Effect", "Principal", "Action", "NotAction", "Resource", "Condition"}
    unknown = set(raw) - allowed
    if unknown:
        raise _malformed(f"unsupported statement element(s): {', '.join(sorted(unknown))}")
    effect = raw.get("Effect")
    if effect not in ("Allow", "Deny"):
        raise _malformed('Effect must be "Allow" or "Deny"')
    if key_policy and "Principal" not in raw:
        raise _malformed("a key policy statement needs a Principal")
    if not key_policy and "Principal" in raw:
        raise _malformed("an identity policy statement must not have a Principal")
    if ("Action" in raw) == ("NotAction" in raw):
        raise _malformed("a statement needs exactly one of Action or NotAction")
    actions = _as_list(raw.get("Action", raw.get("NotAction")), "Action")
    for action in actions:
        if not _ACTION.match(action):
            raise _malformed(f"Action {action[:100]!r} is not a kms action")
    resources = _as_list(raw.get("Resource", "*"), "Resource")
    sid = raw.get("Sid", "")
    if not isinstance(sid, str):
        raise _malformed("Sid must be a string")
    return Statement(
        effect=effect,
        principals=_parse_principal(raw["Principal"]) if key_policy else None,
        actions=tuple(a.lower() for a in actions),
        not_actions="NotAction" in raw,
        resources=tuple(resources),
        conditions=_parse_conditions(raw.get("Condition")),
        sid=sid,
    )


def parse(text: object, *, key_policy: bool = True) -> Policy:
    """Parse and validate a policy document; raise MalformedPolicyDocumentException if it is not one.

    Parsed policies are immutable and depend only on the text, so stored policies — asked for on
    every request — are parsed once (a changed policy is a different text).
    """
    if isinstance(text, str):
        return _parse_cached(text, key_policy)
    return _parse(text, key_policy=key_policy)


@functools.lru_cache(maxsize=4096)
def _parse_cached(text: str, key_policy: bool) -> Policy:
    return _parse(text, key_policy=key_policy)


def _parse(text: object, *, key_policy: bool) -> Policy:
    if not isinstance(text, str) or not text.strip():
        raise _malformed("the policy must be a non-empty JSON string")
    if len(text.encode("utf-8")) > MAX_POLICY_BYTES:
        raise _malformed(f"the policy exceeds {MAX_POLICY_BYTES} bytes")
    try:
        document = json.loads(text)
    except ValueError:
        raise _malformed("the policy is not valid JSON") from None
    if not isinstance(document, dict):
        raise _malformed("the policy must be a JSON object")
    unknown = set(document) - {"Version", "Id", "Statement"}
    if unknown:
        raise _malformed(f"unsupported policy element(s): {', '.join(sorted(unknown))}")
    if document.get("Version", "2008-10-17") not in VERSIONS:
        raise _malformed(f"Version must be one of {', '.join(VERSIONS)}")
    raw_statements = document.get("Statement")
    if isinstance(raw_statements, dict):
        raw_statements = [raw_statements]
    if not isinstance(raw_statements, list) or not raw_statements:
        raise _malformed("the policy needs at least one Statement")
    return Policy(tuple(_parse_statement(s, key_policy=key_policy) for s in raw_statements), text)


def default_key_policy(account_id: str) -> str:
    """AWS's default key policy: the account (its root user and, through identity policies, its
    principals) has full access, so the key can never become unmanageable."""
    return json.dumps({
        "Version": "2012-10-17",
        "Id": "key-default-1",
        "Statement": [{
            "Sid": "Enable IAM User Permissions",
            "Effect": "Allow",
            "Principal": {"AWS": f"arn:aws:iam::{account_id}:root"},
            "Action": "kms:*",
            "Resource": "*",
        }],
    }, indent=2)  # fmt: skip


# --------------------------------------------------------------------------- matching


def _action_matches(statement: Statement, action: str) -> bool:
    hit = any(fnmatch.fnmatchcase(action.lower(), pattern) for pattern in statement.actions)
    return hit != statement.not_actions


def _resource_matches(statement: Statement, resource: str) -> bool:
    return any(pattern == "*" or fnmatch.fnmatchcase(resource, pattern) for pattern in statement.resources)


def _context_values(request: Request, key: str) -> list[str] | None:
    lowered = key.lower()
    if lowered.startswith("kms:encryptioncontext:"):
        name = key.split(":", 2)[2]
        value = request.encryption_context.get(name)
        return None if value is None else [value]
    if lowered == "kms:encryptioncontextkeys":
        return list(request.encryption_context) or None
    if lowered == "kms:calleraccount":
        return [request.account_id]
    if lowered == "aws:principalarn":
        return [request.principal_arn]
    if lowered == "kms:grantisforawsresource":
        return ["false"]
    return None


def _value_matches(operator: str, actual: str, expected: str) -> bool:
    if operator in ("StringEquals", "StringNotEquals", "Bool"):
        return actual == expected
    if operator in ("StringEqualsIgnoreCase", "StringNotEqualsIgnoreCase"):
        return actual.lower() == expected.lower()
    return fnmatch.fnmatchcase(actual, expected)  # StringLike / StringNotLike


def _condition_holds(condition: Condition, request: Request) -> bool:
    actual = _context_values(request, condition.key)
    if condition.operator == "Null":
        return (actual is None) == (condition.values[0] == "true")
    negated = condition.operator in ("StringNotEquals", "StringNotEqualsIgnoreCase", "StringNotLike")
    if actual is None:  # as in IAM: an absent key fails a positive test and passes a negated one
        return negated or condition.if_exists or condition.quantifier == "ForAllValues"
    base = {
        "StringNotEquals": "StringEquals",
        "StringNotEqualsIgnoreCase": "StringEqualsIgnoreCase",
        "StringNotLike": "StringLike",
    }.get(condition.operator, condition.operator)

    def one(value: str) -> bool:
        return any(_value_matches(base, value, expected) for expected in condition.values)

    if condition.quantifier == "ForAllValues":
        result = all(one(v) for v in actual)
    else:  # a single-valued key, or ForAnyValue
        result = any(one(v) for v in actual)
    return not result if negated else result


def _conditions_hold(statement: Statement, request: Request) -> bool:
    return all(_condition_holds(c, request) for c in statement.conditions)


def _names_caller(statement: Statement, request: Request) -> bool:
    return any(p == "*" or p == request.principal_arn for p in statement.principals or ())


def _names_account(statement: Statement, request: Request) -> bool:
    account = request.key_account_id
    return request.account_id == account and any(
        p in (account, f"arn:aws:iam::{account}:root") for p in statement.principals or ()
    )


def _applies(statement: Statement, request: Request) -> bool:
    return (
        _action_matches(statement, request.action)
        and _resource_matches(statement, request.resource)
        and _conditions_hold(statement, request)
    )


# Grant operations that take an encryption context: only these are subject to grant constraints
# (AWS: "Grant constraints are not applied to ... DescribeKey or RetireGrant").
CONTEXT_OPERATIONS = frozenset({
    "Encrypt", "Decrypt", "ReEncryptFrom", "ReEncryptTo", "GenerateDataKey",
    "GenerateDataKeyWithoutPlaintext", "GenerateDataKeyPair", "GenerateDataKeyPairWithoutPlaintext",
})  # fmt: skip


def _grant_allows(grant: Grant, request: Request) -> bool:
    if grant.grantee != request.principal_arn or grant.key_arn != request.resource:
        return False
    if request.operation not in grant.operations:
        return False
    if request.operation not in CONTEXT_OPERATIONS:
        return True
    # In a grant constraint the context *keys* compare case-insensitively, the values exactly (AWS).
    context = {k.lower(): v for k, v in request.encryption_context.items()}
    if grant.context_equals is not None:
        wanted = {k.lower(): v for k, v in grant.context_equals.items()}
        if context != wanted:
            return False
    if grant.context_subset is not None and any(
        context.get(k.lower()) != v for k, v in grant.context_subset.items()
    ):
        return False
    return True


def decide(
    key_policy: Policy,
    identity_policies: Sequence[Policy],
    grants: Sequence[Grant],
    request: Request,
) -> Decision:
    """Allow or deny ``request``; the reason names the deciding statement, for logs and tests."""
    key_statements = [s for s in key_policy.statements if _applies(s, request)]
    identity_statements = [s for p in identity_policies for s in p.statements if _applies(s, request)]
    for statement in key_statements:
        if statement.effect == "Deny" and (
            _names_caller(statement, request) or _names_account(statement, request)
        ):
            return Decision(
                False, f"explicit deny in the key policy ({statement.sid or 'no Sid'})", "resource-deny"
            )
    for statement in identity_statements:
        if statement.effect == "Deny":
            return Decision(
                False, f"explicit deny in an identity policy ({statement.sid or 'no Sid'})", "identity-deny"
            )
    for statement in key_statements:
        if statement.effect == "Allow" and _names_caller(statement, request):
            return Decision(True, f"key policy allows ({statement.sid or 'no Sid'})")
    delegated = [s for s in key_statements if s.effect == "Allow" and _names_account(s, request)]
    if delegated:
        if request.is_account_root:
            return Decision(True, "key policy allows the account; the account root user has every permission")
        for statement in identity_statements:
            if statement.effect == "Allow":
                return Decision(
                    True,
                    f"key policy delegates to the account; identity policy allows "
                    f"({statement.sid or 'no Sid'})",
                )
    for grant in grants:
        if _grant_allows(grant, request):
            return Decision(True, f"grant {grant.grant_id}", grant_id=grant.grant_id)
    if delegated:
        return Decision(False, "delegated to identity policies; none allows it", "no-identity-allow")
    return Decision(False, "no statement or grant allows it", "no-resource-allow")


def decide_identity(identity_policies: Sequence[Policy], request: Request) -> Decision:
    """Allow or deny an operation that is not about one key (CreateKey, ListKeys, ...; resource
    ``"*"``): only identity policies speak. The account root user may do everything."""
    statements = [s for p in identity_policies for s in p.statements if _applies(s, request)]
    for statement in statements:
        if statement.effect == "Deny":
            return Decision(
                False, f"explicit deny in an identity policy ({statement.sid or 'no Sid'})", "identity-deny"
            )
    if request.is_account_root:
        return Decision(True, "the account root user has every permission")
    for statement in statements:
        if statement.effect == "Allow":
            return Decision(True, f"identity policy allows ({statement.sid or 'no Sid'})")
    return Decision(False, "no identity policy allows it", "no-identity-allow")


def aws_managed_key_policy(account_id: str) -> str:
    """The key policy of a service-managed key (``alias/aws/kmsfs``), after AWS's: the account may
    use it and read its metadata; nobody may manage it (disable, delete, re-policy, tag, ...).

    AWS lets every principal of the account (``"*"`` with ``kms:CallerAccount``) use an AWS managed
    key *through the integrated service* (``kms:ViaService``). This service cannot tell whether a
    call comes through kmsfs, so usage is delegated to identity policies instead: the account root
    may use the key, other principals only if an identity policy of theirs allows it.
    """
    root = f"arn:aws:iam::{account_id}:root"
    return json.dumps({
        "Version": "2012-10-17",
        "Id": "auto-kmsfs-1",
        "Statement": [
            {
                "Sid": "Allow use of the key by principals of the account that are authorized to use it",
                "Effect": "Allow",
                "Principal": {"AWS": root},
                "Action": ["kms:Encrypt", "kms:Decrypt", "kms:ReEncrypt*", "kms:GenerateDataKey*",
                           "kms:CreateGrant", "kms:DescribeKey"],
                "Resource": "*",
                "Condition": {"StringEquals": {"kms:CallerAccount": account_id}},
            },
            {
                "Sid": "Allow direct access to key metadata to the account",
                "Effect": "Allow",
                "Principal": {"AWS": root},
                "Action": ["kms:Describe*", "kms:Get*", "kms:List*", "kms:RevokeGrant"],
                "Resource": "*",
            },
        ],
    }, indent=2)  # fmt: skip
