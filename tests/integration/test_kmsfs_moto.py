"""kmsfs against moto's KMS server: an independent implementation of the wire protocol.

This keeps our client honest to AWS KMS as boto3 sees it rather than to our own server.
"""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from kmsfs import format as fmt
from tests.integration.kmsfs_mount_helpers import (
    backing_files,
    data_offset,
    force_unmount,
    kmsfs,
    mounted,
    requires_fuse,
)

pytestmark = [pytest.mark.integration, requires_fuse]
boto3 = pytest.importorskip("boto3")
pytest.importorskip("moto")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    base = tmp_path_factory.mktemp("moto")
    port = _free_port()
    exe = Path(sys.executable).with_name("moto_server")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "moto.server"]
    log = (base / "moto.log").open("wb")
    proc = subprocess.Popen([*cmd, "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                requests.get(endpoint + "/moto-api/", timeout=1)
                break
            except requests.ConnectionError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError((base / "moto.log").read_text()) from None
                time.sleep(0.1)
        creds = {"endpoint": endpoint, "region": "us-east-1", "access_key_id": "testing",
                 "secret_access_key": "testing"}
        path = base / "credentials.json"
        path.write_text(json.dumps(creds))
        yield {**creds, "credentials_file": str(path)}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture
def moto_key(moto: dict[str, str]) -> str:
    client = boto3.client("kms", endpoint_url=moto["endpoint"], region_name=moto["region"],
                          aws_access_key_id="testing", aws_secret_access_key="testing")
    key = client.create_key(Description="kmsfs test")["KeyMetadata"]
    client.create_alias(AliasName="alias/kmsfs-moto-" + key["KeyId"][:8], TargetKeyId=key["KeyId"])
    return key["Arn"]


def test_init_mount_write_read_against_moto(moto: dict[str, str], moto_key: str, tmp_path: Path) -> None:
    cipherdir, mnt = tmp_path / "cipher", tmp_path / "mnt"
    creds = Path(moto["credentials_file"])
    kmsfs("init", cipherdir, "--endpoint", moto["endpoint"], "--key", moto_key, "--credentials", creds)
    config = json.loads((cipherdir / ".kmsfs.json").read_text())
    assert config["key_arn"] == moto_key

    rng = random.Random(7)
    payload = rng.randbytes(3 * 4096 + 123)
    with mounted(cipherdir, mnt, creds):
        assert os.listdir(mnt) == []  # the config (and log) are hidden
        (mnt / "hello.txt").write_text("hello through moto\n")
        (mnt / "dir").mkdir()
        (mnt / "dir" / "data.bin").write_bytes(payload)
        with open(mnt / "dir" / "data.bin", "r+b") as f:  # write in the middle of a block
            f.seek(5000)
            f.write(b"MIDDLE")
        expected = payload[:5000] + b"MIDDLE" + payload[5006:]
        assert (mnt / "hello.txt").read_text() == "hello through moto\n"
        assert (mnt / "dir" / "data.bin").read_bytes() == expected
        assert os.stat(mnt / "dir" / "data.bin").st_size == len(expected)

    # Names are encrypted (a name key from moto): the backing file is found through it.
    found = kmsfs("path", "encrypt", cipherdir, "/dir/data.bin", "--credentials", creds)
    backing = Path(found.stdout.strip())
    assert backing.parent.parent == cipherdir and "data.bin" not in str(backing)
    assert backing.stat().st_size == data_offset(backing) + fmt.backing_size(len(expected))
    header = fmt.parse_header(os.getxattr(backing, fmt.HEADER_XATTR))
    assert header.key_arn == moto_key
    for path in backing_files(cipherdir):
        assert b"hello through moto" not in path.read_bytes()

    # A second mount unwraps the stored data keys through moto again.
    with mounted(cipherdir, mnt, creds):
        assert (mnt / "dir" / "data.bin").read_bytes() == expected
        assert sorted(os.listdir(mnt)) == ["dir", "hello.txt"]


def test_directory_keys_against_moto_say_audit_is_per_unwrap(moto: dict[str, str], moto_key: str,
                                                             tmp_path: Path) -> None:
    """moto (like AWS KMS) lacks the KmsfsReportAccess extension: init says so, and the mount
    runs directory keys without open reports (nothing fails closed for want of them)."""
    cipherdir, mnt = tmp_path / "cipher", tmp_path / "mnt"
    creds = Path(moto["credentials_file"])
    proc = kmsfs("init", cipherdir, "--endpoint", moto["endpoint"], "--key", moto_key, "--credentials", creds,
                 "--directory-keys")
    assert "audit will then show one Decrypt per directory-key unwrap only" in proc.stdout.replace("\n", " ")
    config = json.loads((cipherdir / ".kmsfs.json").read_text())
    assert config["directory_keys"] is True and config["open_reports"] is False
    with mounted(cipherdir, mnt, creds, "--report-deadline", "1"):
        for i in range(20):
            (mnt / f"f{i}").write_text(str(i))
        time.sleep(1.5)  # past the deadline: no reports are pending, so nothing is refused
        assert [(mnt / f"f{i}").read_text() for i in range(20)] == [str(i) for i in range(20)]
    with mounted(cipherdir, mnt, creds):
        assert (mnt / "f7").read_text() == "7"


def test_init_with_alias_and_bad_key(moto: dict[str, str], moto_key: str, tmp_path: Path) -> None:
    creds = moto["credentials_file"]
    alias = "alias/kmsfs-moto-" + moto_key.rsplit("/", 1)[1][:8]
    kmsfs("init", tmp_path / "a", "--endpoint", moto["endpoint"], "--key", alias, "--credentials", creds)
    assert json.loads((tmp_path / "a" / ".kmsfs.json").read_text())["key_arn"] == moto_key
    proc = kmsfs("init", tmp_path / "b", "--endpoint", moto["endpoint"], "--key", "alias/nope",
                 "--credentials", creds, check=False)
    assert proc.returncode != 0 and "NotFoundException" in proc.stderr


def _aws_files(base: Path, moto: dict[str, str], profile: str, credentials: str) -> dict[str, str]:
    """An AWS config and shared-credentials file (never the user's ~/.aws) and the environment
    naming them, with every static-credential variable cleared so only the profile can answer."""
    config, shared = base / "aws-config", base / "aws-credentials"
    config.write_text(f"[profile {profile}]\nregion = {moto['region']}\nendpoint_url = {moto['endpoint']}\n")
    shared.write_text(f"[{profile}]\n{credentials}\n")
    return {"AWS_CONFIG_FILE": str(config), "AWS_SHARED_CREDENTIALS_FILE": str(shared)}


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                 "AWS_DEFAULT_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_KMS", "AWS_REGION",
                 "AWS_DEFAULT_REGION", "AWS_CA_BUNDLE"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_profile_credentials_init_mount_fsck(moto: dict[str, str], moto_key: str, tmp_path: Path,
                                             aws_env: pytest.MonkeyPatch) -> None:
    """Issue 14 item 7: a profile from AWS config files (endpoint_url and region in the profile),
    selected with --aws-profile, then through AWS_PROFILE (the default chain)."""
    profile = "kmsfs-moto"
    for name, value in _aws_files(tmp_path, moto, profile,
                                  "aws_access_key_id = testing\naws_secret_access_key = testing").items():
        aws_env.setenv(name, value)
    cipherdir, mnt = tmp_path / "cipher", tmp_path / "mnt"
    kmsfs("init", cipherdir, "--aws-profile", profile, "--key", moto_key)
    assert json.loads((cipherdir / ".kmsfs.json").read_text())["endpoint"] == moto["endpoint"]
    mnt.mkdir()
    try:
        kmsfs("mount", cipherdir, mnt, "--aws-profile", profile, "--strict")
        (mnt / "profile.txt").write_text("signed with a profile's keys")
        assert (mnt / "profile.txt").read_text() == "signed with a profile's keys"
        kmsfs("umount", mnt)
    finally:
        force_unmount(mnt)
    aws_env.setenv("AWS_PROFILE", profile)
    report = kmsfs("fsck", cipherdir, "--quiet")
    assert "1 files" in report.stdout and "clean" in report.stdout
    missing = kmsfs("fsck", cipherdir, "--aws-profile", "no-such-profile", check=False)
    assert missing.returncode == 1 and "not found" in missing.stderr and "Traceback" not in missing.stderr


PROCESS = """\
import datetime, json, sys
with open(sys.argv[1], "a") as calls:
    calls.write("call\\n")
n = sum(1 for _ in open(sys.argv[1]))
expires = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=int(sys.argv[2]))
print(json.dumps({"Version": 1, "AccessKeyId": f"ASIAKMSFS{n}", "SecretAccessKey": f"secret{n}",
                  "SessionToken": f"token{n}", "Expiration": expires.isoformat()}))
"""


@pytest.mark.parametrize(("lifetime", "refreshes"), [(300, True), (3600, False)])
def test_credential_process_is_refreshed_before_expiry(moto: dict[str, str], moto_key: str, tmp_path: Path,
                                                       aws_env: pytest.MonkeyPatch, lifetime: int,
                                                       refreshes: bool) -> None:
    """botocore refreshes temporary credentials inside its window before expiry (10-15 min):
    credentials that expire in 5 minutes are fetched again for the next request (with the new
    session token sent); credentials good for an hour are fetched once."""
    from kmsfs.awscreds import resolve
    from kmsfs.keyclient import KeyClient

    script, calls = tmp_path / "creds.py", tmp_path / "calls"
    script.write_text(PROCESS)
    command = f"credential_process = {sys.executable} {script} {calls} {lifetime}"
    for name, value in _aws_files(tmp_path, moto, "proc", command).items():
        aws_env.setenv(name, value)
    creds = resolve("proc")
    assert creds.endpoint == moto["endpoint"] and creds.region == moto["region"]
    client = KeyClient(creds.endpoint, creds.region, creds)
    before = len(calls.read_text().splitlines())
    try:
        for _ in range(3):
            assert client.describe_key(moto_key)["Arn"] == moto_key
    finally:
        client.close()
    fetched = len(calls.read_text().splitlines()) - before
    assert fetched == (3 if refreshes else 0), fetched
