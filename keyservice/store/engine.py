"""Which engine holds a data directory's store, and opening it.

Without a URL the store is SQLite in ``DATA_DIR/keyservice.db`` (the embedded default). With a
``postgresql://`` URL (``--store`` or ``KEYSERVICE_STORE``) it is that PostgreSQL database;
``keyservice init`` records the URL in ``DATA_DIR/store.url`` (0600) so every later command on
that directory (``serve``, ``principal``, a copy of the directory on a second node) finds the same
database without being told again. Keep passwords out of the URL: libpq reads ``PGPASSWORD`` and
``~/.pgpass``.
"""

from __future__ import annotations

import os
from pathlib import Path

from keyservice.files import write_atomic
from keyservice.store.base import Store
from keyservice.store.sqlite import SQLiteStore
from keyservice.store.sqlite_schema import DB_NAME

STORE_URL_FILE = "store.url"
STORE_ENV = "KEYSERVICE_STORE"


class StoreUrlError(ValueError):
    """A ``--store`` value this release cannot use."""


def is_postgres(url: str | None) -> bool:
    return bool(url) and str(url).startswith(("postgresql://", "postgres://"))


def check_url(url: str | None) -> str | None:
    if url is None or url == "" or url == "sqlite":
        return None
    if not is_postgres(url):
        raise StoreUrlError("--store must be a postgresql://... URL (or omitted for SQLite in the data dir)")
    return url


def recorded_url(data_dir: Path) -> str | None:
    path = Path(data_dir) / STORE_URL_FILE
    return path.read_text().strip() or None if path.exists() else None


def resolve_url(data_dir: Path, url: str | None) -> str | None:
    """The store URL to use for ``data_dir``: the one given, else the recorded one, else None (SQLite)."""
    return check_url(url) or recorded_url(data_dir)


def record_url(data_dir: Path, url: str | None) -> None:
    if url is not None:
        write_atomic(Path(data_dir) / STORE_URL_FILE, (url + "\n").encode(), mode=0o600)


def store_exists(data_dir: Path, url: str | None) -> bool:
    """Could ``data_dir``'s store hold anything yet (for SQLite: is its file there)?"""
    return url is not None or (Path(data_dir) / DB_NAME).exists()


def open_store(data_dir: Path, url: str | None, *, watch: bool = False, label: str | None = None) -> Store:
    """Open (creating or migrating the schema) the store of ``data_dir``; ``watch`` for serving
    processes on PostgreSQL (``postgres_nodes.NodeWatch``)."""
    if url is None:
        return SQLiteStore(Path(data_dir) / DB_NAME)
    try:
        from keyservice.store.postgres import PostgresStore
    except ImportError as error:
        raise StoreUrlError(
            f"PostgreSQL needs the postgres extra: pip install 'kmsfs[postgres]' ({error})"
        ) from None
    try:
        return PostgresStore(url, watch=watch, label=label or f"{os.uname().nodename}:{os.getpid()}")
    except Exception as error:
        if type(error).__module__.startswith(("psycopg", "psycopg_pool")):
            raise StoreUrlError(f"cannot open the PostgreSQL store: {str(error).strip()[:300]}") from None
        raise
