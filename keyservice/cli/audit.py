"""``keyservice audit``: list, files, key, principals, verify, reindex, export, prune.

Offline: reads the data directory, server running or not (prune alone needs the root key, to sign
its record).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from keyservice.audit import export as audit_export
from keyservice.audit import index as audit_index
from keyservice.audit import prune as audit_prune
from keyservice.audit import questions
from keyservice.audit import review as audit_review
from keyservice.audit import signing as audit_signing
from keyservice.audit import verify as audit_verify
from keyservice.audit.records import DEFAULT_CHECKPOINT_EVERY, DEFAULT_CHECKPOINT_SECONDS
from keyservice.cli.common import CliError, root_source
from keyservice.files import write_atomic
from keyservice.store import rootkey

VERIFY_STATE = "audit-verified.json"  # --since-last: outside the log directory


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def _time(value: str):  # noqa: ANN202 - argparse type
    try:
        return audit_review.parse_time(value)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _filters(args: argparse.Namespace) -> dict[str, object]:
    return {
        "key": args.key, "operation": args.operation, "since": args.since, "until": args.until,
        "file": args.file, "principal": args.principal, "outcome": args.outcome, "user": args.user,
        "file_id": args.file_id,
    }  # fmt: skip


def _print(items: Iterable[Mapping[str, Any]], as_json: bool, table: Callable[[Any], str]) -> None:
    if as_json:
        for item in items:
            print(json.dumps(item, sort_keys=True))
    else:
        print(table(items), end="")


def _query(args: argparse.Namespace) -> Iterable[dict[str, Any]]:
    filters = questions.Filters(**_filters(args))  # type: ignore[arg-type]
    return questions.query(Path(args.data_dir), filters, warn=_warn, scan=args.scan)


def cmd_list(args: argparse.Namespace) -> int:
    _print(_query(args), args.json, audit_review.format_table)
    return 0


def cmd_files(args: argparse.Namespace) -> int:
    if args.top is not None:
        top = questions.top(Path(args.data_dir), args.top, since=args.since, until=args.until, warn=_warn,
                            scan=args.scan)
        if args.json:
            print(json.dumps(top.__dict__, sort_keys=True))
            return 0
        print(f"period: {top.since or 'start'} .. {top.until or 'now'}")
        for title, rows, name in (("busiest files", top.files, "path"), ("busiest users", top.users, "user")):
            print(f"{title}:")
            table = [(name.upper(), "TOTAL", "OPENS", "CREATED", "REFUSED")]
            table += [(str(r[name]), str(r["total"]), str(r["opens"]), str(r["created"]), str(r["refused"]))
                      for r in rows]
            print(audit_review._render(table), end="")
        return 0
    _print(audit_review.files_summary(_query(args)), args.json, audit_review.format_files)
    return 0


def cmd_key(args: argparse.Namespace) -> int:
    timeline = questions.key_timeline(Path(args.data_dir), args.key_id, since=args.since, until=args.until,
                                      warn=_warn, scan=args.scan)
    if args.json:
        for event in timeline["events"]:
            print(json.dumps(event, sort_keys=True))
        print(json.dumps({"successful_uses": timeline["uses"]}))
        return 0
    print(audit_review.format_table(timeline["events"]), end="")
    print(f"{timeline['uses']} successful cryptographic uses besides these events")
    return 0


def cmd_principals(args: argparse.Namespace) -> int:
    rows = questions.key_principals(Path(args.data_dir), args.key_id, warn=_warn, scan=args.scan)
    if args.json:
        for row in rows:
            print(json.dumps(row, sort_keys=True))
        return 0
    table = [("PRINCIPAL", "ACCESS KEY", "REQUESTS", "REFUSED", "FIRST", "LAST")]
    table += [(r["principal"], r["access_key_id"], str(r["requests"]), str(r["refused"]), str(r["first"]),
               str(r["last"])) for r in rows]
    print(audit_review._render(table), end="")
    return 0


def cmd_reindex(args: argparse.Namespace) -> int:
    data_dir = Path(args.data_dir)
    started = time.monotonic()
    count = audit_index.reindex(data_dir)
    elapsed = time.monotonic() - started
    print(f"indexed {count} records in {elapsed:.1f} s ({count / max(elapsed, 1e-9):.0f} records/s)")
    while args.follow:
        time.sleep(args.interval)
        try:
            audit_index.update(data_dir)
        except audit_index.IndexMismatch as error:
            _warn(f"{error}: rebuilding the index")
            audit_index.reindex(data_dir)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    data_dir = Path(args.data_dir)
    if not (data_dir / "audit").is_dir():
        raise CliError(f"no audit log in {data_dir}")
    cursor = Path(args.cursor) if args.cursor else None
    try:
        if args.output:
            with open(args.output, "ab") as out:
                audit_export.export(data_dir, out, cursor_path=cursor, since=args.since, follow=args.follow)
        else:
            audit_export.export(data_dir, sys.stdout.buffer, cursor_path=cursor, since=args.since,
                                follow=args.follow)
    except ValueError as error:
        raise CliError(str(error)) from None
    except KeyboardInterrupt:
        return 130
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    data_dir = Path(args.data_dir)
    if args.dev:
        root_key = rootkey.load_root_key(data_dir, rootkey.RootKeySource.dev())
    else:
        root_key = rootkey.load_root_key(data_dir, root_source(args, confirm=False))
    signer = audit_signing.load_or_create(data_dir, root_key)
    del root_key
    exported = None
    if args.export_cursor:
        try:
            exported = audit_export.Cursor.load(Path(args.export_cursor)).chains
        except ValueError as error:
            raise CliError(str(error)) from None
    from keyservice.audit import segments

    removed = 0
    for chain in segments.chains(data_dir):
        try:
            result = audit_prune.prune(data_dir, signer, args.before, chain=chain, force=args.force,
                                       exported=(exported or {}).get(chain) if exported is not None else None)
        except audit_prune.PruneRefused as error:
            raise CliError(f"chain {chain}: {error}") from None
        for path in result.removed:
            print(f"removed {path}")
        if result.record is not None:
            print(f"chain {chain}: pruned through segment {result.record['through_segment']} "
                  f"({result.record['records']} records, checkpoint #{result.record['checkpoint_seq']})")
        removed += len(result.removed)
    if not removed:
        print("nothing to prune: no sealed segment ends before that date")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    data_dir = Path(args.data_dir)
    key_path = Path(args.public_key) if args.public_key else audit_signing.public_path(data_dir)
    try:
        public_key = audit_signing.load_public(key_path)
    except (OSError, ValueError) as error:
        print(f"cannot load the audit public key {key_path}: {error}")
        return 2
    state_path = Path(args.state) if args.state else data_dir / VERIFY_STATE
    since = None
    if args.since_last:
        try:
            state = json.loads(state_path.read_bytes())
            same_key = state.get("fingerprint") == audit_verify.key_fingerprint(public_key)
            since = state.get("chains") if same_key else None
        except (OSError, ValueError, AttributeError):
            since = None
        if since is None:
            print(f"no state in {state_path} for this key: verifying in full")
    report = audit_verify.verify(
        data_dir,
        public_key,
        checkpoint_every=args.checkpoint_every,
        checkpoint_seconds=args.checkpoint_seconds,
        since=since,
    )
    if report.ok:
        positions = {**(since or {}), **report.positions}
        state_body = {"fingerprint": report.fingerprint, "chains": positions}
        write_atomic(state_path, json.dumps(state_body).encode())
    pinned = "pinned" if args.public_key else f"from {key_path}; compare with your own copy"
    print(f"signing key fingerprint {report.fingerprint} ({pinned})")
    print(f"{report.records} records, {report.checkpoints} checkpoints, {report.segments} segments, "
          f"{report.unsealed} not yet sealed")
    for note in report.notes:
        print(f"note: {note}")
    if report.ok:
        print("OK: the audit log is intact")
        return 0
    print(f"TAMPERED: {report.problems[0]}")
    for problem in report.problems[1:]:
        print(f"also: {problem}")
    return 1


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the ``audit`` command group to the top-level parser."""
    parser = sub.add_parser("audit", help="review and verify the audit log (works offline)")
    commands = parser.add_subparsers(dest="audit_command", required=True)
    for name, func, text in (
        ("list", cmd_list, "list audit records, oldest first"),
        ("files", cmd_files, "who created and opened which file how often, through which key"),
    ):
        p = commands.add_parser(name, help=text)
        p.add_argument("--data-dir", required=True)
        p.add_argument("--key", help="key id, ARN, alias name or alias ARN")
        p.add_argument("--operation", help="e.g. Decrypt")
        p.add_argument("--principal", help="principal ARN or access key id")
        p.add_argument("--outcome", choices=("success", "error"))
        p.add_argument("--user", help="local user behind a kmsfs open: uid or user name")
        p.add_argument("--file", help="path inside a kmsfs mount (a directory matches everything below it)")
        p.add_argument("--file-id", help="kmsfs file id (hex, from the encryption context): joins a "
                       "pooled GenerateDataKey to the create that used it and the file's opens")
        p.add_argument("--since", type=_time, help="ISO 8601 time, today, yesterday, or 15m / 2h / 7d ago")
        p.add_argument("--until", type=_time, help="ISO 8601 time, today, yesterday, or 15m / 2h / 7d ago")
        p.add_argument("--json", action="store_true", help="one JSON object per line")
        p.add_argument("--scan", action="store_true", help="read the whole log instead of using the index")
        if name == "files":
            p.add_argument("--top", type=int, metavar="N", help="the N busiest files and users of the period "
                           "(counted in whole UTC hours)")
        p.set_defaults(func=func)
    key = commands.add_parser("key", help="what happened to a key: management requests, refusals, uses")
    key.add_argument("key_id", help="key id or ARN")
    principals = commands.add_parser("principals", help="which principals used a key, how often")
    principals.add_argument("key_id", help="key id or ARN")
    for p, func in ((key, cmd_key), (principals, cmd_principals)):
        p.add_argument("--data-dir", required=True)
        p.add_argument("--json", action="store_true", help="one JSON object per line")
        p.add_argument("--scan", action="store_true", help="read the whole log instead of using the index")
        p.set_defaults(func=func)
    key.add_argument("--since", type=_time, help="ISO 8601 time, today, yesterday, or 15m / 2h / 7d ago")
    key.add_argument("--until", type=_time, help="ISO 8601 time, today, yesterday, or 15m / 2h / 7d ago")
    reindex = commands.add_parser("reindex", help="rebuild the audit index from the log")
    reindex.add_argument("--data-dir", required=True)
    reindex.add_argument("--follow", action="store_true", help="then keep indexing new records (a sidecar)")
    reindex.add_argument("--interval", type=float, default=2.0, help="--follow: seconds between updates")
    reindex.set_defaults(func=cmd_reindex)
    export = commands.add_parser("export", help="records as JSON lines for a SIEM, resumable from a cursor")
    export.add_argument("--data-dir", required=True)
    export.add_argument("--since", type=_time, help="only records from this time on")
    export.add_argument("--cursor", metavar="FILE", help="where to resume from and to save the position")
    export.add_argument("--output", metavar="FILE", help="append to FILE (exactly once with --cursor); "
                        "default stdout (at least once)")
    export.add_argument("--follow", action="store_true", help="keep exporting new records")
    export.set_defaults(func=cmd_export)
    prune = commands.add_parser("prune", help="remove whole sealed segments older than a date")
    prune.add_argument("--data-dir", required=True)
    prune.add_argument("--before", type=_time, required=True, help="segments sealed before this time")
    prune.add_argument("--export-cursor", metavar="FILE", help="the export cursor: only exported segments go")
    prune.add_argument("--force", action="store_true", help="prune even segments not exported")
    prune.add_argument("--dev", action="store_true", help="dev data directory (root key inside it)")
    prune.add_argument("--root-key-file", metavar="FILE", help="root key file (signs the prune record)")
    prune.set_defaults(func=cmd_prune)
    verify = commands.add_parser("verify", help="check the hash chain, signed checkpoints and head")
    verify.add_argument("--data-dir", required=True)
    verify.add_argument("--public-key", help="pinned PEM public key (default: DATA_DIR/audit-signing.pub)")
    verify.add_argument("--checkpoint-every", type=int, default=DEFAULT_CHECKPOINT_EVERY)
    verify.add_argument("--checkpoint-seconds", type=float, default=DEFAULT_CHECKPOINT_SECONDS)
    verify.add_argument("--since-last", action="store_true",
                        help="start from the checkpoint verified last time (kept in --state)")
    verify.add_argument("--state", metavar="FILE", help=f"default DATA_DIR/{VERIFY_STATE}")
    verify.set_defaults(func=cmd_verify)
