"""The HTTP layer: AWS KMS JSON 1.1 over ASGI, translated to and from ``KeyService.call``.

This module only translates: it reads the body (bounded), verifies the SigV4 signature, decodes
JSON and base64, hands the request to the service core, and encodes the reply or the AWS error.
It decides nothing about keys. ``KmsApp.respond`` is the whole translation, free of any server
API; ``KmsApp.__call__`` is the ASGI adapter that ``keyservice.http.server`` runs on uvicorn.

Why ASGI on an event loop rather than a threaded WSGI server: a Decrypt is ~0.2 ms of Python, and
a thread-per-request server (cheroot, used first) spent more than that again on its own request
parsing and thread hand-offs (docs/PERFORMANCE.md). The operations the service runs without its
lock (``service.READ_ONLY_OPERATIONS``: crypto and reads) therefore run directly on the event
loop; their audit record is written there and made durable by ``audit.AsyncCommitter`` (group
commit on one thread), and the reply leaves only after that. Everything else (key management:
SQLite writes, imports) runs on a thread pool and commits its audit record the blocking way.
``KmsApp.dispatch`` is the same routing without ASGI, for the server's direct path (issue 19).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import os
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from keyservice import errors, jsonsafe
from keyservice.audit.commit import AsyncCommitter, deferred_commits
from keyservice.clock import Clock
from keyservice.context import Principal, RequestContext
from keyservice.http.sigv4 import verify_request
from keyservice.http.unix_listener import Peer, scope_peer
from keyservice.service import READ_ONLY_OPERATIONS

log = logging.getLogger(__name__)

CONTENT_TYPE = "application/x-amz-json-1.1"
TARGET_PREFIX = "TrentService."
MAX_BODY_BYTES = 256 * 1024
# Bodies up to this multiple of the limit are read and dropped before the 413; larger ones are
# cut off by the HTTP server itself.
DRAIN_FACTOR = 8
CALLER_HEADER = "x-kmsfs-caller"
MAX_CALLER_BYTES = 8192
# kmsfs's caller header is a flat object; a request body nests at most 3 levels (grant Constraints).
MAX_CALLER_DEPTH = 4
MAX_BODY_DEPTH = jsonsafe.DEFAULT_MAX_DEPTH
# What the audit record names as the operation when a request named none (no X-Amz-Target, not
# POST /, not even parseable HTTP).
NO_OPERATION = "(none)"
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
# ``json.dumps(value, separators=(",", ":"))`` builds an encoder per call; one is enough.
_REPLY_ENCODER = json.JSONEncoder(separators=(",", ":"))


def new_request_id() -> str:
    """A random (version 4) UUID as text, like ``str(uuid.uuid4())`` at a third of its cost."""
    raw = bytearray(os.urandom(16))
    raw[6] = (raw[6] & 0x0F) | 0x40  # version 4
    raw[8] = (raw[8] & 0x3F) | 0x80  # RFC 4122 variant
    text = raw.hex()
    return f"{text[:8]}-{text[8:12]}-{text[12:16]}-{text[16:20]}-{text[20:]}"

ASGIReceive = Callable[[], Any]
ASGISend = Callable[[dict[str, Any]], Any]
ASGIApp = Callable[[dict[str, Any], ASGIReceive, ASGISend], Any]


@dataclass(frozen=True)
class HttpRequest:
    """One request as the HTTP server delivered it; ``headers`` have lower-case names."""

    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes
    remote_addr: str
    too_large: bool = False  # the body exceeded the limit (and was drained, not kept)
    peer: Peer | None = None  # the connecting process, on the Unix-socket listener only


@dataclass(frozen=True)
class HttpReply:
    status: int
    content_type: str
    body: bytes
    request_id: str


class Service(Protocol):
    """What the HTTP layer needs from the service core."""

    region: str

    def request_scope(self) -> AbstractContextManager[None]: ...

    def authenticate(self, access_key_id: str) -> tuple[str, Principal]: ...

    def call(self, operation: str, params: dict[str, Any], ctx: RequestContext) -> dict[str, Any]: ...

    def record_refused(
        self, operation: str, ctx: RequestContext, error: errors.KMSError, *, access_key_id: str | None = None
    ) -> None: ...


def asgi_headers(raw: list[tuple[bytes, bytes]]) -> dict[str, str]:
    """ASGI header pairs (already lower-case) as a dict; repeated names joined with commas."""
    headers: dict[str, str] = {}
    for name_b, value_b in raw:
        name, value = name_b.decode("latin-1"), value_b.decode("latin-1")
        headers[name] = f"{headers[name]},{value}" if name in headers else value
    return headers


def _decode_params(body: bytes) -> dict[str, Any]:
    try:
        params = jsonsafe.loads(body or b"{}", max_depth=MAX_BODY_DEPTH)
    except jsonsafe.JsonError as error:
        raise errors.SerializationException(f"Request body is not valid: {error}.") from None
    if not isinstance(params, dict):
        raise errors.SerializationException("Request body must be a JSON object.")
    # A lone surrogate can only arrive as a \u escape or as its (invalid UTF-8) bytes, which
    # json accepts: look closer only then.
    if (b"\\u" in body or b"\xed" in body) and jsonsafe.has_surrogate(params):
        raise errors.SerializationException(
            "Request body contains a lone UTF-16 surrogate, which is not Unicode text."
        )
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
        caller = jsonsafe.loads(raw, max_depth=MAX_CALLER_DEPTH)
    except jsonsafe.JsonError as error:
        return {"invalid": f"caller header is {'nested too deep' if 'deeper' in str(error) else 'not JSON'}"}
    return caller if isinstance(caller, dict) else {"invalid": "caller header is not an object"}


def _context(request: HttpRequest, request_id: str) -> RequestContext:
    """What the audit record can say about any request before its signature is checked."""
    return RequestContext(
        request_id=request_id,
        source_address=request.peer.source_address if request.peer else request.remote_addr,
        user_agent=request.headers.get("user-agent", "")[:256],
        caller=_parse_caller(request.headers.get(CALLER_HEADER)),
        peer=request.peer.audit_fields() if request.peer else None,
    )


def _claimed_access_key(headers: dict[str, str]) -> str | None:
    """The access key id an Authorization header claims (recorded for refused requests)."""
    claimed = _CLAIMED_KEY.search(headers.get("authorization", ""))
    return claimed.group(1)[:128] if claimed else None


def _operation_of(request: HttpRequest) -> str:
    """The operation a request names, for the audit record of a refusal (attacker text, cut short)."""
    target = request.headers.get("x-amz-target", "")
    operation = target[len(TARGET_PREFIX) :] if target.startswith(TARGET_PREFIX) else target
    return operation[:100] or NO_OPERATION


class KmsApp:
    """The application: ``respond`` translates one request; calling it as ASGI serves it."""

    def __init__(
        self,
        service: Service,
        clock: Clock,
        *,
        max_body: int = MAX_BODY_BYTES,
        extra_routes: dict[str, Callable[[], tuple[str, str]]] | None = None,
        threads: int = 8,
        mounts: dict[str, ASGIApp] | None = None,
    ) -> None:
        self.service = service
        self.clock = clock
        self.max_body = max_body
        self.extra_routes = {"/healthz": lambda: ("text/plain; charset=utf-8", "ok\n")} | (extra_routes or {})
        # Other ASGI apps served on this listener under a path prefix ending in "/" (the web
        # console at /console/); they get the request untouched, body unread.
        self.mounts = dict(mounts or {})
        self._threads = threads
        self._pool: ThreadPoolExecutor | None = None
        self._committer: AsyncCommitter | None = None

    # -- the translation ----------------------------------------------------------------------------
    def respond(self, request: HttpRequest) -> HttpReply:
        """Answer one request. Every request but ``GET /healthz`` (and the other ``extra_routes``)
        gets exactly one audit record, however malformed it is; refusals are AWS errors (4xx)."""
        request_id = new_request_id()
        if request.method == "GET" and request.path in self.extra_routes:
            content_type, text = self.extra_routes[request.path]()
            return HttpReply(200, content_type, text.encode("utf-8"), request_id)
        ctx = _context(request, request_id)
        try:
            if request.method != "POST" or request.path != "/":
                self._refuse(
                    request,
                    ctx,
                    errors.UnknownOperationException(
                        f"{request.method[:16]} {request.path[:100]} is not a KMS operation."
                    ),
                )
            if request.too_large:
                self._refuse(
                    request,
                    ctx,
                    errors.RequestEntityTooLargeException(f"Request body exceeds {self.max_body} bytes."),
                )
            with self.service.request_scope():
                return self._handle(request, ctx)
        except errors.KMSError as error:
            return self.error_reply(error, request_id)
        except Exception:
            # Our own fault (the service audits its own internal errors; this is the HTTP layer's).
            log.exception("internal error in the HTTP layer (request %s)", request_id)
            internal = errors.KMSInternalException("The request failed because of an internal error.")
            try:
                self.service.record_refused(_operation_of(request), ctx, internal)
            except Exception:
                log.exception("request %s could not be audited", request_id)
            return self.error_reply(internal, request_id)

    def _refuse(self, request: HttpRequest, ctx: RequestContext, error: errors.KMSError) -> None:
        """Audit a request refused before its signature was checked, then raise ``error``."""
        self.service.record_refused(
            _operation_of(request), ctx, error, access_key_id=_claimed_access_key(request.headers)
        )
        raise error

    async def refuse_malformed(self, status: int, remote_addr: str, peer: Peer | None = None) -> HttpReply:
        """Answer and audit what the HTTP parser refused before the request reached ``respond``:
        431 (request line and headers over ``server.MAX_HEADER_BYTES``) or 400 (not HTTP)."""
        request_id = new_request_id()
        ctx = RequestContext(request_id=request_id,
                             source_address=peer.source_address if peer else remote_addr,
                             peer=peer.audit_fields() if peer else None)
        if status == 431:
            error: errors.KMSError = errors.RequestHeaderFieldsTooLargeException(
                "The request line and headers are too large."
            )
        else:
            error = errors.SerializationException("The request is not valid HTTP/1.1.")
        with deferred_commits() as tickets:
            try:
                self.service.record_refused(NO_OPERATION, ctx, error)
            except errors.KMSError as not_recorded:
                return self.error_reply(not_recorded, request_id)
        try:
            await self._wait_durable(tickets)
        except errors.KMSError as not_recorded:
            return self.error_reply(not_recorded, request_id)
        return self.error_reply(error, request_id)

    def _handle(self, request: HttpRequest, ctx: RequestContext) -> HttpReply:
        headers = request.headers
        request_id = ctx.request_id
        target = headers.get("x-amz-target", "")
        operation = target[len(TARGET_PREFIX) :] if target.startswith(TARGET_PREFIX) else ""
        try:
            principal = verify_request(
                method=request.method,
                path=request.path,
                query=request.query,
                headers=headers,
                body=request.body,
                region=self.service.region,
                lookup=self.service.authenticate,
                now=self.clock.now(),
            )
        except errors.KMSError as error:
            self.service.record_refused(
                operation or target[:100] or NO_OPERATION,
                ctx,
                error,
                access_key_id=_claimed_access_key(headers),
            )
            raise
        ctx = RequestContext(
            request_id=ctx.request_id,
            source_address=ctx.source_address,
            principal=principal,
            user_agent=ctx.user_agent,
            caller=ctx.caller,
            peer=ctx.peer,
        )
        if not operation:
            error = errors.UnknownOperationException(f"Unknown X-Amz-Target '{target[:100]}'.")
            self.service.record_refused(target[:100] or NO_OPERATION, ctx, error)
            raise error
        try:
            params = _decode_params(request.body)
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
        body_out = _REPLY_ENCODER.encode(_encode(result)).encode("utf-8")
        return HttpReply(200, CONTENT_TYPE, body_out, request_id)

    @staticmethod
    def error_reply(error: errors.KMSError, request_id: str) -> HttpReply:
        body = json.dumps({"__type": error.aws_type, "message": error.message}).encode("utf-8")
        return HttpReply(error.status, CONTENT_TYPE, body, request_id)

    # -- ASGI ---------------------------------------------------------------------------------------
    async def __call__(self, scope: dict[str, Any], receive: ASGIReceive, send: ASGISend) -> None:
        if scope["type"] != "http":
            return  # no lifespan or websocket support; the server runs with lifespan="off"
        path = scope.get("path") or "/"
        for prefix, mounted in self.mounts.items():
            if path.startswith(prefix) or path == prefix[:-1]:
                await mounted(scope, receive, send)
                return
        body, too_large = await self._read_body(scope, receive)
        client = scope.get("client")
        request = HttpRequest(
            method=scope["method"],
            path=scope.get("path") or "/",
            query=scope.get("query_string", b"").decode("latin-1"),
            headers=asgi_headers(scope["headers"]),
            body=body,
            remote_addr=client[0] if client else "",
            too_large=too_large,
            peer=scope_peer(scope),
        )
        target = request.headers.get("x-amz-target", "")
        # The operations the service runs without its lock (reads and crypto) run on the event
        # loop; key management (SQLite writes under the lock, imports) on the thread pool.
        if target[len(TARGET_PREFIX) :] in READ_ONLY_OPERATIONS or request.method != "POST":
            reply = await self._respond_inline(request)
        else:
            reply = await asyncio.get_running_loop().run_in_executor(self._executor(), self.respond, request)
        headers = [
            (b"content-type", reply.content_type.encode("latin-1")),
            (b"content-length", str(len(reply.body)).encode("ascii")),
            (b"x-amzn-requestid", reply.request_id.encode("ascii")),
        ]
        if too_large:
            headers.append((b"connection", b"close"))  # the rest of the body is not worth reading
        await send({"type": "http.response.start", "status": reply.status, "headers": headers})
        await send({"type": "http.response.body", "body": reply.body})

    def dispatch(self, raw_headers: list[tuple[bytes, bytes]], body: bytes, remote_addr: str,
                 on_reply: Callable[[HttpReply], None], peer: Peer | None = None) -> None:
        """Answer a ``POST /`` whose whole body has arrived, without ASGI (``server``'s direct
        path): ``on_reply`` gets the reply once its audit records are durable, from a callback on
        the event loop, or at once if it has none. The same routing and the same durability rule
        as ``__call__``; it spares the request an ASGI cycle, a task and two coroutines per message.
        ``raw_headers``: (lower-case name, value) pairs as the parser gave them; ``peer``: the
        Unix-socket peer (None on TCP)."""
        request = HttpRequest(
            method="POST", path="/", query="", headers=asgi_headers(raw_headers), body=body,
            remote_addr=remote_addr, peer=peer,
        )
        target = request.headers.get("x-amz-target", "")
        loop = asyncio.get_running_loop()
        if target[len(TARGET_PREFIX) :] not in READ_ONLY_OPERATIONS:
            pooled = loop.run_in_executor(self._executor(), self.respond, request)
            pooled.add_done_callback(lambda done: on_reply(self._pooled_reply(done)))
            return
        with deferred_commits() as tickets:
            reply = self.respond(request)
        if not tickets:
            on_reply(reply)
            return
        if self._committer is None:
            self._committer = AsyncCommitter()
        durable = self._committer.submit(tickets)
        durable.add_done_callback(lambda done: on_reply(self._durable_reply(done, reply)))

    def _pooled_reply(self, done: asyncio.Future[HttpReply]) -> HttpReply:
        if done.cancelled():
            return self.error_reply(
                errors.KMSInternalException("The request was cancelled."), new_request_id()
            )
        error = done.exception()
        if error is not None:  # respond answers every error itself; this would be a bug
            log.error("request failed outside respond: %r", error)
            return self.error_reply(
                errors.KMSInternalException("The request failed because of an internal error."),
                new_request_id(),
            )
        return done.result()

    def _durable_reply(self, done: asyncio.Future[None], reply: HttpReply) -> HttpReply:
        """``reply``, or the error its request gets when its records could not be made durable."""
        if done.cancelled():
            cancelled = errors.KMSInternalException("The request was cancelled.")
            return self.error_reply(cancelled, reply.request_id)
        error = done.exception()
        if error is None:
            return reply
        if isinstance(error, errors.KMSError):
            return self.error_reply(error, reply.request_id)
        log.error("audit commit failed: %r", error)
        return self.error_reply(
            errors.KMSInternalException("The request could not be recorded in the audit log."),
            reply.request_id,
        )

    async def _respond_inline(self, request: HttpRequest) -> HttpReply:
        """Run on the event loop; the reply waits until its audit records are durable."""
        with deferred_commits() as tickets:
            reply = self.respond(request)
        try:
            await self._wait_durable(tickets)
        except errors.KMSError as error:
            return self.error_reply(error, reply.request_id)
        return reply

    async def _wait_durable(self, tickets: list[Any]) -> None:
        if tickets:
            if self._committer is None:
                self._committer = AsyncCommitter()
            await self._committer.wait(tickets)

    async def _read_body(self, scope: dict[str, Any], receive: ASGIReceive) -> tuple[bytes, bool]:
        """The body, or (b"", True) past ``max_body``.

        An oversize body is read and dropped up to DRAIN_FACTOR x the limit, so a client still
        sending gets the 413 rather than a reset connection; beyond that the reply goes out at once.
        Either way the connection is closed after the 413.
        """
        chunks: list[bytes] = []
        size = 0
        too_large = False
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            chunk = message.get("body", b"")
            more = message.get("more_body", False)
            size += len(chunk)
            if size > self.max_body:
                if not too_large:
                    too_large, chunks = True, []
                if size > self.max_body * DRAIN_FACTOR:
                    break
            elif chunk:
                chunks.append(chunk)
        return (b"", True) if too_large else (b"".join(chunks), False)

    def _executor(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=self._threads, thread_name_prefix="kms-request")
        return self._pool

    def close(self) -> None:
        """Finish queued audit commits and stop the worker threads (after the server stopped)."""
        if self._committer is not None:
            self._committer.close()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
