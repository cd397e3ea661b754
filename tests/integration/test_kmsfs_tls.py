"""kmsfs verifies the key service's TLS certificate: with the right CA (from the credentials file
or --ca-bundle) it works; with none or a wrong one, init and mount fail with a clear message."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from keyservice.http import tls
from tests.conftest import DevKeyService
from tests.integration.kmsfs_mount_helpers import force_unmount, kmsfs, kmsfs_init, mounted, requires_fuse

pytestmark = [pytest.mark.integration, requires_fuse]


def _creds_without_ca(keyservice_dev: DevKeyService, tmp_path: Path) -> Path:
    creds = {k: v for k, v in keyservice_dev.credentials.items() if k != "ca_bundle"}
    path = tmp_path / "creds-no-ca.json"
    path.write_text(json.dumps(creds))
    return path


def test_wrong_or_missing_ca_is_refused_and_ca_bundle_works(
    keyservice_dev: DevKeyService, tmp_path: Path
) -> None:
    key_id = keyservice_dev.boto3_client().create_key()["KeyMetadata"]["KeyId"]
    creds = _creds_without_ca(keyservice_dev, tmp_path)
    cipher = tmp_path / "cipher"
    # No CA for the private certificate: the system CAs (or AWS_CA_BUNDLE) do not vouch for it.
    refused = kmsfs_init(cipher, keyservice_dev.endpoint, key_id, creds, check=False)
    assert refused.returncode == 1 and "certificate" in refused.stderr.lower(), refused.stderr
    other = tls.generate(tmp_path / "other", ["127.0.0.1"])
    wrong = kmsfs_init(cipher, keyservice_dev.endpoint, key_id, creds, "--ca-bundle", other.ca, check=False)
    assert wrong.returncode == 1 and "certificate" in wrong.stderr.lower(), wrong.stderr
    kmsfs_init(cipher, keyservice_dev.endpoint, key_id, creds, "--ca-bundle", keyservice_dev.ca_bundle)
    (tmp_path / "plain").mkdir()
    try:
        bad_mount = kmsfs("mount", cipher, tmp_path / "plain", "--credentials", creds, check=False)
    finally:
        force_unmount(tmp_path / "plain")  # in case it mounted after all
    assert bad_mount.returncode == 1 and "certificate" in bad_mount.stderr.lower(), bad_mount.stderr
    with mounted(cipher, tmp_path / "plain", keyservice_dev.credentials_file) as plain:
        (plain / "a.txt").write_text("over verified TLS")
        assert (plain / "a.txt").read_text() == "over verified TLS"
