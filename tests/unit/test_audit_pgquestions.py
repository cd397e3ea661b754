"""The audit questions answered from PostgreSQL's audit table (schema version 2's columns), on a
real PostgreSQL 15: the same answers as a scan of the log, rows written before the columns
existed filled by the migration, and a row whose columns were edited detected."""

from __future__ import annotations

import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest

from keyservice.audit import questions, review
from keyservice.audit.pgmirror import PgMirror
from keyservice.audit.records import chain_lines
from keyservice.store.postgres_schema import MIGRATIONS
from tests.unit.test_audit_scale import FILTERS, KEY, OTHER_KEY, Clock, open_log, sample, write


@pytest.fixture
def url(pg_url: str) -> str:
    from keyservice.store.postgres import PostgresStore

    PostgresStore(pg_url).close()  # creates the schema, migrated to the newest version
    return pg_url


def mirrored_sample(data: Path, url: str) -> None:
    """The unit tests' sample log, every line copied into the table as the service does."""
    sample(data)
    mirror = PgMirror(url, "n1:main")
    mirror.resume(list(chain_lines(data)))
    mirror.close()


def no_warnings() -> questions.Warn:
    def fail(message: str) -> None:
        raise AssertionError(message)

    return fail


@pytest.mark.parametrize("filters", FILTERS, ids=lambda f: ",".join(k for k, v in f.as_dict().items() if v))
def test_the_table_answers_like_a_scan(url: str, tmp_path: Path, filters: questions.Filters) -> None:
    data, elsewhere = tmp_path / "data", tmp_path / "other-node"
    mirrored_sample(data, url)
    elsewhere.mkdir()  # another node's data dir: the answer can only come from the table
    answer = list(questions.query(elsewhere, filters, warn=no_warnings(), store=url))
    assert answer == list(review.query(data, **filters.as_dict()))
    assert answer


def test_key_timeline_principals_and_top_from_the_table(url: str, tmp_path: Path) -> None:
    data, elsewhere = tmp_path / "data", tmp_path / "other-node"
    mirrored_sample(data, url)
    elsewhere.mkdir()
    timeline = questions.key_timeline(elsewhere, KEY, warn=no_warnings(), store=url)
    assert timeline == questions.key_timeline(data, KEY, warn=no_warnings(), scan=True)
    principals = questions.key_principals(elsewhere, OTHER_KEY, warn=no_warnings(), store=url)
    assert [(p["principal"], p["requests"], p["refused"]) for p in principals] == [
        (p["principal"], p["requests"], p["refused"])
        for p in questions.key_principals(data, OTHER_KEY, warn=no_warnings(), scan=True)]
    top = questions.top(elsewhere, 3, warn=no_warnings(), store=url)
    scanned = questions.top(data, 3, warn=no_warnings(), scan=True)
    assert [(u["user"], u["total"], u["refused"]) for u in top.users] == [
        (u["user"], u["total"], u["refused"]) for u in scanned.users]
    assert sorted(f["total"] for f in top.files) == sorted(f["total"] for f in scanned.files)


def test_rows_from_before_the_columns_are_filled_by_the_migration(url: str, tmp_path: Path) -> None:
    import psycopg

    data = tmp_path / "data"
    sample(data)
    lines = list(chain_lines(data))
    with psycopg.connect(url, autocommit=True) as conn:  # as a version 1 service wrote them
        for seq, line in enumerate(lines, 1):
            conn.execute("INSERT INTO audit_records(chain_id, seq, line) VALUES ('n1:main', %s, %s)",
                         (seq, line))
        conn.execute("INSERT INTO audit_records(chain_id, seq, line) VALUES ('n1:main', %s, %s)",
                     (len(lines) + 1, b"not json"))
        with conn.transaction():
            for statement in MIGRATIONS[1][2:5]:  # the backfill, as the migration runs it
                conn.execute(statement)
    unparsable: list[int] = []
    answer = list(questions.query(data, questions.Filters(user="alice"), warn=no_warnings(), store=url,
                                  unparsable=unparsable))
    assert answer == list(review.query(data, user="alice"))
    assert unparsable == [len(lines) + 1]


def test_an_edited_row_is_detected_and_the_answer_comes_from_the_log(url: str, tmp_path: Path) -> None:
    import psycopg

    data = tmp_path / "data"
    mirrored_sample(data, url)
    with psycopg.connect(url, autocommit=True) as conn, conn.transaction():  # the schema owner's hand
        conn.execute("ALTER TABLE audit_records DISABLE TRIGGER audit_records_no_update_delete")
        assert conn.execute("UPDATE audit_records SET path = '/docs/d1/f1.txt' WHERE seq = 1").rowcount == 1
        conn.execute("ALTER TABLE audit_records ENABLE TRIGGER audit_records_no_update_delete")
    seen: list[str] = []
    filters = questions.Filters(file="/docs/d1/f1.txt")
    answer = list(questions.query(data, filters, warn=seen.append, store=url))
    assert len(seen) == 1 and "does not match its lines" in seen[0], seen
    assert answer == list(review.query(data, **filters.as_dict()))


def test_a_record_naming_nul_is_stored_and_found(url: str, tmp_path: Path) -> None:
    from datetime import timedelta

    from keyservice.context import RequestContext
    from tests.unit.test_audit_scale import ALICE, T0, build_record

    data = tmp_path / "data"
    clock = Clock()
    log = open_log(data, clock)
    clock.now = T0 + timedelta(seconds=1)
    ctx = RequestContext("nul-1", "127.0.0.1", ALICE, "kmsfs/test", {"path": "/a\x00b", "user": "alice\x00"})
    log.append(build_record(when=clock.now, ctx=ctx, operation="Decrypt", key_arn=KEY))
    write(log, clock, 2, start=50)
    log.close()
    mirror = PgMirror(url, "n1:main")
    mirror.resume(list(chain_lines(data)))  # U+0000 does not stop the copy (text columns cannot hold it)
    mirror.close()
    found = list(questions.query(data, questions.Filters(key=KEY), warn=no_warnings(), store=url))
    assert [r["request_id"] for r in found] == ["nul-1", "req-50", "req-51"]


def test_cli_list_asks_the_table_with_store(url: str, tmp_path: Path) -> None:
    data = tmp_path / "data"
    mirrored_sample(data, url)
    done = subprocess.run([sys.executable, "-m", "keyservice", "audit", "list", "--data-dir", str(data),
                           "--store", url, "--user", "bob", "--json"], capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    assert len(done.stdout.splitlines()) == len(list(review.query(data, user="bob"))) == 11


def test_prune_in_postgresql_mode_removes_the_rows_and_verify_proves_the_rest(url: str, tmp_path: Path) -> None:  # noqa: E501
    import psycopg

    from keyservice.audit import prune as audit_prune
    from keyservice.audit import segments
    from keyservice.audit.pgmirror import prune_table, table_chains, table_prunes
    from keyservice.audit.verify import verify
    from tests.unit.test_audit_scale import PUBLIC, SIGNER, T0

    data = tmp_path / "data"
    clock = Clock()
    mirror = PgMirror(url, "n1:main")
    mirror.resume([])
    log = open_log(data, clock, segment_bytes=3000, mirror=mirror.ship)
    write(log, clock, 40, step=timedelta(seconds=5))
    log.close()
    mirror.close()
    assert len(segments.segments(data)) >= 5
    assert verify(data, PUBLIC, checkpoint_every=10, lines=table_chains(url)["n1:main"]).ok
    with psycopg.connect(url, autocommit=True) as conn:  # before any prune record: nothing can go
        with pytest.raises(psycopg.errors.RaiseException, match="append-only"):
            conn.execute("DELETE FROM audit_records WHERE seq = 1")
    pruned: list[tuple[str, int] | None] = []
    result = audit_prune.prune(data, SIGNER, T0 + timedelta(seconds=100), force=True,
                               on_record=lambda record: pruned.append(prune_table(url, "main", record)))
    assert result.removed and pruned and pruned[0] is not None
    table_chain, through = pruned[0]
    lines = table_chains(url)[table_chain]
    assert lines == list(chain_lines(data))  # the table's copy starts where the log now starts
    record = table_prunes(url)[table_chain]
    checked = verify(data, PUBLIC, checkpoint_every=10, lines=lines, pruned=record)
    assert checked.ok, checked.problems
    assert checked.records + record["records"] == 40
    assert not verify(data, PUBLIC, checkpoint_every=10, lines=lines).ok  # without the record: broken
    with psycopg.connect(url, autocommit=True) as conn:  # rows after the prune record stay
        with pytest.raises(psycopg.errors.RaiseException, match="append-only"):
            conn.execute("DELETE FROM audit_records WHERE seq = %s", (through + 1,))
    # The service restarts on the pruned log: the table is still a prefix-free copy of it.
    again = PgMirror(url, "n1:main")
    assert again.resume(list(chain_lines(data))) == 0
    log = open_log(data, clock, segment_bytes=3000, mirror=again.ship)
    write(log, clock, 3, start=100)
    log.close()
    again.close()
    assert table_chains(url)[table_chain] == list(chain_lines(data))
