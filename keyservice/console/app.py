"""The console's ASGI app (Starlette): login, sessions, CSRF, security headers, and the routes.

A page handler finds the session, then runs its work on a worker thread (the service core
blocks on SQLite and the audit ``fsync``) inside ``deferred_commits``: the many calls a page makes
(DescribeKey per listed key...) each append their audit record, and one ``fsync`` at the end
makes them all durable before the page is sent, as the wire API guarantees for each reply.

Served by ``keyservice.http.api.KmsApp`` under ``/console/`` on the API's own listener and TLS
(``keyservice serve`` wires it, ``--no-console`` leaves it out).
"""

from __future__ import annotations

import dataclasses
import hmac
import secrets
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, TypeVar
from urllib.parse import parse_qsl, urlencode

from jinja2 import Environment, PackageLoader
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from keyservice import errors
from keyservice.audit.commit import commit_all, deferred_commits
from keyservice.console import audit_views, keys
from keyservice.console.sessions import LoginLimiter, LoginTokens, Session, SessionStore, TooManySessions
from keyservice.context import Principal, RequestContext

PREFIX = "/console"
SESSION_COOKIE = "__Host-kmsfs-console"
LOGIN_COOKIE = "__Host-kmsfs-login"
USER_AGENT = "kmsfs-console/1"
# The IAM action (identity policies, resource "*") that lets a principal read the audit log.
READ_AUDIT = "ReadAuditLog"
MAX_FORM_BYTES = 64 * 1024
MAX_FORM_FIELDS = 50

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
       "form-action 'self'; frame-ancestors 'none'; base-uri 'none'")  # fmt: skip
SECURITY_HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"same-origin"),  # "no-referrer" makes Chromium send "Origin: null"
    (b"cross-origin-opener-policy", b"same-origin"),
    (b"cache-control", b"no-store"),
]

T = TypeVar("T")


class Service(Protocol):
    """What the console needs of ``keyservice.service.KeyService``."""

    def authenticate(self, access_key_id: str) -> tuple[str, Principal]: ...
    def call(self, operation: str, params: dict[str, Any], ctx: RequestContext) -> dict[str, Any]: ...
    def record_refused(self, operation: str, ctx: RequestContext, error: errors.KMSError, *,
                       access_key_id: str | None = None) -> None: ...  # fmt: skip
    def record_event(self, operation: str, ctx: RequestContext) -> None: ...
    def authorize_action(self, operation: str, ctx: RequestContext) -> None: ...
    def allows(self, operation: str, principal: Principal) -> bool: ...
    def now(self) -> Any: ...


class Refused(Exception):
    """Ends a request with an error page (``status``, ``message``)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


def _durably(fn: Callable[[], T]) -> T:
    """Run ``fn`` with its audit records deferred, then make them all durable (fail closed)."""
    with deferred_commits() as tickets:
        try:
            result = fn()
        finally:
            commit_all(tickets)
    return result


class Console:
    """The console app; ``service`` is the key service core, ``data_dir`` its data directory."""

    def __init__(self, service: Service, data_dir: Path, *, sessions: SessionStore | None = None,
                 limiter: LoginLimiter | None = None) -> None:  # fmt: skip
        self.service = service
        self.data_dir = Path(data_dir)
        clock = self._clock
        self.sessions = sessions or SessionStore(clock=clock)
        self.limiter = limiter or LoginLimiter(clock=clock)
        self.login_tokens = LoginTokens(clock=clock)
        self.verifier = audit_views.Verifier(self.data_dir)
        self.templates = Environment(loader=PackageLoader("keyservice.console", "templates"), autoescape=True)
        self.templates.filters["when"] = keys.when
        static = StaticFiles(directory=str(Path(__file__).parent / "static"))
        routes = [
            Route("/", self.home),
            Route("/login", self.login_form, methods=["GET"]),
            Route("/login", self.login, methods=["POST"]),
            Route("/logout", self.logout, methods=["POST"]),
            Route("/keys", self.key_list, methods=["GET"]),
            Route("/keys", self.create_key, methods=["POST"]),
            Route("/keys/{key_id}", self.key_page, methods=["GET"]),
            Route("/keys/{key_id}/{action}", self.key_action, methods=["POST"]),
            Route("/audit", self.audit_timeline, methods=["GET"]),
            Route("/audit/files", self.audit_files, methods=["GET"]),
            Route("/audit/keys/{key_id}", self.audit_key, methods=["GET"]),
            Route("/audit/verify", self.audit_verify, methods=["GET", "POST"]),
            Mount("/static", static),
        ]
        self.app = Starlette(routes=[Mount(PREFIX, routes=routes)])

    def _clock(self) -> float:
        """Sessions and the login limit follow the service clock (tests shift it)."""
        return float(self.service.now().timestamp())

    # -- ASGI: every reply gets the security headers ----------------------------------------------
    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        https = scope.get("scheme") == "https"

        async def send_secured(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                headers = [h for h in message.get("headers", []) if h[0].lower() != b"cache-control"]
                headers += SECURITY_HEADERS
                if https:
                    headers.append((b"strict-transport-security", b"max-age=31536000"))
                message = {**message, "headers": headers}
            await send(message)

        if scope.get("path") == PREFIX:
            scope = {**scope, "path": PREFIX + "/"}
        await self.app(scope, receive, send_secured)

    # -- helpers ----------------------------------------------------------------------------------
    def render(self, request: Request, name: str, status: int = 200, session: Session | None = None,
               **values: Any) -> HTMLResponse:  # fmt: skip
        flashes = []
        if session is not None:
            flashes, session.flashes = session.flashes, []
        html = self.templates.get_template(name).render(
            request=request, session=session, flashes=flashes, prefix=PREFIX,
            csrf=session.csrf if session else "", can_audit=bool(session and session.can_read_audit),
            **values,
        )  # fmt: skip
        return HTMLResponse(html, status_code=status)

    def refused(self, request: Request, error: Refused, session: Session | None = None) -> HTMLResponse:
        return self.render(request, "error.html", error.status, session, message=error.message)

    @staticmethod
    def _address(request: Request) -> str:
        return request.client.host if request.client else ""

    def _context(self, request: Request, principal: Principal | None, session: Session | None = None
                 ) -> RequestContext:  # fmt: skip
        browser = request.headers.get("user-agent", "")[:200]
        return RequestContext(
            request_id=str(uuid.uuid4()), source_address=self._address(request), principal=principal,
            user_agent=f"{USER_AGENT} ({browser})" if browser else USER_AGENT,
            caller={"console_session": session.tag} if session else {},
        )  # fmt: skip

    async def _session(self, request: Request) -> Session | None:
        """The request's live session, if its access key still authenticates as the same principal.

        Checked on every request, as SigV4 is: a deleted principal or a rotated access key ends
        its console sessions at their next request."""
        session_id = request.cookies.get(SESSION_COOKIE)
        session = self.sessions.get(session_id)
        if session is None:
            return None
        try:
            _, principal = await run_in_threadpool(self.service.authenticate, session.principal.access_key_id)
        except errors.KMSError:
            principal = None
        if principal != session.principal:
            self.sessions.end(session_id)
            return None
        return session

    def _caller(self, request: Request, session: Session) -> keys.Call:
        """``call(operation, params)`` as the session's principal, each call its own request id."""
        ctx = self._context(request, session.principal, session)

        def call(operation: str, params: dict[str, Any]) -> dict[str, Any]:
            fresh = dataclasses.replace(ctx, request_id=str(uuid.uuid4()))
            return self.service.call(operation, params, fresh)

        return call

    async def _form(self, request: Request) -> dict[str, str]:
        """The url-encoded form, bounded in size and fields (first value of a repeated name)."""
        content_type = request.headers.get("content-type", "").split(";")[0].strip()
        if content_type != "application/x-www-form-urlencoded":
            raise Refused(415, "Forms must be sent as application/x-www-form-urlencoded.")
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_FORM_BYTES:
                raise Refused(413, "The form is too large.")
        try:
            pairs = parse_qsl(body.decode("utf-8"), keep_blank_values=True, max_num_fields=MAX_FORM_FIELDS,
                              strict_parsing=False)  # fmt: skip
        except (UnicodeDecodeError, ValueError):
            raise Refused(400, "The form could not be read.") from None
        form: dict[str, str] = {}
        for name, value in pairs:
            form.setdefault(name, value)
        return form

    def _same_origin(self, request: Request) -> bool:
        origin = request.headers.get("origin")
        if origin is None:  # not sent by every browser for same-origin forms; the token still counts
            return True
        return origin == f"{request.url.scheme}://{request.url.netloc}"

    async def _posted(self, request: Request, session: Session | None) -> dict[str, str]:
        """The form of a POST from this session's own pages: CSRF token and Origin checked.

        A refusal is audited (operation ``ConsoleForm``): a forged form is worth a record."""
        form = await self._form(request)
        token = form.get("csrf_token", "")
        ok = (session is not None and self._same_origin(request)
              and hmac.compare_digest(token.encode(), session.csrf.encode()))  # fmt: skip
        if not ok:
            error = errors.AccessDeniedException("The form was refused: missing or wrong CSRF token, or "
                                                 "another origin, or no live session.")  # fmt: skip
            ctx = self._context(request, session.principal if session else None, session)
            await run_in_threadpool(self.service.record_refused, "ConsoleForm", ctx, error)
            raise Refused(403, error.message)
        return form

    async def _session_form(self, request: Request) -> tuple[Session, dict[str, str]] | Response:
        """A live session and its checked form, or the refusal page to send."""
        session = await self._session(request)
        try:
            form = await self._posted(request, session)
        except Refused as error:
            return self.refused(request, error, session)
        assert session is not None  # _posted refuses without one
        return session, form

    def _login_redirect(self) -> RedirectResponse:
        return RedirectResponse(f"{PREFIX}/login", status_code=303)

    # -- login / logout ---------------------------------------------------------------------------
    async def home(self, request: Request) -> Response:
        return RedirectResponse(f"{PREFIX}/keys" if await self._session(request) else f"{PREFIX}/login", 303)

    def _login_page(self, request: Request, status: int = 200, message: str = "") -> HTMLResponse:
        token = self.login_tokens.issue()
        response = self.render(request, "login.html", status, login_token=token, message=message)
        response.set_cookie(LOGIN_COOKIE, token, max_age=int(self.login_tokens.lifetime), path="/",
                            secure=True, httponly=True, samesite="strict")  # fmt: skip
        return response

    async def login_form(self, request: Request) -> Response:
        if await self._session(request):
            return RedirectResponse(f"{PREFIX}/keys", 303)
        return self._login_page(request)

    async def login(self, request: Request) -> Response:
        try:
            form = await self._form(request)
        except Refused as error:
            return self.refused(request, error)
        access_key_id = form.get("access_key_id", "").strip()[:128]
        secret = form.get("secret_access_key", "")[:256]
        address = self._address(request)
        ctx = self._context(request, None)
        if not self.login_tokens.valid(request.cookies.get(LOGIN_COOKIE), form.get("login_token")):
            error: errors.KMSError = errors.AccessDeniedException("The login form expired or was forged.")
            await run_in_threadpool(self.service.record_refused, "ConsoleLogin", ctx, error,
                                    access_key_id=access_key_id or None)  # fmt: skip
            return self._login_page(request, 403, "The login form expired; please try again.")
        if self.limiter.blocked(address):
            error = errors.LimitExceededException("Too many failed logins from this address; wait and retry.")
            await run_in_threadpool(self.service.record_refused, "ConsoleLogin", ctx, error,
                                    access_key_id=access_key_id or None)  # fmt: skip
            return self._login_page(request, 429, error.message)
        principal = await run_in_threadpool(self._check_secret, access_key_id, secret)
        if principal is None:
            self.limiter.failed(address)
            error = errors.UnrecognizedClientException("The access key id or secret access key is wrong.")
            await run_in_threadpool(self.service.record_refused, "ConsoleLogin", ctx, error,
                                    access_key_id=access_key_id or None)  # fmt: skip
            return self._login_page(request, 401, error.message)
        self.sessions.end(request.cookies.get(SESSION_COOKIE))  # never keep a presented id
        try:
            session_id, session = self.sessions.create(principal, address)
        except TooManySessions as full:
            return self.refused(request, Refused(503, str(full)))
        session.can_read_audit = await run_in_threadpool(self.service.allows, READ_AUDIT, principal)
        await run_in_threadpool(self.service.record_event, "ConsoleLogin",
                                self._context(request, principal, session))  # fmt: skip
        response = RedirectResponse(f"{PREFIX}/keys", status_code=303)
        response.set_cookie(SESSION_COOKIE, session_id, path="/", secure=True, httponly=True,
                            samesite="strict")
        response.delete_cookie(LOGIN_COOKIE, path="/", secure=True, httponly=True, samesite="strict")
        return response

    def _check_secret(self, access_key_id: str, secret: str) -> Principal | None:
        """The principal if ``secret`` is the access key's, compared in constant time."""
        try:
            expected, principal = self.service.authenticate(access_key_id)
        except errors.UnrecognizedClientException:
            expected, principal = secrets.token_urlsafe(30), None  # the same comparison either way
        same = hmac.compare_digest(secret.encode(), expected.encode())
        return principal if same and principal is not None else None

    async def logout(self, request: Request) -> Response:
        posted = await self._session_form(request)
        if isinstance(posted, Response):
            return posted
        session = posted[0]
        self.sessions.end(request.cookies.get(SESSION_COOKIE))
        await run_in_threadpool(self.service.record_event, "ConsoleLogout",
                                self._context(request, session.principal, session))  # fmt: skip
        response = self._login_redirect()
        response.delete_cookie(SESSION_COOKIE, path="/", secure=True, httponly=True, samesite="strict")
        return response

    # -- keys -------------------------------------------------------------------------------------
    async def key_list(self, request: Request) -> Response:
        session = await self._session(request)
        if session is None:
            return self._login_redirect()
        q = request.query_params
        filters = {name: q.get(name, "")[:256] for name in ("state", "alias", "tag")}
        call = self._caller(request, session)
        try:
            marker = q.get("marker", "")[:1024]
            listing = await run_in_threadpool(
                _durably, lambda: keys.list_keys(call, **filters, marker=marker)
            )
        except errors.KMSError as error:
            return self.refused(request, Refused(403 if "AccessDenied" in error.aws_type else 400,
                                                 f"{error.aws_type}: {error.message}"), session)  # fmt: skip
        more = urlencode({**filters, "marker": listing.next_marker}) if listing.next_marker else ""
        partial = request.headers.get("hx-target") == "key-table"
        return self.render(request, "key_table.html" if partial else "keys.html", session=session,
                           listing=listing, filters=filters, states=keys.STATES, more=more)  # fmt: skip

    async def create_key(self, request: Request) -> Response:
        posted = await self._session_form(request)
        if isinstance(posted, Response):
            return posted
        session, form = posted
        call = self._caller(request, session)
        try:
            key_id, message = await run_in_threadpool(_durably, lambda: keys.create_key(call, form))
        except errors.KMSError as error:
            session.flash("error", f"{error.aws_type}: {error.message}")
            return RedirectResponse(f"{PREFIX}/keys", 303)
        session.flash("ok", message)
        return RedirectResponse(f"{PREFIX}/keys/{key_id}", 303)

    async def key_page(self, request: Request, draft: dict[str, str] | None = None,
                       status: int = 200) -> Response:  # fmt: skip
        session = await self._session(request)
        if session is None:
            return self._login_redirect()
        key_id = request.path_params["key_id"][:2048]
        call = self._caller(request, session)
        try:
            detail = await run_in_threadpool(_durably, lambda: keys.key_detail(call, key_id))
        except errors.KMSError as error:
            code = {"NotFoundException": 404, "AccessDeniedException": 403}.get(error.aws_type, 400)
            return self.refused(request, Refused(code, f"{error.aws_type}: {error.message}"), session)
        return self.render(request, "key.html", status, session, d=detail, draft=draft or {},
                           policy_text=(draft or {}).get("policy", detail.policy))  # fmt: skip

    async def key_action(self, request: Request) -> Response:
        posted = await self._session_form(request)
        if isinstance(posted, Response):
            return posted
        session, form = posted
        key_id = request.path_params["key_id"][:2048]
        action = request.path_params["action"]
        call = self._caller(request, session)
        try:
            message = await run_in_threadpool(_durably, lambda: keys.key_action(call, key_id, action, form))
        except errors.KMSError as error:
            session.flash("error", f"{error.aws_type}: {error.message}")
            if action == "policy":  # keep the edited text on the page
                return await self.key_page(request, draft=form, status=400)
            return RedirectResponse(f"{PREFIX}/keys/{key_id}", 303)
        session.flash("ok", message)
        return RedirectResponse(f"{PREFIX}/keys/{key_id}", 303)

    # -- audit ------------------------------------------------------------------------------------
    async def _audit_session(self, request: Request) -> Session | Response:
        """The session, if its principal may read the audit log now (checked and audited)."""
        session = await self._session(request)
        if session is None:
            return self._login_redirect()
        ctx = self._context(request, session.principal, session)
        try:
            await run_in_threadpool(self.service.authorize_action, READ_AUDIT, ctx)
        except errors.KMSError as error:
            session.can_read_audit = False
            return self.refused(request, Refused(403, f"{error.aws_type}: {error.message}"), session)
        session.can_read_audit = True
        return session

    async def audit_timeline(self, request: Request) -> Response:
        session = await self._audit_session(request)
        if isinstance(session, Response):
            return session
        q = request.query_params
        raw = {name: q.get(name, "")[:1024] for name in audit_views.FILTERS}
        try:
            page_number = int(q.get("page", "1"))
        except ValueError:
            page_number = 1
        try:
            page = await run_in_threadpool(audit_views.timeline, self.data_dir, raw, page_number)
        except audit_views.BadFilter as bad:
            return self.render(request, "audit.html", 400, session, filters=raw, page=None, error=str(bad))
        base = urlencode({k: v for k, v in raw.items() if v})
        partial = request.headers.get("hx-target") == "timeline"
        return self.render(request, "audit_table.html" if partial else "audit.html", session=session,
                           filters=raw, page=page, base=base, error="")  # fmt: skip

    async def audit_files(self, request: Request) -> Response:
        session = await self._audit_session(request)
        if isinstance(session, Response):
            return session
        prefix = request.query_params.get("prefix", "")[:1024]
        rows = await run_in_threadpool(audit_views.files, self.data_dir, prefix)
        return self.render(request, "files.html", session=session, rows=rows, file_prefix=prefix)

    async def audit_key(self, request: Request) -> Response:
        session = await self._audit_session(request)
        if isinstance(session, Response):
            return session
        key_id = request.path_params["key_id"][:2048]
        rows = await run_in_threadpool(audit_views.key_timeline, self.data_dir, key_id)
        return self.render(request, "key_timeline.html", session=session, key_id=key_id, rows=rows)

    async def audit_verify(self, request: Request) -> Response:
        if request.method == "POST":
            posted = await self._session_form(request)
            if isinstance(posted, Response):
                return posted
        checked = await self._audit_session(request)
        if isinstance(checked, Response):
            return checked
        if request.method == "POST":
            started = self.verifier.start()
            note = "Verification started." if started else "A verification is already running."
            checked.flash("ok", note)
            return RedirectResponse(f"{PREFIX}/audit/verify", 303)
        head = await run_in_threadpool(audit_views.last_checkpoint, self.data_dir)
        return self.render(request, "verify.html", session=checked, run=self.verifier.status(), head=head)


def build_console(service: Service, data_dir: Path) -> Console:
    """The console for ``KmsApp(mounts={"/console/": ...})``."""
    return Console(service, data_dir)
