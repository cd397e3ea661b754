"""``kmsfs fsck``: verify every header and block through the key service and print what is
damaged, pending, left over or repaired."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from kmsfs.cli.common import CliError, _tool_client, _tool_names
from kmsfs.keyclient import KeyServiceUnavailable

if TYPE_CHECKING:
    from kmsfs.fsck import FsckReport


def cmd_fsck(args: argparse.Namespace) -> int:
    """Verify every header and block; exit 1 if anything is damaged."""
    from kmsfs.fsck import fsck

    config, client = _tool_client(args.cipherdir, args)
    try:
        names = _tool_names(config, client, "fsck", "/")
        report = fsck(args.cipherdir, client, progress=not args.quiet, names=names,
                      repair=getattr(args, "repair", False))
    except KeyServiceUnavailable as exc:
        raise CliError(f"fsck stopped: {exc}") from None
    finally:
        client.close()
    _print_name_problems(report)
    for rel, problems in sorted(report.damaged.items()):
        for problem in problems:
            print(f"DAMAGED {rel}: {problem}")
    for rel in report.pending:
        print(f"PENDING {rel}: interrupted size change, completed at its next open")
    for rel in report.temporaries:
        print(f"LEFTOVER {rel}: temporary file of an interrupted create (safe to delete)")
    _print_backup_notes(report)
    state = "clean" if report.clean else f"{len(report.damaged)} damaged file(s)"
    if report.bad_names:
        state += f", {len(report.bad_names)} undecryptable name(s)"
    print(f"fsck: {report.files} files, {report.blocks} blocks checked: {state}")
    return 0 if report.clean else 1


def _print_backup_notes(report: FsckReport) -> None:
    """fsck's findings that do not make a file unreadable: missing xattrs, old formats, repairs."""
    for rel, notes in sorted(report.notes.items()):
        for note in notes:
            print(f"NOTE {rel}: {note}")
    for rel in report.repaired:
        print(f"REPAIRED {rel}: header xattr restored from the in-file copy")


def _print_name_problems(report: Any) -> None:
    for path, why in report.bad_names:
        print(f"BADNAME {path}: {why}")
    for path in report.orphan_names:
        print(f"ORPHAN {path}: long-name side entry without its entry (left by a crash; safe to delete)")
