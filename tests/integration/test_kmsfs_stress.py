"""Concurrency stress through a real mount (issue 11): git's object-copy pattern from several
processes at once (exclusive creates in directories made concurrently, utime and chmod right
after), a real ``git clone --no-hardlinks``, and the debug log of errno replies (rate-limited)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.kmsfs_mount_helpers import kmsfs, mounted, requires_fuse

pytestmark = [pytest.mark.integration, requires_fuse]


class M:
    def __init__(self, cipherdir: Path, path: Path) -> None:
        self.cipherdir, self.path = cipherdir, path

    def log(self) -> str:
        return (self.cipherdir / ".kmsfs.log").read_text(errors="replace")


@pytest.fixture(scope="module")
def m(keyservice_dev: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[M]:
    tmp = tmp_path_factory.mktemp("stress")
    key = keyservice_dev.boto3_client().create_key(Description="stress")["KeyMetadata"]
    kmsfs("init", tmp / "cipher", "--endpoint", keyservice_dev.endpoint, "--key", key["KeyId"],
          "--credentials", keyservice_dev.credentials_file)
    with mounted(tmp / "cipher", tmp / "mnt", keyservice_dev.credentials_file, "--key-pool", "32") as path:
        yield M(tmp / "cipher", path)


# git's copy of an object (copy.c / object-file.c): make the fan-out directory (another process
# may make it at the same moment), create the file with O_EXCL, write, close, set its times and
# mode, then rename a temporary into place. Every step's error is printed with its path.
_WORKER = r'''
import errno, os, sys
root, me, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
for i in range(count):
    fan = os.path.join(root, "objects", f"{(i * 7 + me) % 64:02x}")
    try:
        os.mkdir(fan, 0o755)
    except FileExistsError:
        pass
    tmp = os.path.join(fan, f"tmp_obj_{me}_{i}")
    final = os.path.join(fan, f"obj_{me}_{i}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o444)
        os.write(fd, os.urandom(100 + i % 3000))
        os.close(fd)
        os.utime(tmp, ns=(10**18, 10**18))
        os.chmod(tmp, 0o444)
        os.link(tmp, final)
        os.unlink(tmp)
        os.stat(final)
    except OSError as exc:
        print(f"{exc.strerror}: {exc.filename}", flush=True)
        sys.exit(1)
'''


def test_parallel_exclusive_creates_in_fresh_directories(m: M) -> None:
    root = m.path / "gitlike"
    root.mkdir()
    (root / "objects").mkdir()
    workers = [subprocess.Popen([sys.executable, "-c", _WORKER, str(root), str(n), "250"],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
               for n in range(4)]
    outputs = [(w.communicate(timeout=300)[0], w.returncode) for w in workers]
    assert all(code == 0 for _, code in outputs), outputs
    names = [p.name for p in (root / "objects").rglob("obj_*")]
    assert len(names) == 1000 and not list((root / "objects").rglob("tmp_obj_*"))


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_git_clone_no_hardlinks(m: M, tmp_path: Path) -> None:
    src = tmp_path / "repo"
    src.mkdir()
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@e", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@e"}
    subprocess.run(["git", "init", "-q", str(src)], check=True, env=env)
    for i in range(600):
        sub = src / f"d{i % 20}"
        sub.mkdir(exist_ok=True)
        (sub / f"f{i}.txt").write_text(f"file {i}\n" * (i % 50 + 1))
    subprocess.run(["git", "-C", str(src), "add", "-A"], check=True, env=env)
    subprocess.run(["git", "-C", str(src), "commit", "-qm", "files"], check=True, env=env)
    for n in range(2):
        dst = m.path / f"clone{n}"
        proc = subprocess.run(["git", "clone", "-q", "--no-hardlinks", str(src), str(dst)],
                              capture_output=True, text=True, env=env, timeout=300)
        assert proc.returncode == 0, proc.stderr
        check = subprocess.run(["git", "-C", str(dst), "fsck", "--full"], capture_output=True, text=True,
                               timeout=300)
        assert check.returncode == 0, check.stderr
        assert (dst / "d3" / "f3.txt").read_text() == "file 3\n" * 4


def test_errno_replies_are_logged_at_debug_rate_limited(keyservice_dev: Any, tmp_path: Path) -> None:
    key = keyservice_dev.boto3_client().create_key(Description="errno log")["KeyMetadata"]
    cipherdir = tmp_path / "cipher"
    kmsfs("init", cipherdir, "--endpoint", keyservice_dev.endpoint, "--key", key["KeyId"],
          "--credentials", keyservice_dev.credentials_file)
    log = tmp_path / "daemon.log"
    with mounted(cipherdir, tmp_path / "mnt", keyservice_dev.credentials_file, "--verbose",
                 "--log", str(log)) as mnt:
        (mnt / "d").mkdir()
        (mnt / "d" / "f").write_bytes(b"x")
        with pytest.raises(OSError):
            os.rmdir(mnt / "d")  # answered by the daemon: ENOTEMPTY
        for i in range(2000):  # far more misses than the log takes in a second
            assert not (mnt / f"missing-{i}").exists()
        time.sleep(1.1)  # the next line, in a new second, reports how many were left out
        assert not (mnt / "missing-last").exists()
    text = log.read_text(errors="replace")
    assert "DEBUG kmsfs: lookup /missing-0: ENOENT" in text
    assert "rmdir /d: ENOTEMPTY" in text
    logged = text.count(": ENOENT")
    assert 40 <= logged < 1000, logged  # at most 50 lines a second
    assert re.search(r"lookup /missing-last: ENOENT \(\d+ earlier errno lines suppressed\)", text)
