"""AWS Signature Version 4 for the KMS JSON protocol: signing (clients) and verification (server).

Both sides share one canonicalisation, so a request our client signs is checked by exactly the
code that checks boto3's. Verification follows ../shared/AWS-KMS-NOTES.md step by step and
raises the AWS error type of the first step that fails; it never returns a bool.

Only the signature scheme lives here: which access key maps to which principal is the service's
business (``lookup`` below), and HTTP parsing is the API layer's.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import re
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from typing import TypeVar
from urllib.parse import quote, urlsplit

from keyservice.errors import (
    IncompleteSignatureException,
    InvalidSignatureException,
    MissingAuthenticationTokenException,
)

ALGORITHM = "AWS4-HMAC-SHA256"
SERVICE = "kms"
TERMINATOR = "aws4_request"
MAX_CLOCK_SKEW = timedelta(minutes=5)
AMZ_DATE_FORMAT = "%Y%m%dT%H%M%SZ"

_AUTH_FIELD = re.compile(r"(Credential|SignedHeaders|Signature)=([^,\s]*)")
_SIGNATURE = re.compile(r"[0-9a-f]{64}")
_ALWAYS_SIGNED = ("host", "content-type", "x-amz-date", "x-amz-target", "x-amz-security-token")

T = TypeVar("T")


def _sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _hmac(key: bytes, msg: str) -> bytes:
    # hmac.digest is OpenSSL's one-shot HMAC: several times faster than building an hmac.HMAC.
    return hmac.digest(key, msg.encode("utf-8"), "sha256")


@functools.lru_cache(maxsize=1024)
def signing_key(secret_access_key: str, date: str, region: str, service: str = SERVICE) -> bytes:
    """The HMAC chain AWS4+secret -> date -> region -> service -> aws4_request.

    Cached: it changes once a day per access key, and four HMACs per request add up.
    """
    k_date = _hmac(("AWS4" + secret_access_key).encode("utf-8"), date)
    return _hmac(_hmac(_hmac(k_date, region), service), TERMINATOR)


def _canonical_query(query: str) -> str:
    if not query:
        return ""
    pairs = []
    for part in query.split("&"):
        name, _, value = part.partition("=")
        pairs.append((quote(name, safe="-_.~"), quote(value, safe="-_.~")))
    return "&".join(f"{n}={v}" for n, v in sorted(pairs))


def canonical_request(
    method: str, path: str, query: str, headers: Mapping[str, str], signed_headers: list[str], body: bytes
) -> str:
    """The canonical request; ``headers`` must be keyed by lowercase name.

    Each value is trimmed and its runs of whitespace collapsed to one space (``str.split`` splits
    on exactly the characters ``\\s`` matches in a ``str`` pattern)."""
    canonical_headers = "".join([f"{name}:{' '.join(headers[name].split())}\n" for name in signed_headers])
    return "\n".join(
        [
            method.upper(),
            "/" if path in ("/", "") else quote(path, safe="/-_.~"),
            _canonical_query(query),
            canonical_headers,
            ";".join(signed_headers),
            _sha256_hex(body),
        ]
    )


def string_to_sign(amz_date: str, scope: str, canonical: str) -> str:
    return "\n".join([ALGORITHM, amz_date, scope, _sha256_hex(canonical.encode("utf-8"))])


def sign_request(
    *,
    method: str,
    url: str,
    headers: dict[str, str],
    body: bytes,
    access_key_id: str,
    secret_access_key: str,
    region: str,
    service: str = SERVICE,
    session_token: str | None = None,
    now: datetime | None = None,
) -> dict[str, str]:
    """Return the headers to add (X-Amz-Date, Authorization, and X-Amz-Security-Token if a token).

    Signs host, content-type, x-amz-date, x-amz-target, x-amz-security-token and every
    x-kmsfs-* header present in ``headers``.
    """
    moment = (now or datetime.now(UTC)).astimezone(UTC)
    amz_date = moment.strftime(AMZ_DATE_FORMAT)
    parts = urlsplit(url)
    added: dict[str, str] = {"X-Amz-Date": amz_date}
    if session_token:
        added["X-Amz-Security-Token"] = session_token
    lower = {k.lower(): v for k, v in {**headers, **added}.items()}
    lower.setdefault("host", parts.netloc)
    signed = sorted(n for n in lower if n in _ALWAYS_SIGNED or n.startswith("x-kmsfs-"))
    scope = f"{amz_date[:8]}/{region}/{service}/{TERMINATOR}"
    canonical = canonical_request(method, parts.path or "/", parts.query, lower, signed, body)
    signature = _hmac(signing_key(secret_access_key, amz_date[:8], region, service),
                      string_to_sign(amz_date, scope, canonical)).hex()
    added["Authorization"] = (
        f"{ALGORITHM} Credential={access_key_id}/{scope}, "
        f"SignedHeaders={';'.join(signed)}, Signature={signature}"
    )
    return added


def _parse_amz_date(value: str) -> datetime:
    """``YYYYMMDDTHHMMSSZ`` -> aware datetime (strptime is slow enough to show per request)."""
    if len(value) != 16 or value[8] != "T" or value[15] != "Z" or not (value[:8] + value[9:15]).isdigit():
        raise ValueError(value)
    return datetime(int(value[:4]), int(value[4:6]), int(value[6:8]), int(value[9:11]), int(value[11:13]),
                    int(value[13:15]), tzinfo=UTC)


def parse_authorization(value: str) -> tuple[str, list[str], list[str], str]:
    """Split an Authorization header into (access key id, scope parts, signed headers, signature)."""
    algorithm, _, rest = value.strip().partition(" ")
    if algorithm != ALGORITHM:
        raise IncompleteSignatureException(f"Unsupported authorization algorithm; expected {ALGORITHM}.")
    fields = dict(_AUTH_FIELD.findall(rest))
    missing = [k for k in ("Credential", "SignedHeaders", "Signature") if not fields.get(k)]
    if missing:
        raise IncompleteSignatureException(
            f"Authorization header requires {', '.join(missing)} parameter(s). Authorization={value[:200]}"
        )
    credential = fields["Credential"].split("/")
    if len(credential) != 5 or not credential[0]:
        raise IncompleteSignatureException(
            "Credential must have exactly 5 slash-delimited elements, e.g. keyid/date/region/service/term."
        )
    signed = fields["SignedHeaders"].split(";")
    if signed != sorted(signed) or any(not n or n != n.lower() for n in signed):
        raise IncompleteSignatureException("SignedHeaders must be a sorted list of lowercase header names.")
    if not _SIGNATURE.fullmatch(fields["Signature"]):
        raise IncompleteSignatureException("Signature must be 64 lowercase hex characters.")
    return credential[0], credential[1:], signed, fields["Signature"]


def verify_request(
    *,
    method: str,
    path: str,
    query: str,
    headers: Mapping[str, str],
    body: bytes,
    region: str,
    lookup: Callable[[str], tuple[str, T]],
    now: datetime,
) -> T:
    """Verify a SigV4-signed request and return what ``lookup`` gave for its access key.

    ``headers`` is keyed by lowercase name. ``lookup(access_key_id)`` returns the secret and the
    caller's identity, or raises UnrecognizedClientException for an unknown key.
    """
    authorization = headers.get("authorization")
    if not authorization:
        raise MissingAuthenticationTokenException("Missing Authentication Token")
    access_key_id, scope_parts, signed, signature = parse_authorization(authorization)
    amz_date = headers.get("x-amz-date", "")
    if not amz_date:
        raise IncompleteSignatureException(
            "Authorization header requires existence of a 'X-Amz-Date' header."
        )
    try:
        request_time = _parse_amz_date(amz_date)
    except ValueError:
        raise IncompleteSignatureException(
            f"X-Amz-Date '{amz_date[:40]}' is not in ISO 8601 basic format."
        ) from None
    date, scope_region, scope_service, terminator = scope_parts
    if date != amz_date[:8]:
        raise InvalidSignatureException(
            f"Date in Credential scope does not match YYYYMMDD from ISO-8601 version of date from HTTP: "
            f"'{date}' != '{amz_date[:8]}'"
        )
    if scope_service != SERVICE or terminator != TERMINATOR:
        raise InvalidSignatureException(f"Credential should be scoped to correct service: '{SERVICE}'.")
    if scope_region != region:
        raise InvalidSignatureException(
            f"Credential should be scoped to a valid region. This service's region is '{region}'."
        )
    if "host" not in signed:
        raise InvalidSignatureException("The 'host' header must be signed.")
    absent = [n for n in signed if n not in headers]
    if absent:
        raise InvalidSignatureException(f"Signed header(s) missing from the request: {', '.join(absent)}")
    secret, identity = lookup(access_key_id)
    skew = abs(now - request_time)
    if skew > MAX_CLOCK_SKEW:
        raise InvalidSignatureException(
            f"Signature expired: {amz_date} is now earlier than "
            f"{(now - MAX_CLOCK_SKEW).strftime(AMZ_DATE_FORMAT)} "
            f"({now.strftime(AMZ_DATE_FORMAT)} - 5 min.)"
            if request_time < now
            else f"Signature not yet current: {amz_date} is still later than "
            f"{(now + MAX_CLOCK_SKEW).strftime(AMZ_DATE_FORMAT)} ({now.strftime(AMZ_DATE_FORMAT)} + 5 min.)"
        )
    scope = "/".join(scope_parts)
    canonical = canonical_request(method, path, query, headers, signed, body)
    expected = _hmac(signing_key(secret, date, scope_region, scope_service),
                     string_to_sign(amz_date, scope, canonical)).hex()
    if not hmac.compare_digest(expected.encode("ascii"), signature.encode("ascii")):
        raise InvalidSignatureException(
            "The request signature we calculated does not match the signature you provided. "
            "Check your AWS Secret Access Key and signing method."
        )
    return identity
