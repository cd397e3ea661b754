"""The data-key pool (``--key-pool 32``; off by default) over a real mount and a real key
service: a pooled create is audited with its path (the claim), a disabled key fails a pooled
create's handle, and ``--key-pool 0`` still creates through the service directly."""

from __future__ import annotations

import errno
import json
import os
import time
from pathlib import Path
from typing import Any

import pytest

from keyservice.audit.review import is_create
from kmsfs import format as fmt
from tests.conftest import run_keyservice
from tests.integration.kmsfs_mount_helpers import (
    kmsfs_init,
    mounted,
    requires_fuse,
    wait_for_records,
    wait_pool_full,
)

pytestmark = [pytest.mark.integration, requires_fuse]


def _init(service: Any, tmp: Path) -> tuple[Path, str]:
    key = service.boto3_client().create_key(Description="key pool")["KeyMetadata"]
    cipherdir = tmp / "cipher"
    # Plaintext names: the tests read headers of backing files by name, and count the mount's
    # own requests (a name key adds its own Decrypt).
    kmsfs_init(cipherdir, service.endpoint, key["KeyId"], service.credentials_file, "--plaintext-names")
    return cipherdir, key["Arn"]


def _file_id(cipherdir: Path, name: str) -> str:
    return fmt.parse_header(os.getxattr(cipherdir / name, fmt.HEADER_XATTR)).file_id.hex()


def _audit(service: Any, *args: str) -> list[dict[str, Any]]:
    proc = run_keyservice("audit", *args, "--data-dir", str(service.data_dir), "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return [json.loads(line) for line in proc.stdout.splitlines()]


def test_pooled_create_is_audited_with_its_path(keyservice_dev: Any, tmp_path: Path) -> None:
    cipherdir, arn = _init(keyservice_dev, tmp_path)
    with mounted(cipherdir, tmp_path / "mnt", keyservice_dev.credentials_file, "--key-pool", "32") as m:
        daemon = wait_pool_full(keyservice_dev, cipherdir, m)
        (m / "pooled.txt").write_text("made with a pooled key")
        file_id = _file_id(cipherdir, "pooled.txt")
        records = wait_for_records(lambda: _audit(keyservice_dev, "list", "--file-id", file_id),
                                   lambda rs: any(is_create(r) for r in rs))
        generated, claim = records[0], records[1]
        # The key was generated ahead of time by the pool (no path yet) ...
        assert generated["operation"] == "GenerateDataKey" and generated["outcome"] == "success"
        assert generated["caller"]["pool"] is True and generated["caller"]["pid"] == daemon
        assert "path" not in generated["caller"]
        # ... and the create is audited by its claim, with the path, user and process of the writer.
        assert claim["operation"] == "Decrypt" and claim["outcome"] == "success"
        assert claim["caller"]["op"] == "create" and claim["caller"]["path"] == "/pooled.txt"
        assert claim["caller"]["uid"] == os.getuid() and claim["caller"]["pid"] == os.getpid()
        assert claim["caller"]["user"] and claim["caller"]["process"]
        assert claim["key_id"] == generated["key_id"] == arn
        assert claim["encryption_context"] == generated["encryption_context"] == {"kmsfs:file-id": file_id}
        assert (m / "pooled.txt").read_text() == "made with a pooled key"
        rows = wait_for_records(lambda: _audit(keyservice_dev, "files", "--file", "/pooled.txt"),
                                lambda rs: bool(rs) and rs[0]["opens"] == 1)
    assert [(r["path"], r["user"], r["created"], r["opens"], r["denied"]) for r in rows] == [
        ("/pooled.txt", claim["caller"]["user"], 1, 1, 0)]
    assert claim["caller"]["process"] in rows[0]["processes"]
    table = run_keyservice("audit", "files", "--data-dir", str(keyservice_dev.data_dir), "--file",
                           "/pooled.txt").stdout
    assert "/pooled.txt" in table and claim["caller"]["process"] in table


def test_disabled_key_fails_a_pooled_create_handle(keyservice_dev: Any, tmp_path: Path) -> None:
    cipherdir, arn = _init(keyservice_dev, tmp_path)
    kms = keyservice_dev.boto3_client()
    with mounted(cipherdir, tmp_path / "mnt", keyservice_dev.credentials_file, "--key-pool", "32") as m:
        wait_pool_full(keyservice_dev, cipherdir, m)
        kms.disable_key(KeyId=arn)
        try:
            # The pool still holds keys generated before the key was disabled: the create
            # succeeds, its claim is refused, and the handle fails (like a refused revalidation).
            fd = os.open(m / "late.txt", os.O_CREAT | os.O_RDWR, 0o644)
            try:
                start = time.monotonic()
                while True:
                    try:
                        os.pwrite(fd, b"x" * 100, 0)
                    except OSError as exc:
                        assert exc.errno == errno.EACCES
                        break
                    assert time.monotonic() - start < 30, "a pooled create outlived its refused claim"
                    time.sleep(0.01)
                # A first pwrite that got in before the refusal left its (clean, write-through)
                # page in the page cache, which would serve this read without the daemon.
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                with pytest.raises(OSError) as info:
                    os.pread(fd, 1, 0)
                assert info.value.errno == errno.EACCES
            finally:
                os.close(fd)
            # The refusal emptied the pool: the next create asks the service and is refused.
            with pytest.raises(OSError) as info:
                (m / "later.txt").write_text("no key")
            assert info.value.errno == errno.EACCES
        finally:
            kms.enable_key(KeyId=arn)
        refused = [r for r in _audit(keyservice_dev, "list", "--file", "/late.txt")
                   if is_create(r) and r["outcome"] == "error"]
        assert refused and refused[0]["error_code"] == "DisabledException"
        (m / "after.txt").write_text("key enabled again")
        assert (m / "after.txt").read_text() == "key enabled again"


def test_pool_0_creates_through_the_service(keyservice_dev: Any, tmp_path: Path) -> None:
    cipherdir, _ = _init(keyservice_dev, tmp_path)
    with mounted(cipherdir, tmp_path / "mnt", keyservice_dev.credentials_file, "--key-pool", "0") as m:
        for i in range(3):
            (m / f"direct{i}.txt").write_text(f"direct {i}")
        assert [(m / f"direct{i}.txt").read_text() for i in range(3)] == [f"direct {i}" for i in range(3)]
        file_id = _file_id(cipherdir, "direct0.txt")
        records = _audit(keyservice_dev, "list", "--file-id", file_id)
        creates = [r for r in records if is_create(r)]
        assert [r["operation"] for r in creates] == ["GenerateDataKey"]  # asked at the create
        assert creates[0]["caller"]["path"] == "/direct0.txt" and "pool" not in creates[0]["caller"]
        assert not [r for r in records if (r.get("caller") or {}).get("op") == "create"]  # no claim
        rows = _audit(keyservice_dev, "files", "--file", "/direct0.txt")
        assert [(r["created"], r["opens"]) for r in rows] == [(1, 1)]
