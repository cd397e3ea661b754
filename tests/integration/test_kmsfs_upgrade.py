"""The frozen format-2 cipherdir still reads, and ``kmsfs upgrade`` converts it crash-safely
(kill -9 in the middle of rebuilding a file, then again, then a run to the end)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kmsfs import format as fmt
from kmsfs import headers
from kmsfs.core import TEMP_PREFIX
from kmsfs.encfile import EncryptedFile
from tests.integration.kmsfs_mount_helpers import kmsfs, mounted, requires_fuse

pytestmark = [pytest.mark.integration, requires_fuse]
V2_FIXTURE = Path(__file__).resolve().parents[1] / "data" / "kmsfs-v2"
BS = fmt.DEFAULT_BLOCK_SIZE
PAGE = 4096


def _copy_sparse(src: Path, dst: Path) -> None:
    """Copy a backing file leaving all-zero pages as holes (git stores the fixture densely)."""
    data = src.read_bytes()
    with open(dst, "wb") as f:
        for off in range(0, len(data), PAGE):
            page = data[off:off + PAGE]
            if page.count(0) != len(page):
                f.seek(off)
                f.write(page)
        f.truncate(len(data))


@pytest.fixture
def v2_cipherdir(tmp_path: Path) -> Iterator[tuple[Path, Any, dict[str, Any]]]:
    """The frozen v2 cipherdir (holes re-punched, headers restored) with its frozen key service."""
    from tests.conftest import start_dev_service, stop_dev_service

    manifest = json.loads((V2_FIXTURE / "manifest.json").read_text())
    base = tmp_path / "svc"
    base.mkdir()
    shutil.copytree(V2_FIXTURE / "keyservice-data", base / "keyservice-data")
    cipherdir = tmp_path / "cipher"
    (cipherdir / "dir").mkdir(parents=True)
    shutil.copy(V2_FIXTURE / "cipherdir" / ".kmsfs.json", cipherdir / ".kmsfs.json")
    for rel, entry in manifest["files"].items():
        _copy_sparse(V2_FIXTURE / "cipherdir" / rel, cipherdir / rel)
        os.setxattr(cipherdir / rel, fmt.HEADER_XATTR, bytes.fromhex(entry["header_hex"]))
    fd = os.open(cipherdir / "sparse.bin", os.O_RDONLY)
    try:
        assert os.lseek(fd, 0, os.SEEK_HOLE) < 12 * PAGE  # real holes, as the v2 code left them
    finally:
        os.close(fd)
    service = start_dev_service(base)
    try:
        config = json.loads((cipherdir / ".kmsfs.json").read_text())
        config["endpoint"] = service.endpoint
        (cipherdir / ".kmsfs.json").write_text(json.dumps(config))
        yield cipherdir, service, manifest
    finally:
        stop_dev_service(service)


def test_frozen_v2_cipherdir_reads_writes_and_upgrades(v2_cipherdir: tuple[Path, Any, dict[str, Any]],
                                                       tmp_path: Path) -> None:
    cipherdir, service, manifest = v2_cipherdir
    creds = service.credentials_file
    with mounted(cipherdir, tmp_path / "mnt", creds) as m:
        for rel, entry in manifest["files"].items():
            assert (m / rel).read_bytes() == bytes.fromhex(entry["plaintext_hex"]), rel
        with open(m / "dir/blocks.bin", "ab") as f:  # v2 files stay writable (as v2)
            f.write(b"appended to v2")
    assert fmt.parse_header(os.getxattr(cipherdir / "dir/blocks.bin", fmt.HEADER_XATTR)).version == 2
    out = kmsfs("fsck", cipherdir, "--credentials", creds, "-q").stdout
    assert "NOTE /sparse.bin: format version 2: no in-file header copy" in out and "clean" in out
    out = kmsfs("upgrade", cipherdir, "--credentials", creds, "-q").stdout
    assert "upgrade: 5 file(s) converted to format 3, 0 already current, 0 failed" in out
    out = kmsfs("fsck", cipherdir, "--credentials", creds, "-q").stdout
    assert "NOTE" not in out and "clean" in out
    for rel in manifest["files"]:
        assert fmt.parse_header(os.getxattr(cipherdir / rel, fmt.HEADER_XATTR)).version == 3
    copy = tmp_path / "copy"  # and now a copy without xattrs reads back too
    subprocess.run(["rsync", "-a", f"{cipherdir}/", f"{copy}/"], check=True)
    with mounted(copy, tmp_path / "mnt", creds) as m:
        for rel, entry in manifest["files"].items():
            want = bytes.fromhex(entry["plaintext_hex"])
            if rel == "dir/blocks.bin":
                want += b"appended to v2"
            assert (m / rel).read_bytes() == want, rel


def _offline_plaintext(path: Path, keys: dict[bytes, bytes]) -> bytes:
    """A file's plaintext in whatever format it is now, with the fixture's test-only data keys."""
    fd = os.open(path, os.O_RDONLY)
    try:
        header = headers.read_header(fd, restore=False)
        return EncryptedFile(fd, keys[header.file_id], header.file_id, header.block_size,
                             header.version).read(0, 1 << 30)
    finally:
        os.close(fd)


def test_upgrade_survives_kill_9(v2_cipherdir: tuple[Path, Any, dict[str, Any]], tmp_path: Path) -> None:
    cipherdir, service, manifest = v2_cipherdir
    creds = service.credentials_file
    keys = {fmt.parse_header(bytes.fromhex(e["header_hex"])).file_id: bytes.fromhex(e["data_key_hex"])
            for e in manifest["files"].values()}
    want = {rel: bytes.fromhex(e["plaintext_hex"]) for rel, e in manifest["files"].items()}
    hello = manifest["files"]["hello.txt"]
    header = fmt.parse_header(bytes.fromhex(hello["header_hex"]))
    for i in range(3):  # big v2 files (sharing hello.txt's key and file id: valid v2 files)
        rel = f"big{i}.bin"
        fd = os.open(cipherdir / rel, os.O_RDWR | os.O_CREAT, 0o640)
        try:
            data = os.urandom(1 << 20) * 24 + bytes(3 << 20) + b"tail"
            EncryptedFile(fd, bytes.fromhex(hello["data_key_hex"]), header.file_id, version=2).write(0, data)
            os.setxattr(fd, fmt.HEADER_XATTR, bytes.fromhex(hello["header_hex"]))
        finally:
            os.close(fd)
        want[rel] = data
    os.link(cipherdir / "big1.bin", cipherdir / "dir" / "big1-link.bin")
    want["dir/big1-link.bin"] = want["big1.bin"]
    kills = 0
    for _ in range(3):
        proc = subprocess.Popen([sys.executable, "-m", "kmsfs", "upgrade", str(cipherdir), "--credentials",
                                 str(creds), "-q"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline:  # kill mid-rebuild of a big file
            temps = [p for p in cipherdir.rglob(TEMP_PREFIX + "*") if p.stat().st_size > (4 << 20)]
            if temps:
                proc.send_signal(signal.SIGKILL)
                kills += 1
                break
            time.sleep(0.005)
        proc.wait()
        for rel, data in want.items():  # every name reads: the old file or the complete new one
            assert _offline_plaintext(cipherdir / rel, keys) == data, rel
    assert kills >= 2, "the kill never landed inside a rebuild"
    assert list(cipherdir.rglob(TEMP_PREFIX + "*")), "a killed rebuild leaves its temporary"
    out = kmsfs("fsck", cipherdir, "--credentials", creds, "-q").stdout
    assert "LEFTOVER" in out
    out = kmsfs("upgrade", cipherdir, "--credentials", creds, "-q").stdout
    assert " 0 failed" in out, out
    assert not list(cipherdir.rglob(TEMP_PREFIX + "*"))
    assert (cipherdir / "big1.bin").stat().st_ino == (cipherdir / "dir" / "big1-link.bin").stat().st_ino
    assert oct((cipherdir / "big2.bin").stat().st_mode & 0o777) == oct(0o640)
    with mounted(cipherdir, tmp_path / "mnt", creds) as m:
        for rel, data in want.items():
            got = (m / rel).read_bytes()
            assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest(), rel
    out = kmsfs("fsck", cipherdir, "--credentials", creds, "-q").stdout
    assert "NOTE" not in out and "clean" in out and "LEFTOVER" not in out
