"""``keyservice backup`` and ``keyservice restore`` (keyservice/backup.py; docs/OPERATIONS.md)."""

from __future__ import annotations

import argparse
from pathlib import Path

from keyservice import backup
from keyservice.cli.common import CliError


def cmd_backup(args: argparse.Namespace) -> int:
    try:
        manifest = backup.backup(Path(args.data_dir), Path(args.out))
    except (backup.BackupError, OSError) as error:
        raise CliError(str(error)) from None
    chains = ", ".join(f"{c} at byte {p['bytes']}" for c, p in manifest["audit_position"].items()) or "none"
    print(f"backed up {args.data_dir} to {args.out} (store: {manifest['store']}; audit position: {chains})")
    if manifest.get("note"):
        print(f"note: {manifest['note']}")
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    try:
        manifest = backup.restore(Path(args.backup), Path(args.data_dir))
    except (backup.BackupError, OSError) as error:
        raise CliError(str(error)) from None
    created = manifest.get("created")
    print(f"restored the backup of {created} into {args.data_dir} (a fresh audit log starts there)")
    return 0


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("backup", help="back up a data directory while it serves (SQLite online backup)")
    p.add_argument("--data-dir", required=True, help="the data directory to back up (required)")
    p.add_argument("out", metavar="OUT", help="new directory to write the backup into (required)")
    p.set_defaults(func=cmd_backup)
    p = sub.add_parser("restore", help="restore a backup into a new data directory")
    p.add_argument("backup", metavar="BACKUP", help="a directory written by `keyservice backup` (required)")
    p.add_argument("--data-dir", required=True, help="the new (or empty) data directory (required)")
    p.set_defaults(func=cmd_restore)
