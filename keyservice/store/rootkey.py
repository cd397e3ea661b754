"""The root key and the sealing of everything secret the service keeps on disk.

The data directory holds only sealed secrets (key material, credential secrets). They are
sealed with AES-256-GCM under a 32-byte root key that normally lives *outside* the data
directory, so that the directory alone recovers nothing (SPEC K14). The root key comes from:

* ``passphrase``: scrypt (memory-hard) over a passphrase, salt and parameters in
  ``DATA_DIR/root.json``;
* ``key_file``: 32 random bytes (raw or hex) in a file kept outside the data directory;
* ``dev``: a key file ``DATA_DIR/dev-root.key`` inside the data directory. Convenient and
  insecure; the caller prints a loud warning.

``root.json`` also holds a *verifier* (a constant sealed under the root key) so a wrong
passphrase or key file gives a clear error instead of unseal failures later.

Sealed format (``seal``)::

    0x01 | nonce (12 bytes) | AES-256-GCM ciphertext + 16-byte tag

with the caller's AAD binding the sealed value to where it belongs (see docs/STORE.md).
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from keyservice.files import write_atomic

ROOT_KEY_LEN = 32
SEAL_VERSION = 1
NONCE_LEN = 12
TAG_LEN = 16

ROOT_CONFIG_NAME = "root.json"
DEV_KEY_NAME = "dev-root.key"
PASSPHRASE_ENV = "KEYSERVICE_ROOT_PASSPHRASE"

# scrypt defaults: n=2**15, r=8, p=1 is ~32 MiB and ~0.1 s; tests may pass a smaller n.
DEFAULT_SCRYPT_N = 2**15
SCRYPT_R = 8
SCRYPT_P = 1
MIN_SCRYPT_N = 2**4

_VERIFIER_PLAINTEXT = b"keyservice root key verifier v1"
_VERIFIER_AAD = b"keyservice/root-verifier/v1"

SourceKind = Literal["passphrase", "key_file", "dev"]


class UnsealError(Exception):
    """A sealed value did not open: wrong root key, wrong AAD, or damaged bytes. Deliberately undetailed."""

    def __init__(self) -> None:
        super().__init__("sealed value could not be opened")


class RootKeyError(Exception):
    """The root key could not be obtained (wrong passphrase, missing/invalid key file, bad config)."""


@dataclass(frozen=True)
class RootKeySource:
    """Where the root key comes from. Build with ``from_passphrase`` / ``from_key_file`` / ``dev``."""

    kind: SourceKind
    passphrase: str | None = None
    key_file: Path | None = None
    scrypt_n: int = DEFAULT_SCRYPT_N

    @classmethod
    def from_passphrase(cls, passphrase: str, *, scrypt_n: int = DEFAULT_SCRYPT_N) -> RootKeySource:
        if not passphrase:
            raise RootKeyError("the root passphrase must not be empty")
        return cls(kind="passphrase", passphrase=passphrase, scrypt_n=scrypt_n)

    @classmethod
    def from_env(cls, *, scrypt_n: int = DEFAULT_SCRYPT_N) -> RootKeySource:
        value = os.environ.get(PASSPHRASE_ENV)
        if not value:
            raise RootKeyError(f"environment variable {PASSPHRASE_ENV} is not set or empty")
        return cls.from_passphrase(value, scrypt_n=scrypt_n)

    @classmethod
    def from_key_file(cls, path: Path | str) -> RootKeySource:
        return cls(kind="key_file", key_file=Path(path))

    @classmethod
    def dev(cls) -> RootKeySource:
        return cls(kind="dev")


# --------------------------------------------------------------------------- sealing


def seal(root_key: bytes, plaintext: bytes, aad: bytes) -> bytes:
    """AES-256-GCM seal with a fresh random nonce; output is ``version | nonce | ct+tag``."""
    _check_key(root_key)
    nonce = os.urandom(NONCE_LEN)
    return bytes([SEAL_VERSION]) + nonce + AESGCM(root_key).encrypt(nonce, plaintext, aad)


def unseal(root_key: bytes, sealed: bytes, aad: bytes) -> bytes:
    """Open a value made by ``seal``; any failure raises ``UnsealError`` without detail."""
    _check_key(root_key)
    if len(sealed) < 1 + NONCE_LEN + TAG_LEN or sealed[0] != SEAL_VERSION:
        raise UnsealError()
    nonce = sealed[1 : 1 + NONCE_LEN]
    try:
        return AESGCM(root_key).decrypt(nonce, sealed[1 + NONCE_LEN :], aad)
    except InvalidTag:
        raise UnsealError() from None


def _check_key(root_key: bytes) -> None:
    if not isinstance(root_key, bytes | bytearray) or len(root_key) != ROOT_KEY_LEN:
        raise ValueError("the root key must be 32 bytes")


# --------------------------------------------------------------------------- key files


def generate_key_file(path: Path) -> bytes:
    """Write 32 fresh random bytes as hex to ``path`` (mode 0600, must not exist); return them."""
    key = secrets.token_bytes(ROOT_KEY_LEN)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, key.hex().encode() + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    return key


def read_key_file(path: Path) -> bytes:
    """Read a root key file: 32 raw bytes, or 64 hex digits (surrounding whitespace ignored)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise RootKeyError(f"cannot read root key file {path}: {exc.strerror}") from None
    if len(data) == ROOT_KEY_LEN:
        return data
    text = data.strip()
    if len(text) == 2 * ROOT_KEY_LEN:
        try:
            return bytes.fromhex(text.decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            pass
    raise RootKeyError(f"root key file {path} must hold 32 raw bytes or 64 hex digits")


def _is_inside(path: Path, directory: Path) -> bool:
    try:
        path.resolve().relative_to(directory.resolve())
    except ValueError:
        return False
    return True


# --------------------------------------------------------------------------- root config


def _derive(passphrase: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return Scrypt(salt=salt, length=ROOT_KEY_LEN, n=n, r=r, p=p).derive(passphrase.encode("utf-8"))



def ensure_private_dir(path: Path) -> None:
    """Create ``path`` (and parents) if needed and make it mode 0700."""
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)


def create_root_config(data_dir: Path, source: RootKeySource) -> bytes:
    """Set up the root key for a new data directory and return it.

    Writes ``root.json`` (kind, KDF parameters, salt, verifier). For ``key_file`` the file is
    generated if it does not exist and must lie outside ``data_dir``; for ``dev`` the key is
    generated into ``data_dir/dev-root.key``. Refuses to overwrite an existing ``root.json``.
    """
    data_dir = Path(data_dir)
    ensure_private_dir(data_dir)
    config_path = data_dir / ROOT_CONFIG_NAME
    if config_path.exists():
        raise RootKeyError(f"{config_path} already exists: this data directory is already initialised")
    config: dict[str, object] = {"version": 1, "kind": source.kind}
    if source.kind == "passphrase":
        if not source.passphrase:
            raise RootKeyError("no root passphrase given")
        if source.scrypt_n < MIN_SCRYPT_N or source.scrypt_n & (source.scrypt_n - 1):
            raise RootKeyError("scrypt n must be a power of two >= 16")
        salt = os.urandom(16)
        root_key = _derive(source.passphrase, salt, source.scrypt_n, SCRYPT_R, SCRYPT_P)
        config["kdf"] = {
            "name": "scrypt",
            "n": source.scrypt_n,
            "r": SCRYPT_R,
            "p": SCRYPT_P,
            "salt": salt.hex(),
        }
    elif source.kind == "key_file":
        if source.key_file is None:
            raise RootKeyError("no root key file given")
        if _is_inside(source.key_file, data_dir):
            raise RootKeyError("the root key file must be kept outside the data directory")
        root_key = read_key_file(source.key_file) if source.key_file.exists() else generate_key_file(
            source.key_file
        )
    elif source.kind == "dev":
        dev_path = data_dir / DEV_KEY_NAME
        root_key = read_key_file(dev_path) if dev_path.exists() else generate_key_file(dev_path)
    else:  # pragma: no cover - guarded by the Literal type
        raise RootKeyError(f"unknown root key source {source.kind!r}")
    config["verifier"] = seal(root_key, _VERIFIER_PLAINTEXT, _VERIFIER_AAD).hex()
    write_atomic(config_path, (json.dumps(config, indent=2) + "\n").encode())
    return root_key


def read_root_config(data_dir: Path) -> dict[str, object]:
    path = Path(data_dir) / ROOT_CONFIG_NAME
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise RootKeyError(f"{path} not found: the data directory is not initialised") from None
    except (OSError, ValueError) as exc:
        raise RootKeyError(f"cannot read {path}: {exc}") from None
    if not isinstance(config, dict) or config.get("version") != 1:
        raise RootKeyError(f"{path} has an unknown format")
    return config


def root_source_kind(data_dir: Path) -> str:
    """The kind of root key source a data directory was initialised with."""
    return str(read_root_config(data_dir)["kind"])


def load_root_key(data_dir: Path, source: RootKeySource) -> bytes:
    """Recover the root key of an initialised data directory and check it against the verifier."""
    data_dir = Path(data_dir)
    config = read_root_config(data_dir)
    kind = config.get("kind")
    if kind != source.kind:
        raise RootKeyError(f"this data directory uses a {kind} root key, not {source.kind}")
    if source.kind == "passphrase":
        kdf = config.get("kdf")
        if not isinstance(kdf, dict) or kdf.get("name") != "scrypt":
            raise RootKeyError("root.json: unsupported KDF")
        if not source.passphrase:
            raise RootKeyError("no root passphrase given")
        try:
            salt = bytes.fromhex(str(kdf["salt"]))
            root_key = _derive(source.passphrase, salt, int(kdf["n"]), int(kdf["r"]), int(kdf["p"]))
        except (KeyError, ValueError, TypeError) as exc:
            raise RootKeyError(f"root.json: bad KDF parameters ({exc})") from None
        wrong = "wrong root passphrase"
    elif source.kind == "key_file":
        if source.key_file is None:
            raise RootKeyError("no root key file given")
        root_key = read_key_file(source.key_file)
        wrong = f"root key file {source.key_file} does not match this data directory"
    else:
        root_key = read_key_file(data_dir / DEV_KEY_NAME)
        wrong = "dev root key does not match this data directory"
    try:
        verifier = bytes.fromhex(str(config.get("verifier", "")))
        ok = unseal(root_key, verifier, _VERIFIER_AAD) == _VERIFIER_PLAINTEXT
    except (UnsealError, ValueError):
        ok = False
    if not ok:
        raise RootKeyError(wrong)
    return root_key
