"""The key service client: AWS KMS JSON 1.1 over a pooled requests.Session, signed with SigV4.

Why not boto3: the mount daemon needs three operations, bounded timeouts, an extra signed header
(``X-Kmsfs-Caller``, the local process the request is made for, recorded by our service's audit
log) and no heavyweight import in the FUSE process. Speaking the wire protocol directly also keeps
us honest: the integration tests run this client against moto, an independent implementation.
Credentials are static (a file, ``Credentials.current`` ~0.1 us) or borrowed from botocore's
provider chain (kmsfs/awscreds.py: profiles, SSO, roles, refreshed before expiry; ~0.6 us per
request, ~0.1 s to import once), never botocore's signer or transport.

Errors: an AWS error reply becomes ``KeyServiceError(code, message)``; anything that means "the
service could not answer" (connection refused, timeout, 5xx, unparseable reply) becomes
``KeyServiceUnavailable``. Nothing else escapes.

Unix socket: an endpoint ``unix:///path/to/keyservice.sock`` reaches a key service on this host
through its Unix-socket listener (``keyservice serve --listen unix:PATH``), plain HTTP on the
lean pool (kmsfs/transport.py). SigV4 still signs every request; it needs a host, and the host
signed (and sent) is always ``localhost`` (UNIX_HOST), the path ``/`` (docs/PROTOCOL.md).

Failover: a client may be given further endpoints (nodes of the same key service, the
credentials file's ``"endpoints"`` list). When the current one cannot answer, the same request is
signed again for the next one and sent there, in order; the first that answers becomes current.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import os
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import requests
from requests.adapters import HTTPAdapter

from keyservice.http.sigv4 import sign_request
from kmsfs import transport

CONTENT_TYPE = "application/x-amz-json-1.1"
TARGET_PREFIX = "TrentService."
CALLER_HEADER = "X-Kmsfs-Caller"
DEFAULT_REGION = "us-east-1"
# The CA bundle to verify the key service with, overriding the credentials file's ``ca_bundle`` and
# AWS_CA_BUNDLE (``kmsfs --ca-bundle`` sets it, so the forked mount daemon inherits it).
CA_BUNDLE_ENV = "KMSFS_CA_BUNDLE"
# A Unix-socket endpoint is unix:///abs/path; its requests are signed and sent for this host.
UNIX_SCHEME = "unix"
UNIX_HOST = "localhost"

# Error codes that mean "you may not use this key now" (mapped to EACCES by the FUSE layer).
# The key service's extension operation for open reports (directory-key mode).
REPORT_ACCESS = "KmsfsReportAccess"

ACCESS_CODES = frozenset({
    "AccessDeniedException", "DisabledException", "KMSInvalidStateException", "NotFoundException",
    "UnrecognizedClientException", "InvalidSignatureException", "IncorrectKeyException",
    "MissingAuthenticationTokenException", "KeyUnavailableException",
})


class KeyServiceError(Exception):
    """The service answered with an AWS error (``code`` is ``__type`` without any ``ns#``)."""

    def __init__(self, code: str, message: str = "") -> None:
        super().__init__(f"{code}: {message}" if message else code)
        self.code = code
        self.message = message

    @property
    def is_access_denied(self) -> bool:
        return self.code in ACCESS_CODES


class KeyServiceUnavailable(Exception):
    """The service could not be reached or did not answer properly in time."""


@dataclass(frozen=True)
class Credentials:
    access_key_id: str
    secret_access_key: str
    session_token: str | None = None
    endpoint: str | None = None
    region: str | None = None
    # Every endpoint of the service, in the order to try them (``endpoint`` first when both given).
    endpoints: tuple[str, ...] = ()
    # A PEM bundle of CAs to trust for an https endpoint (the keyservice's private CA); None means
    # the system's CAs. Certificate verification is never turned off.
    ca_bundle: str | None = None
    # For credentials resolved by botocore (kmsfs/awscreds.py): returns the keys to sign with now,
    # refreshing temporary credentials before they expire. None: the static keys above.
    refresh: Callable[[], tuple[str, str, str | None]] | None = None
    # Where they came from, for messages ("credentials file X", "AWS shared-credentials-file ...").
    source: str = ""

    def __repr__(self) -> str:  # never print the secret
        return f"Credentials(access_key_id={self.access_key_id!r}, endpoint={self.endpoint!r})"

    def current(self) -> tuple[str, str, str | None]:
        """(access key id, secret, session token) to sign the next request with."""
        if self.refresh is None:
            return self.access_key_id, self.secret_access_key, self.session_token
        return self.refresh()


def is_loopback(host: str) -> bool:
    """The same rule as the server's ``--insecure-http``: a loopback IP literal or ``localhost``."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host.lower() == "localhost"


def check_endpoint(url: str) -> str:
    """``url`` if kmsfs may send data keys there, else ValueError with one line saying why.

    https anywhere (the certificate is always verified); plain http only to a loopback address, so
    data keys never cross a network in clear; ``unix:///abs/path``, a Unix socket on this host.
    """
    parts = urlsplit(url)
    if parts.scheme == UNIX_SCHEME:
        if parts.netloc or not parts.path.startswith("/") or parts.query or parts.fragment:
            raise ValueError(f"endpoint {url!r} is not a unix:///ABSOLUTE/PATH URL")
        return url
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"endpoint {url!r}: invalid port") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"endpoint {url!r} is not an http(s)://HOST[:PORT] URL")
    if port == 0:
        raise ValueError(f"endpoint {url!r}: invalid port")
    if parts.scheme == "http" and not is_loopback(parts.hostname):
        raise ValueError(f"endpoint {url!r}: plain http is only allowed to a loopback address "
                         "(data keys would cross the network in clear); use https")
    return url


def load_credentials(path: str | os.PathLike[str] | None = None,
                     environ: dict[str, str] | None = None) -> Credentials:
    """From a JSON file {"endpoint","region","access_key_id","secret_access_key"} or AWS env vars."""
    env = os.environ if environ is None else environ
    if path is not None:
        try:
            data = json.loads(Path(path).read_text())
            endpoints = [str(e) for e in data.get("endpoints") or []]
            if not isinstance(data.get("endpoints", []), list):
                raise ValueError('"endpoints" must be a list of URLs')
            if data.get("endpoint") and data["endpoint"] not in endpoints:
                endpoints.insert(0, str(data["endpoint"]))
            return Credentials(
                access_key_id=str(data["access_key_id"]),
                secret_access_key=str(data["secret_access_key"]),
                session_token=data.get("session_token"),
                endpoint=endpoints[0] if endpoints else None,
                endpoints=tuple(endpoints),
                region=data.get("region"),
                ca_bundle=env.get(CA_BUNDLE_ENV) or data.get("ca_bundle") or env.get("AWS_CA_BUNDLE") or None,
                source=f"the credentials file {path}",
            )
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"cannot read credentials file {path}: {exc}") from exc
    akid, secret = env.get("AWS_ACCESS_KEY_ID"), env.get("AWS_SECRET_ACCESS_KEY")
    if not akid or not secret:
        raise ValueError("no credentials: pass --credentials FILE or set AWS_ACCESS_KEY_ID and "
                         "AWS_SECRET_ACCESS_KEY")
    return Credentials(
        access_key_id=akid,
        secret_access_key=secret,
        session_token=env.get("AWS_SESSION_TOKEN") or None,
        endpoint=env.get("AWS_ENDPOINT_URL_KMS") or env.get("AWS_ENDPOINT_URL") or None,
        region=env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or None,
        ca_bundle=env.get(CA_BUNDLE_ENV) or env.get("AWS_CA_BUNDLE") or None,
        source="the AWS environment variables",
    )


class KeyClient:
    """A thread-safe client for GenerateDataKey, Decrypt and DescribeKey."""

    def __init__(self, endpoint: str, region: str, credentials: Credentials, *,
                 connect_timeout: float = 3.0, read_timeout: float = 10.0,
                 session: requests.Session | None = None, fallbacks: tuple[str, ...] = ()) -> None:
        self._endpoints: list[tuple[str, str]] = []  # (url, host) in the order to try them
        for url in (endpoint, *fallbacks):
            parts = urlsplit(check_endpoint(url))
            entry = ((f"{UNIX_SCHEME}://{parts.path}", UNIX_HOST) if parts.scheme == UNIX_SCHEME
                     else (f"{parts.scheme}://{parts.netloc}/", parts.netloc))
            if entry not in self._endpoints:
                self._endpoints.append(entry)
        self.url, self.host = self._endpoints[0]
        self.region = region
        self.credentials = credentials
        self.timeout = (connect_timeout, read_timeout)
        self.session = session or requests.Session()
        adapter = HTTPAdapter(pool_connections=4, pool_maxsize=16, max_retries=0)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        self._adapter = adapter
        # Passed with every request: a session-level setting would lose to REQUESTS_CA_BUNDLE.
        self.verify: str | bool = credentials.ca_bundle or True
        # The lean keep-alive pool (kmsfs/transport.py) unless a session was given or a proxy is
        # configured: requests costs ~0.8 ms of Python per call, on the path of every open.
        # (A transport adapter mounted on the session later, as tests do, takes precedence.)
        # A Unix socket is only reachable through the pool (requests cannot speak it; no proxy applies).
        lean = session is None and transport.usable()
        self._pools = {url: transport.ConnectionPool(url) if lean or _is_unix(url) else None
                       for url, _ in self._endpoints}
        self._pool = self._pools[self.url]

    # -- transport --------------------------------------------------------------------------------
    def call(self, operation: str, payload: dict[str, Any],
             caller: dict[str, Any] | None = None) -> dict[str, Any]:
        """POST one KMS operation and return the decoded JSON reply (failing over, see the module doc)."""
        body = json.dumps(payload, separators=(",", ":")).encode("utf-8")
        current = (self.url, self.host)
        order = [current] + [e for e in self._endpoints if e != current]
        for attempt, (url, host) in enumerate(order):
            try:
                reply = self._call_one(url, host, operation, body, caller)
            except KeyServiceUnavailable:
                if attempt == len(order) - 1:
                    raise
                continue
            if attempt:
                self.url, self.host, self._pool = url, host, self._pools[url]  # stay on the one that answered
            return reply
        raise AssertionError("unreachable")

    def _call_one(self, url: str, host: str, operation: str, body: bytes,
                  caller: dict[str, Any] | None) -> dict[str, Any]:
        headers = {
            "Host": host,
            "Content-Type": CONTENT_TYPE,
            "X-Amz-Target": TARGET_PREFIX + operation,
        }
        if caller:
            # ensure_ascii keeps any path representable as an HTTP header value.
            headers[CALLER_HEADER] = json.dumps({k: _audit_text(v) for k, v in caller.items()},
                                                separators=(",", ":"), sort_keys=True)
        try:
            access_key_id, secret, token = self.credentials.current()
        except Exception as exc:  # noqa: BLE001 - botocore's refresh: any failure means "no answer"
            raise KeyServiceUnavailable(f"credentials could not be refreshed: {exc}") from exc
        # On a Unix socket the URL names the socket file; the request itself is for http://localhost/.
        request_url = f"http://{UNIX_HOST}/" if _is_unix(url) else url
        headers.update(sign_request(
            method="POST", url=request_url, headers=headers, body=body,
            access_key_id=access_key_id, secret_access_key=secret,
            region=self.region, session_token=token,
        ))
        pool = self._pools[url]
        try:
            lean = pool is not None and (_is_unix(url) or self.session.get_adapter(url) is self._adapter)
            post = pool.post if lean and pool is not None else self.session.post
            resp = post(request_url, data=body, headers=headers, timeout=self.timeout, verify=self.verify)
        except requests.RequestException as exc:
            if _tls_failure(exc):
                trusted = self.verify if isinstance(self.verify, str) else "the system CAs"
                raise KeyServiceUnavailable(
                    f"the TLS certificate of {url} is not trusted by {trusted}: {_tls_reason(exc)} "
                    "(wrong endpoint, or pass the service's CA with --ca-bundle)") from exc
            raise KeyServiceUnavailable(f"key service at {url} unreachable: {exc}") from exc
        if resp.status_code >= 500:
            code = _error_code(resp)
            raise KeyServiceUnavailable(f"key service error {resp.status_code} {code}".strip())
        try:
            reply = resp.json() if resp.content else {}
        except ValueError as exc:
            raise KeyServiceUnavailable(f"unparseable reply (HTTP {resp.status_code})") from exc
        if resp.status_code != 200:
            raise KeyServiceError(_error_code(resp) or f"HTTP{resp.status_code}",
                                  str(reply.get("message") or reply.get("Message") or ""))
        if not isinstance(reply, dict):
            raise KeyServiceUnavailable("reply is not a JSON object")
        return reply

    # -- operations -------------------------------------------------------------------------------
    def generate_data_key(self, key_id: str, context: dict[str, str],
                          caller: dict[str, Any] | None = None) -> tuple[bytes, bytes, str]:
        """A fresh AES-256 data key: (plaintext, wrapped blob, key ARN)."""
        reply = self.call("GenerateDataKey",
                          {"KeyId": key_id, "KeySpec": "AES_256", "EncryptionContext": context},
                          caller)
        try:
            return (_b64(reply["Plaintext"]), _b64(reply["CiphertextBlob"]), str(reply["KeyId"]))
        except (KeyError, ValueError, TypeError) as exc:
            raise KeyServiceUnavailable(f"malformed GenerateDataKey reply: {exc}") from exc

    def decrypt(self, blob: bytes, context: dict[str, str],
                caller: dict[str, Any] | None = None, key_id: str | None = None) -> bytes:
        """Unwrap a data key; the service checks the context and records the access."""
        payload: dict[str, Any] = {"CiphertextBlob": base64.b64encode(blob).decode("ascii"),
                                   "EncryptionContext": context}
        if key_id:
            payload["KeyId"] = key_id
        reply = self.call("Decrypt", payload, caller)
        try:
            return _b64(reply["Plaintext"])
        except (KeyError, ValueError, TypeError) as exc:
            raise KeyServiceUnavailable(f"malformed Decrypt reply: {exc}") from exc

    def re_encrypt(self, blob: bytes, context: dict[str, str], destination_key_id: str,
                   caller: dict[str, Any] | None = None) -> tuple[bytes, str]:
        """ReEncrypt a wrapped key under ``destination_key_id`` (same context); (blob, key ARN)."""
        payload = {"CiphertextBlob": base64.b64encode(blob).decode("ascii"),
                   "SourceEncryptionContext": context, "DestinationKeyId": destination_key_id,
                   "DestinationEncryptionContext": context}
        reply = self.call("ReEncrypt", payload, caller)
        try:
            return _b64(reply["CiphertextBlob"]), str(reply["KeyId"])
        except (KeyError, ValueError, TypeError) as exc:
            raise KeyServiceUnavailable(f"malformed ReEncrypt reply: {exc}") from exc

    def describe_key(self, key_id: str) -> dict[str, Any]:
        reply = self.call("DescribeKey", {"KeyId": key_id})
        meta = reply.get("KeyMetadata")
        if not isinstance(meta, dict):
            raise KeyServiceUnavailable("malformed DescribeKey reply")
        return meta

    def report_access(self, key_id: str, cipherdir_id: str, reports: list[dict[str, Any]]) -> int:
        """Send opens and creates granted under directory keys to the key service's audit (the
        kmsfs extension operation ``KmsfsReportAccess``, docs/PROTOCOL.md); returns how many it
        recorded. An empty list is a probe: is the extension there, and may we use the key?"""
        reply = self.call(REPORT_ACCESS, {"KeyId": key_id, "CipherdirId": cipherdir_id, "Reports": reports})
        recorded = reply.get("Recorded")
        if not isinstance(recorded, int) or recorded != len(reports):
            raise KeyServiceUnavailable("malformed KmsfsReportAccess reply")
        return recorded

    def close(self) -> None:
        for pool in self._pools.values():
            if pool is not None:
                pool.close()
        self.session.close()


def _is_unix(url: str) -> bool:
    return url.startswith(UNIX_SCHEME + ":")


def _tls_failure(exc: BaseException) -> bool:
    """A certificate verification failure anywhere in the cause chain (requests or our pool)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, (ssl.SSLCertVerificationError, requests.exceptions.SSLError)):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _tls_reason(exc: BaseException) -> str:
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLCertVerificationError):
            return str(seen.verify_message or seen.reason or seen)
        seen = seen.__cause__ or seen.__context__
    return str(exc)


def _b64(value: Any) -> bytes:
    return base64.b64decode(value, validate=True)


def _error_code(resp: requests.Response | transport.Response) -> str:
    code = ""
    try:
        body = resp.json()
        if isinstance(body, dict):
            code = str(body.get("__type") or body.get("code") or "")
    except ValueError:
        pass
    if not code:
        code = resp.headers.get("x-amzn-ErrorType", "").split(":")[0]
    return code.rsplit("#", 1)[-1]


def _audit_text(value: Any) -> Any:
    """A path with bytes that are not UTF-8 (os.fsdecode keeps them as lone surrogates, which the
    service refuses as JSON) goes to the audit with those bytes as ``\\xNN`` escapes."""
    if not isinstance(value, str):
        return value
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return value.encode("utf-8", "surrogateescape" if _escapes_only(value) else "backslashreplace"
                            ).decode("utf-8", "backslashreplace")
    return value


def _escapes_only(value: str) -> bool:
    return all(not 0xD800 <= ord(c) <= 0xDFFF or 0xDC80 <= ord(c) <= 0xDCFF for c in value)
