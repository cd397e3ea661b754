"""Root key sources and sealing: wrong passphrase/key file is a clear error, DIR alone recovers nothing."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from keyservice.store import rootkey
from keyservice.store.rootkey import RootKeyError, RootKeySource, UnsealError

FAST_N = 2**10  # cheap scrypt for tests; production default is 2**15


def test_seal_roundtrip_and_format() -> None:
    key = os.urandom(32)
    sealed = rootkey.seal(key, b"secret", b"aad")
    assert sealed[0] == 1
    assert len(sealed) == 1 + 12 + len(b"secret") + 16
    assert b"secret" not in sealed
    assert rootkey.unseal(key, sealed, b"aad") == b"secret"
    assert rootkey.seal(key, b"secret", b"aad") != sealed  # fresh nonce


@pytest.mark.parametrize("mutate", ["key", "aad", "flip", "version", "short"])
def test_unseal_failures_are_undetailed(mutate: str) -> None:
    key = os.urandom(32)
    sealed = rootkey.seal(key, b"secret", b"aad")
    aad = b"aad"
    if mutate == "key":
        key = os.urandom(32)
    elif mutate == "aad":
        aad = b"other"
    elif mutate == "flip":
        sealed = sealed[:-1] + bytes([sealed[-1] ^ 1])
    elif mutate == "version":
        sealed = b"\x02" + sealed[1:]
    else:
        sealed = sealed[:20]
    with pytest.raises(UnsealError) as info:
        rootkey.unseal(key, sealed, aad)
    assert str(info.value) == "sealed value could not be opened"


def test_seal_refuses_bad_key_length() -> None:
    with pytest.raises(ValueError):
        rootkey.seal(b"short", b"x", b"")


def test_passphrase_source(tmp_path: Path) -> None:
    data = tmp_path / "data"
    key = rootkey.create_root_config(data, RootKeySource.from_passphrase("correct horse", scrypt_n=FAST_N))
    assert len(key) == 32
    config = json.loads((data / "root.json").read_text())
    assert config["kind"] == "passphrase"
    assert config["kdf"]["name"] == "scrypt" and config["kdf"]["n"] == FAST_N
    assert key.hex() not in (data / "root.json").read_text()
    assert stat.S_IMODE((data / "root.json").stat().st_mode) == 0o600
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    again = rootkey.load_root_key(data, RootKeySource.from_passphrase("correct horse"))
    assert again == key
    with pytest.raises(RootKeyError, match="wrong root passphrase"):
        rootkey.load_root_key(data, RootKeySource.from_passphrase("wrong horse"))


def test_default_scrypt_cost_is_memory_hard() -> None:
    assert RootKeySource.from_passphrase("x").scrypt_n >= 2**15


def test_passphrase_from_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(rootkey.PASSPHRASE_ENV, raising=False)
    with pytest.raises(RootKeyError, match=rootkey.PASSPHRASE_ENV):
        RootKeySource.from_env()
    monkeypatch.setenv(rootkey.PASSPHRASE_ENV, "pw")
    key = rootkey.create_root_config(tmp_path / "d", RootKeySource.from_env(scrypt_n=FAST_N))
    assert rootkey.load_root_key(tmp_path / "d", RootKeySource.from_env()) == key


def test_empty_passphrase_refused() -> None:
    with pytest.raises(RootKeyError):
        RootKeySource.from_passphrase("")


def test_key_file_source_generated_outside(tmp_path: Path) -> None:
    data, keyfile = tmp_path / "data", tmp_path / "secret" / "root.key"
    key = rootkey.create_root_config(data, RootKeySource.from_key_file(keyfile))
    assert keyfile.read_text().strip() == key.hex()
    assert stat.S_IMODE(keyfile.stat().st_mode) == 0o600
    assert rootkey.load_root_key(data, RootKeySource.from_key_file(keyfile)) == key
    other = tmp_path / "other.key"
    other.write_bytes(os.urandom(32))
    with pytest.raises(RootKeyError, match="does not match"):
        rootkey.load_root_key(data, RootKeySource.from_key_file(other))
    with pytest.raises(RootKeyError, match="cannot read"):
        rootkey.load_root_key(data, RootKeySource.from_key_file(tmp_path / "missing.key"))


def test_existing_raw_key_file(tmp_path: Path) -> None:
    keyfile = tmp_path / "raw.key"
    raw = os.urandom(32)
    keyfile.write_bytes(raw)
    assert rootkey.create_root_config(tmp_path / "data", RootKeySource.from_key_file(keyfile)) == raw


def test_key_file_inside_data_dir_refused(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with pytest.raises(RootKeyError, match="outside"):
        rootkey.create_root_config(data, RootKeySource.from_key_file(data / "root.key"))


@pytest.mark.parametrize("content", [b"", b"abc", b"zz" * 32, os.urandom(31)])
def test_bad_key_files(tmp_path: Path, content: bytes) -> None:
    keyfile = tmp_path / "bad.key"
    keyfile.write_bytes(content)
    with pytest.raises(RootKeyError):
        rootkey.read_key_file(keyfile)


def test_dev_source(tmp_path: Path) -> None:
    data = tmp_path / "data"
    key = rootkey.create_root_config(data, RootKeySource.dev())
    assert (data / "dev-root.key").read_text().strip() == key.hex()
    assert rootkey.load_root_key(data, RootKeySource.dev()) == key
    assert rootkey.root_source_kind(data) == "dev"


def test_kind_mismatch_and_reinit(tmp_path: Path) -> None:
    data = tmp_path / "data"
    rootkey.create_root_config(data, RootKeySource.dev())
    with pytest.raises(RootKeyError, match="uses a dev root key"):
        rootkey.load_root_key(data, RootKeySource.from_passphrase("x"))
    with pytest.raises(RootKeyError, match="already"):
        rootkey.create_root_config(data, RootKeySource.dev())


def test_uninitialised_dir(tmp_path: Path) -> None:
    with pytest.raises(RootKeyError, match="not initialised"):
        rootkey.load_root_key(tmp_path, RootKeySource.dev())
