"""``GET /metrics`` on a listener of its own, opt-in (``keyservice serve --metrics-listen HOST:PORT``).

The metrics are unauthenticated (Prometheus scrapes without SigV4), so they are not served on the
KMS port, where anyone who can reach the service could read key ids, states and request counts.
An operator who wants them names a separate address, normally a loopback one or an interface
only the monitoring network reaches; a non-loopback address must be asked for explicitly
(``--metrics-allow-remote``, checked by the CLI).

Plain HTTP, one request at a time, on one daemon thread (``http.server``): a scrape every few
seconds needs no more, and a serial server cannot be made to grow threads or memory by clients
(each connection gets ``TIMEOUT_SECONDS`` to send its request). Only ``GET /metrics`` and
``GET /healthz`` are answered; everything else is a 404.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, HTTPServer

TIMEOUT_SECONDS = 5.0


class _Handler(BaseHTTPRequestHandler):
    render: Callable[[], tuple[str, str]]
    timeout = TIMEOUT_SECONDS
    server_version = "keyservice-metrics"
    sys_version = ""

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        if self.path == "/metrics":
            content_type, text = self.render()
        elif self.path == "/healthz":
            content_type, text = "text/plain; charset=utf-8", "ok\n"
        else:
            self.send_error(404)
            return
        body = text.encode("utf-8")
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass  # scrapes are not worth a log line each


class MetricsListener:
    """Serves ``render()`` (content type, text) at ``GET /metrics`` on ``host:port`` until ``stop``."""

    def __init__(self, host: str, port: int, render: Callable[[], tuple[str, str]]) -> None:
        handler = type("MetricsHandler", (_Handler,), {"render": staticmethod(render)})
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        server_class = type("MetricsServer", (HTTPServer,), {"address_family": family})
        self._server = server_class((host, port), handler)
        self.host = host
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(target=self._server.serve_forever, name="metrics", daemon=True)

    @property
    def endpoint(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        if self._thread.is_alive():
            self._server.shutdown()
        self._server.server_close()
