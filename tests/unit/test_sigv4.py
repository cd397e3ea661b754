"""SigV4: our signer and verifier agree with botocore's signer, and every failure has its AWS name."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from keyservice import errors
from keyservice.http.sigv4 import sign_request, signing_key, verify_request

AKID = "AKIAEXAMPLEEXAMPLE00"
SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
URL = "http://127.0.0.1:8600/"
BODY = b'{"KeyId": "alias/test"}'
NOW = datetime(2026, 11, 29, 12, 0, 0, tzinfo=UTC)


def _lookup(akid: str) -> tuple[str, str]:
    if akid != AKID:
        raise errors.UnrecognizedClientException("The security token included in the request is invalid.")
    return SECRET, "principal"


def _botocore_headers(body: bytes = BODY, region: str = "us-east-1") -> dict[str, str]:
    request = AWSRequest(
        method="POST",
        url=URL,
        data=body,
        headers={"Content-Type": "application/x-amz-json-1.1", "X-Amz-Target": "TrentService.DescribeKey"},
    )
    SigV4Auth(Credentials(AKID, SECRET), "kms", region).add_auth(request)
    headers = {k.lower(): v for k, v in request.headers.items()}
    headers["host"] = "127.0.0.1:8600"
    return headers


def _sign(headers: dict[str, str], now: datetime | None = None) -> dict[str, str]:
    return sign_request(
        method="POST",
        url=URL,
        headers=headers,
        body=BODY,
        access_key_id=AKID,
        secret_access_key=SECRET,
        region="us-east-1",
        now=now,
    )


def _verify(headers: dict[str, str], body: bytes = BODY, now: datetime | None = None) -> str:
    return verify_request(
        method="POST",
        path="/",
        query="",
        headers=headers,
        body=body,
        region="us-east-1",
        lookup=_lookup,
        now=now or datetime.now(UTC),
    )


def test_signing_key_matches_aws_documented_example() -> None:
    # AWS General Reference, "Examples of how to derive a signing key for Signature Version 4".
    key = signing_key("wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", "20120215", "us-east-1", "iam")
    assert key.hex() == "f4780e2d9f65fa895f9c67b32ce1baf0b0d8a43505a000a1a9e090d414db404d"


def test_botocore_signature_verifies() -> None:
    assert _verify(_botocore_headers()) == "principal"


def test_our_signature_equals_botocores() -> None:
    theirs = _botocore_headers()
    base = {"Content-Type": "application/x-amz-json-1.1", "X-Amz-Target": "TrentService.DescribeKey"}
    moment = datetime.strptime(theirs["x-amz-date"], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
    ours = _sign(base, now=moment)
    assert ours["Authorization"].split("Signature=")[1] == theirs["authorization"].split("Signature=")[1]


def test_kmsfs_headers_are_signed() -> None:
    base = {
        "Content-Type": "application/x-amz-json-1.1",
        "X-Amz-Target": "TrentService.Decrypt",
        "X-Kmsfs-Caller": '{"path": "/a"}',
    }
    added = _sign(base)
    assert "x-kmsfs-caller" in added["Authorization"]
    headers = {k.lower(): v for k, v in {**base, **added}.items()} | {"host": "127.0.0.1:8600"}
    _verify(headers)
    headers["x-kmsfs-caller"] = '{"path": "/b"}'
    with pytest.raises(errors.InvalidSignatureException):
        _verify(headers)


def test_tampered_body_is_refused() -> None:
    with pytest.raises(errors.InvalidSignatureException, match="does not match"):
        _verify(_botocore_headers(), body=BODY + b" ")


def test_wrong_secret_is_refused() -> None:
    headers = _botocore_headers()
    with pytest.raises(errors.InvalidSignatureException):
        verify_request(
            method="POST",
            path="/",
            query="",
            headers=headers,
            body=BODY,
            region="us-east-1",
            lookup=lambda a: ("not-the-secret", "p"),
            now=datetime.now(UTC),
        )


def test_unknown_access_key_is_refused() -> None:
    headers = _botocore_headers()
    headers["authorization"] = headers["authorization"].replace(AKID, "AKIAUNKNOWNUNKNOWN00")
    with pytest.raises(errors.UnrecognizedClientException):
        _verify(headers)


def test_missing_authorization() -> None:
    headers = _botocore_headers()
    del headers["authorization"]
    with pytest.raises(errors.MissingAuthenticationTokenException):
        _verify(headers)


@pytest.mark.parametrize(
    "mangle",
    [
        lambda v: v.replace("AWS4-HMAC-SHA256", "AWS4-HMAC-SHA1"),
        lambda v: v.split(", Signature=")[0],
        lambda v: v.replace("/aws4_request", ""),
        lambda v: v.replace("SignedHeaders=content-type;host", "SignedHeaders=host;content-type"),
    ],
)
def test_malformed_authorization(mangle) -> None:
    headers = _botocore_headers()
    headers["authorization"] = mangle(headers["authorization"])
    with pytest.raises(errors.IncompleteSignatureException):
        _verify(headers)


@pytest.mark.parametrize("delta", [timedelta(minutes=6), timedelta(minutes=-6)])
def test_stale_or_future_date(delta: timedelta) -> None:
    with pytest.raises(errors.InvalidSignatureException, match="Signature (expired|not yet current)"):
        _verify(_botocore_headers(), now=datetime.now(UTC) + delta)


def test_other_region_is_refused() -> None:
    with pytest.raises(errors.InvalidSignatureException, match="region"):
        _verify(_botocore_headers(region="eu-west-1"))


def test_host_must_be_signed() -> None:
    base = {"Content-Type": "application/x-amz-json-1.1", "X-Amz-Target": "TrentService.DescribeKey"}
    added = _sign(base)
    added["Authorization"] = added["Authorization"].replace("host;", "")
    headers = {k.lower(): v for k, v in {**base, **added}.items()} | {"host": "127.0.0.1:8600"}
    with pytest.raises(errors.InvalidSignatureException, match="host"):
        _verify(headers)


def _verify_with(headers: dict[str, str], secret: str) -> str:
    return verify_request(
        method="POST", path="/", query="", headers=headers, body=BODY, region="us-east-1",
        lookup=lambda a: (secret, "p"), now=datetime.now(UTC),
    )  # fmt: skip


def test_signing_key_cache_does_not_outlive_a_rotated_secret() -> None:
    """The derived signing key is cached by (secret, date, region, service): once the access key's
    secret changes, a request signed with the old one fails although its key is still cached."""
    headers = _botocore_headers()
    assert _verify_with(headers, SECRET) == "p"  # the old secret's signing key is now cached
    with pytest.raises(errors.InvalidSignatureException, match="does not match"):
        _verify_with(headers, "a-new-secret-after-rotation-0000000000000")
    assert signing_key.cache_info().currsize >= 1


def test_signing_key_cache_does_not_outlive_a_deleted_access_key() -> None:
    headers = _botocore_headers()
    assert _verify(headers) == "principal"

    def deleted(akid: str) -> tuple[str, str]:
        raise errors.UnrecognizedClientException("The security token included in the request is invalid.")

    with pytest.raises(errors.UnrecognizedClientException):
        verify_request(method="POST", path="/", query="", headers=headers, body=BODY, region="us-east-1",
                       lookup=deleted, now=datetime.now(UTC))


@pytest.mark.parametrize("position", [0, 31, 63])
def test_a_wrong_signature_is_refused_after_the_right_one_verified(position: int) -> None:
    headers = _botocore_headers()
    assert _verify(headers) == "principal"
    signature = headers["authorization"].rsplit("Signature=", 1)[1]
    flipped = signature[:position] + ("0" if signature[position] != "0" else "1") + signature[position + 1 :]
    headers["authorization"] = headers["authorization"].replace(signature, flipped)
    with pytest.raises(errors.InvalidSignatureException, match="does not match"):
        _verify(headers)


@pytest.mark.parametrize("value", ["  a  b\t c ", "a\u00a0\u00a0b", "a\x1c b", "plain"])
def test_header_whitespace_is_collapsed_as_sigv4_says(value: str) -> None:
    """Trimmed, every run of whitespace one space: the same as the regular expression it replaced."""
    import re

    from keyservice.http.sigv4 import canonical_request

    canonical = canonical_request("POST", "/", "", {"x-v": value}, ["x-v"], b"")
    assert canonical.split("\n")[3] == "x-v:" + re.sub(r"\s+", " ", value.strip())
