"""The stores: records round-trip, quota and uniqueness are atomic, threads are safe, files private.

Every test taking ``store`` runs on both engines: SQLite and a real PostgreSQL (tests/pg_server.py);
those taking ``sqlite_store`` check what only SQLite has (pragmas, the file, outside connections).
"""

from __future__ import annotations

import sqlite3
import stat
import threading
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from keyservice.errors import AlreadyExistsException, LimitExceededException, NotFoundException
from keyservice.store.base import material_aad, secret_aad
from keyservice.store.model import (
    DISABLED,
    ENABLED,
    AliasRecord,
    CredentialRecord,
    KeyRecord,
    KeyVersionRecord,
)
from keyservice.store.sqlite import SQLiteStore
from keyservice.store.sqlite_schema import SCHEMA_VERSION

T0 = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)


def make_key(key_id: str | None = None, *, manager: str = "CUSTOMER") -> tuple[KeyRecord, KeyVersionRecord]:
    key_id = key_id or str(uuid.uuid4())
    key = KeyRecord(
        key_id=key_id,
        arn=f"arn:aws:kms:us-east-1:111122223333:key/{key_id}",
        account_id="111122223333",
        region="us-east-1",
        description="d",
        state=ENABLED,
        origin="AWS_KMS",
        key_manager=manager,
        creation_date=T0,
        tags=[{"TagKey": "k", "TagValue": "v"}],
    )
    return key, KeyVersionRecord(key_id, 1, T0, b"sealed-" + key_id.encode())


@pytest.fixture
def sqlite_store(tmp_path: Path):
    s = SQLiteStore(tmp_path / "ks.db")
    yield s
    s.close()


@pytest.fixture(params=["sqlite", "postgres"])
def store(request: pytest.FixtureRequest, tmp_path: Path):
    if request.param == "sqlite":
        s = SQLiteStore(tmp_path / "ks.db")
    else:
        from keyservice.store.postgres import PostgresStore

        s = PostgresStore(request.getfixturevalue("pg_url"), watch=True)
    yield s
    s.close()


def test_schema_and_pragmas(sqlite_store: SQLiteStore, tmp_path: Path) -> None:
    store = sqlite_store
    assert store.get_meta("schema_version") == str(SCHEMA_VERSION)
    conn = store._conn()
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert stat.S_IMODE((tmp_path / "ks.db").stat().st_mode) == 0o600


def test_meta(store: SQLiteStore) -> None:
    assert store.get_meta("x") is None
    store.set_meta("x", "1")
    store.set_meta("x", "2")
    assert store.get_meta("x") == "2"


def test_key_roundtrip_and_update(store: SQLiteStore) -> None:
    key, version = make_key()
    store.create_key(key, version, max_customer_keys=10)
    got = store.get_key(key.key_id)
    assert got == key
    assert got is not None and got.creation_date == T0 and got.enabled
    got.state = DISABLED
    got.description = "new"
    got.deletion_date = T0 + timedelta(days=7)
    store.update_key(got)
    again = store.get_key(key.key_id)
    assert again is not None and again.state == DISABLED and again.description == "new"
    assert again.deletion_date == T0 + timedelta(days=7)
    assert store.get_key(str(uuid.uuid4())) is None


def test_update_missing_key(store: SQLiteStore) -> None:
    key, _ = make_key()
    with pytest.raises(NotFoundException):
        store.update_key(key)


def test_versions(store: SQLiteStore) -> None:
    key, v1 = make_key()
    store.create_key(key, v1, max_customer_keys=10)
    v2 = KeyVersionRecord(key.key_id, 2, T0, b"sealed2")
    store.add_key_version(v2)
    assert store.get_key_version(key.key_id, 1) == v1
    assert store.latest_key_version(key.key_id) == v2
    assert store.get_key_version(key.key_id, 3) is None
    with pytest.raises(store._integrity_errors):
        store.add_key_version(v2)


def test_quota_counts_customer_keys_only(store: SQLiteStore) -> None:
    for _ in range(3):
        store.create_key(*make_key(), max_customer_keys=3)
    with pytest.raises(LimitExceededException):
        store.create_key(*make_key(), max_customer_keys=3)
    store.create_key(*make_key(manager="AWS"), max_customer_keys=3)
    assert store.count_customer_keys() == 3


def test_quota_is_atomic_under_threads(store: SQLiteStore) -> None:
    errors: list[Exception] = []

    def worker() -> None:
        for _ in range(5):
            try:
                store.create_key(*make_key(), max_customer_keys=12)
            except LimitExceededException as exc:
                errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert store.count_customer_keys() == 12
    assert len(errors) == 40 - 12


def test_list_keys_paging(store: SQLiteStore) -> None:
    ids = sorted(str(uuid.uuid4()) for _ in range(5))
    for key_id in ids:
        store.create_key(*make_key(key_id), max_customer_keys=10)
    first = store.list_keys(after=None, limit=2)
    assert [k.key_id for k in first] == ids[:2]
    rest = store.list_keys(after=first[-1].key_id, limit=10)
    assert [k.key_id for k in rest] == ids[2:]


def test_aliases(store: SQLiteStore) -> None:
    key, v = make_key()
    other, ov = make_key()
    store.create_key(key, v, max_customer_keys=10)
    store.create_key(other, ov, max_customer_keys=10)
    store.create_alias(AliasRecord("alias/b", key.key_id, T0, T0))
    store.create_alias(AliasRecord("alias/a", other.key_id, T0, T0))
    with pytest.raises(AlreadyExistsException):
        store.create_alias(AliasRecord("alias/a", key.key_id, T0, T0))
    with pytest.raises(NotFoundException):
        store.create_alias(AliasRecord("alias/c", str(uuid.uuid4()), T0, T0))  # foreign key
    assert [a.name for a in store.list_aliases(key_id=None, after=None, limit=10)] == ["alias/a", "alias/b"]
    assert [a.name for a in store.list_aliases(key_id=key.key_id, after=None, limit=10)] == ["alias/b"]
    assert [a.name for a in store.list_aliases(key_id=None, after="alias/a", limit=10)] == ["alias/b"]
    later = T0 + timedelta(hours=1)
    store.update_alias("alias/b", other.key_id, later)
    alias = store.get_alias("alias/b")
    assert alias is not None and alias.target_key_id == other.key_id
    assert alias.last_updated_date == later and alias.creation_date == T0
    store.delete_alias("alias/b")
    assert store.get_alias("alias/b") is None
    with pytest.raises(NotFoundException):
        store.delete_alias("alias/b")
    with pytest.raises(NotFoundException):
        store.update_alias("alias/zz", key.key_id, later)


def test_credentials(store: SQLiteStore) -> None:
    cred = CredentialRecord(
        "AKIAAAAAAAAAAAAAAAAA", "arn:aws:iam::111122223333:root", "111122223333", b"s", T0
    )
    store.add_credential(cred)
    assert store.get_credential(cred.access_key_id) == cred
    assert store.get_credential("AKIAXXXXXXXXXXXXXXXX") is None
    assert store.list_credentials() == [cred]
    with pytest.raises(AlreadyExistsException):
        store.add_credential(cred)


def test_persistence_across_reopen(tmp_path: Path) -> None:
    s = SQLiteStore(tmp_path / "ks.db")
    key, v = make_key()
    s.create_key(key, v, max_customer_keys=10)
    s.close()
    s2 = SQLiteStore(tmp_path / "ks.db")
    try:
        assert s2.get_key(key.key_id) == key
    finally:
        s2.close()


def test_concurrent_readers_and_writers(store: SQLiteStore) -> None:
    key, v = make_key()
    store.create_key(key, v, max_customer_keys=10)
    failures: list[BaseException] = []

    def writer(n: int) -> None:
        try:
            for i in range(20):
                store.set_meta(f"w{n}", str(i))
        except BaseException as exc:  # pragma: no cover - reported below
            failures.append(exc)

    def reader() -> None:
        try:
            for _ in range(50):
                assert store.get_key(key.key_id) is not None
        except BaseException as exc:  # pragma: no cover
            failures.append(exc)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    threads += [threading.Thread(target=reader) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []
    assert all(store.get_meta(f"w{n}") == "19" for n in range(4))


def test_aad_helpers_bind_identity() -> None:
    assert material_aad("a", 1) != material_aad("a", 2)
    assert material_aad("a", 1) != material_aad("b", 1)
    assert secret_aad("AKIA1") != secret_aad("AKIA2")


def test_closed_store_refuses(tmp_path: Path) -> None:
    s = SQLiteStore(tmp_path / "ks.db")
    s.close()
    with pytest.raises(RuntimeError):
        s.get_meta("x")


def test_memoised_lookups_see_every_commit(sqlite_store: SQLiteStore, tmp_path: Path) -> None:
    """The per-thread memo never serves a value older than the last commit, from any connection."""
    store = sqlite_store
    key, version = make_key()
    store.create_key(key, version, max_customer_keys=10)
    first = store.get_key(key.key_id)
    assert first is not None
    first.description = "edited by the caller"  # must not leak into the memo
    assert store.get_key(key.key_id).description == "d"
    # A write through this store, from another thread (its own connection).
    changed = store.get_key(key.key_id)
    changed.state = DISABLED
    worker = threading.Thread(target=store.update_key, args=(changed,))
    worker.start()
    worker.join()
    assert store.get_key(key.key_id).state == DISABLED
    # A write from another process's connection (as `keyservice principal` makes offline).
    other = sqlite3.connect(tmp_path / "ks.db", isolation_level=None)
    other.execute("UPDATE keys SET description = 'from outside' WHERE key_id = ?", (key.key_id,))
    other.close()
    assert store.get_key(key.key_id).description == "from outside"
    # A write on this very thread's connection.
    mine = store.get_key(key.key_id)
    mine.description = "mine"
    store.update_key(mine)
    assert store.get_key(key.key_id).description == "mine"
    assert store.latest_key_version(key.key_id) == version


def test_one_read_check_per_request_still_sees_its_own_writes(
    sqlite_store: SQLiteStore, tmp_path: Path
) -> None:
    store = sqlite_store
    key, version = make_key()
    store.create_key(key, version, max_customer_keys=10)
    other = sqlite3.connect(tmp_path / "ks.db", isolation_level=None)
    with store.one_read_check():
        assert store.get_key(key.key_id).description == "d"
        mine = store.get_key(key.key_id)
        mine.description = "mine"
        store.update_key(mine)  # a write through the store empties the memo at once
        assert store.get_key(key.key_id).description == "mine"
        other.execute("UPDATE keys SET description = 'outside' WHERE key_id = ?", (key.key_id,))
    # The next request (or any lookup outside a request) sees the outside commit.
    with store.one_read_check():
        assert store.get_key(key.key_id).description == "outside"
    other.close()


def test_transaction_commits_as_one_and_sees_its_own_writes(store: SQLiteStore) -> None:
    key, v = make_key()
    store.create_key(key, v, max_customer_keys=10)
    with store.transaction():
        mine = store.get_key(key.key_id)
        mine.description = "in the transaction"
        store.update_key(mine)
        assert store.get_key(key.key_id).description == "in the transaction"
        with pytest.raises(AlreadyExistsException):  # a failed write undoes only itself
            store.add_credential(CredentialRecord("AKIAB", "arn:aws:iam::1:root", "1", b"s", T0))
            store.add_credential(CredentialRecord("AKIAB", "arn:aws:iam::1:root", "1", b"s", T0))
    assert store.get_key(key.key_id).description == "in the transaction"
    assert store.get_credential("AKIAB") is not None
    with pytest.raises(RuntimeError), store.transaction():
        mine = store.get_key(key.key_id)
        mine.description = "rolled back"
        store.update_key(mine)
        raise RuntimeError("the handler failed")
    assert store.get_key(key.key_id).description == "in the transaction"


def test_destroyed_customer_key_frees_its_quota(store: SQLiteStore) -> None:
    key, v = make_key()
    store.create_key(key, v, max_customer_keys=1)
    key.state = "PendingDeletion"
    key.deletion_date = T0
    store.update_key(key)
    assert store.destroy_key(key.key_id, T0 + timedelta(seconds=1))
    assert not store.destroy_key(key.key_id, T0 + timedelta(seconds=1))
    store.create_key(*make_key(), max_customer_keys=1)
    with pytest.raises(LimitExceededException):
        store.create_key(*make_key(), max_customer_keys=1)


def test_the_scheduler_lease_is_held_by_one_node_and_fences_the_last(pg_url: str) -> None:
    """Two nodes on one database: one holds the lease; when it lapses the other takes it with a new
    token, and a transition of the old holder inside ``fenced`` is refused and rolled back."""
    from keyservice.store.base import LeaseLostError
    from keyservice.store.postgres import PostgresStore

    first, second = PostgresStore(pg_url), PostgresStore(pg_url)
    try:
        key, v = make_key()
        first.create_key(key, v, max_customer_keys=10)
        token = first.acquire_scheduler_lease("first", 0.5)
        assert token is not None
        assert first.acquire_scheduler_lease("first", 0.5) == token  # renewed, same token
        assert second.acquire_scheduler_lease("second", 0.5) is None
        with first.fenced("first", token), first.transaction():
            mine = first.get_key(key.key_id)
            mine.description = "while holding the lease"
            first.update_key(mine)
        import time

        time.sleep(0.7)
        taken = second.acquire_scheduler_lease("second", 30)
        assert taken is not None and taken > token
        with pytest.raises(LeaseLostError), first.fenced("first", token), first.transaction():
            mine = first.get_key(key.key_id)
            mine.description = "after losing it"
            first.update_key(mine)
        assert second.get_key(key.key_id).description == "while holding the lease"
        assert first.acquire_scheduler_lease("first", 30) is None
    finally:
        first.close()
        second.close()
