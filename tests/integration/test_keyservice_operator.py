"""The operator's view of ``keyservice`` (issue 14): one-line errors with documented exit codes and
nothing left behind, one server per data directory, one endpoint from init to serve, review
commands that never answer "nobody" by mistake, and ``serve --background`` for eval and systemd.
Real server processes on loopback, stopped in teardown."""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.conftest import DevKeyService, free_port, run_keyservice, spawn_keyservice, wait_healthy

pytestmark = [pytest.mark.integration]

def one_line(proc: subprocess.CompletedProcess[str], code: int) -> str:
    """The documented exit code, no traceback, and exactly one line on stderr."""
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith("keyservice"), proc.stderr
    return proc.stderr


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def test_bad_invocations_one_line_documented_exit_nothing_left(tmp_path: Path, busy_port: int) -> None:
    regular = tmp_path / "regular-file"
    regular.write_text("x")
    root_key = tmp_path / "root.key"
    table: list[tuple[list[str], int, str, list[Path]]] = [
        (["serve", "--dev", "--listen", f"127.0.0.1:{busy_port}", "--data-dir", str(tmp_path / "d1")], 1,
         "port is in use", [tmp_path / "d1"]),
        (["serve", "--dev", "--listen", "127.0.0.1:99999", "--data-dir", str(tmp_path / "d2")], 2,
         "out of range", [tmp_path / "d2"]),
        (["serve", "--dev", "--listen", "192.0.2.1:8600", "--data-dir", str(tmp_path / "d3")], 1,
         "this host has no address 192.0.2.1", [tmp_path / "d3"]),
        (["serve", "--dev", "--listen", "127.0.0.1:0", "--data-dir", f"{regular}/d4"], 1,
         "not a directory", []),
        (["serve", "--listen", "127.0.0.1:0", "--data-dir", str(tmp_path / "d5")], 1,
         "not an initialised keyservice data directory", [tmp_path / "d5"]),
        (["init", "--data-dir", "/etc/hostname", "--root-key-file", str(root_key)], 1, "not a directory",
         [root_key]),
        (["init", "--data-dir", f"{regular}/sub", "--root-key-file", str(root_key)], 1, "not a directory",
         [root_key]),
        (["init", "--data-dir", str(tmp_path / "d6" / "store"), "--root-key-file", str(root_key),
          "--region", "bogus", "--credentials-out", str(tmp_path / "c6.json")], 1, "invalid region",
         [tmp_path / "d6", root_key, tmp_path / "c6.json"]),
        (["init", "--data-dir", str(tmp_path / "d7"), "--root-passphrase-file", str(tmp_path / "none")], 1,
         "cannot read the root passphrase file", [tmp_path / "d7"]),
        (["audit", "list", "--data-dir", str(tmp_path / "no-such-dir")], 1, "no such data directory", []),
        (["audit", "files", "--data-dir", str(tmp_path)], 1, "has no audit log", []),
        (["audit", "list", "--data-dir", str(tmp_path), "--since", "last tuesday"], 2, "cannot parse time",
         []),
        (["audit", "verify", "--data-dir", str(tmp_path / "no-such-dir")], 2, "cannot check", []),
        (["audit", "verify", "--data-dir", str(tmp_path)], 2, "cannot load the audit public key", []),
        (["serve", "--bogus-option"], 2, "unrecognized arguments", []),
    ]
    for args, code, phrase, leftovers in table:
        proc = run_keyservice(*args)
        assert phrase in one_line(proc, code), (args, proc.stderr)
        for path in leftovers:
            assert not path.exists(), f"keyservice {args} left {path} behind"


def test_version_and_help_defaults() -> None:
    proc = run_keyservice("--version")
    assert proc.returncode == 0 and proc.stdout.startswith("keyservice ")
    from keyservice.cli.main import build_parser
    from tests.integration.test_kmsfs_operator import _options

    for command, options in _options(build_parser()).items():
        for option, text in options:
            if option in ("--clock-offset-file",):
                continue  # test only, documented as such
            assert "default" in text.lower() or "(required)" in text, \
                f"keyservice {command} {option}: help names no default"


def test_second_server_on_a_data_dir_is_refused(keyservice_dev: DevKeyService) -> None:
    data_dir = str(keyservice_dev.data_dir)
    second = run_keyservice("serve", "--dev", "--listen", f"127.0.0.1:{free_port()}", "--data-dir", data_dir)
    stderr = one_line(second, 1)
    assert "in use by another keyservice serve" in stderr and f"pid {keyservice_dev.process.pid}" in stderr
    # offline writers still work beside the server, and the chain stays one chain
    made = run_keyservice("principal", "create", f"beside-{os.getpid()}", "--data-dir", data_dir, "--json")
    assert made.returncode == 0, made.stderr
    keyservice_dev.boto3_client().list_keys()
    verify = run_keyservice("audit", "verify", "--data-dir", data_dir)
    assert verify.returncode == 0 and "OK" in verify.stdout, verify.stdout + verify.stderr


def test_audit_list_reports_unparsable_lines_and_times(keyservice_dev: DevKeyService, tmp_path: Path) -> None:
    keyservice_dev.boto3_client().list_keys()
    copy = tmp_path / "copy"
    (copy / "audit").mkdir(parents=True)
    lines = (keyservice_dev.data_dir / "audit" / "audit.log").read_text().splitlines(keepends=True)
    (copy / "audit" / "audit.log").write_text("".join(lines[:1]) + "garbage {\n" + "".join(lines[1:]))
    listed = run_keyservice("audit", "list", "--data-dir", str(copy), "--json")
    assert listed.returncode == 3, listed.stderr
    assert "1 line(s)" in listed.stderr and "(line 2)" in listed.stderr and "Traceback" not in listed.stderr
    assert len(listed.stdout.splitlines()) >= 1
    today = run_keyservice("audit", "list", "--data-dir", str(keyservice_dev.data_dir), "--since", "today",
                           "--operation", "ListKeys", "--json")
    assert today.returncode == 0 and today.stdout.strip(), today.stderr
    late = run_keyservice("audit", "list", "--data-dir", str(keyservice_dev.data_dir), "--since", "1m",
                          "--operation", "ListKeys", "--local")
    assert late.returncode == 0
    shown = late.stdout.splitlines()[-1].split()[0]
    offset = time.strftime("%z")
    assert shown.endswith(f"{offset[:3]}:{offset[3:]}") or shown.endswith("Z"), shown
    utc = run_keyservice("audit", "list", "--data-dir", str(keyservice_dev.data_dir), "--since", "30m",
                         "--operation", "ListKeys", "--utc")
    assert utc.stdout.splitlines()[-1].split()[0].endswith("Z")


def test_init_endpoint_follows_listen_and_serve_says_when_it_does_not(tmp_path: Path) -> None:
    port = free_port()
    data_dir, creds, root_key = tmp_path / "store", tmp_path / "admin.json", tmp_path / "root.key"
    made = run_keyservice("init", "--data-dir", str(data_dir), "--root-key-file", str(root_key),
                          "--listen", f"127.0.0.1:{port}", "--credentials-out", str(creds))
    assert made.returncode == 0, made.stderr
    assert json.loads(creds.read_text())["endpoint"] == f"https://127.0.0.1:{port}"
    # served elsewhere (another port, an address the certificate does not name): two warnings
    other = free_port()
    log = tmp_path / "serve.log"
    process = spawn_keyservice(log, "serve", "--data-dir", str(data_dir), "--root-key-file", str(root_key),
                               "--listen", f"127.0.0.2:{other}")
    try:
        wait_healthy(process, f"https://127.0.0.2:{other}", log, verify=False)
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=15)
    text = log.read_text()
    assert f"init recorded the endpoint https://127.0.0.1:{port}" in text
    assert f"https://127.0.0.2:{other}" in text
    assert f"(CA {data_dir / 'tls' / 'ca.pem'})" in text and "not 127.0.0.2" in text


def test_background_for_eval_then_stop(tmp_path: Path, busy_port: int) -> None:
    data_dir, creds, pid_file = tmp_path / "ks", tmp_path / "creds.json", tmp_path / "ks.pid"
    passphrase = tmp_path / "passphrase"
    passphrase.write_text("correct horse battery staple\n")
    made = run_keyservice("init", "--data-dir", str(data_dir), "--root-passphrase-file", str(passphrase),
                          "--credentials-out", str(creds))
    assert made.returncode == 0, made.stderr
    port = free_port()
    started = time.monotonic()
    proc = run_keyservice("serve", "--background", "--data-dir", str(data_dir), "--root-passphrase-file",
                          str(passphrase), "--listen", f"127.0.0.1:{port}", "--pid-file", str(pid_file))
    took = time.monotonic() - started
    env = dict(line.removeprefix("export ").split("=", 1) for line in proc.stdout.splitlines()
               if line.startswith("export "))
    pid = int(env.get("KEYSERVICE_PID", "0"))
    try:
        assert proc.returncode == 0, proc.stderr
        assert env["AWS_ENDPOINT_URL_KMS"] == f"https://127.0.0.1:{port}"
        ca = shlex.split(env["AWS_CA_BUNDLE"])[0]
        # it answers as soon as the command returned: no wait loop needed after eval
        assert requests.get(f"https://127.0.0.1:{port}/healthz", verify=ca, timeout=5).ok
        assert int(pid_file.read_text()) == pid and took < 30
        again = run_keyservice("serve", "--background", "--data-dir", str(data_dir), "--root-passphrase-file",
                               str(passphrase), "--listen", f"127.0.0.1:{free_port()}")
        assert "in use by another keyservice serve" in one_line(again, 1) and again.stdout == ""
    finally:
        if pid:
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 15
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(pid) and not pid_file.exists()
    failed = run_keyservice("serve", "--background", "--dev", "--data-dir", str(tmp_path / "dev"),
                            "--listen", f"127.0.0.1:{busy_port}")
    assert "port is in use" in one_line(failed, 1) and failed.stdout == ""
    assert not (tmp_path / "dev").exists()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            return stat.read().split()[2] != "Z"
    except OSError:
        return False


def test_principal_commands_print_one_line_on_a_missing_data_dir(tmp_path: Path) -> None:
    proc = run_keyservice("principal", "create", "x", "--data-dir", str(tmp_path / "nope"))
    one_line(proc, 1)
