"""The web console in a real browser (Debian's Chromium driven by Playwright) against a real
``keyservice serve --dev`` process, with kmsfs mounted over the key made in the UI; and the attacker's
side: forged forms, planted session ids, cookie flags, the CSP, password guessing, markup in names.

Chromium runs headless with a new empty profile per test (``launch_persistent_context`` on a fresh
directory); ``playwright install`` is never used: the browser is the system's (scripts/setup.sh).
The service clock is shifted through ``--clock-offset-file`` to age sessions and the login limit.
Set KMSFS_CONSOLE_SCREENSHOTS=DIR to save the README's screenshots there.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from playwright.sync_api import BrowserContext, Page, Playwright, expect, sync_playwright

from tests.conftest import DevKeyService, run_keyservice, start_dev_service, stop_dev_service
from tests.integration.kmsfs_mount_helpers import kmsfs, mounted, requires_fuse, wait_for_records

pytestmark = [pytest.mark.integration]

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]  # fmt: skip
SESSION_COOKIE = "__Host-kmsfs-console"
LOGIN_COOKIE = "__Host-kmsfs-login"
XSS = '<script>alert("x")</script><img src=x onerror=alert(1)>'
# Playwright's 5 s default for expect() flaked once on a loaded 2-core machine (a wrong page still
# fails, after this long).
expect.set_options(timeout=20_000)


class World:
    def __init__(self, service: DevKeyService, offset_file: Path) -> None:
        self.service = service
        self.offset_file = offset_file
        self.console = service.endpoint + "/console"
        creds = service.credentials
        self.admin = (creds["access_key_id"], creds["secret_access_key"])
        self._offset = 0.0

    def shift_clock(self, seconds: float) -> None:
        """Move the service clock (sessions, login limit) ``seconds`` ahead."""
        self._offset += seconds
        self.offset_file.write_text(str(self._offset))

    def http(self) -> requests.Session:
        session = self.service.http
        session.headers["User-Agent"] = "console-test"
        return session

    def login_http(self, http: requests.Session, akid: str, secret: str) -> requests.Response:
        blank = self.http()  # ``http`` may hold a live session, which skips the login page
        page = blank.get(self.console + "/login")
        token = re.search(r'name="login_token" value="([^"]+)"', page.text)
        assert token, page.text
        http.cookies.set(LOGIN_COOKIE, blank.cookies[LOGIN_COOKIE], domain="127.0.0.1", path="/")
        return http.post(self.console + "/login", data={
            "login_token": token.group(1), "access_key_id": akid, "secret_access_key": secret})

    def principal(self, name: str, *actions: str) -> dict[str, str]:
        """A new principal with an identity policy allowing ``actions`` on every key."""
        data_dir = str(self.service.data_dir)
        result = run_keyservice("principal", "create", name, "--json", "--data-dir", data_dir)
        assert result.returncode == 0, result.stderr
        creds = json.loads(result.stdout)
        if actions:
            self.attach(name, "base", *actions)
        return creds

    def attach(self, name: str, policy_name: str, *actions: str) -> None:
        doc = self.offset_file.parent / f"{name}-{policy_name}.json"
        doc.write_text(json.dumps({"Version": "2012-10-17", "Statement": [
            {"Effect": "Allow", "Action": list(actions), "Resource": "*"}]}))
        result = run_keyservice("principal", "attach-policy", name, "--policy-file", str(doc), "--name",
                                policy_name, "--data-dir", str(self.service.data_dir))  # fmt: skip
        assert result.returncode == 0, result.stderr

    def records(self, operation: str | None = None) -> list[dict[str, Any]]:
        return [r for r in self.service.audit_records() if operation is None or r["operation"] == operation]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    base = tmp_path_factory.mktemp("console")
    offset = base / "clock-offset"
    offset.write_text("0")
    service = start_dev_service(base, "--clock-offset-file", str(offset))
    try:
        yield World(service, offset)
    finally:
        stop_dev_service(service)


@pytest.fixture(scope="module")
def playwright() -> Iterator[Playwright]:
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"{CHROMIUM} is missing: scripts/setup.sh installs Debian's chromium")
    with sync_playwright() as p:
        yield p


@pytest.fixture
def browser(playwright: Playwright, tmp_path: Path) -> Iterator[BrowserContext]:
    """A fresh Chromium with an empty profile; any JavaScript dialog (an XSS firing) fails the test."""
    context = playwright.chromium.launch_persistent_context(
        str(tmp_path / "chromium-profile"), executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True,
        ignore_https_errors=True, viewport={"width": 1280, "height": 800})  # fmt: skip
    dialogs: list[str] = []

    def watch(page: Page) -> None:
        page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))

    for page in context.pages:
        watch(page)
    context.on("page", watch)
    try:
        yield context
    finally:
        context.close()
    assert dialogs == [], f"a script ran in the console: {dialogs}"


def _page(context: BrowserContext) -> Page:
    return context.pages[0] if context.pages else context.new_page()


def login(page: Page, world: World, akid: str, secret: str) -> None:
    page.goto(world.console + "/")
    page.get_by_label("Access key id").fill(akid)
    page.get_by_label("Secret access key").fill(secret)
    page.get_by_role("button", name="Log in").click()
    expect(page.get_by_role("heading", name="Keys", exact=True)).to_be_visible()


def create_key_in_ui(page: Page, description: str) -> str:
    """Create a key from the key list's form; the browser lands on its page. Returns the key id."""
    page.get_by_label("Description").fill(description)
    page.get_by_role("button", name="Create key").click()
    expect(page.get_by_role("status")).to_contain_text("Created key")
    return page.url.rsplit("/", 1)[1]


def _shot(page: Page, name: str, full_page: bool = False) -> None:
    target = os.environ.get("KMSFS_CONSOLE_SCREENSHOTS")
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(target) / name), full_page=full_page)


def _drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("1")


# --------------------------------------------------------------------------- the operator's path


@requires_fuse
def test_manage_a_key_mount_it_disable_it_and_review_the_audit_in_the_browser(
    world: World, browser: BrowserContext, tmp_path: Path
) -> None:
    if os.environ.get("KMSFS_CONSOLE_SCREENSHOTS"):  # a few more keys, for a fuller picture
        kms = world.service.boto3_client()
        for name, text in (("backups", "nightly backups"), ("hr", "HR records"), ("build", "CI secrets")):
            key = kms.create_key(Description=text, Tags=[{"TagKey": "team", "TagValue": name}])["KeyMetadata"]
            kms.create_alias(AliasName=f"alias/{name}", TargetKeyId=key["KeyId"])
        kms.enable_key_rotation(KeyId=key["KeyId"])
        kms.disable_key(KeyId=key["KeyId"])
    page = _page(browser)
    login(page, world, *world.admin)
    page.get_by_label("Description").fill("project files")
    page.get_by_label("Alias (optional, alias/...)").fill("alias/console-e2e")
    page.get_by_label("Tag key (optional)").fill("team")
    page.get_by_label("Tag value").fill("storage")
    page.get_by_role("button", name="Create key").click()
    expect(page.get_by_role("status")).to_contain_text("Created key")
    key_id = page.url.rsplit("/", 1)[1]
    expect(page.locator(".meta")).to_contain_text("Enabled")
    expect(page.locator(".alias")).to_have_text(["alias/console-e2e"])

    cipherdir = tmp_path / "cipher"
    kmsfs("init", cipherdir, "--endpoint", world.service.endpoint, "--key", "alias/console-e2e",
          "--credentials", world.service.credentials_file)  # fmt: skip
    with mounted(cipherdir, tmp_path / "mnt", world.service.credentials_file) as mnt:
        (mnt / "report.txt").write_text("quarterly numbers\n")
        _drop_caches()
        read = subprocess.run(["cat", str(mnt / "report.txt")], capture_output=True, text=True, check=True)
        assert read.stdout == "quarterly numbers\n"
        wait_for_records(world.service.audit_records, lambda rs: any(
            r["operation"] == "Decrypt" and (r.get("caller") or {}).get("process") == "cat" for r in rs))

        page.get_by_role("link", name="Files", exact=True).click()
        row = page.locator("table.files tbody tr", has_text="/report.txt").first
        expect(row).to_contain_text("cat")  # the process
        expect(row).to_contain_text("root")  # the local user (uid 0)
        expect(row).to_contain_text(key_id)
        _shot(page, "console-files.png")

        page.get_by_role("link", name="Keys", exact=True).click()
        _shot(page, "console-keys.png")
        page.get_by_role("link", name=key_id).click()
        _shot(page, "console-key.png", full_page=True)
        page.get_by_role("button", name="Disable key").click()
        expect(page.get_by_role("status")).to_contain_text("Key disabled")
        expect(page.locator(".meta")).to_contain_text("Disabled")

        _drop_caches()
        denied = subprocess.run(["cat", str(mnt / "report.txt")], capture_output=True, text=True)
        assert denied.returncode != 0 and "denied" in denied.stderr.lower(), denied

        page.get_by_role("link", name="Audit timeline", exact=True).click()
        page.get_by_label("File path or prefix").fill("/report.txt")
        page.get_by_label("Outcome").select_option("error")
        page.get_by_role("button", name="Filter").click()
        refused = page.locator("table.audit tbody tr", has_text="REFUSED").first
        expect(refused).to_contain_text("DisabledException")
        expect(refused).to_contain_text("/report.txt")
        expect(refused).to_contain_text("cat")
        # htmx pushed the filtered URL (waited for: the unfiltered page already showed a refusal,
        # so the row above can match before the filtered answer replaced the table)
        expect(page).to_have_url(re.compile(r"outcome=error"))
        page.get_by_label("Outcome").select_option("")
        page.get_by_role("button", name="Filter").click()
        expect(page.locator("table.audit tbody tr", has_text="success").first).to_contain_text("Decrypt")
        _shot(page, "console-audit.png")

        page.goto(f"{world.console}/audit/keys/{key_id}")
        timeline = page.locator("table.audit")
        expect(timeline).to_contain_text("DisableKey")
        expect(timeline).to_contain_text("DisabledException")

    # Every action the console took is in the log as the admin, with the console's user agent.
    console_records = [r for r in world.records() if r["user_agent"].startswith("kmsfs-console/")]
    done = {(r["operation"], r["outcome"]) for r in console_records if r.get("key_id", "") and
            key_id in (r.get("key_id") or "")}  # fmt: skip
    assert {("CreateKey", "success"), ("CreateAlias", "success"), ("DisableKey", "success")} <= done
    assert {r["access_key_id"] for r in console_records if r["principal"]} == {world.admin[0]}
    assert any(r["operation"] == "ConsoleLogin" and r["outcome"] == "success" for r in console_records)


def test_login_and_navigation_work_from_the_keyboard_alone(world: World, browser: BrowserContext) -> None:
    page = _page(browser)
    page.goto(world.console + "/login")
    page.keyboard.press("Tab")  # the skip link first
    expect(page.get_by_role("link", name="Skip to content")).to_be_focused()
    page.keyboard.press("Tab")
    expect(page.get_by_label("Access key id")).to_be_focused()
    page.keyboard.type(world.admin[0])
    page.keyboard.press("Tab")
    expect(page.get_by_label("Secret access key")).to_be_focused()
    page.keyboard.type(world.admin[1])
    page.keyboard.press("Enter")
    expect(page.get_by_role("heading", name="Keys", exact=True)).to_be_visible()
    page.get_by_role("link", name="Audit timeline", exact=True).focus()
    page.keyboard.press("Enter")
    expect(page.get_by_role("heading", name="Audit timeline")).to_be_visible()
    # Every form field on the pages has a label.
    key_id = world.service.boto3_client().create_key()["KeyMetadata"]["KeyId"]
    for path in ("/keys", f"/keys/{key_id}", "/audit", "/audit/files", "/audit/verify"):
        page.goto(world.console + path)
        unlabelled = page.locator("main input:not([type=hidden]), main select, main textarea").evaluate_all(
            "els => els.filter(e => !(e.labels && e.labels.length)).map(e => e.name)")
        assert unlabelled == [], (path, unlabelled)


def test_audit_verification_runs_in_the_background(world: World, browser: BrowserContext) -> None:
    page = _page(browser)
    login(page, world, *world.admin)
    page.get_by_role("link", name="Verification").click()
    page.get_by_role("button", name="Verify now (in the background)").click()
    for _ in range(100):
        if "PASSED" in page.content() or "FAILED" in page.content():
            break
        page.wait_for_timeout(100)
        page.reload()
    expect(page.locator(".result-ok")).to_contain_text("PASSED")


def test_key_actions_rotation_policy_and_typed_deletion(world: World, browser: BrowserContext) -> None:
    page = _page(browser)
    login(page, world, *world.admin)
    key_id = create_key_in_ui(page, "actions")
    page.get_by_role("button", name="Rotate now").click()
    expect(page.get_by_role("status")).to_contain_text("Rotation started")
    expect(page.locator("table", has_text="Key material id")).to_contain_text("ON_DEMAND")
    page.get_by_label("Automatic rotation every (days, 90–2560)").fill("180")
    page.get_by_role("button", name="Enable automatic rotation").click()
    expect(page.get_by_text("Automatic rotation: on, every 180 days")).to_be_visible()
    page.get_by_role("button", name="Disable automatic rotation").click()
    expect(page.get_by_text("Automatic rotation: off")).to_be_visible()

    # A policy that would lock the admin out is refused with PutKeyPolicy's own check; the text stays.
    lockout = json.dumps({"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Principal": {"AWS": "arn:aws:iam::123456789012:root"}, "Action": "kms:*",
         "Resource": "*"}]})  # fmt: skip
    page.get_by_label(re.compile("^Policy document")).fill(lockout)
    page.get_by_role("button", name="Save key policy").click()
    expect(page.get_by_role("alert").first).to_contain_text("MalformedPolicyDocumentException")
    expect(page.get_by_label(re.compile("^Policy document"))).to_have_value(lockout)

    # Deletion needs the key id typed out, and 7 to 30 days.
    page.get_by_label("Waiting period (days, 7–30)").fill("7")
    page.get_by_label(re.compile("^Type the key id")).fill("not the id")
    page.get_by_role("button", name="Schedule deletion").click()
    expect(page.get_by_role("alert").first).to_contain_text("Type the key id exactly")
    page.get_by_label("Waiting period (days, 7–30)").fill("3")
    page.get_by_label(re.compile("^Type the key id")).fill(key_id)
    page.get_by_role("button", name="Schedule deletion").click()
    expect(page.get_by_role("alert").first).to_contain_text("ValidationException")
    page.get_by_label("Waiting period (days, 7–30)").fill("7")
    page.get_by_label(re.compile("^Type the key id")).fill(key_id)
    page.get_by_role("button", name="Schedule deletion").click()
    expect(page.locator(".meta")).to_contain_text("PendingDeletion")
    page.get_by_role("button", name="Cancel deletion").click()
    expect(page.locator(".meta")).to_contain_text("Disabled")
    page.get_by_role("button", name="Enable key").click()
    expect(page.locator(".meta")).to_contain_text("Enabled")

    # The list filters by state and alias (htmx swaps the table in place).
    page.get_by_label("New alias").fill("alias/console-actions")
    page.get_by_role("button", name="Create alias").click()
    page.get_by_role("link", name="All keys").click()
    page.get_by_label("Alias contains").fill("console-actions")
    page.get_by_role("button", name="Filter").click()
    expect(page.locator("table.keys tbody tr")).to_have_count(1)
    expect(page.locator("table.keys")).to_contain_text(key_id)
    page.get_by_label("State").select_option("Disabled")
    page.get_by_role("button", name="Filter").click()
    expect(page.locator("table.keys")).to_contain_text("No key matches")


def test_a_principal_without_audit_permission_sees_no_audit_page(
    world: World, browser: BrowserContext
) -> None:
    bob = world.principal("console-bob", "kms:ListKeys", "kms:ListAliases", "kms:DescribeKey")
    page = _page(browser)
    login(page, world, bob["access_key_id"], bob["secret_access_key"])
    expect(page.get_by_role("navigation")).not_to_contain_text("Audit")
    response = page.goto(world.console + "/audit")
    assert response is not None and response.status == 403
    expect(page.get_by_role("alert")).to_contain_text("kms:ReadAuditLog")
    denied = [r for r in world.records("ReadAuditLog") if r["access_key_id"] == bob["access_key_id"]]
    assert denied and denied[-1]["error_code"] == "AccessDeniedException"
    # Key policies still apply: bob may list but not create.
    page.goto(world.console + "/keys")
    page.get_by_role("button", name="Create key").click()
    expect(page.get_by_role("alert").first).to_contain_text("AccessDeniedException")

    world.attach("console-bob", "audit", "kms:ReadAuditLog")  # the permission, named as documented
    page.goto(world.console + "/audit")
    expect(page.get_by_role("heading", name="Audit timeline")).to_be_visible()


def test_a_deleted_principal_loses_its_console_session_at_once(world: World) -> None:
    carol = world.principal("console-carol", "kms:ListKeys", "kms:ListAliases", "kms:DescribeKey")
    http = world.http()
    assert world.login_http(http, carol["access_key_id"], carol["secret_access_key"]).url.endswith("/keys")
    result = run_keyservice("principal", "delete", "console-carol", "--data-dir", str(world.service.data_dir))
    assert result.returncode == 0, result.stderr
    assert http.get(world.console + "/keys", allow_redirects=False).status_code == 303  # to the login


# --------------------------------------------------------------------------- the attacker's side


def test_a_forged_post_without_the_csrf_token_is_refused(world: World, browser: BrowserContext) -> None:
    page = _page(browser)
    login(page, world, *world.admin)
    key_id = create_key_in_ui(page, "csrf target")
    token = page.locator("input[name=csrf_token]").first.input_value()
    url = f"{world.console}/keys/{key_id}/disable"
    # The browser's own cookies, no token / a wrong token / the right token from another origin.
    for form, headers in (({}, {}), ({"csrf_token": "x" * 43}, {}),
                          ({"csrf_token": token}, {"Origin": "https://evil.example"})):  # fmt: skip
        reply = browser.request.post(url, form=form, headers=headers, max_redirects=0)
        assert reply.status == 403, (form, headers)
    page.reload()
    expect(page.locator(".meta")).to_contain_text("Enabled")
    refused = world.records("ConsoleForm")
    assert len(refused) >= 3 and all(r["error_code"] == "AccessDeniedException" for r in refused)
    # A cross-site form: the SameSite=Strict cookie does not go with it, so there is no session.
    evil = page.context.new_page()
    evil.set_content(f'<form method="post" action="{url}"><input name="csrf_token" value="{token}">'
                     '<button>go</button></form>')  # fmt: skip
    evil.get_by_role("button", name="go").click()
    evil.wait_for_load_state()
    assert "refused" in evil.content().lower()
    page.reload()
    expect(page.locator(".meta")).to_contain_text("Enabled")
    # The right token from the page itself works.
    reply = browser.request.post(url, form={"csrf_token": token}, max_redirects=0)
    assert reply.status == 303


def test_a_stale_session_is_refused(world: World, browser: BrowserContext) -> None:
    page = _page(browser)
    login(page, world, *world.admin)
    token = page.locator("input[name=csrf_token]").first.input_value()
    world.shift_clock(16 * 60)  # 15 minutes idle
    page.goto(world.console + "/keys")
    expect(page.get_by_role("heading", name="Log in")).to_be_visible()
    reply = browser.request.post(world.console + "/keys", form={"csrf_token": token, "description": "late"},
                                 max_redirects=0)  # fmt: skip
    assert reply.status == 403

    # Busy but old: a request every 10 minutes does not stretch a session past 8 hours.
    login(page, world, *world.admin)
    for _ in range(47):
        world.shift_clock(600)
        assert page.goto(world.console + "/keys").url.endswith("/keys")
    world.shift_clock(1200)
    assert page.goto(world.console + "/keys").url.endswith("/login")


def test_session_cookie_flags_and_no_fixation(world: World) -> None:
    http = world.http()
    http.cookies.set(SESSION_COOKIE, "planted-by-attacker", domain="127.0.0.1", path="/")
    reply = world.login_http(http, *world.admin)
    assert reply.history and reply.history[0].status_code == 303
    cookies = reply.history[0].raw.headers.getlist("set-cookie")
    [set_cookie] = [c for c in cookies if c.startswith(SESSION_COOKIE + "=")]
    value, *attributes = [part.strip() for part in set_cookie.split(";")]
    assert value.split("=", 1)[1] != "planted-by-attacker" and len(value) > 40
    flags = {a.lower() for a in attributes}
    assert flags == {"secure", "httponly", "samesite=strict", "path=/"}  # no Domain, no lifetime

    # An attacker's own valid session planted in a victim's browser is ended by the victim's login.
    attacker = world.http()
    world.login_http(attacker, *world.admin)
    planted = attacker.cookies.get(SESSION_COOKIE)
    victim = world.http()
    victim.cookies.set(SESSION_COOKIE, planted, domain="127.0.0.1", path="/")
    world.login_http(victim, *world.admin)
    assert victim.cookies.get(SESSION_COOKIE) != planted
    assert attacker.get(world.console + "/keys", allow_redirects=False).status_code == 303  # gone

    # Logout ends the session on the server (a copied cookie is useless after it) and is audited.
    copy = victim.cookies.get(SESSION_COOKIE)
    token = re.search(r'name="csrf_token" value="([^"]+)"', victim.get(world.console + "/keys").text)
    assert token
    victim.post(world.console + "/logout", data={"csrf_token": token.group(1)})
    stolen = world.http()
    stolen.cookies.set(SESSION_COOKIE, copy, domain="127.0.0.1", path="/")
    assert stolen.get(world.console + "/keys", allow_redirects=False).status_code == 303
    assert world.records("ConsoleLogout")[-1]["outcome"] == "success"


def test_every_console_reply_has_the_strict_csp(world: World) -> None:
    http = world.http()
    world.login_http(http, *world.admin)
    for path in ("/login", "/keys", "/audit", "/keys/no-such-key", "/static/console.css",
                 "/static/htmx.min.js", "/nothing-here"):  # fmt: skip
        reply = http.get(world.console + path, allow_redirects=False)
        csp = reply.headers.get("content-security-policy", "")
        assert "default-src 'none'" in csp and "script-src 'self'" in csp, path
        assert "unsafe-inline" not in csp and "unsafe-eval" not in csp and "frame-ancestors 'none'" in csp
        assert reply.headers["x-content-type-options"] == "nosniff"
        assert reply.headers["cache-control"] == "no-store"
        assert "max-age" in reply.headers["strict-transport-security"]
    # The KMS API on the same listener is untouched by the console.
    assert http.get(world.service.endpoint + "/healthz").text == "ok\n"


def test_failed_logins_are_rate_limited_per_address_and_audited(world: World) -> None:
    before = len(world.records("ConsoleLogin"))
    http = world.http()
    for _ in range(5):
        assert world.login_http(http, world.admin[0], "wrong-secret").status_code == 401
    # Now even the right secret is refused from this address until the window passes.
    assert world.login_http(http, *world.admin).status_code == 429
    logins = world.records("ConsoleLogin")[before:]
    codes = [r["error_code"] for r in logins]
    assert codes == ["UnrecognizedClientException"] * 5 + ["LimitExceededException"]
    assert all(r["access_key_id"] == world.admin[0] and r["source_address"] == "127.0.0.1" for r in logins)
    assert not any("wrong-secret" in json.dumps(r) for r in logins)
    world.shift_clock(301)
    assert world.login_http(http, *world.admin).url.endswith("/console/keys")


def test_markup_in_descriptions_tags_and_alias_names_is_shown_as_text(
    world: World, browser: BrowserContext
) -> None:
    page = _page(browser)
    login(page, world, *world.admin)
    page.get_by_label("Description").fill(XSS)
    page.get_by_label("Tag key (optional)").fill("<b>tag</b>")
    page.get_by_label("Tag value").fill('"><svg onload=alert(2)>')
    page.get_by_role("button", name="Create key").click()
    expect(page.locator("dd.description")).to_have_text(XSS)
    expect(page.locator("td.tag").first).to_have_text("<b>tag</b>")
    expect(page.locator("td.tag").nth(1)).to_have_text('"><svg onload=alert(2)>')
    assert page.locator("main img, main svg, main b, main script").count() == 0
    page.get_by_label("New alias").fill('alias/<script>alert("a")</script>')
    page.get_by_role("button", name="Create alias").click()
    expect(page.get_by_role("alert").first).to_contain_text("<script>")  # the error names it, as text
    assert page.locator("main script").count() == 0
    page.get_by_role("link", name="All keys").click()
    expect(page.locator("table.keys")).to_contain_text(XSS)
    assert page.locator("main img, main script").count() == 0
    page.goto(world.console + "/audit?operation=" + requests.utils.quote("<script>alert(3)</script>"))
    expect(page.get_by_label("Operation")).to_have_value("<script>alert(3)</script>")
    assert page.locator("main script").count() == 0


def test_bad_forms_get_a_clear_refusal_and_change_nothing(world: World) -> None:
    http = world.http()
    world.login_http(http, *world.admin)
    page = http.get(world.console + "/keys").text
    token = re.search(r'name="csrf_token" value="([^"]+)"', page)
    assert token
    url = world.console + "/keys"
    before = len(world.service.boto3_client().list_keys(Limit=1000)["Keys"])
    too_big = http.post(url, data={"csrf_token": token.group(1), "description": "x" * (70 * 1024)})
    assert too_big.status_code == 413 and "too large" in too_big.text
    as_json = http.post(url, json={"csrf_token": token.group(1)})
    assert as_json.status_code == 415
    form_type = {"Content-Type": "application/x-www-form-urlencoded"}
    garbage = http.post(url, data=b"\xff\xfe=\x00", headers=form_type)
    assert garbage.status_code == 400 and "could not be read" in garbage.text
    unknown = http.post(f"{world.console}/keys/{'0' * 8}-0000-0000-0000-{'0' * 12}/explode",
                        data={"csrf_token": token.group(1)})  # fmt: skip
    assert unknown.status_code == 404 and "Unknown console action" in unknown.text  # then: no such key
    assert len(world.service.boto3_client().list_keys(Limit=1000)["Keys"]) == before
    assert http.get(world.console, allow_redirects=False).status_code == 303  # /console -> /console/keys
