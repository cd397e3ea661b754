"""The SQLite tables of who may do what: credentials, principals, identity policies and grants.

A mixin of ``SQLiteStore`` (it uses the store's connection helpers ``_write``, ``_one`` and
``_conn`` and its memo); split out so each file holds one concern of the schema in docs/STORE.md.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING

from keyservice.errors import (
    AlreadyExistsException,
    NotFoundException,
)
from keyservice.store.model import (
    CredentialRecord,
    GrantRecord,
    IdentityPolicyRecord,
    PrincipalRecord,
)
from keyservice.store.sqlite_memo import memo
from keyservice.store.sqlite_schema import (
    cred_from_row,
    grant_from_row,
    to_datetime,
    to_text,
)


class AccessTables:
    """Credentials, principals, identity policies and grants (see ``SQLiteStore``)."""

    _integrity_errors: tuple[type[Exception], ...]
    if TYPE_CHECKING:
        _write: Callable[[], AbstractContextManager[sqlite3.Connection]]
        _one: Callable[[str, tuple[object, ...]], sqlite3.Row | None]
        _conn: Callable[[], sqlite3.Connection]

    # ----------------------------------------------------------------- credentials

    def add_credential(self, cred: CredentialRecord) -> None:
        try:
            with self._write() as conn:
                conn.execute(
                    "INSERT INTO credentials(access_key_id, principal_arn, account_id, sealed_secret,"
                    " creation_date, enabled) VALUES (?, ?, ?, ?, ?, ?)",
                    (
                        cred.access_key_id,
                        cred.principal_arn,
                        cred.account_id,
                        cred.sealed_secret,
                        to_text(cred.creation_date),
                        int(cred.enabled),
                    ),
                )
        except self._integrity_errors:
            raise AlreadyExistsException(f"Access key {cred.access_key_id} already exists") from None

    @memo
    def get_credential(self, access_key_id: str) -> CredentialRecord | None:
        row = self._one("SELECT * FROM credentials WHERE access_key_id = ?", (access_key_id,))
        return None if row is None else cred_from_row(row)

    def list_credentials(self) -> list[CredentialRecord]:
        rows = (
            self._conn().execute("SELECT * FROM credentials ORDER BY creation_date, access_key_id").fetchall()
        )
        return [cred_from_row(r) for r in rows]

    def delete_credentials(self, principal_arn: str, *, except_access_key_id: str | None = None) -> int:
        """Delete the access keys of ``principal_arn`` (all, or all but one); returns how many."""
        with self._write() as conn:
            return conn.execute(
                "DELETE FROM credentials WHERE principal_arn = ? AND access_key_id != ?",
                (principal_arn, except_access_key_id or ""),
            ).rowcount

    # ----------------------------------------------------------------- principals and identity policies

    def create_principal(self, principal: PrincipalRecord) -> None:
        try:
            with self._write() as conn:
                conn.execute(
                    "INSERT INTO principals(arn, name, account_id, creation_date) VALUES (?, ?, ?, ?)",
                    (principal.arn, principal.name, principal.account_id, to_text(principal.creation_date)),
                )
        except self._integrity_errors:
            raise AlreadyExistsException(f"Principal {principal.name} already exists") from None

    @memo
    def get_principal(self, arn: str) -> PrincipalRecord | None:
        row = self._one("SELECT * FROM principals WHERE arn = ?", (arn,))
        return None if row is None else self._principal(row)

    @staticmethod
    def _principal(row: sqlite3.Row) -> PrincipalRecord:
        return PrincipalRecord(
            arn=row["arn"], name=row["name"], account_id=row["account_id"],
            creation_date=to_datetime(row["creation_date"]),  # type: ignore[arg-type]
        )  # fmt: skip

    def list_principals(self) -> list[PrincipalRecord]:
        rows = self._conn().execute("SELECT * FROM principals ORDER BY name").fetchall()
        return [self._principal(r) for r in rows]

    def delete_principal(self, arn: str) -> bool:
        """Delete a principal with its access keys and identity policies, atomically."""
        with self._write() as conn:
            conn.execute("DELETE FROM credentials WHERE principal_arn = ?", (arn,))
            conn.execute("DELETE FROM identity_policies WHERE principal_arn = ?", (arn,))
            return conn.execute("DELETE FROM principals WHERE arn = ?", (arn,)).rowcount == 1

    def put_identity_policy(self, record: IdentityPolicyRecord) -> None:
        """Attach (or replace) the identity policy ``record.name`` of a principal."""
        try:
            with self._write() as conn:
                conn.execute(
                    "INSERT INTO identity_policies(principal_arn, name, document) VALUES (?, ?, ?)"
                    " ON CONFLICT(principal_arn, name) DO UPDATE SET document = excluded.document",
                    (record.principal_arn, record.name, record.document),
                )
        except self._integrity_errors:
            raise NotFoundException(f"Principal {record.principal_arn} does not exist") from None

    def delete_identity_policy(self, principal_arn: str, name: str) -> bool:
        with self._write() as conn:
            sql = "DELETE FROM identity_policies WHERE principal_arn = ? AND name = ?"
            return conn.execute(sql, (principal_arn, name)).rowcount == 1

    @memo
    def identity_policies(self, principal_arn: str) -> list[IdentityPolicyRecord]:
        sql = "SELECT * FROM identity_policies WHERE principal_arn = ? ORDER BY name"
        rows = self._conn().execute(sql, (principal_arn,)).fetchall()
        return [IdentityPolicyRecord(r["principal_arn"], r["name"], r["document"]) for r in rows]

    # ----------------------------------------------------------------- grants

    def create_grant(self, grant: GrantRecord) -> None:
        constraints = grant.constraints()
        with self._write() as conn:
            conn.execute(
                "INSERT INTO grants(grant_id, key_id, grantee, retiring_principal, operations, constraints,"
                " name, issuing_account, creation_date) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    grant.grant_id, grant.key_id, grant.grantee, grant.retiring_principal,
                    json.dumps(list(grant.operations)), json.dumps(constraints) if constraints else None,
                    grant.name, grant.issuing_account, to_text(grant.creation_date),
                ),
            )  # fmt: skip

    def get_grant(self, grant_id: str) -> GrantRecord | None:
        row = self._one("SELECT * FROM grants WHERE grant_id = ?", (grant_id,))
        return None if row is None else grant_from_row(row)

    @memo
    def list_grants(
        self, *, key_id: str | None = None, grantee: str | None = None, retiring_principal: str | None = None,
        grant_id: str | None = None, after: str | None = None, limit: int = 1000,
    ) -> list[GrantRecord]:  # fmt: skip
        """Grants ordered by grant id, strictly after ``after``, filtered by the given fields."""
        where, args = ["grant_id > ?"], [after or ""]
        for column, value in (
            ("key_id", key_id), ("grantee", grantee), ("retiring_principal", retiring_principal),
            ("grant_id", grant_id),
        ):  # fmt: skip
            if value is not None:
                where.append(f"{column} = ?")
                args.append(value)
        sql = f"SELECT * FROM grants WHERE {' AND '.join(where)} ORDER BY grant_id LIMIT ?"
        rows = self._conn().execute(sql, (*args, limit)).fetchall()
        return [grant_from_row(r) for r in rows]

    def delete_grant(self, grant_id: str) -> bool:
        with self._write() as conn:
            return conn.execute("DELETE FROM grants WHERE grant_id = ?", (grant_id,)).rowcount == 1
