"""The audit signing key: an Ed25519 key that signs audit checkpoints.

Why a separate key, kept outside the log directory: whoever can rewrite ``audit/audit.log`` must
not be able to re-sign it. The private key is sealed under the root key in
``DATA_DIR/audit-signing.key`` (so the data directory alone cannot produce signatures); the
public key is written beside it in ``audit-signing.pub`` and its fingerprint printed, so an
operator can keep a copy elsewhere and pin it with ``keyservice audit verify --public-key``.
"""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
    load_pem_public_key,
)

from keyservice.files import write_atomic
from keyservice.store import rootkey

PRIVATE_FILE = "audit-signing.key"
PUBLIC_FILE = "audit-signing.pub"
_AAD = b"keyservice/audit-signing-key/v1"



def load_or_create(data_dir: Path, root_key: bytes) -> Ed25519PrivateKey:
    """The data directory's signing key, created (and its public half published) on first use."""
    private_path = Path(data_dir) / PRIVATE_FILE
    if private_path.exists():
        raw = rootkey.unseal(root_key, private_path.read_bytes(), _AAD)
        return Ed25519PrivateKey.from_private_bytes(raw)
    key = Ed25519PrivateKey.generate()
    raw = key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
    write_atomic(private_path, rootkey.seal(root_key, raw, _AAD), 0o600)
    pem = key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    write_atomic(Path(data_dir) / PUBLIC_FILE, pem, 0o644)
    return key


def load_public(path: Path) -> Ed25519PublicKey:
    """A PEM public key (the published ``audit-signing.pub`` or an operator's pinned copy)."""
    key = load_pem_public_key(Path(path).read_bytes())
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"{path} is not an Ed25519 public key")
    return key


def public_path(data_dir: Path) -> Path:
    return Path(data_dir) / PUBLIC_FILE
