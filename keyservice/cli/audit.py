"""``keyservice audit``: list, files, verify. Offline: reads the data directory, server running or not.

Review commands must never answer "nobody" by mistake: a data directory that does not exist or
has no audit log is an error (exit 1), not an empty table, and lines of the log that cannot be
parsed are reported on stderr and in the exit status (3) rather than skipped in silence.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from keyservice.audit import digest as audit_digest
from keyservice.audit import pgmirror as audit_pgmirror
from keyservice.audit import records as audit_records
from keyservice.audit import review as audit_review
from keyservice.audit import signing as audit_signing
from keyservice.audit import verify as audit_verify
from keyservice.audit.records import DEFAULT_CHECKPOINT_EVERY, DEFAULT_CHECKPOINT_SECONDS, audit_path
from keyservice.cli.common import CliError
from keyservice.store import engine

# Exit status of list/files when some log lines could not be parsed (the output is incomplete).
EXIT_UNPARSABLE = 3


def _time(value: str) -> str:
    """argparse type: a time ``parse_time`` accepts (parsed again with --local in ``_filters``)."""
    try:
        audit_review.parse_time(value)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return value


def _filters(args: argparse.Namespace) -> dict[str, object]:
    since = audit_review.parse_time(args.since, local=args.local) if args.since else None
    until = audit_review.parse_time(args.until, local=args.local) if args.until else None
    return {
        "key": args.key, "operation": args.operation, "since": since, "until": until,
        "file": args.file, "principal": args.principal, "outcome": args.outcome, "user": args.user,
        "file_id": args.file_id,
    }  # fmt: skip


def _print(items: Iterable[Mapping[str, Any]], as_json: bool, table: Callable[[Any], str]) -> None:
    if as_json:
        for item in items:
            print(json.dumps(item, sort_keys=True))
    else:
        print(table(items), end="")


def _readable_log(data_dir: Path) -> None:
    """CliError unless ``data_dir`` is a keyservice data directory with an audit log."""
    if not data_dir.is_dir():
        raise CliError(f"{data_dir}: no such data directory")
    if not audit_records.chains(data_dir):
        raise CliError(f"{data_dir} has no audit log ({audit_path(data_dir)}): not a keyservice data "
                       "directory, or never served")


def _report_unparsable(data_dir: Path, lines: list[int]) -> int:
    if not lines:
        return 0
    shown = ", ".join(map(str, lines[:10])) + (", ..." if len(lines) > 10 else "")
    print(f"keyservice: {len(lines)} line(s) of {audit_path(data_dir)} could not be parsed and are "
          f"not listed (line {shown}); run keyservice audit verify", file=sys.stderr)
    return EXIT_UNPARSABLE


def cmd_list(args: argparse.Namespace) -> int:
    data_dir = Path(args.data_dir)
    _readable_log(data_dir)
    unparsable: list[int] = []
    records = audit_review.query(data_dir, **_filters(args), unparsable=unparsable)  # type: ignore[arg-type]
    _print(records, args.json, lambda rows: audit_review.format_table(rows, local=args.local))
    return _report_unparsable(data_dir, unparsable)


def cmd_files(args: argparse.Namespace) -> int:
    data_dir = Path(args.data_dir)
    _readable_log(data_dir)
    unparsable: list[int] = []
    records = audit_review.query(data_dir, **_filters(args), unparsable=unparsable)  # type: ignore[arg-type]
    _print(audit_review.files_summary(records), args.json,
           lambda rows: audit_review.format_files(rows, local=args.local))
    return _report_unparsable(data_dir, unparsable)


def cmd_verify(args: argparse.Namespace) -> int:
    data_dir = Path(args.data_dir)
    if not data_dir.is_dir():
        print(f"keyservice: cannot check: {data_dir}: no such data directory", file=sys.stderr)
        return 2
    key_path = Path(args.public_key) if args.public_key else audit_signing.public_path(data_dir)
    try:
        public_key = audit_signing.load_public(key_path)
    except (OSError, ValueError) as error:
        print(f"keyservice: cannot check: cannot load the audit public key {key_path}: {error}",
              file=sys.stderr)
        return 2
    chains = audit_records.chains(data_dir) or [audit_records.MAIN_CHAIN]
    failed = False
    for chain in chains:
        report = audit_verify.verify(
            data_dir,
            public_key,
            checkpoint_every=args.checkpoint_every,
            checkpoint_seconds=args.checkpoint_seconds,
            chain=chain,
        )
        label = "" if chains == [audit_records.MAIN_CHAIN] else f"chain {chain}: "
        if chain == chains[0]:
            pinned = "pinned" if args.public_key else f"from {key_path}; compare with your own copy"
            print(f"signing key fingerprint {report.fingerprint} ({pinned})")
        print(
            f"{label}{report.records} records, {report.checkpoints} checkpoints, "
            f"{report.unsealed} not yet sealed"
        )
        for note in report.notes:
            print(f"{label}note: {note}")
        if report.ok:
            print(f"{label}OK: the audit log is intact")
            continue
        failed = True
        print(f"{label}TAMPERED: {report.problems[0]}", file=sys.stderr)
        for problem in report.problems[1:]:
            print(f"{label}also: {problem}", file=sys.stderr)
    failed = _verify_table(data_dir, public_key, args) or failed
    count, problems = audit_digest.verify_digests(data_dir, public_key)
    if count:
        for problem in problems:
            print(f"TAMPERED: {problem}", file=sys.stderr)
        if not problems:
            print(f"digests: {count}, every chain they name is intact")
        failed = failed or bool(problems)
    return 1 if failed else 0


def _verify_table(data_dir: Path, public_key: Any, args: argparse.Namespace) -> bool:
    """With the store on PostgreSQL: check every chain of every node in ``audit_records`` too
    (hash chain and signed checkpoints; True if one is tampered)."""
    url = args.store or engine.recorded_url(data_dir)
    if not url:
        return False
    try:
        chains = audit_pgmirror.table_chains(url)
    except Exception as error:  # noqa: BLE001 - any driver error is one line for the operator
        print(f"cannot read the audit table: {str(error).strip()[:200]}")
        return True
    failed = False
    for chain, lines in sorted(chains.items()):
        report = audit_verify.verify(
            data_dir, public_key, checkpoint_every=args.checkpoint_every,
            checkpoint_seconds=args.checkpoint_seconds, lines=lines,
        )  # fmt: skip
        state = "OK" if report.ok else f"TAMPERED: {report.problems[0]}"
        print(f"table chain {chain}: {report.records} records, {report.checkpoints} checkpoints: {state}")
        failed = failed or not report.ok
    return failed


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the ``audit`` command group to the top-level parser."""
    parser = sub.add_parser("audit", help="review and verify the audit log (works offline)")
    commands = parser.add_subparsers(dest="audit_command", required=True)
    for name, func, text in (
        ("list", cmd_list, "list audit records, oldest first"),
        ("files", cmd_files, "who created and opened which file how often, through which key"),
    ):
        p = commands.add_parser(name, help=text)
        p.add_argument("--data-dir", required=True, help="the key service's data directory (required)")
        p.add_argument("--key", help="key id, ARN, alias name or alias ARN (default: any)")
        p.add_argument("--operation", help="e.g. Decrypt (default: any)")
        p.add_argument("--principal", help="principal ARN or access key id (default: any)")
        p.add_argument("--outcome", choices=("success", "error"), help="(default: both)")
        p.add_argument("--user", help="local user behind a kmsfs open: uid or user name (default: any)")
        p.add_argument("--file", help="path inside a kmsfs mount (a directory matches everything below "
                       "it) (default: any)")
        p.add_argument("--file-id", help="kmsfs file id (hex, from the encryption context): joins a "
                       "pooled GenerateDataKey to the create that used it and the file's opens "
                       "(default: any)")
        p.add_argument("--since", type=_time, help="ISO 8601 time, 30m / 1h / 7d ago, today or yesterday "
                       "(from midnight, UTC or --local) (default: the beginning)")
        p.add_argument("--until", type=_time, help="same forms as --since, exclusive (default: now)")
        p.add_argument("--json", action="store_true",
                       help="one JSON object per line, times as recorded in UTC (default: a table)")
        zone = p.add_mutually_exclusive_group()
        zone.add_argument("--utc", dest="local", action="store_false",
                          help="show times in UTC, as recorded (the default)")
        zone.add_argument("--local", dest="local", action="store_true",
                          help="show table times in this host's time zone, and read naive --since/--until "
                               "and today/yesterday in it (default: UTC)")
        p.set_defaults(func=func, local=False)
    verify = commands.add_parser("verify", help="check the hash chain, signed checkpoints and head")
    verify.add_argument("--data-dir", required=True, help="the key service's data directory (required)")
    verify.add_argument("--public-key", help="pinned PEM public key (default: DATA_DIR/audit-signing.pub)")
    verify.add_argument(
        "--store",
        default=os.environ.get(engine.STORE_ENV) or None,
        metavar="URL",
        help="also verify every chain in this PostgreSQL store's audit table (default: the data dir's)",
    )
    verify.add_argument("--checkpoint-every", type=int, default=DEFAULT_CHECKPOINT_EVERY,
                        help=f"records per checkpoint the server used (default {DEFAULT_CHECKPOINT_EVERY})")
    verify.add_argument("--checkpoint-seconds", type=float, default=DEFAULT_CHECKPOINT_SECONDS,
                        help="seconds per checkpoint the server used "
                             f"(default {DEFAULT_CHECKPOINT_SECONDS:g})")
    verify.set_defaults(func=cmd_verify)
