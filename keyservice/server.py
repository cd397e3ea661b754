"""The HTTP(S) server around the WSGI app: cheroot, with TLS when given a certificate.

Why cheroot: a production WSGI server (CherryPy's) with a thread pool, HTTP/1.1 keep-alive, a
request body limit and built-in TLS. (waitress, used first, has no TLS.)
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from cheroot import wsgi
from cheroot.ssl.builtin import BuiltinSSLAdapter

from keyservice.api import DRAIN_FACTOR


class Server:
    """One listening server; ``port`` is known after construction (port 0 picks a free one)."""

    def __init__(self, app: Callable[..., Any], host: str, port: int, *, threads: int, max_body: int,
                 tls_cert: Path | None = None, tls_key: Path | None = None) -> None:
        self._server = wsgi.Server((host, port), app, numthreads=threads, server_name="keyservice",
                                   timeout=30, shutdown_timeout=5)
        # The application enforces ``max_body`` with a proper AWS error; the server's own cap is a
        # backstop against clients that send far more.
        self._server.max_request_body_size = max_body * DRAIN_FACTOR
        self.scheme = "http"
        if tls_cert is not None:
            if tls_key is None:
                raise ValueError("--tls-cert needs --tls-key")
            self._server.ssl_adapter = BuiltinSSLAdapter(str(tls_cert), str(tls_key))
            self.scheme = "https"
        self._server.prepare()  # binds now, so the chosen port can be printed before serving
        self.host = host
        self.port = int(self._server.bind_addr[1])

    @property
    def endpoint(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"

    def serve_forever(self) -> None:
        self._server.serve()

    def stop(self) -> None:
        self._server.stop()
