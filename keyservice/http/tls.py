"""A private CA and server certificate for the key service, so TLS works with no outside PKI.

Why: kmsfs and boto3 must verify the server they send credentials-signed requests and data keys
to; for a self-hosted service the simplest sound setup is a private CA whose certificate clients
trust explicitly (``--ca-bundle`` / ``AWS_CA_BUNDLE`` / the ``ca_bundle`` of the credentials
file). The CA's private key is not kept: it signs the server certificate once, and a new server
certificate means a new CA (re-run with ``--regenerate-tls``).

Files in ``DATA_DIR/tls/``: ``ca.pem`` (give this to clients), ``server.pem`` (certificate and
chain) and ``server.key`` (mode 0600). The server key lets its holder impersonate the service to
clients that trust the CA; it recovers no key material.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from keyservice.files import write_atomic

TLS_DIR = "tls"
VALIDITY = dt.timedelta(days=825)
_CA_USAGE = x509.KeyUsage(
    digital_signature=False, content_commitment=False, key_encipherment=False, data_encipherment=False,
    key_agreement=False, key_cert_sign=True, crl_sign=True, encipher_only=False, decipher_only=False,
)  # fmt: skip


@dataclass(frozen=True)
class TlsFiles:
    ca: Path
    cert: Path
    key: Path


def tls_files(data_dir: Path) -> TlsFiles:
    base = Path(data_dir) / TLS_DIR
    return TlsFiles(ca=base / "ca.pem", cert=base / "server.pem", key=base / "server.key")


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "keyservice"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _san(hosts: list[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in dict.fromkeys(hosts):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)



def generate(data_dir: Path, hosts: list[str], *, now: dt.datetime | None = None) -> TlsFiles:
    """Create a private CA and a server certificate for ``hosts`` (DNS names or IP addresses)."""
    files = tls_files(data_dir)
    files.ca.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    start = (now or dt.datetime.now(dt.UTC)) - dt.timedelta(minutes=5)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name("keyservice private CA")
    ca_cert = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(start + VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_CA_USAGE, critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = (
        x509.CertificateBuilder().subject_name(_name(hosts[0])).issuer_name(ca_name)
        .public_key(server_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(start + VALIDITY)
        .add_extension(_san(hosts), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    pem = serialization.Encoding.PEM
    write_atomic(files.key, server_key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()), 0o600)
    write_atomic(files.cert, server_cert.public_bytes(pem) + ca_cert.public_bytes(pem), 0o644)
    write_atomic(files.ca, ca_cert.public_bytes(pem), 0o644)
    return files


def default_hosts(listen_host: str) -> list[str]:
    """Names a local client may use: the listen address plus the loopback names."""
    hosts = ["localhost", "127.0.0.1", "::1"]
    if listen_host not in ("", "0.0.0.0", "::"):
        hosts.insert(0, listen_host)
    return hosts
