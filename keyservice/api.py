"""The HTTP layer: AWS KMS JSON 1.1 over WSGI, translated to and from ``KeyService.call``.

This module only translates: it reads the body (bounded), verifies the SigV4 signature, decodes
JSON and base64, hands the request to the service core, and encodes the reply or the AWS error.
It decides nothing about keys. Served by waitress (a production WSGI server with HTTP/1.1
keep-alive) from ``keyservice.cli``.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import re
import uuid
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Any, Protocol

from keyservice import errors
from keyservice.clock import Clock
from keyservice.context import Principal, RequestContext
from keyservice.sigv4 import verify_request

log = logging.getLogger(__name__)

CONTENT_TYPE = "application/x-amz-json-1.1"
TARGET_PREFIX = "TrentService."
MAX_BODY_BYTES = 256 * 1024
# Bodies up to this multiple of the limit are read and dropped before the 413; larger ones are
# cut off by the HTTP server itself.
DRAIN_FACTOR = 8
CALLER_HEADER = "x-kmsfs-caller"
MAX_CALLER_BYTES = 8192
# Members that travel as base64 strings in the JSON protocol (botocore's "blob" shapes for KMS).
BLOB_FIELDS = frozenset(
    {
        "Plaintext",
        "CiphertextBlob",
        "PublicKey",
        "ImportToken",
        "EncryptedKeyMaterial",
        "Message",
        "Signature",
        "Mac",
        "CiphertextForRecipient",
        "PrivateKeyCiphertextBlob",
        "PrivateKeyPlaintext",
    }
)

_CLAIMED_KEY = re.compile(r"Credential=([A-Za-z0-9]+)/")

StartResponse = Callable[[str, list[tuple[str, str]]], Any]


class Service(Protocol):
    """What the HTTP layer needs from the service core."""

    region: str

    def authenticate(self, access_key_id: str) -> tuple[str, Principal]: ...

    def call(self, operation: str, params: dict[str, Any], ctx: RequestContext) -> dict[str, Any]: ...

    def record_refused(
        self, operation: str, ctx: RequestContext, error: errors.KMSError, *, access_key_id: str | None = None
    ) -> None: ...


def _request_headers(environ: dict[str, Any]) -> dict[str, str]:
    headers = {k[5:].replace("_", "-").lower(): v for k, v in environ.items() if k.startswith("HTTP_")}
    for key, name in (("CONTENT_TYPE", "content-type"), ("CONTENT_LENGTH", "content-length")):
        if environ.get(key):
            headers[name] = environ[key]
    return headers


def _decode_params(body: bytes) -> dict[str, Any]:
    try:
        params = json.loads(body or b"{}")
    except (ValueError, UnicodeDecodeError):
        raise errors.SerializationException("Request body is not valid JSON.") from None
    if not isinstance(params, dict):
        raise errors.SerializationException("Request body must be a JSON object.")
    for name in BLOB_FIELDS & params.keys():
        value = params[name]
        if not isinstance(value, str):
            raise errors.SerializationException(f"{name} must be a base64-encoded string.")
        try:
            params[name] = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise errors.SerializationException(f"{name} is not valid base64.") from None
    return params


def _encode(value: Any) -> Any:
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    if isinstance(value, datetime):
        return value.timestamp()
    if isinstance(value, dict):
        return {k: _encode(v) for k, v in value.items() if v is not None}
    if isinstance(value, list | tuple):
        return [_encode(v) for v in value]
    return value


def _parse_caller(raw: str | None) -> dict[str, object]:
    """The kmsfs caller header (file path, local uid/pid/process); kept only if it is a small JSON object."""
    if not raw:
        return {}
    if len(raw) > MAX_CALLER_BYTES:
        return {"invalid": "caller header too large"}
    try:
        caller = json.loads(raw)
    except ValueError:
        return {"invalid": "caller header is not JSON"}
    return caller if isinstance(caller, dict) else {"invalid": "caller header is not an object"}


class KmsApp:
    """The WSGI application. One instance serves every request, from waitress's thread pool."""

    def __init__(
        self,
        service: Service,
        clock: Clock,
        *,
        max_body: int = MAX_BODY_BYTES,
        extra_routes: dict[str, Callable[[], tuple[str, str]]] | None = None,
    ) -> None:
        self.service = service
        self.clock = clock
        self.max_body = max_body
        self.extra_routes = {"/healthz": lambda: ("text/plain; charset=utf-8", "ok\n")} | (extra_routes or {})

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        request_id = str(uuid.uuid4())
        method = environ.get("REQUEST_METHOD", "")
        path = environ.get("PATH_INFO", "") or "/"
        if method == "GET" and path in self.extra_routes:
            content_type, text = self.extra_routes[path]()
            return self._reply(start_response, "200 OK", content_type, text.encode("utf-8"), request_id)
        try:
            if method != "POST" or path != "/":
                raise errors.UnknownOperationException(f"{method} {path[:100]} is not a KMS operation.")
            return self._handle(environ, start_response, request_id, path)
        except errors.KMSError as error:
            return self._error(start_response, error, request_id)

    def _handle(
        self, environ: dict[str, Any], start_response: StartResponse, request_id: str, path: str
    ) -> Iterable[bytes]:
        headers = _request_headers(environ)
        try:
            length = int(environ.get("CONTENT_LENGTH") or 0)
        except ValueError:
            raise errors.SerializationException("Invalid Content-Length.") from None
        if length > self.max_body:
            # Read and drop the body (the server caps it at DRAIN_FACTOR x the limit) so the client,
            # still sending, gets this 413 rather than a reset connection.
            stream = environ["wsgi.input"]
            while length > 0 and (chunk := stream.read(min(length, 65536))):
                length -= len(chunk)
            raise errors.RequestEntityTooLargeException(f"Request body exceeds {self.max_body} bytes.")
        body = environ["wsgi.input"].read(length) if length else b""
        target = headers.get("x-amz-target", "")
        operation = target[len(TARGET_PREFIX) :] if target.startswith(TARGET_PREFIX) else ""
        ctx = RequestContext(
            request_id=request_id,
            source_address=environ.get("REMOTE_ADDR", ""),
            user_agent=headers.get("user-agent", "")[:256],
            caller=_parse_caller(headers.get(CALLER_HEADER)),
        )
        try:
            principal = verify_request(
                method=environ.get("REQUEST_METHOD", "POST"),
                path=path,
                query=environ.get("QUERY_STRING", ""),
                headers=headers,
                body=body,
                region=self.service.region,
                lookup=self.service.authenticate,
                now=self.clock.now(),
            )
        except errors.KMSError as error:
            claimed = _CLAIMED_KEY.search(headers.get("authorization", ""))
            self.service.record_refused(
                operation or target[:100] or "(none)",
                ctx,
                error,
                access_key_id=claimed.group(1)[:128] if claimed else None,
            )
            raise
        ctx = RequestContext(
            request_id=ctx.request_id,
            source_address=ctx.source_address,
            principal=principal,
            user_agent=ctx.user_agent,
            caller=ctx.caller,
        )
        if not operation:
            error = errors.UnknownOperationException(f"Unknown X-Amz-Target '{target[:100]}'.")
            self.service.record_refused(target[:100] or "(none)", ctx, error)
            raise error
        try:
            params = _decode_params(body)
        except errors.KMSError as error:
            self.service.record_refused(operation, ctx, error)
            raise
        try:
            result = self.service.call(operation, params, ctx)
        except errors.KMSError:
            raise
        except Exception:
            log.exception("internal error in %s (request %s)", operation, request_id)
            raise errors.KMSInternalException("The request failed because of an internal error.") from None
        body_out = json.dumps(_encode(result), separators=(",", ":")).encode("utf-8")
        return self._reply(start_response, "200 OK", CONTENT_TYPE, body_out, request_id)

    def _error(
        self, start_response: StartResponse, error: errors.KMSError, request_id: str
    ) -> Iterable[bytes]:
        body = json.dumps({"__type": error.aws_type, "message": error.message}).encode("utf-8")
        status = {
            400: "400 Bad Request",
            404: "404 Not Found",
            413: "413 Request Entity Too Large",
            500: "500 Internal Server Error",
        }.get(error.status, f"{error.status} Error")
        return self._reply(start_response, status, CONTENT_TYPE, body, request_id)

    @staticmethod
    def _reply(
        start_response: StartResponse, status: str, content_type: str, body: bytes, request_id: str
    ) -> Iterable[bytes]:
        start_response(
            status,
            [
                ("Content-Type", content_type),
                ("Content-Length", str(len(body))),
                ("x-amzn-RequestId", request_id),
            ],
        )
        return [body]
