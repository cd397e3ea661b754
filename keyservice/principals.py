"""Principals of the account: named users with access keys and identity policies (issue 4).

Offline operations on a data directory, for ``keyservice principal`` (``cli/principal.py``). They
write straight to the SQLite store (WAL lets them do so while a server runs); the server reads
principals, access keys and identity policies from the store on every request, so a change is
effective at the next request, with no restart and no cache to go stale.

A principal is ``arn:aws:iam::<account>:user/<name>``. Its secret access keys are sealed under the
root key like the bootstrap admin's (``bootstrap._add_credential``), which is why every change
except listing needs the root key: it proves the caller may administer this data directory. The
bootstrap admin is the account root (``arn:aws:iam::<account>:root``) and is not managed here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from keyservice import bootstrap
from keyservice.authz import policy
from keyservice.clock import Clock, SystemClock
from keyservice.store import engine
from keyservice.store.base import Store
from keyservice.store.model import IdentityPolicyRecord, PrincipalRecord

USER_NAME = re.compile(r"^[\w+=,.@-]{1,64}$")
POLICY_NAME = re.compile(r"^[\w+=,.@-]{1,128}$")


class PrincipalError(Exception):
    """A user-facing failure (unknown principal, bad name, malformed policy)."""


@dataclass(frozen=True)
class PrincipalInfo:
    arn: str
    name: str
    access_key_ids: tuple[str, ...]
    policies: tuple[str, ...]
    creation_date: str


def user_arn(account_id: str, name: str) -> str:
    return f"arn:aws:iam::{account_id}:user/{name}"


def _check_name(name: str) -> None:
    if not USER_NAME.match(name):
        raise PrincipalError(f"invalid principal name {name[:80]!r}: 1-64 of letters, digits and +=,.@_-")


def _open(data_dir: Path, root_key: bytes) -> tuple[Store, str]:
    store = bootstrap._open_checked(Path(data_dir), root_key)  # checks the root key matches
    return store, store.get_meta("account_id") or bootstrap.DEFAULT_ACCOUNT_ID


def _existing(store: Store, account_id: str, name: str) -> PrincipalRecord:
    _check_name(name)
    principal = store.get_principal(user_arn(account_id, name))
    if principal is None:
        raise PrincipalError(f"no principal named {name!r}")
    return principal


def create(
    data_dir: Path, root_key: bytes, name: str, *, clock: Clock | None = None
) -> bootstrap.Credentials:
    """Create principal ``name`` with one access key; the secret is returned here and never again."""
    _check_name(name)
    clock = clock or SystemClock()
    store, account_id = _open(data_dir, root_key)
    try:
        arn = user_arn(account_id, name)
        if store.get_principal(arn) is not None:
            raise PrincipalError(f"principal {name!r} already exists")
        store.create_principal(PrincipalRecord(arn, name, account_id, clock.now()))
        return bootstrap._add_credential(store, root_key, account_id, arn, clock)
    finally:
        store.close()


def list_all(data_dir: Path) -> list[PrincipalInfo]:
    """Every principal with its access key ids and policy names (nothing secret; no root key needed)."""
    url = engine.resolve_url(Path(data_dir), None)
    if not engine.store_exists(Path(data_dir), url):
        raise bootstrap.NotInitializedError(f"{data_dir} is not an initialised keyservice data directory")
    store = engine.open_store(Path(data_dir), url)
    try:
        keys: dict[str, list[str]] = {}
        for cred in store.list_credentials():
            keys.setdefault(cred.principal_arn, []).append(cred.access_key_id)
        return [
            PrincipalInfo(
                arn=p.arn,
                name=p.name,
                access_key_ids=tuple(keys.get(p.arn, ())),
                policies=tuple(r.name for r in store.identity_policies(p.arn)),
                creation_date=p.creation_date.isoformat(),
            )
            for p in store.list_principals()
        ]
    finally:
        store.close()


def delete(data_dir: Path, root_key: bytes, name: str) -> None:
    """Delete a principal, its access keys and its identity policies (grants naming it stay, as in
    AWS, but no one can sign as it any more)."""
    store, account_id = _open(data_dir, root_key)
    try:
        store.delete_principal(_existing(store, account_id, name).arn)
    finally:
        store.close()


def rotate_access_key(
    data_dir: Path, root_key: bytes, name: str, *, clock: Clock | None = None
) -> bootstrap.Credentials:
    """A new access key for ``name``; its previous access keys stop working at once."""
    store, account_id = _open(data_dir, root_key)
    try:
        arn = _existing(store, account_id, name).arn
        creds = bootstrap._add_credential(store, root_key, account_id, arn, clock or SystemClock())
        store.delete_credentials(arn, except_access_key_id=creds.access_key_id)
        return creds
    finally:
        store.close()


def attach_policy(data_dir: Path, root_key: bytes, name: str, policy_name: str, document: str) -> None:
    """Attach (or replace) identity policy ``policy_name``; refused unless it parses."""
    if not POLICY_NAME.match(policy_name):
        raise PrincipalError(f"invalid policy name {policy_name[:80]!r}")
    try:
        policy.parse(document, key_policy=False)
    except Exception as error:  # MalformedPolicyDocumentException: say why, without echoing the file
        raise PrincipalError(f"malformed identity policy: {getattr(error, 'message', error)}") from None
    store, account_id = _open(data_dir, root_key)
    try:
        arn = _existing(store, account_id, name).arn
        store.put_identity_policy(IdentityPolicyRecord(arn, policy_name, document))
    finally:
        store.close()


def detach_policy(data_dir: Path, root_key: bytes, name: str, policy_name: str) -> None:
    store, account_id = _open(data_dir, root_key)
    try:
        arn = _existing(store, account_id, name).arn
        if not store.delete_identity_policy(arn, policy_name):
            raise PrincipalError(f"principal {name!r} has no policy named {policy_name!r}")
    finally:
        store.close()
