"""The audit table on PostgreSQL: append-only, the exact line bytes, a chain resumed from its
local file, a foreign or cut chain refused, and the AuditLog copying each durable line."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from keyservice.audit.log import AuditLog
from keyservice.audit.pgmirror import AuditMirrorError, PgMirror, table_chains
from keyservice.audit.records import audit_path, build_record, read_lines
from keyservice.audit.verify import verify
from keyservice.context import Principal, RequestContext

SIGNER = Ed25519PrivateKey.generate()
ALICE = Principal("111122223333", "arn:aws:iam::111122223333:user/alice", "AKIAALICE00000000000")


@pytest.fixture
def url(pg_url: str) -> str:
    from keyservice.store.postgres import PostgresStore

    PostgresStore(pg_url).close()  # creates the schema
    return pg_url


def _log(data_dir: Path, mirror: PgMirror, count: int) -> None:
    log = AuditLog(data_dir, signer=SIGNER, checkpoint_every=4, mirror=mirror.ship)
    for n in range(count):
        ctx = RequestContext(f"req-{n}", "127.0.0.1", ALICE, "test", {})
        log.append(build_record(when=datetime.now(UTC), ctx=ctx, operation="Decrypt"))
    log.close()


def test_every_line_lands_in_the_table_byte_for_byte(url: str, tmp_path: Path) -> None:
    mirror = PgMirror(url, "n1:main")
    mirror.resume([])
    _log(tmp_path, mirror, 10)
    local = list(read_lines(audit_path(tmp_path)))
    assert table_chains(url)["n1:main"] == local
    assert verify(tmp_path, SIGNER.public_key(), lines=table_chains(url)["n1:main"]).ok


def test_the_table_refuses_update_delete_and_truncate(url: str, tmp_path: Path) -> None:
    import psycopg

    mirror = PgMirror(url, "n1:main")
    mirror.resume([])
    mirror.ship([b'{"a":1}', b'{"a":2}'])
    with psycopg.connect(url, autocommit=True) as conn:
        for statement in (
            "UPDATE audit_records SET line = 'x'",
            "DELETE FROM audit_records",
            "TRUNCATE audit_records",
        ):
            with pytest.raises(psycopg.errors.RaiseException, match="append-only"):
                conn.execute(statement)
    assert table_chains(url)["n1:main"] == [b'{"a":1}', b'{"a":2}']


def test_resume_ships_what_is_missing_and_refuses_a_foreign_or_cut_chain(url: str) -> None:
    first = PgMirror(url, "n1:main")
    assert first.resume([b"1", b"2"]) == 2
    again = PgMirror(url, "n1:main")  # a restart: the table is a prefix of the local file
    assert again.resume([b"1", b"2", b"3"]) == 1
    assert table_chains(url)["n1:main"] == [b"1", b"2", b"3"]
    with pytest.raises(AuditMirrorError, match="another node"):
        PgMirror(url, "n1:main").resume([b"1", b"2", b"X"])  # another chain under the same id
    with pytest.raises(AuditMirrorError, match="cut"):
        PgMirror(url, "n1:main").resume([b"1"])  # the local log lost lines the table has
