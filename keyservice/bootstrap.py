"""Creating and opening a data directory.

``initialize`` lays out a new data directory (store, audit directory, a bootstrap admin
credential); ``open_service`` builds the ``KeyService`` over an existing one, reading region and
account back from the store so a restart serves the same keys under the same ARNs;
``admin_credentials`` lets dev mode reprint the same admin credentials on every start.

The root key is obtained separately (``rootkey.create_root_config`` / ``rootkey.load_root_key``);
this module checks that it matches the store through a sealed constant (``root_check``).

Layout::

    DATA_DIR/            0700
      root.json          0600  root key source, KDF params, verifier (rootkey.py)
      dev-root.key       0600  dev mode only
      keyservice.db      0600  SQLite store (+ -wal, -shm), unless the store is on PostgreSQL:
      store.url          0600  then the database's URL (store/engine.py)
      audit/             0700
        audit.log        0600  JSON Lines audit log
"""

from __future__ import annotations

import re
import secrets
import string
from dataclasses import asdict, dataclass
from pathlib import Path

from keyservice.audit import signing as audit_signing
from keyservice.audit.log import AuditLog
from keyservice.audit.pgmirror import PgMirror
from keyservice.audit.records import AUDIT_DIR, MAIN_CHAIN, audit_path, read_lines
from keyservice.clock import Clock, SystemClock
from keyservice.ops.registry import OPERATIONS
from keyservice.service import DEFAULT_MAX_KEYS, KeyService
from keyservice.store import engine, rootkey
from keyservice.store.base import Store, root_check_aad, secret_aad
from keyservice.store.model import CredentialRecord
from keyservice.store.sqlite_schema import DB_NAME

DEFAULT_REGION = "us-east-1"
DEFAULT_ACCOUNT_ID = "111122223333"

_ROOT_CHECK = b"keyservice root check v1"
_REGION = re.compile(r"^[a-z]{2,}(-[a-z0-9]+)+$")
_ACCOUNT = re.compile(r"^\d{12}$")
_AKID_ALPHABET = string.ascii_uppercase + string.digits
_SECRET_ALPHABET = string.ascii_letters + string.digits + "+/"


class NotInitializedError(Exception):
    """The data directory has no store yet (run ``keyservice init``)."""


class RegionMismatchError(ValueError):
    """A server was started with a region other than the one its store was created in (K17)."""


class AlreadyInitializedError(Exception):
    """The data directory already holds a store."""


@dataclass(frozen=True)
class Credentials:
    access_key_id: str
    secret_access_key: str
    principal_arn: str

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


def store_path(data_dir: Path) -> Path:
    return Path(data_dir) / DB_NAME


def is_initialized(data_dir: Path, store_url: str | None = None) -> bool:
    store_url = engine.resolve_url(data_dir, store_url)
    if not engine.store_exists(data_dir, store_url):
        return False
    store = engine.open_store(data_dir, store_url)
    try:
        return store.get_meta("account_id") is not None
    finally:
        store.close()


def new_access_key_id() -> str:
    """``AKIA`` + 16 uppercase letters/digits, like an AWS long-term access key id."""
    return "AKIA" + "".join(secrets.choice(_AKID_ALPHABET) for _ in range(16))


def new_secret_access_key() -> str:
    """40 characters from AWS's secret alphabet (about 238 bits)."""
    return "".join(secrets.choice(_SECRET_ALPHABET) for _ in range(40))


def _add_credential(
    store: Store, root_key: bytes, account_id: str, principal_arn: str, clock: Clock
) -> Credentials:
    access_key_id = new_access_key_id()
    secret = new_secret_access_key()
    store.add_credential(
        CredentialRecord(
            access_key_id=access_key_id,
            principal_arn=principal_arn,
            account_id=account_id,
            sealed_secret=rootkey.seal(root_key, secret.encode(), secret_aad(access_key_id)),
            creation_date=clock.now(),
        )
    )
    return Credentials(access_key_id, secret, principal_arn)


def _open_checked(
    data_dir: Path, root_key: bytes, store_url: str | None = None, *, watch: bool = False
) -> Store:
    """The store of ``data_dir`` (on the engine ``store_url`` or ``DATA_DIR/store.url`` names),
    checked to be initialised and sealed under ``root_key``."""
    store_url = engine.resolve_url(data_dir, store_url)
    if not engine.store_exists(data_dir, store_url):
        raise NotInitializedError(f"{data_dir} is not an initialised keyservice data directory")
    store = engine.open_store(data_dir, store_url, watch=watch)
    try:
        check = store.get_meta("root_check")
        if check is None or store.get_meta("account_id") is None:
            raise NotInitializedError(f"{data_dir} is not an initialised keyservice data directory")
        try:
            ok = rootkey.unseal(root_key, bytes.fromhex(check), root_check_aad()) == _ROOT_CHECK
        except (rootkey.UnsealError, ValueError):
            ok = False
        if not ok:
            raise rootkey.RootKeyError("the root key does not match this data directory")
    except BaseException:
        store.close()
        raise
    return store


def initialize(
    data_dir: Path,
    root_key: bytes,
    *,
    region: str = DEFAULT_REGION,
    account_id: str = DEFAULT_ACCOUNT_ID,
    clock: Clock | None = None,
    store_url: str | None = None,
) -> Credentials:
    """Create the store and audit directory and a bootstrap admin credential; return the latter.

    ``store_url``: a PostgreSQL database (recorded in ``DATA_DIR/store.url``); None for SQLite."""
    clock = clock or SystemClock()
    if not _REGION.match(region):
        raise ValueError(f"invalid region {region!r} (e.g. us-east-1)")
    if not _ACCOUNT.match(account_id):
        raise ValueError(f"invalid account id {account_id!r} (12 digits)")
    data_dir = Path(data_dir)
    rootkey.ensure_private_dir(data_dir)
    rootkey.ensure_private_dir(data_dir / AUDIT_DIR)
    store_url = engine.check_url(store_url)
    if is_initialized(data_dir, store_url):
        raise AlreadyInitializedError(f"{data_dir} already holds a keyservice store")
    engine.record_url(data_dir, store_url)
    store = engine.open_store(data_dir, store_url)
    try:
        principal_arn = f"arn:aws:iam::{account_id}:root"
        creds = _add_credential(store, root_key, account_id, principal_arn, clock)
        store.set_meta("region", region)
        store.set_meta("admin_access_key_id", creds.access_key_id)
        store.set_meta("created_at", clock.now().isoformat())
        store.set_meta("root_check", rootkey.seal(root_key, _ROOT_CHECK, root_check_aad()).hex())
        # Written last: its presence marks the directory as initialised.
        store.set_meta("account_id", account_id)
    finally:
        store.close()
    AuditLog(data_dir).close()  # create audit/audit.log with its mode now
    return creds


def open_service(
    data_dir: Path,
    root_key: bytes,
    *,
    clock: Clock | None = None,
    region: str | None = None,
    max_keys: int = DEFAULT_MAX_KEYS,
    allow_pkcs1_import: bool = False,
    store_url: str | None = None,
    audit_chain: str = MAIN_CHAIN,
    audit_table_chain: str | None = None,
) -> KeyService:
    """The service over an initialised data directory; ``region``, if given, must match the store's.
    ``store_url``: the PostgreSQL database, if not the one recorded in the data directory."""
    data_dir = Path(data_dir)
    store = _open_checked(data_dir, root_key, store_url, watch=True)
    try:
        stored_region = store.get_meta("region") or DEFAULT_REGION
        account_id = store.get_meta("account_id") or DEFAULT_ACCOUNT_ID
        if region is not None and region != stored_region:
            raise RegionMismatchError(f"this data directory serves region {stored_region}, not {region}")
        clock = clock or SystemClock()
        signer = audit_signing.load_or_create(data_dir, root_key)
        mirror = None
        url = engine.resolve_url(data_dir, store_url)
        if url is not None:  # every line also goes into the database's append-only table
            mirror = PgMirror(url, audit_table_chain or audit_chain)
            mirror.resume(read_lines(audit_path(data_dir, audit_chain)))
        audit_log = AuditLog(
            data_dir, signer=signer, now=clock.now, chain=audit_chain, mirror=mirror.ship if mirror else None
        )
    except BaseException:
        store.close()
        raise
    return KeyService(
        store,
        audit_log,
        region=stored_region,
        account_id=account_id,
        clock=clock,
        root_key=root_key,
        operations=OPERATIONS,
        max_keys=max_keys,
        allow_pkcs1_import=allow_pkcs1_import,
    )


def check_store(
    data_dir: Path, root_key: bytes, store_url: str | None = None, *, region: str | None = None
) -> str:
    """Check that ``data_dir``'s store is initialised, sealed under ``root_key`` and of ``region``
    (if given) without serving it, and create the audit signing key if it is not there yet;
    returns its region (``serve --workers`` does this once, before it forks the workers)."""
    store = _open_checked(Path(data_dir), root_key, store_url)
    try:
        stored_region = store.get_meta("region") or DEFAULT_REGION
    finally:
        store.close()
    audit_signing.load_or_create(Path(data_dir), root_key)
    if region is not None and region != stored_region:
        raise RegionMismatchError(f"this data directory serves region {stored_region}, not {region}")
    return stored_region


def admin_credentials(data_dir: Path, root_key: bytes, store_url: str | None = None) -> Credentials:
    """The bootstrap admin's credentials, unsealed (dev mode reprints them on restart)."""
    store = _open_checked(Path(data_dir), root_key, store_url)
    try:
        access_key_id = store.get_meta("admin_access_key_id")
        cred = store.get_credential(access_key_id) if access_key_id else None
        if cred is None:
            raise NotInitializedError(f"{data_dir} has no admin credential")
        secret = rootkey.unseal(root_key, cred.sealed_secret, secret_aad(cred.access_key_id)).decode()
        return Credentials(cred.access_key_id, secret, cred.principal_arn)
    finally:
        store.close()


def create_credentials(
    data_dir: Path, root_key: bytes, principal_arn: str, *, clock: Clock | None = None
) -> Credentials:
    """A new access key for ``principal_arn`` in this account (for ``keyservice principal``)."""
    store = _open_checked(Path(data_dir), root_key)
    try:
        account_id = store.get_meta("account_id") or DEFAULT_ACCOUNT_ID
        if not principal_arn.startswith(f"arn:aws:iam::{account_id}:"):
            raise ValueError(f"principal ARN must be of account {account_id} (arn:aws:iam::{account_id}:...)")
        return _add_credential(store, root_key, account_id, principal_arn, clock or SystemClock())
    finally:
        store.close()
