"""The README's quick start works as written when pasted line by line into an interactive shell.

The block is taken from README.md itself and fed to ``bash -i`` on stdin, from the repository's
top directory, as a new user would paste it. Only its fixed paths (/tmp/ks, /srv/cipher ...) are
moved into the test's temporary directory and the service gets a free port, so that the test
never touches the machine's own paths or collides with a service on 8600. After the block the
shell must still be alive after a failing command, with none of ``set -euo pipefail`` left on by
``source scripts/setup.sh``.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import free_port
from tests.integration.kmsfs_mount_helpers import force_unmount, is_mounted, requires_fuse

pytestmark = [pytest.mark.integration, requires_fuse]

ROOT = Path(__file__).resolve().parents[2]
PATHS = ("/tmp/ks", "/tmp/creds.json", "/srv/cipher", "/mnt/plain")


def quickstart_block() -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Quick start by hand", 1)[1]
    match = re.search(r"```sh\n(.*?)```", section, re.S)
    assert match, "README has no ```sh block under 'Quick start by hand'"
    return match.group(1)


def _processes_using(marker: str) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            if marker.encode() in cmdline:
                pids.append(int(entry))
    return pids


@pytest.mark.skipif(not Path(sys.executable).with_name("aws").exists(), reason="needs the AWS CLI")
def test_readme_quickstart_in_interactive_bash(tmp_path: Path) -> None:
    block = quickstart_block()
    for path in PATHS:
        assert path in block, f"the quick start no longer uses {path}: update this test"
        block = block.replace(path, str(tmp_path / Path(path).name))
    assert "serve --dev" in block
    block = block.replace("serve --dev", f"serve --dev --listen 127.0.0.1:{free_port()}", 1)
    script = block + 'false\necho "ALIVE OPTS=$SHELLOPTS"\nset -o | grep -E "^(errexit|nounset|pipefail)"\n'
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env["HOME"] = str(tmp_path)  # no ~/.aws of the machine's user
    plain = tmp_path / "plain"
    try:
        proc = subprocess.run(["bash", "-i"], input=script, capture_output=True, text=True, cwd=ROOT,
                              env=env, timeout=300)
    finally:
        force_unmount(plain)
        for pid in _processes_using(str(tmp_path / "ks")):
            os.kill(pid, signal.SIGTERM)
    out, err = proc.stdout, proc.stderr
    assert "Traceback" not in out + err, err
    assert "command not found" not in err and "No such file" not in err, err
    assert "kmsfs:" not in err and "keyservice:" not in err, err
    assert "quarterly numbers" in out, (out, err)
    assert "/report.txt" in out, out
    assert "OK: the audit log is intact" in out, (out, err)
    assert "ALIVE OPTS=" in out, (out, err)  # `false` did not close the shell
    opts = out.split("ALIVE OPTS=", 1)[1].splitlines()[0].split(":")
    assert not {"errexit", "nounset", "pipefail"} & set(opts), opts
    assert re.search(r"errexit\s+off", out) and re.search(r"pipefail\s+off", out), out
    assert not is_mounted(plain)
    deadline = time.monotonic() + 10  # the block's last line stopped the service
    while _processes_using(str(tmp_path / "ks")) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _processes_using(str(tmp_path / "ks")), "the README's kill did not stop the service"
