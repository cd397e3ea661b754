"""Directory keys (``kmsfs init --directory-keys``) over real key service processes and real mounts.

What is checked: opens and creates under a cached directory key make (almost) no requests, yet
every one of them reaches the audit as a ``KmsfsReported*`` record; a stopped service lets opens
go on until ``--report-deadline`` and then refuses them (EACCES) until it is back, with no report
lost; a disabled key stops new opens within ``--directory-key-ttl``; the backing-store attacker
(swapped or edited ``kmsfs.dirkey``, a file moved into another directory, a header from another
file) gets EIO, never wrong data; a file renamed to another directory keeps reading.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from kmsfs import format as fmt
from kmsfs.dirformat import parse_dirkey_file
from kmsfs.names import DIRKEY_FILE
from tests.conftest import start_dev_service, stop_dev_service, wait_healthy
from tests.integration.kmsfs_mount_helpers import (
    backing_path,
    kill_daemon_during,
    kmsfs,
    kmsfs_init,
    mounted,
    requires_fuse,
    wait_for_records,
)

pytestmark = [pytest.mark.integration, requires_fuse]

REPORTED = ("KmsfsReportedOpen", "KmsfsReportedCreate", "KmsfsReportedTruncate")


def _init(service: Any, tmp: Path, description: str = "dirkeys") -> tuple[Path, str]:
    key = service.boto3_client().create_key(Description=description)["KeyMetadata"]
    cipherdir = tmp / "cipher"
    proc = kmsfs_init(cipherdir, service.endpoint, key["KeyId"], service.credentials_file,
                      "--directory-keys")
    assert "directory keys" in proc.stdout and "note:" not in proc.stdout
    return cipherdir, key["Arn"]


def _mine(service: Any, arn: str) -> list[dict[str, Any]]:
    return [r for r in service.audit_records() if r.get("key_id") == arn]


def _requests(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The requests the mount made (the reported accesses are records, not requests)."""
    return [r for r in records if r["operation"] not in REPORTED]


def _reported(records: list[dict[str, Any]], pid: int | None = None) -> list[dict[str, Any]]:
    return [r for r in records if r["operation"] in REPORTED and r["outcome"] == "success"
            and (pid is None or r["caller"]["pid"] == pid)]


def test_cached_directory_key_opens_are_cheap_and_all_reported(keyservice_dev: Any, tmp_path: Path) -> None:
    cipherdir, arn = _init(keyservice_dev, tmp_path)
    with mounted(cipherdir, tmp_path / "mnt", keyservice_dev.credentials_file) as m:
        before = len(_requests(_mine(keyservice_dev, arn)))
        me = os.getpid()
        paths = []
        for d in ("a", "b"):
            (m / d).mkdir()
            for i in range(100):
                path = m / d / f"f{i}.txt"
                path.write_text(f"{d}{i}")  # one create each
                paths.append(path)
        for _ in range(4):  # 800 opens
            for i, path in enumerate(paths):
                assert path.read_text() == f"{'ab'[i // 100]}{i % 100}"
        records = wait_for_records(lambda: _mine(keyservice_dev, arn),
                                   lambda rs: len(_reported(rs, me)) >= 1000, timeout=30)
        requests = _requests(records)[before:]
        # 1,000 accesses: two GenerateDataKey (one per directory) and the report batches.
        assert len(requests) <= 20, [r["operation"] for r in requests]
        assert sum(r["operation"] == "GenerateDataKey" for r in requests) == 2
        assert all(r["operation"] == "KmsfsReportAccess" for r in requests
                   if r["operation"] != "GenerateDataKey")
        reported = _reported(records, me)
        assert len(reported) == 1000
        creates = [r for r in reported if r["operation"] == "KmsfsReportedCreate"]
        assert sorted(r["caller"]["path"] for r in creates) == sorted(
            f"/{d}/f{i}.txt" for d in "ab" for i in range(100))
        one = reported[-1]
        assert one["operation"] == "KmsfsReportedOpen" and one["key_id"] == arn
        assert one["caller"]["uid"] == os.getuid() and one["caller"]["user"] and one["caller"]["process"]
        assert one["caller"]["reported_by"] == "mount" and one["caller"]["authorized_by"] == "directory-key"
        assert one["caller"]["accessed_at"].endswith("Z")
        assert one["encryption_context"]["kmsfs:purpose"] == "directory"
        assert one["principal"] == records[0]["principal"]
        # The files are version 4 and each directory has its key file.
        backing = backing_path(cipherdir, "/a/f0.txt", keyservice_dev.credentials_file)
        header = fmt.parse_header(os.getxattr(backing, fmt.HEADER_XATTR))
        assert header.version == fmt.FORMAT_V4
        assert (backing.parent / DIRKEY_FILE).is_file()
        assert DIRKEY_FILE not in os.listdir(m / "a")


def test_rename_across_directories_and_rmdir_keep_files_readable(keyservice_dev: Any, tmp_path: Path) -> None:
    """A file keeps the key of the directory it was created in (its header carries that key's
    wrapped form): a rename to another directory, and removing the first directory, change
    nothing; a fresh mount reads it with one Decrypt per directory key."""
    cipherdir, arn = _init(keyservice_dev, tmp_path)
    creds = keyservice_dev.credentials_file
    with mounted(cipherdir, tmp_path / "mnt", creds) as m:
        (m / "src").mkdir()
        (m / "dst").mkdir()
        (m / "src" / "moved.txt").write_bytes(b"x" * 10000)
        (m / "dst" / "native.txt").write_text("native")
        os.rename(m / "src" / "moved.txt", m / "dst" / "moved.txt")
        os.rmdir(m / "src")
        assert (m / "dst" / "moved.txt").read_bytes() == b"x" * 10000
        with open(m / "dst" / "moved.txt", "r+b") as f:  # writable too, same key
            f.write(b"y")
    with mounted(cipherdir, tmp_path / "mnt", creds) as m:
        start = len(_requests(_mine(keyservice_dev, arn)))
        assert (m / "dst" / "moved.txt").read_bytes() == b"y" + b"x" * 9999
        assert (m / "dst" / "native.txt").read_text() == "native"
        (m / "dst" / "native.txt").write_text("rewritten")  # O_TRUNC: a fresh file id, same dir key
        assert (m / "dst" / "native.txt").read_text() == "rewritten"
        new = _requests(_mine(keyservice_dev, arn))[start:]
        unwraps = [r["operation"] for r in new if r["operation"] != "KmsfsReportAccess"]
        assert unwraps == ["Decrypt", "Decrypt"]  # src's key (moved.txt) and dst's


def test_kill_9_during_creates_and_cross_directory_renames(keyservice_dev: Any, tmp_path: Path) -> None:
    """A rename to another directory is only the backing rename (the header names its first
    directory's key and is not rewritten), and a directory's first create writes kmsfs.dirkey
    as a temporary linked into place: a kill -9 at any point leaves every file readable, every
    directory usable, and fsck clean."""
    cipherdir, _ = _init(keyservice_dev, tmp_path)
    creds = keyservice_dev.credentials_file
    mnt = tmp_path / "mnt"
    workload = r'''
import os, sys
m = sys.argv[1]
for d in range(4):
    os.makedirs(os.path.join(m, f"d{d}"), exist_ok=True)
print("ready", flush=True)
i = int(sys.argv[2]) * 100000
while True:
    i += 1
    src = os.path.join(m, f"d{i % 4}", f"f{i}")
    with open(src, "w") as f:
        f.write(f"f{i}" * 50)
    os.rename(src, os.path.join(m, f"d{(i + 1) % 4}", f"f{i}"))
    if i % 5 == 0:
        os.makedirs(os.path.join(m, f"d{i % 4}", f"sub{i}"))
        with open(os.path.join(m, f"d{i % 4}", f"sub{i}", "x"), "w") as f:
            f.write("x")
'''
    kill_daemon_during(cipherdir, mnt, creds, workload, rounds=2, ready="ready", first_sleep=0.5, step=0.4)
    with mounted(cipherdir, mnt, creds) as m:
        seen = 0
        for path in m.rglob("*"):
            if path.is_file():
                expected = "x" if path.name == "x" else path.name * 50
                # empty: the kill came between its create and its write (any file system's outcome)
                assert path.read_text() in ("", expected)
                seen += 1
        assert seen > 4
        for d in range(4):  # every directory still takes new files
            (m / f"d{d}" / "after").write_text("after")
    proc = kmsfs("fsck", cipherdir, "--credentials", creds, check=False)
    assert proc.returncode == 0, proc.stdout
    assert "DAMAGED" not in proc.stdout


def _restart(service: Any) -> None:
    with service.log_file.open("ab") as log:  # same command line, same port, same data
        service.process = subprocess.Popen(service.process.args, stdout=log, stderr=subprocess.STDOUT)
    ca = service.data_dir / "tls" / "ca.pem"
    wait_healthy(service.process, service.endpoint, service.log_file,
                 **({"verify": str(ca)} if ca.exists() else {}))


def test_service_stopped_opens_continue_until_the_deadline_then_fail_closed(tmp_path: Path) -> None:
    (tmp_path / "svc").mkdir()
    service = start_dev_service(tmp_path / "svc")
    try:
        cipherdir, arn = _init(service, tmp_path)
        with mounted(cipherdir, tmp_path / "mnt", service.credentials_file, "--report-deadline", "3",
                     "--kms-timeout", "1") as m:
            for i in range(20):
                (m / f"f{i}").write_text(str(i))
            me = os.getpid()
            # the creates' reports delivered first: the deadline then counts from the stop
            wait_for_records(lambda: _mine(service, arn), lambda rs: len(_reported(rs, me)) >= 20)
            stop_dev_service(service)
            start = time.monotonic()
            opened = 0
            refused = None
            while time.monotonic() - start < 15:
                try:
                    assert (m / f"f{opened % 20}").read_text() == str(opened % 20)
                    opened += 1
                except PermissionError as exc:
                    refused = exc
                    break
                time.sleep(0.02)
            took = time.monotonic() - start
            assert refused is not None and refused.errno == errno.EACCES
            assert opened > 20 and 2.5 <= took < 8, (opened, took)
            with pytest.raises(PermissionError):
                (m / "new").write_text("no create either")
            _restart(service)
            deadline = time.monotonic() + 15
            while True:  # the queued reports go out, then opens work again
                try:
                    assert (m / "f0").read_text() == "0"
                    break
                except PermissionError:
                    assert time.monotonic() < deadline
                    time.sleep(0.2)
            records = wait_for_records(lambda: _mine(service, arn),
                                       lambda rs: len(_reported(rs, me)) >= 20 + opened + 1, timeout=20)
            opens = [r for r in _reported(records, me) if r["operation"] == "KmsfsReportedOpen"]
            assert len(opens) == opened + 1  # none lost, none doubled
    finally:
        stop_dev_service(service)


def test_disabled_key_stops_opens_within_the_ttl(keyservice_dev: Any, tmp_path: Path) -> None:
    cipherdir, arn = _init(keyservice_dev, tmp_path)
    kms = keyservice_dev.boto3_client()
    with mounted(cipherdir, tmp_path / "mnt", keyservice_dev.credentials_file,
                 "--directory-key-ttl", "2", "--revalidate-after", "1") as m:
        (m / "d").mkdir()
        (m / "d" / "f").write_text("data")
        assert (m / "d" / "f").read_text() == "data"
        kms.disable_key(KeyId=arn)
        try:
            start = time.monotonic()
            while True:
                try:
                    (m / "d" / "f").read_text()
                except PermissionError:
                    break
                assert time.monotonic() - start < 4, "a disabled key still opened files after the TTL"
                time.sleep(0.05)
            with pytest.raises(PermissionError):
                (m / "d" / "g").write_text("no new files")
        finally:
            kms.enable_key(KeyId=arn)
        deadline = time.monotonic() + 15
        while True:  # enabled again: opens work again (reports delivered, key unwrapped)
            try:
                assert (m / "d" / "f").read_text() == "data"
                break
            except PermissionError:
                assert time.monotonic() < deadline
                time.sleep(0.2)


def _expect_eio(path: Path) -> None:
    with pytest.raises(OSError) as info:
        path.read_bytes()
    assert info.value.errno == errno.EIO


def test_backing_store_attacker_gets_eio(keyservice_dev: Any, tmp_path: Path) -> None:
    cipherdir, _ = _init(keyservice_dev, tmp_path)
    creds = keyservice_dev.credentials_file
    with mounted(cipherdir, tmp_path / "mnt", creds) as m:
        for d in ("x", "y"):
            (m / d).mkdir()
            (m / d / "one").write_text(f"{d} one")
            (m / d / "two").write_text(f"{d} two")
    bx = backing_path(cipherdir, "/x/one", creds)
    by = backing_path(cipherdir, "/y/one", creds)
    bx2 = backing_path(cipherdir, "/x/two", creds)
    xkey, ykey = bx.parent / DIRKEY_FILE, by.parent / DIRKEY_FILE
    saved = xkey.read_bytes()
    # 1. directory key files swapped between directories: a create there (new mount, cold cache)
    os.chmod(xkey, 0o644)
    xkey.write_bytes(ykey.read_bytes())
    with mounted(cipherdir, tmp_path / "mnt", creds) as m:
        with pytest.raises(OSError) as info:
            (m / "x" / "new").write_text("must not be wrapped under y's key")
        assert info.value.errno == errno.EIO
        assert (m / "x" / "one").read_text() == "x one"  # files carry their own directory key
    # 2. the key file edited (its directory id): the service refuses to unwrap under that context
    edited = bytearray(saved)
    edited[9] ^= 1
    xkey.write_bytes(bytes(edited))
    with mounted(cipherdir, tmp_path / "mnt", creds) as m:
        with pytest.raises(OSError) as info:
            (m / "x" / "new").write_text("nope")
        assert info.value.errno == errno.EIO
    xkey.write_bytes(saved)
    # 3. one file's header (xattr and in-file copy) put on another: EIO, never the other's data
    head = os.getxattr(by, fmt.HEADER_XATTR)
    fx = os.open(bx2, os.O_RDWR)
    fy = os.open(by, os.O_RDONLY)
    try:
        prefix_y = os.pread(fy, 1024, 0)
        os.pwrite(fx, prefix_y[:16 + len(head)], 0)
        os.setxattr(fx, fmt.HEADER_XATTR, head)
    finally:
        os.close(fx)
        os.close(fy)
    # 4. a directory-wrapped key bit-flipped (xattr only, so the pair also differs)
    raw = bytearray(os.getxattr(bx, fmt.HEADER_XATTR))
    raw[-1] ^= 1
    os.setxattr(bx, fmt.HEADER_XATTR, bytes(raw))
    # 5. a file moved into another directory in the backing store: its name does not
    # authenticate there (names are bound to the directory id), so it is neither listed nor opened
    os.rename(by, bx.parent / by.name)
    with mounted(cipherdir, tmp_path / "mnt", creds) as m:
        _expect_eio(m / "x" / "two")
        _expect_eio(m / "x" / "one")
        assert sorted(os.listdir(m / "x")) == ["one", "two"]
        assert os.listdir(m / "y") == ["two"]
        assert (m / "y" / "two").read_text() == "y two"
        # (an entry exchanged with another under a name valid where it lands, within or across
        # directories, is the limit strict mode has too: docs/SECURITY.md)


def test_frozen_v4_cipherdir_reads(tmp_path: Path) -> None:
    """The version-4 fixture (tests/data/kmsfs-v4, made by this code through a real mount) reads
    with the dev key service data directory that issued its keys."""
    data = Path(__file__).resolve().parent.parent / "data" / "kmsfs-v4"
    manifest = json.loads((data / "manifest.json").read_text())
    base = tmp_path / "svc"
    shutil.copytree(data / "keyservice-data", base / "keyservice-data")
    cipherdir = tmp_path / "cipher"
    shutil.copytree(data / "cipherdir", cipherdir)  # git keeps no xattrs: in-file copies only
    service = start_dev_service(base)
    try:
        config = json.loads((cipherdir / ".kmsfs.json").read_text())
        assert config["version"] == 3 and config["directory_keys"] is True
        config["endpoint"] = service.endpoint  # (the fixture's service listened elsewhere)
        (cipherdir / ".kmsfs.json").write_text(json.dumps(config))
        with mounted(cipherdir, tmp_path / "mnt", service.credentials_file) as m:
            for name, text in manifest["files"].items():
                assert (m / name).read_text() == text
            (m / "dir" / "later.txt").write_text("written after freezing")
            assert (m / "dir" / "later.txt").read_text() == "written after freezing"
        creds = service.credentials_file
        proc = kmsfs("fsck", cipherdir, "--credentials", creds)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        hello = backing_path(cipherdir, "/hello.txt", creds)
        info = json.loads(kmsfs("info", str(hello), "--credentials", creds).stdout)
        assert info["format_version"] == 4 and info["encryption_context"]["kmsfs:purpose"] == "directory"
        # rewrap: every file's directory-key blob and every kmsfs.dirkey, under a new key
        other = service.boto3_client().create_key(Description="rewrap target")["KeyMetadata"]["Arn"]
        kmsfs("rewrap", cipherdir, "--to-key", other, "--quiet", "--credentials", creds)
        assert fmt.parse_header(os.getxattr(hello, fmt.HEADER_XATTR)).key_arn == other
        dirkey = parse_dirkey_file((cipherdir / DIRKEY_FILE).read_bytes())
        assert dirkey.key_arn == other
        with mounted(cipherdir, tmp_path / "mnt", creds) as m:
            for name, text in manifest["files"].items():
                assert (m / name).read_text() == text
            (m / "new.txt").write_text("under the new key")
        assert fmt.parse_header(os.getxattr(backing_path(cipherdir, "/new.txt", creds),
                                            fmt.HEADER_XATTR)).key_arn == other
    finally:
        stop_dev_service(service)
