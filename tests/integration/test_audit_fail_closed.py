"""Fail-closed auditing: when a record cannot be written (full disk), the request fails with
KMSInternalException and returns nothing, and a kmsfs open fails with EIO; once space is back,
everything works and the log still verifies."""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

from keyservice.audit.records import audit_path
from tests.conftest import DevKeyService, run_keyservice, stop_dev_service
from tests.integration import audit_disk
from tests.integration.kmsfs_mount_helpers import kmsfs_init, mounted, requires_fuse

pytestmark = [pytest.mark.integration, requires_fuse]


@pytest.fixture
def small_audit_disk(tmp_path: Path) -> Iterator[tuple[DevKeyService, Path]]:
    """A dev service whose audit directory is a 512 KiB tmpfs, unmounted afterwards."""
    with audit_disk.small_audit_disk(tmp_path) as served:
        yield served


def test_full_audit_disk_fails_requests_and_opens(small_audit_disk, tmp_path: Path) -> None:
    service, audit_dir = small_audit_disk
    kms = service.boto3_client(config=Config(retries={"max_attempts": 1}))
    key_id = kms.create_key()["KeyMetadata"]["KeyId"]
    cipher, plain = tmp_path / "cipher", tmp_path / "plain"
    cipher.mkdir()
    kmsfs_init(cipher, service.endpoint, key_id, service.credentials_file)
    with mounted(cipher, plain, service.credentials_file):
        (plain / "secret.txt").write_text("kept safe")
        filler = audit_disk.fill(audit_dir)
        # The log's last tmpfs page may still hold a few records; the first one that does not fit
        # must fail the request, and every later one too.
        for _ in range(50):
            try:
                kms.encrypt(KeyId=key_id, Plaintext=b"must not be returned")
            except ClientError as error:
                assert error.response["Error"]["Code"] == "KMSInternalException"
                assert "CiphertextBlob" not in error.response
                break
        else:
            pytest.fail("requests kept succeeding although the audit log could not grow")
        with pytest.raises(ClientError):
            kms.generate_data_key(KeyId=key_id, KeySpec="AES_256")
        with pytest.raises(OSError) as opened:
            (plain / "secret.txt").read_text()
        assert opened.value.errno == errno.EIO
        filler.unlink()
        assert (plain / "secret.txt").read_text() == "kept safe"
        assert kms.encrypt(KeyId=key_id, Plaintext=b"x")["CiphertextBlob"]
    stop_dev_service(service)
    report = run_keyservice("audit", "verify", "--data-dir", str(service.data_dir))
    assert report.returncode == 0, report.stdout
    records = service.audit_records()
    assert not any(r.get("error_code") == "KMSInternalException" for r in records)  # never written
    assert os.path.getsize(audit_path(service.data_dir)) > 0


def test_read_only_audit_log_fails_requests_and_opens(keyservice_dev: DevKeyService, tmp_path: Path) -> None:
    """An audit log that cannot be written to (immutable: writes get EPERM even on the server's
    open descriptor) fails every request and every kmsfs open until it is writable again."""
    log_file = audit_path(keyservice_dev.data_dir)
    if subprocess.run(["chattr", "+i", str(log_file)], capture_output=True).returncode != 0:
        pytest.skip("the file system of the test directory does not support chattr +i")
    subprocess.run(["chattr", "-i", str(log_file)], check=True)
    kms = keyservice_dev.boto3_client(config=Config(retries={"max_attempts": 1}))
    key_id = kms.create_key()["KeyMetadata"]["KeyId"]
    cipher, plain = tmp_path / "cipher", tmp_path / "plain"
    cipher.mkdir()
    kmsfs_init(cipher, keyservice_dev.endpoint, key_id, keyservice_dev.credentials_file)
    with mounted(cipher, plain, keyservice_dev.credentials_file):
        (plain / "doc.txt").write_text("still here")
        subprocess.run(["chattr", "+i", str(log_file)], check=True)
        try:
            with pytest.raises(ClientError) as excinfo:
                kms.encrypt(KeyId=key_id, Plaintext=b"must not be returned")
            assert excinfo.value.response["Error"]["Code"] == "KMSInternalException"
            with pytest.raises(OSError) as opened:
                (plain / "doc.txt").read_text()
            assert opened.value.errno == errno.EIO
        finally:
            subprocess.run(["chattr", "-i", str(log_file)], check=True)
        assert (plain / "doc.txt").read_text() == "still here"
    assert run_keyservice("audit", "verify", "--data-dir", str(keyservice_dev.data_dir)).returncode == 0
