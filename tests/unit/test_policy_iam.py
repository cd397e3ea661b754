"""IAM semantics in policy matching (issue 12, item 4), and a property-based fuzz of the evaluator.

Only ``*`` and ``?`` are wildcards (``[``, ``]``, ``!``, ``\\`` are literal, unlike fnmatch);
dates (aws:CurrentTime), source addresses (aws:SourceIp), Bool and Null conditions; unknown
operators and keys, and operators on keys of another type, are refused (fail closed); and whatever
a policy author or a caller sends, parsing either returns a policy or raises
MalformedPolicyDocumentException, and ``decide`` answers.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from keyservice.authz import policy
from keyservice.errors import MalformedPolicyDocumentException
from tests.unit.test_policy import ACCOUNT, ALICE, KEY, ROOT, doc, stmt

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)


def ask(text: str, action: str = "kms:Decrypt", *, resource: str = KEY, context: dict | None = None,
        now: datetime | None = NOW, source_ip: str = "192.0.2.10") -> bool:  # fmt: skip
    request = policy.Request(ALICE, ACCOUNT, ACCOUNT, action, resource, context or {}, now, source_ip)
    return policy.decide(policy.parse(text), [], [], request).allowed


def allowed_with(condition: dict, **kw: object) -> bool:
    return ask(doc(stmt(principal=ALICE, action="kms:Decrypt", Condition=condition)), **kw)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- wildcards


@pytest.mark.parametrize(
    ("pattern", "value", "match"),
    [
        ("[ab]", "a", False), ("[ab]", "[ab]", True),
        ("[!x]", "y", False), ("[!x]", "[!x]", True),
        ("a]b", "a]b", True), ("!", "!", True),
        ("a\\*", "a\\bc", True), ("a\\*", "a*", False), ("a\\?", "a\\x", True), ("\\", "\\", True),
        ("*", "", True), ("?", "", False), ("a?c", "abc", True), ("a?c", "ac", False),
        ("a*b*c", "aXbYc", True), ("a*b*c", "aXcYb", False), ("*a*a*a*a*b", "a" * 300, False),
        ("key/*", "key/1/2", True), ("a*", "A", False),
    ],
)  # fmt: skip
def test_only_star_and_question_mark_are_wildcards(pattern: str, value: str, match: bool) -> None:
    assert policy.wildcard_match(pattern, value) is match


def test_brackets_are_literal_in_resource_action_and_string_like() -> None:
    bracket_key = KEY[:-1] + "[" + "0-9" + "]"
    assert not ask(doc(stmt(principal=ALICE, Resource=bracket_key)))  # fnmatch: a character class
    assert ask(doc(stmt(principal=ALICE, Resource=KEY[:-1] + "?")))
    with pytest.raises(MalformedPolicyDocumentException):  # an action is kms: and letters, * and ?
        policy.parse(doc(stmt(principal=ALICE, action="kms:[D]ecrypt")))
    like = {"StringLike": {"kms:EncryptionContext:path": "/home/[a-z]*"}}
    assert not allowed_with(like, context={"path": "/home/alice"})
    assert allowed_with(like, context={"path": "/home/[a-z]/x"})


def _reference(pattern: str, value: str) -> bool:
    regex = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.fullmatch(regex, value, re.DOTALL) is not None


@settings(max_examples=400, deadline=None, database=None)
@given(st.text(alphabet="ab*?[]!\\-", max_size=12), st.text(alphabet="ab*?[]!\\-", max_size=16))
def test_wildcard_match_agrees_with_a_reference(pattern: str, value: str) -> None:
    assert policy.wildcard_match(pattern, value) is _reference(pattern, value)


# --------------------------------------------------------------------------- new conditions


@pytest.mark.parametrize(
    ("condition", "allowed"),
    [
        ({"DateGreaterThan": {"aws:CurrentTime": "2026-01-01T00:00:00Z"}}, True),
        ({"DateGreaterThan": {"aws:CurrentTime": "2027-01-01T00:00:00Z"}}, False),
        ({"DateLessThan": {"aws:CurrentTime": "2026-06-01T12:00:01Z"}}, True),
        ({"DateLessThan": {"aws:CurrentTime": "2026-06-01"}}, False),
        ({"DateLessThanEquals": {"aws:CurrentTime": "2026-06-01T12:00:00+00:00"}}, True),
        ({"DateGreaterThanEquals": {"aws:CurrentTime": str(int(NOW.timestamp()))}}, True),
        ({"DateEquals": {"aws:EpochTime": int(NOW.timestamp())}}, True),
        ({"DateNotEquals": {"aws:CurrentTime": "2026-06-01T12:00:00Z"}}, False),
        ({"IpAddress": {"aws:SourceIp": "192.0.2.0/24"}}, True),
        ({"IpAddress": {"aws:SourceIp": ["198.51.100.0/24", "192.0.2.10"]}}, True),
        ({"IpAddress": {"aws:SourceIp": "198.51.100.0/24"}}, False),
        ({"IpAddress": {"aws:SourceIp": "2001:db8::/32"}}, False),
        ({"NotIpAddress": {"aws:SourceIp": "192.0.2.0/24"}}, False),
        ({"NotIpAddress": {"aws:SourceIp": "10.0.0.0/8"}}, True),
        ({"Bool": {"kms:GrantIsForAWSResource": "false"}}, True),
        ({"Bool": {"kms:GrantIsForAWSResource": "True"}}, False),
        ({"Null": {"aws:SourceIp": "false"}}, True),
        ({"Null": {"kms:EncryptionContext:x": "true"}}, True),
    ],
)
def test_date_address_bool_and_null_conditions(condition: dict, allowed: bool) -> None:
    assert allowed_with(condition) is allowed


def test_an_ipv4_client_on_a_dual_stack_listener_and_absent_facts() -> None:
    cidr = {"IpAddress": {"aws:SourceIp": "192.0.2.0/24"}}
    assert allowed_with(cidr, source_ip="::ffff:192.0.2.10")
    assert not allowed_with(cidr, source_ip="")  # unknown address: a positive test fails
    assert allowed_with({"NotIpAddress": {"aws:SourceIp": "192.0.2.0/24"}}, source_ip="")
    assert not allowed_with({"DateGreaterThan": {"aws:CurrentTime": "2020-01-01"}}, now=None)


@pytest.mark.parametrize(
    "condition",
    [
        {"DateGreaterThan": {"aws:CurrentTime": "tomorrow"}},
        {"DateGreaterThan": {"kms:EncryptionContext:d": "2026-01-01"}},  # a date operator on a string key
        {"StringEquals": {"aws:CurrentTime": "2026-01-01"}},  # a string operator on a date key
        {"IpAddress": {"aws:SourceIp": "300.1.2.3"}},
        {"IpAddress": {"aws:PrincipalArn": "10.0.0.0/8"}},
        {"StringLike": {"aws:SourceIp": "10.*"}},
        {"ArnLike": {"aws:PrincipalArn": "arn:*"}},  # an operator we do not implement
        {"StringEquals": {"aws:SourceVpc": "vpc-1"}},  # a key we do not know
        {"Null": {"aws:SourceIp": "maybe"}},
        {"DateGreaterThan": {"aws:CurrentTime": []}},
    ],
)
def test_unknown_or_mistyped_conditions_fail_closed(condition: dict) -> None:
    with pytest.raises(MalformedPolicyDocumentException):
        policy.parse(doc(stmt(principal=ALICE, Condition=condition)))


def test_deeply_nested_policy_is_malformed_not_a_crash() -> None:
    for depth in (100, 1500, 12000):
        with pytest.raises(MalformedPolicyDocumentException):
            policy.parse("[" * depth + "]" * depth)
        nested = '{"Version": "2012-10-17", "Statement": ' + "[" * depth + "{}" + "]" * depth + "}"
        with pytest.raises(MalformedPolicyDocumentException):
            policy.parse(nested)


# --------------------------------------------------------------------------- fuzz

_SPECIAL = ["*", "?", "[", "]", "!", "\\", ":", "/"]
_SURROGATE = st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF)
_text = st.text(st.characters(codec="utf-8") | st.sampled_from(_SPECIAL), max_size=20) | _SURROGATE
_value = st.one_of(_text, st.booleans(), st.integers(), st.none(), st.floats(allow_nan=True))
_json = st.recursive(
    _value,
    lambda inner: (
        st.lists(inner, min_size=1, max_size=3) | st.dictionaries(_text, inner, min_size=1, max_size=3)
    ),
    max_leaves=12,
)
_operators = st.sampled_from([
    *sorted(policy._OPERATORS), "ForAnyValue:StringLike", "ForAllValues:StringEquals", "StringEqualsIfExists",
    "DateLessThanIfExists", "NotIpAddressIfExists", "Bogus", "ForSome:StringEquals",
])  # fmt: skip
_keys = st.sampled_from([
    "aws:CurrentTime", "aws:EpochTime", "aws:SourceIp", "kms:EncryptionContext:a",
    "kms:EncryptionContextKeys", "kms:CallerAccount", "aws:PrincipalArn", "kms:GrantIsForAWSResource",
    "aws:Unknown",
])  # fmt: skip
_condition_values = st.one_of(
    _text, st.sampled_from(["2026-01-01T00:00:00Z", "1700000000", "192.0.2.0/24", "::1", "true", "false"]),
    st.lists(_text, max_size=3), st.integers(), st.booleans(), _json,
)
_conditions = st.dictionaries(_operators, st.dictionaries(_keys, _condition_values, max_size=2), max_size=3)
_statements = st.fixed_dictionaries(
    {
        "Effect": st.sampled_from(["Allow", "Deny"]),
        "Principal": st.sampled_from(["*", {"AWS": ROOT}, {"AWS": ALICE}]),
        "Action": st.sampled_from(["kms:*", "kms:Decrypt", "kms:[D]ecrypt", "kms:De?rypt", "*"]) | _text,
        "Resource": st.sampled_from(["*", KEY, KEY[:-4] + "*", KEY[:-1] + "[a-f]"]) | _text,
    },
    optional={"Condition": _conditions | _json, "Sid": _text | _value},
)
_documents = st.one_of(
    st.fixed_dictionaries({
        "Version": st.sampled_from(["2012-10-17", "2008-10-17"]) | _text,
        "Statement": st.lists(_statements, min_size=1, max_size=3) | _statements,
    }),
    _json,
)  # fmt: skip
_addresses = st.sampled_from(["", "192.0.2.10", "::1", "::ffff:10.0.0.1", "junk"])
_actions = st.sampled_from(["kms:Decrypt", "kms:Encrypt", "kms:PutKeyPolicy"])


@settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(_documents, st.dictionaries(_text, _text, max_size=3), _addresses, _actions)
def test_fuzz_parse_and_decide_never_crash(
    document: object, context: dict, source_ip: str, action: str
) -> None:
    """Anything parses to a policy or is malformed; every parsed policy gets a decision, and an
    explicit Deny that applies to everyone always wins."""
    try:
        text = json.dumps(document, allow_nan=True)
    except (UnicodeEncodeError, ValueError):
        return
    try:
        parsed = policy.parse(text)
    except MalformedPolicyDocumentException:
        return
    request = policy.Request(ALICE, ACCOUNT, ACCOUNT, action, KEY, context, NOW, source_ip)
    assert isinstance(policy.decide(parsed, [], [], request).allowed, bool)
    deny_all = {"Effect": "Deny", "Principal": "*", "Action": "*", "Resource": "*"}
    assert parsed.statements
    with_deny = json.loads(text)
    raw = with_deny["Statement"]
    with_deny["Statement"] = [*(raw if isinstance(raw, list) else [raw]), deny_all]
    assert not policy.decide(policy.parse(json.dumps(with_deny)), [], [], request).allowed
