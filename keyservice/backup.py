"""Backing up a data directory while it serves, and restoring it into a new one (docs/OPERATIONS.md).

A backup is a directory holding:

* ``keyservice.db``: SQLite's online backup of the store (a consistent snapshot taken while
  other processes keep writing; its sealed columns stay sealed: useless without the root key);
* the sealed and key files of the data directory (``root.json``, ``dev-root.key`` in dev mode,
  ``audit-signing.key``/``.pub``, ``tls/``, ``store.url``), copied as they are;
* ``backup.json``: when it was taken and the *audit log position* at that moment: per chain,
  the log's length in bytes and the hash of its last complete line, so an auditor can tell
  which records precede the snapshot. The audit logs themselves are not part of the backup
  (they are append-only records to archive on their own schedule).

The root key is never in a backup (unless the directory is a dev one, whose root key lives in it).
A store on PostgreSQL is backed up with ``pg_dump``; ``backup`` then copies the sealed files only.

``restore`` copies a backup into a new data directory, checks the store's integrity, and starts
it with an empty audit directory (its audit log starts afresh, signed with the same key).
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from keyservice.audit import signing
from keyservice.audit.records import AUDIT_DIR, audit_path, chains, line_hash
from keyservice.files import write_atomic
from keyservice.http.tls import TLS_DIR
from keyservice.store import engine, rootkey
from keyservice.store.sqlite_schema import DB_NAME

MANIFEST = "backup.json"
FILES = (
    rootkey.ROOT_CONFIG_NAME,
    rootkey.DEV_KEY_NAME,
    signing.PRIVATE_FILE,
    signing.PUBLIC_FILE,
    engine.STORE_URL_FILE,
)


class BackupError(Exception):
    """A backup or restore that cannot be done (one line for the operator)."""


def _audit_position(data_dir: Path) -> dict[str, Any]:
    position: dict[str, Any] = {}
    for chain in chains(data_dir):
        data = audit_path(data_dir, chain).read_bytes()
        end = data.rfind(b"\n") + 1
        last = data[:end].rsplit(b"\n", 2)[-2] if end else b""
        position[chain] = {"bytes": end, "last_line_hash": line_hash(last) if last else None}
    return position


def _copy_files(source: Path, target: Path) -> list[str]:
    copied = []
    for name in FILES:
        if (source / name).exists():
            shutil.copy2(source / name, target / name)
            copied.append(name)
    if (source / TLS_DIR).is_dir():
        shutil.copytree(source / TLS_DIR, target / TLS_DIR)
        copied.append(TLS_DIR + "/")
    return copied


def backup(data_dir: Path, out: Path) -> dict[str, Any]:
    """Write a backup of ``data_dir`` into the new directory ``out``; returns the manifest."""
    data_dir, out = Path(data_dir), Path(out)
    if not (data_dir / rootkey.ROOT_CONFIG_NAME).exists():
        raise BackupError(f"{data_dir} is not an initialised keyservice data directory")
    if out.exists():
        raise BackupError(f"{out} already exists; a backup goes into a new directory")
    url = engine.recorded_url(data_dir)
    out.mkdir(mode=0o700, parents=True)
    manifest: dict[str, Any] = {"version": 1, "created": datetime.now(UTC).isoformat(), "store": "sqlite"}
    if url is None:
        source = sqlite3.connect(f"file:{data_dir / DB_NAME}?mode=ro", uri=True, timeout=30)
        target_path = out / DB_NAME
        os.close(os.open(target_path, os.O_WRONLY | os.O_CREAT, 0o600))
        target = sqlite3.connect(target_path)
        try:
            source.backup(target)  # one step: a consistent snapshot while others write
        finally:
            target.close()
            source.close()
    else:
        manifest["store"] = "postgresql"
        manifest["note"] = "the store is on PostgreSQL: back it up with pg_dump (docs/OPERATIONS.md)"
    manifest["audit_position"] = _audit_position(data_dir)
    manifest["files"] = _copy_files(data_dir, out)
    write_atomic(out / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode(), mode=0o600)
    return manifest


def restore(backup_dir: Path, data_dir: Path) -> dict[str, Any]:
    """Restore ``backup_dir`` into the new (or empty) data directory ``data_dir``."""
    backup_dir, data_dir = Path(backup_dir), Path(data_dir)
    try:
        manifest = json.loads((backup_dir / MANIFEST).read_text())
    except (OSError, ValueError) as error:
        raise BackupError(f"{backup_dir} is not a keyservice backup ({error})") from None
    if data_dir.exists() and any(data_dir.iterdir()):
        raise BackupError(f"{data_dir} is not empty; restore into a new data directory")
    rootkey.ensure_private_dir(data_dir)
    if manifest.get("store") == "sqlite":
        db = backup_dir / DB_NAME
        check = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        try:
            result = check.execute("PRAGMA integrity_check").fetchone()[0]
        finally:
            check.close()
        if result != "ok":
            raise BackupError(f"the backup's store is damaged: {result}")
        shutil.copy2(db, data_dir / DB_NAME)
    _copy_files(backup_dir, data_dir)
    rootkey.ensure_private_dir(data_dir / AUDIT_DIR)
    return manifest
