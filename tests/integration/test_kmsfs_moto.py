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
from tests.integration.kmsfs_mount_helpers import backing_files, data_offset, kmsfs, mounted, requires_fuse

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

    backing = cipherdir / "dir" / "data.bin"
    assert backing.stat().st_size == data_offset(backing) + fmt.backing_size(len(expected))
    header = fmt.parse_header(os.getxattr(backing, fmt.HEADER_XATTR))
    assert header.key_arn == moto_key
    for path in backing_files(cipherdir):
        assert b"hello through moto" not in path.read_bytes()

    # A second mount unwraps the stored data keys through moto again.
    with mounted(cipherdir, mnt, creds):
        assert (mnt / "dir" / "data.bin").read_bytes() == expected
        assert sorted(os.listdir(mnt)) == ["dir", "hello.txt"]


def test_init_with_alias_and_bad_key(moto: dict[str, str], moto_key: str, tmp_path: Path) -> None:
    creds = moto["credentials_file"]
    alias = "alias/kmsfs-moto-" + moto_key.rsplit("/", 1)[1][:8]
    kmsfs("init", tmp_path / "a", "--endpoint", moto["endpoint"], "--key", alias, "--credentials", creds)
    assert json.loads((tmp_path / "a" / ".kmsfs.json").read_text())["key_arn"] == moto_key
    proc = kmsfs("init", tmp_path / "b", "--endpoint", moto["endpoint"], "--key", "alias/nope",
                 "--credentials", creds, check=False)
    assert proc.returncode != 0 and "NotFoundException" in proc.stderr
