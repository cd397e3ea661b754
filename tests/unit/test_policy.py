"""Policy evaluation: default deny, explicit deny wins, delegation to identity policies,
conditions on the encryption context, grants, and strict parsing."""

from __future__ import annotations

import json

import pytest

from keyservice.authz import policy
from keyservice.errors import MalformedPolicyDocumentException

ACCOUNT = "111122223333"
ROOT = f"arn:aws:iam::{ACCOUNT}:root"
ALICE = f"arn:aws:iam::{ACCOUNT}:user/alice"
BOB = f"arn:aws:iam::{ACCOUNT}:user/bob"
KEY = f"arn:aws:kms:us-east-1:{ACCOUNT}:key/1234abcd-12ab-34cd-56ef-1234567890ab"
OTHER_KEY = f"arn:aws:kms:us-east-1:{ACCOUNT}:key/00000000-0000-4000-8000-000000000000"


def doc(*statements: dict) -> str:
    return json.dumps({"Version": "2012-10-17", "Statement": list(statements)})


def stmt(effect: str = "Allow", principal: object = ROOT, action: object = "kms:*", **extra: object) -> dict:
    body: dict = {"Effect": effect, "Action": action, "Resource": "*", **extra}
    if principal is not None:
        body["Principal"] = principal if principal == "*" else {"AWS": principal}
    return body


def ask(
    key_policy: str,
    principal: str = ALICE,
    action: str = "kms:Encrypt",
    *,
    identity: tuple[str, ...] = (),
    grants: tuple[policy.Grant, ...] = (),
    context: dict | None = None,
    resource: str = KEY,
    account: str = ACCOUNT,
) -> policy.Decision:
    request = policy.Request(principal, account, ACCOUNT, action, resource, context or {})
    return policy.decide(
        policy.parse(key_policy), [policy.parse(i, key_policy=False) for i in identity], list(grants), request
    )


def test_default_policy_gives_the_account_root_everything_and_others_nothing_by_itself() -> None:
    default = policy.default_key_policy(ACCOUNT)
    assert ask(default, ROOT, "kms:PutKeyPolicy").allowed
    assert not ask(default, ALICE).allowed  # no identity policy: default deny


def test_delegation_to_identity_policies() -> None:
    default = policy.default_key_policy(ACCOUNT)
    identity = doc(stmt(principal=None, action=["kms:Encrypt", "kms:Decrypt"]))
    assert ask(default, ALICE, "kms:Encrypt", identity=(identity,)).allowed
    assert not ask(default, ALICE, "kms:DisableKey", identity=(identity,)).allowed
    scoped = json.dumps({"Statement": {"Effect": "Allow", "Action": "kms:*", "Resource": OTHER_KEY}})
    assert not ask(default, ALICE, identity=(scoped,)).allowed
    # Delegation needs the key policy's account statement: naming only bob does not delegate.
    assert not ask(doc(stmt(principal=BOB)), ALICE, identity=(identity,)).allowed
    # Another account's principal is not covered by this account's root statement.
    assert not ask(
        default, "arn:aws:iam::999999999999:user/eve", account="999999999999", identity=(identity,)
    ).allowed


def test_key_policy_naming_the_principal() -> None:
    text = doc(stmt(principal=ALICE, action=["kms:Encrypt", "kms:GenerateDataKey*"]))
    assert ask(text, ALICE, "kms:Encrypt").allowed
    assert ask(text, ALICE, "kms:GenerateDataKeyWithoutPlaintext").allowed
    assert not ask(text, ALICE, "kms:Decrypt").allowed
    assert not ask(text, BOB, "kms:Encrypt").allowed
    assert ask(doc(stmt(principal="*", action="kms:Encrypt")), BOB).allowed
    assert ask(doc(stmt(principal=[BOB, ALICE], action="KMS:ENCRYPT")), ALICE).allowed


def test_explicit_deny_wins() -> None:
    text = doc(stmt(principal=ALICE), stmt("Deny", principal=ALICE, action="kms:Decrypt"))
    assert ask(text, ALICE, "kms:Encrypt").allowed
    decision = ask(text, ALICE, "kms:Decrypt")
    assert not decision.allowed and "explicit deny" in decision.reason
    # A Deny naming the account applies to every principal of it, root included.
    account_deny = doc(stmt(principal=ROOT), stmt("Deny", principal=ACCOUNT, action="kms:Decrypt"))
    assert not ask(account_deny, ROOT, "kms:Decrypt").allowed
    identity_deny = doc(
        stmt(principal=None, action="kms:Encrypt"), stmt("Deny", principal=None, action="kms:*")
    )
    assert not ask(doc(stmt(principal=ALICE)), ALICE, identity=(identity_deny,)).allowed


def test_not_action() -> None:
    text = doc(
        {
            "Effect": "Allow",
            "Principal": {"AWS": ALICE},
            "NotAction": "kms:ScheduleKeyDeletion",
            "Resource": "*",
        }
    )
    assert ask(text, ALICE, "kms:Encrypt").allowed
    assert not ask(text, ALICE, "kms:ScheduleKeyDeletion").allowed


@pytest.mark.parametrize(
    ("condition", "context", "allowed"),
    [
        ({"StringEquals": {"kms:EncryptionContext:dept": "finance"}}, {"dept": "finance"}, True),
        ({"StringEquals": {"kms:EncryptionContext:dept": "finance"}}, {"dept": "hr"}, False),
        ({"StringEquals": {"kms:EncryptionContext:dept": "finance"}}, {}, False),
        ({"StringEquals": {"kms:EncryptionContext:dept": ["hr", "finance"]}}, {"dept": "finance"}, True),
        ({"StringLike": {"kms:EncryptionContext:kmsfs:file-id": "ab*"}}, {"kmsfs:file-id": "abcd"}, True),
        ({"StringLike": {"kms:EncryptionContext:kmsfs:file-id": "ab*"}}, {"kmsfs:file-id": "ba"}, False),
        ({"StringNotEquals": {"kms:EncryptionContext:dept": "hr"}}, {}, True),
        ({"StringEqualsIfExists": {"kms:EncryptionContext:dept": "hr"}}, {}, True),
        ({"StringEquals": {"kms:CallerAccount": ACCOUNT}}, {}, True),
        ({"StringEquals": {"kms:CallerAccount": "999999999999"}}, {}, False),
        ({"ForAllValues:StringEquals": {"kms:EncryptionContextKeys": ["a", "b"]}}, {"a": "1"}, True),
        ({"ForAllValues:StringEquals": {"kms:EncryptionContextKeys": ["a"]}}, {"a": "1", "c": "2"}, False),
        ({"ForAnyValue:StringEquals": {"kms:EncryptionContextKeys": ["c"]}}, {"a": "1", "c": "2"}, True),
        ({"Null": {"kms:EncryptionContext:dept": "false"}}, {"dept": "x"}, True),
        ({"Null": {"kms:EncryptionContext:dept": "false"}}, {}, False),
    ],
)
def test_conditions(condition: dict, context: dict, allowed: bool) -> None:
    text = doc(stmt(principal=ALICE, action="kms:Decrypt", Condition=condition))
    assert ask(text, ALICE, "kms:Decrypt", context=context).allowed is allowed


def test_grants() -> None:
    grant = policy.Grant("g1", KEY, BOB, frozenset({"Decrypt"}), context_subset={"dept": "hr"})
    locked = doc(stmt(principal=ROOT))
    assert ask(locked, BOB, "kms:Decrypt", grants=(grant,), context={"dept": "hr", "x": "y"}).allowed
    assert not ask(locked, BOB, "kms:Decrypt", grants=(grant,), context={"dept": "it"}).allowed
    assert not ask(locked, BOB, "kms:Encrypt", grants=(grant,), context={"dept": "hr"}).allowed
    assert not ask(locked, ALICE, "kms:Decrypt", grants=(grant,), context={"dept": "hr"}).allowed
    assert not ask(
        locked, BOB, "kms:Decrypt", grants=(grant,), context={"dept": "hr"}, resource=OTHER_KEY
    ).allowed
    equals = policy.Grant("g2", KEY, BOB, frozenset({"Decrypt"}), context_equals={"a": "1"})
    assert ask(locked, BOB, "kms:Decrypt", grants=(equals,), context={"a": "1"}).allowed
    assert not ask(locked, BOB, "kms:Decrypt", grants=(equals,), context={"a": "1", "b": "2"}).allowed
    deny = doc(stmt(principal=ROOT), stmt("Deny", principal=BOB, action="kms:Decrypt"))
    assert not ask(deny, BOB, "kms:Decrypt", grants=(grant,), context={"dept": "hr"}).allowed


@pytest.mark.parametrize(
    "text",
    [
        "",
        "not json",
        "[]",
        json.dumps({"Statement": []}),
        json.dumps({"Version": "2001-01-01", "Statement": [stmt()]}),
        doc(stmt(effect="Maybe")),
        doc({"Effect": "Allow", "Action": "kms:*", "Resource": "*"}),  # no Principal
        doc(stmt(action="s3:GetObject")),
        doc(stmt(principal="arn:aws:s3:::bucket")),
        doc(stmt(Condition={"NumericEquals": {"kms:CallerAccount": "1"}})),
        doc(stmt(Condition={"StringEquals": {"aws:SourceIp": "1.2.3.4"}})),
        doc(stmt(NotPrincipal={"AWS": ROOT})),
        json.dumps({"Statement": [stmt()], "Extra": 1}),
        doc(stmt()) + " " * 40000,
    ],
)
def test_malformed_policies_are_refused(text: str) -> None:
    with pytest.raises(MalformedPolicyDocumentException):
        policy.parse(text)


def test_identity_policy_must_not_name_a_principal() -> None:
    with pytest.raises(MalformedPolicyDocumentException):
        policy.parse(doc(stmt()), key_policy=False)
    policy.parse(doc(stmt(principal=None)), key_policy=False)


def test_denial_kinds_name_the_reason_in_aws_words() -> None:
    default = policy.default_key_policy(ACCOUNT)
    assert ask(default).denial == "no-identity-allow"
    assert ask(doc(stmt(principal=BOB))).denial == "no-resource-allow"
    assert ask(doc(stmt(principal=ALICE), stmt("Deny", ALICE, "kms:Encrypt"))).denial == "resource-deny"
    identity_deny = json.dumps({"Statement": [{"Effect": "Deny", "Action": "kms:*", "Resource": "*"}]})
    assert ask(default, identity=(identity_deny,)).denial == "identity-deny"
    assert "no resource-based policy allows the kms:Encrypt" in ask(
        doc(stmt(principal=BOB))
    ).message().format(action="kms:Encrypt")


def test_identity_only_decisions_for_account_operations() -> None:
    allow = json.dumps({"Statement": [{"Effect": "Allow", "Action": "kms:CreateKey", "Resource": "*"}]})
    deny = json.dumps({"Statement": [{"Effect": "Deny", "Action": "kms:*", "Resource": "*"}]})

    def decide(principal: str, *docs: str) -> policy.Decision:
        request = policy.Request(principal, ACCOUNT, ACCOUNT, "kms:CreateKey", "*")
        return policy.decide_identity([policy.parse(d, key_policy=False) for d in docs], request)

    assert decide(ROOT).allowed and not decide(ALICE).allowed
    assert decide(ALICE, allow).allowed and not decide(ALICE, allow, deny).allowed


def test_grant_constraints_keys_ignore_case_and_skip_non_context_operations() -> None:
    locked = doc(stmt(principal=ROOT))
    grant = policy.Grant("g", KEY, BOB, frozenset({"Decrypt", "DescribeKey"}), context_equals={"Dept": "hr"})
    assert ask(locked, BOB, "kms:Decrypt", grants=(grant,), context={"dept": "hr"}).allowed
    assert not ask(locked, BOB, "kms:Decrypt", grants=(grant,), context={"dept": "HR"}).allowed
    assert ask(locked, BOB, "kms:DescribeKey", grants=(grant,)).allowed  # constraints do not apply
    assert ask(locked, BOB, "kms:Decrypt", grants=(grant,), context={"dept": "hr"}).grant_id == "g"


def test_aws_managed_key_policy_parses_and_denies_management_even_to_root() -> None:
    managed = policy.aws_managed_key_policy(ACCOUNT)
    assert ask(managed, ROOT, "kms:Decrypt").allowed and ask(managed, ROOT, "kms:GetKeyPolicy").allowed
    assert not ask(managed, ROOT, "kms:DisableKey").allowed
    assert not ask(managed, ALICE, "kms:Decrypt").allowed
