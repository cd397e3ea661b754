"""The console's ASGI app in-process over a real KeyService: what unauthenticated clients can and
cannot make the server keep in memory (issue 18: sessions bounded; no state before login)."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest

from keyservice import bootstrap
from keyservice.clock import SystemClock
from keyservice.console.app import LOGIN_COOKIE, SESSION_COOKIE, Console
from keyservice.console.sessions import MAX_SESSIONS_PER_KEY
from keyservice.store import rootkey

FORM = ("content-type", "application/x-www-form-urlencoded")


class Reply:
    def __init__(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        self.status, self.body = status, body.decode()
        self.headers = [(k.decode(), v.decode()) for k, v in headers]

    def cookie(self, name: str) -> str | None:
        for key, value in self.headers:
            if key == "set-cookie" and value.startswith(name + "="):
                return value.split(";", 1)[0].split("=", 1)[1]
        return None


def request(app: Console, method: str, path: str, *, body: bytes = b"", address: str = "10.0.0.1",
            headers: tuple[tuple[str, str], ...] = ()) -> Reply:  # fmt: skip
    scope: dict[str, Any] = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
        "scheme": "https", "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
        "headers": [(k.encode(), v.encode()) for k, v in (("host", "kms.test"), *headers)],
        "client": (address, 50000), "server": ("127.0.0.1", 8600),
    }  # fmt: skip
    messages = [{"type": "http.request", "body": body, "more_body": False}]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    return Reply(sent[0]["status"], sent[0]["headers"], b"".join(m.get("body", b"") for m in sent[1:]))


@pytest.fixture
def console(tmp_path: Path) -> Any:
    data_dir = tmp_path / "data"
    root_key = rootkey.create_root_config(data_dir, rootkey.RootKeySource.dev())
    admin = bootstrap.initialize(data_dir, root_key, region="eu-west-1", account_id="123456789012")
    service = bootstrap.open_service(data_dir, root_key, clock=SystemClock())
    try:
        yield Console(service, data_dir), admin
    finally:
        service.close()


def _login(app: Console, akid: str, secret: str, address: str = "10.0.0.1") -> Reply:
    page = request(app, "GET", "/console/login", address=address)
    token = page.cookie(LOGIN_COOKIE)
    assert token and re.search(r'name="login_token" value="([^"]+)"', page.body)
    body = urlencode({"login_token": token, "access_key_id": akid, "secret_access_key": secret}).encode()
    return request(app, "POST", "/console/login", body=body, address=address,
                   headers=(FORM, ("cookie", f"{LOGIN_COOKIE}={token}")))  # fmt: skip


def test_unauthenticated_clients_leave_no_session_behind(console: Any) -> None:
    app, admin = console
    for i in range(500):
        assert request(app, "GET", "/console/login", address=f"10.1.{i // 250}.{i % 250}").status == 200
        assert request(app, "GET", "/console/keys", address="10.2.0.1").status == 303
    for i in range(200):  # wrong secrets from many addresses: audited, counted, no session
        assert _login(app, admin.access_key_id, "wrong", address=f"10.3.0.{i}").status == 401
    forged = urlencode({"login_token": "a.1.b", "access_key_id": admin.access_key_id,
                        "secret_access_key": admin.secret_access_key}).encode()  # fmt: skip
    assert request(app, "POST", "/console/login", body=forged, headers=(FORM,)).status == 403
    assert len(app.sessions) == 0
    assert len(app.limiter._by_address) == 200  # bounded by MAX_TRACKED_ADDRESSES (unit-tested)


def test_one_access_key_holds_at_most_its_quota_of_sessions(console: Any) -> None:
    app, admin = console
    cookies = []
    for i in range(MAX_SESSIONS_PER_KEY + 5):
        reply = _login(app, admin.access_key_id, admin.secret_access_key, address=f"10.4.0.{i}")
        assert reply.status == 303
        cookies.append(reply.cookie(SESSION_COOKIE))
    assert len(app.sessions) == MAX_SESSIONS_PER_KEY
    newest = request(app, "GET", "/console/keys", headers=(("cookie", f"{SESSION_COOKIE}={cookies[-1]}"),))
    oldest = request(app, "GET", "/console/keys", headers=(("cookie", f"{SESSION_COOKIE}={cookies[0]}"),))
    assert newest.status == 200 and oldest.status == 303
