"""The HTTP(S) server around the ASGI app: uvicorn on uvloop + httptools, with TLS when given a certificate.

Why uvicorn: HTTP/1.1 keep-alive, TLS and flow control on an event loop, with its request parser
(httptools) and loop (uvloop) in C. Measured on 2 cores against a trivial app, one request cost
0.10 ms of server CPU here versus 0.36 ms on cheroot (CherryPy's threaded WSGI server, used
before) and 0.48 ms for WSGI run inside uvicorn (docs/PERFORMANCE.md). uvloop and httptools are
optional speed-ups: without them uvicorn falls back to asyncio and h11 and works the same.

KMS requests (``POST /`` with a Content-Length within ``--max-body``) skip the ASGI layer: the
httptools protocol hands them to the application's ``dispatch`` and writes the reply's head and
body in one buffer (``_http_protocol``). Measured with wrk over TLS against a trivial reply:
0.025 ms of server CPU per request this way, 0.036 ms through uvicorn's ASGI cycle (issue 19,
docs/PERFORMANCE.md). Everything else (the console, ``/healthz``, odd requests) stays ASGI.

The listening socket is bound here, before serving, so the chosen port (port 0 picks a free one)
can be printed first. TLS uses our own ``SSLContext`` (TLS 1.2 minimum, the ``ssl`` module's
secure defaults) rather than uvicorn's cipher default.

A Unix-domain socket (``keyservice.http.unix_listener``) can be served too, beside the TCP socket
or alone: plain HTTP (never TLS: the kernel carries it within the host), each connection's peer
credentials handed to the application.
"""

from __future__ import annotations

import asyncio
import http
import importlib.util
import logging
import socket
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import uvicorn

from keyservice.http import unix_listener

# Connections idle this long are closed; clients (kmsfs's pool, botocore) reconnect transparently.
KEEP_ALIVE_SECONDS = 30
# In-flight requests get this long to finish at shutdown.
GRACEFUL_SHUTDOWN_SECONDS = 5
LISTEN_BACKLOG = 1024
# Request line plus headers, per request. httptools buffers a header until it is complete and has
# no cap of its own, so without this one client could grow the server without bound. (h11, the
# fallback parser, caps at 16 KiB itself.) SigV4 and the kmsfs caller header need a few KiB.
MAX_HEADER_BYTES = 256 * 1024

# ``refuse(status, client_address, peer)``: the application's answer to a request the parser
# refused (431: headers too large; 400: not HTTP), audited like any other request; ``peer`` is the
# Unix-socket peer (None on TCP). The reply has ``status``, ``content_type``, ``body`` and
# ``request_id`` (``api.HttpReply``).
Refuse = Callable[[int, str, "unix_listener.Peer | None"], Awaitable[Any]]


# ``dispatch(raw_headers, body, remote_addr, on_reply, peer)``: the application's direct path for a
# ``POST /`` (``api.KmsApp.dispatch``); ``on_reply(reply)`` is called once, on the event loop;
# ``peer`` is the Unix-socket peer (None on TCP).
Dispatch = Callable[[list[tuple[bytes, bytes]], bytes, str, Callable[[Any], None], Any], None]


class _DirectCycle:
    """Stands in for uvicorn's ``RequestResponseCycle`` while a ``POST /`` is answered by
    ``dispatch`` instead of through ASGI: the protocol reads and writes the same attributes on
    it (``body``, ``response_complete``, ``keep_alive``, ``disconnected``, ``message_event``), so
    uvicorn's own pipelining, keep-alive timer and shutdown handling apply unchanged."""

    __slots__ = ("body", "more_body", "response_complete", "disconnected", "keep_alive", "headers")

    def __init__(self, headers: list[tuple[bytes, bytes]], keep_alive: bool) -> None:
        self.headers = headers
        self.body = b""
        self.more_body = True
        self.response_complete = False
        self.disconnected = False
        self.keep_alive = keep_alive

    @property
    def message_event(self) -> _DirectCycle:
        return self  # uvicorn calls ``cycle.message_event.set()``; nothing waits on it here

    def set(self) -> None:
        pass


def _reply_bytes(reply: Any, default_headers: list[tuple[bytes, bytes]], keep_alive: bool) -> bytes:
    """Status line, headers and body of ``reply`` (``api.HttpReply``) in one buffer: one write, so
    one TLS record and one send for the whole answer (uvicorn writes the head and the body
    separately)."""
    head = [
        STATUS_LINES.get(reply.status) or f"HTTP/1.1 {reply.status} \r\n".encode("ascii"),
        b"content-type: ", reply.content_type.encode("latin-1"),
        b"\r\ncontent-length: ", str(len(reply.body)).encode("ascii"),
        b"\r\nx-amzn-requestid: ", reply.request_id.encode("ascii"), b"\r\n",
    ]
    for name, value in default_headers:  # the date header, as uvicorn sends it
        head += [name, b": ", value, b"\r\n"]
    if not keep_alive:
        head.append(b"connection: close\r\n")
    head += [b"\r\n", reply.body]
    return b"".join(head)


STATUS_LINES = {
    status.value: f"HTTP/1.1 {status.value} {status.phrase}\r\n".encode("ascii") for status in http.HTTPStatus
}


def _http_protocol(refuse: Refuse | None, dispatch: Dispatch | None = None, max_body: int = 0,
                   in_flight: set[Any] | None = None) -> Any:
    """httptools with a header size limit, or uvicorn's h11 protocol when httptools is missing.

    With ``dispatch``, a ``POST /`` with a Content-Length of at most ``max_body`` (every KMS
    request) is answered by ``dispatch`` directly; everything else (the console, other paths, a
    chunked or oversize body, ``Expect: 100-continue``, a request pipelined behind another) goes
    through ASGI as before. ``in_flight`` holds the direct requests still being answered, so that
    shutdown can wait for them as it waits for ASGI tasks."""
    if importlib.util.find_spec("httptools") is None:
        return "h11"
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class BoundedHttpToolsProtocol(HttpToolsProtocol):
        """Counts the bytes that arrive while a request's headers are incomplete; past
        MAX_HEADER_BYTES the client gets a 431 and the connection is closed. That answer, and the
        400 for bytes that are not HTTP, come from ``refuse``: an AWS error with a request id,
        audited, instead of uvicorn's plain text."""

        _header_bytes = 0
        _in_headers = True
        _refusal: asyncio.Task[None] | None = None

        def data_received(self, data: bytes) -> None:
            if self._refusal is not None:
                return  # answered already; the connection is closing
            if self._in_headers:
                self._header_bytes += len(data)
                if self._header_bytes > MAX_HEADER_BYTES:
                    self._in_headers = False
                    self._refuse(431)
                    return
            super().data_received(data)

        def send_400_response(self, msg: str) -> None:
            self._refuse(400)

        def _refuse(self, status: int) -> None:
            if refuse is None:
                self._write_refusal(status, "text/plain; charset=utf-8", b"", "")
                return
            # Reading goes on (and is dropped, above): a client still sending then gets the answer
            # and a clean close, not a reset that could discard the answer.
            client = self.client[0] if self.client else ""
            peer = self.app_state.get(unix_listener.PEER_STATE_KEY)
            self._refusal = self.loop.create_task(self._answer(refuse(status, client, peer)))

        async def _answer(self, pending: Awaitable[Any]) -> None:
            try:
                reply = await pending
            except Exception:
                logging.getLogger("keyservice").exception("could not answer a malformed request")
                self.transport.abort()
                return
            self._write_refusal(reply.status, reply.content_type, reply.body, reply.request_id)

        def _write_refusal(self, status: int, content_type: str, body: bytes, request_id: str) -> None:
            if self.transport.is_closing():
                return
            head = (
                f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}\r\n"
                f"content-type: {content_type}\r\ncontent-length: {len(body)}\r\n"
                + (f"x-amzn-requestid: {request_id}\r\n" if request_id else "")
                + "connection: close\r\n\r\n"
            )
            self.transport.write(head.encode("latin-1") + body)
            self.transport.close()

        def on_headers_complete(self) -> None:
            self._in_headers = False
            if dispatch is not None and self._direct():
                self.cycle = _DirectCycle(self.headers, self.parser.should_keep_alive())  # type: ignore[assignment]
                return
            super().on_headers_complete()

        def _direct(self) -> bool:
            """May this request take the direct path? (See ``_http_protocol``.)"""
            if self.url != b"/" or self.parser.get_method() != b"POST" or self.expect_100_continue:
                return False
            if self.parser.get_http_version() != "1.1" or self.parser.should_upgrade():
                return False
            if self.cycle is not None and not self.cycle.response_complete:
                return False  # pipelined behind a request still being answered: ASGI queues it
            length = None
            for name, value in self.headers:
                if name == b"content-length" and length is None and value.isdigit():
                    length = int(value)
                elif name in (b"content-length", b"transfer-encoding"):
                    return False
            return length is not None and length <= max_body

        def on_body(self, body: bytes) -> None:
            cycle = self.cycle
            if type(cycle) is _DirectCycle:
                cycle.body += body  # at most max_body: the parser stops at the Content-Length
                return
            super().on_body(body)

        def on_message_complete(self) -> None:
            self._in_headers, self._header_bytes = True, 0
            cycle = self.cycle
            if type(cycle) is not _DirectCycle:
                super().on_message_complete()
                return
            cycle.more_body = False
            assert dispatch is not None
            if in_flight is not None:
                in_flight.add(cycle)
            client = self.client[0] if self.client else ""
            peer = self.app_state.get(unix_listener.PEER_STATE_KEY)
            dispatch(cycle.headers, cycle.body, client, lambda reply: self._send_direct(cycle, reply), peer)

        def _send_direct(self, cycle: _DirectCycle, reply: Any) -> None:
            if in_flight is not None:
                in_flight.discard(cycle)
            if cycle.response_complete:
                return
            cycle.response_complete = True
            if cycle.disconnected or self.transport.is_closing():
                return
            self.transport.write(_reply_bytes(reply, self.server_state.default_headers, cycle.keep_alive))
            if not cycle.keep_alive:
                self.transport.close()
            if self.flow.write_paused:
                # A client that does not read its answers: go on (read its next request) only once
                # the transport's buffer drains, as uvicorn's ASGI ``send`` does.
                self.loop.create_task(self._complete_after_drain())
            else:
                self.on_response_complete()  # uvicorn's: the next pipelined request, or the keep-alive timer

        async def _complete_after_drain(self) -> None:
            await self.flow.drain()
            self.on_response_complete()

    return BoundedHttpToolsProtocol


def _tls_context(cert: Path, key: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(cert), str(key))
    return context


def bind_socket(host: str, port: int) -> socket.socket:
    """The listening socket (bound before serving; ``serve --workers`` shares one among its workers)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(LISTEN_BACKLOG)
    sock.set_inheritable(True)
    return sock


def endpoint_url(scheme: str, host: str, port: int) -> str:
    host = f"[{host}]" if ":" in host else host
    return f"{scheme}://{host}:{port}"


class _Uvicorn(uvicorn.Server):
    """uvicorn with a shutdown that does not wait on idle TLS connections.

    uvicorn closes an idle connection at shutdown with ``transport.close()``, and a TLS transport
    then waits up to 30 s for the client's close_notify, which an idle keep-alive client never
    sends: every stop took the whole graceful timeout. Here in-flight requests get
    GRACEFUL_SHUTDOWN_SECONDS to finish (their replies wait for the audit commit), then every
    remaining connection is aborted. ``in_flight``: the requests on the direct path being answered
    (not tasks, see ``_http_protocol``), waited for like the ASGI tasks.
    """

    in_flight: set[Any] = set()  # replaced per instance by ``Server``

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        """uvicorn's startup on the TCP sockets (with TLS if configured), then the Unix sockets:
        plain HTTP, with a protocol that hands each connection's peer credentials to the app."""
        unix = [s for s in sockets or [] if s.family == socket.AF_UNIX]
        await super().startup(sockets=[s for s in sockets or [] if s.family != socket.AF_UNIX])
        if not unix:
            return
        config = self.config
        protocol = unix_listener.peer_protocol(config.http_protocol_class)
        loop = asyncio.get_running_loop()

        def create_protocol() -> asyncio.Protocol:
            return protocol(config=config, server_state=self.server_state,  # type: ignore[no-any-return]
                            app_state=self.lifespan.state, _loop=loop)

        for sock in unix:
            self.servers.append(await loop.create_server(create_protocol, sock=sock, ssl=None,
                                                         backlog=config.backlog))

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        for server in self.servers:
            server.close()
        for sock in sockets or []:
            sock.close()
        for connection in list(self.server_state.connections):
            connection.shutdown()  # idle: closed; busy: no keep-alive after this reply
        loop = asyncio.get_running_loop()
        deadline = loop.time() + GRACEFUL_SHUTDOWN_SECONDS
        while (self.server_state.tasks or self.in_flight) and loop.time() < deadline and not self.force_exit:
            await asyncio.sleep(0.02)
        if self.in_flight:
            logging.getLogger("keyservice").warning("shutdown: %d request(s) unanswered", len(self.in_flight))
        for task in list(self.server_state.tasks):
            logging.getLogger("keyservice").warning("shutdown: cancelling a request still running")
            task.cancel()
        for connection in list(self.server_state.connections):
            transport = getattr(connection, "transport", None)
            if transport is not None:
                transport.abort()


class Server:
    """One listening server; ``port`` is known after construction (None when it serves only a
    Unix socket: ``unix_sock`` given, ``sock`` not)."""

    def __init__(self, app: Any, host: str, port: int, *,
                 tls_cert: Path | None = None, tls_key: Path | None = None,
                 sock: socket.socket | None = None, refuse: Refuse | None = None,
                 unix_sock: socket.socket | None = None) -> None:
        if tls_cert is not None and tls_key is None:
            raise ValueError("--tls-cert needs --tls-key")
        if sock is None and unix_sock is None:
            sock = bind_socket(host, port)
        self._sockets = [s for s in (sock, unix_sock) if s is not None]
        # The application's direct path for POST / (api.KmsApp.dispatch), when it has one.
        dispatch: Dispatch | None = getattr(app, "dispatch", None)
        in_flight: set[Any] = set()
        config = uvicorn.Config(
            app,
            loop="uvloop" if importlib.util.find_spec("uvloop") else "asyncio",
            http=_http_protocol(refuse, dispatch, int(getattr(app, "max_body", 0)), in_flight),
            ws="none",  # no WebSocket upgrades: an Upgrade header is just a header
            # The audit records the peer's address. Behind no proxy here, so X-Forwarded-For is
            # attacker text and must not replace it (uvicorn trusts it from 127.0.0.1 by default).
            proxy_headers=False,
            lifespan="off",
            access_log=False,
            log_config=None,
            log_level=logging.WARNING,
            server_header=False,
            date_header=True,
            timeout_keep_alive=KEEP_ALIVE_SECONDS,
            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS,
            backlog=LISTEN_BACKLOG,
        )
        config.load()
        if tls_cert is not None and tls_key is not None:
            config.ssl = _tls_context(tls_cert, tls_key)
        self._server = _Uvicorn(config)
        self._server.in_flight = in_flight
        self.scheme = "https" if tls_cert is not None else "http"
        self.host = host
        self.port = int(sock.getsockname()[1]) if sock is not None else None

    @property
    def endpoint(self) -> str:
        assert self.port is not None, "a Unix-socket-only server has no TCP endpoint"
        return endpoint_url(self.scheme, self.host, self.port)

    def serve_forever(self) -> None:
        """Serve until ``stop`` or SIGINT/SIGTERM (uvicorn handles both and re-raises them after).
        The sockets are closed at the end; a Unix socket's file is its owner's to remove
        (``unix_listener.Listener.remove``)."""
        try:
            self._server.run(sockets=self._sockets)
        finally:
            for sock in self._sockets:
                sock.close()

    def stop(self) -> None:
        self._server.should_exit = True
