"""``keyservice audit``: list, files, key, principals, verify, reindex, export, prune.

Offline: reads the data directory, server running or not (prune alone needs the root key, to sign
its record). list/files/key/principals answer from the index (``audit.questions``) when it
covers the log, else by a full scan, saying so on stderr.

Review commands must never answer "nobody" by mistake: a data directory that does not exist or
has no audit log is an error (exit 1), not an empty table, and lines of the log that cannot be
parsed are reported on stderr and in the exit status (3) rather than skipped in silence.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from keyservice.audit import index as audit_index
from keyservice.audit import questions, segments
from keyservice.audit import records as audit_records
from keyservice.audit import review as audit_review
from keyservice.audit.records import DEFAULT_CHECKPOINT_EVERY, DEFAULT_CHECKPOINT_SECONDS, audit_path
from keyservice.cli.common import CliError, root_source
from keyservice.store import rootkey

# verify, prune, export and the PostgreSQL table are imported by the commands that use them: a
# question (list/files/key/principals) is one short process and loads only the index and readers.

# Exit status of list/files when some log lines could not be parsed (the output is incomplete).
EXIT_UNPARSABLE = 3
VERIFY_STATE = "audit-verified.json"  # --since-last: outside the log directory
STORE_ENV = "KEYSERVICE_STORE"  # store.engine.STORE_ENV, named here so a question does not load the store


def _warn(message: str) -> None:
    print(f"keyservice: {message}", file=sys.stderr)


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
    if not any(segments.segments(data_dir, chain) for chain in segments.chains(data_dir)):
        raise CliError(f"{data_dir} has no audit log ({audit_path(data_dir)}): not a keyservice data "
                       "directory, or never served")


def _report_unparsable(data_dir: Path, lines: list[int]) -> int:
    if not lines:
        return 0
    shown = ", ".join(map(str, lines[:10])) + (", ..." if len(lines) > 10 else "")
    print(f"keyservice: {len(lines)} line(s) of the audit log could not be parsed and are "
          f"not listed (line {shown}); run keyservice audit verify", file=sys.stderr)
    return EXIT_UNPARSABLE


def _store(args: argparse.Namespace) -> str | None:
    """The PostgreSQL store whose audit table answers (every node's chains): --store, else
    $KEYSERVICE_STORE, else the URL `init` recorded in the data dir (``store.engine``'s file);
    None on SQLite (the data dir's own index answers)."""
    url = getattr(args, "store", None) or os.environ.get(STORE_ENV)
    if url:
        return str(url)
    recorded = Path(args.data_dir) / "store.url"
    if recorded.exists():
        from keyservice.store import engine

        return engine.recorded_url(Path(args.data_dir))
    return None


def _query(args: argparse.Namespace, unparsable: list[int]) -> Iterable[dict[str, Any]]:
    filters = questions.Filters(**_filters(args))  # type: ignore[arg-type]
    return questions.query(Path(args.data_dir), filters, warn=_warn, scan=args.scan, unparsable=unparsable,
                           store=_store(args))


def cmd_list(args: argparse.Namespace) -> int:
    data_dir = Path(args.data_dir)
    _readable_log(data_dir)
    unparsable: list[int] = []
    if args.json:  # each record's line exactly as logged (the bytes the hash chain covers)
        filters = questions.Filters(**_filters(args))  # type: ignore[arg-type]
        pairs = questions.query_lines(data_dir, filters, warn=_warn, scan=args.scan, unparsable=unparsable,
                                      records=False, store=_store(args))
        _write_lines(line for line, _record in pairs)
    else:
        print(audit_review.format_table(_query(args, unparsable), local=args.local), end="")
    return _report_unparsable(data_dir, unparsable)


def _write_lines(lines: Iterable[bytes]) -> None:
    out = sys.stdout.buffer
    chunk: list[bytes] = []
    for line in lines:
        chunk.append(line)
        if len(chunk) >= 4096:
            out.write(b"\n".join(chunk) + b"\n")
            chunk.clear()
    if chunk:
        out.write(b"\n".join(chunk) + b"\n")
    out.flush()


def cmd_files(args: argparse.Namespace) -> int:
    data_dir = Path(args.data_dir)
    _readable_log(data_dir)
    if args.top is not None:
        return _top(args)
    unparsable: list[int] = []
    _print(audit_review.files_summary(_query(args, unparsable)), args.json,
           lambda rows: audit_review.format_files(rows, local=args.local))
    return _report_unparsable(data_dir, unparsable)


def _top(args: argparse.Namespace) -> int:
    period = _filters(args)
    top = questions.top(Path(args.data_dir), args.top, since=period["since"], until=period["until"],  # type: ignore[arg-type]
                        warn=_warn, scan=args.scan, store=_store(args))
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


def cmd_key(args: argparse.Namespace) -> int:
    since = audit_review.parse_time(args.since) if args.since else None
    until = audit_review.parse_time(args.until) if args.until else None
    _readable_log(Path(args.data_dir))
    timeline = questions.key_timeline(Path(args.data_dir), args.key_id, since=since, until=until,
                                      warn=_warn, scan=args.scan, store=_store(args))
    if args.json:
        for event in timeline["events"]:
            print(json.dumps(event, sort_keys=True))
        print(json.dumps({"successful_uses": timeline["uses"]}))
        return 0
    print(audit_review.format_table(timeline["events"]), end="")
    print(f"{timeline['uses']} successful cryptographic uses besides these events")
    return 0


def cmd_principals(args: argparse.Namespace) -> int:
    _readable_log(Path(args.data_dir))
    rows = questions.key_principals(Path(args.data_dir), args.key_id, warn=_warn, scan=args.scan,
                                    store=_store(args))
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
    from keyservice.audit import export as audit_export

    data_dir = Path(args.data_dir)
    if not (data_dir / "audit").is_dir():
        raise CliError(f"no audit log in {data_dir}")
    cursor = Path(args.cursor) if args.cursor else None
    since = audit_review.parse_time(args.since) if args.since else None
    try:
        if args.syslog:
            if args.output:
                raise CliError("--syslog and --output exclude each other")
            _export_syslog(args, data_dir, cursor, since)
        elif args.output:
            with open(args.output, "ab") as out:
                audit_export.export(data_dir, out, cursor_path=cursor, since=since, follow=args.follow)
        else:
            audit_export.export(data_dir, sys.stdout.buffer, cursor_path=cursor, since=since,
                                follow=args.follow)
    except ValueError as error:
        raise CliError(str(error)) from None
    except KeyboardInterrupt:
        return 130
    return 0


def _export_syslog(args: argparse.Namespace, data_dir: Path, cursor: Path | None, since: Any) -> None:
    from keyservice.audit import export as audit_export
    from keyservice.audit import syslog

    out = syslog.SyslogOut(args.syslog, ca_file=Path(args.syslog_ca) if args.syslog_ca else None,
                           cert_file=Path(args.syslog_cert) if args.syslog_cert else None,
                           key_file=Path(args.syslog_key) if args.syslog_key else None)
    try:
        audit_export.export(data_dir, out, cursor_path=cursor, since=since, follow=args.follow,  # type: ignore[arg-type]
                            batch=500)
    finally:
        out.close()


def cmd_prune(args: argparse.Namespace) -> int:
    from keyservice.audit import export as audit_export
    from keyservice.audit import prune as audit_prune
    from keyservice.audit import signing as audit_signing

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
    removed = 0
    store = _store(args)
    for chain in segments.chains(data_dir):
        on_record = None
        if store is not None:  # the table's copy of those lines goes first; if it fails, nothing goes
            from keyservice.audit import pgmirror

            def on_record(record: dict[str, Any], chain: str = chain, url: str = store) -> None:
                pruned = pgmirror.prune_table(url, chain, record)
                if pruned is not None:
                    print(f"audit table chain {pruned[0]}: rows 1-{pruned[1]} removed")
        try:
            result = audit_prune.prune(data_dir, signer, audit_review.parse_time(args.before), chain=chain,
                                       force=args.force, on_record=on_record,
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
    elif audit_index.index_path(data_dir).exists():
        count = audit_index.reindex(data_dir)  # its rows of the pruned records point nowhere now
        print(f"audit index rebuilt ({count} records)")
    return 0




def cmd_verify(args: argparse.Namespace) -> int:
    from keyservice.audit import digest as audit_digest
    from keyservice.audit import signing as audit_signing
    from keyservice.audit import verify as audit_verify
    from keyservice.files import write_atomic

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
    chains = audit_records.chains(data_dir) or [audit_records.MAIN_CHAIN]
    failed = False
    positions: dict[str, Any] = dict(since or {})
    for chain in chains:
        report = audit_verify.verify(
            data_dir,
            public_key,
            checkpoint_every=args.checkpoint_every,
            checkpoint_seconds=args.checkpoint_seconds,
            chain=chain,
            since=since,
        )
        positions.update(report.positions)
        label = "" if chains == [audit_records.MAIN_CHAIN] else f"chain {chain}: "
        if chain == chains[0]:
            pinned = "pinned" if args.public_key else f"from {key_path}; compare with your own copy"
            print(f"signing key fingerprint {report.fingerprint} ({pinned})")
        print(
            f"{label}{report.records} records, {report.checkpoints} checkpoints, {report.segments} segments, "
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
    if not failed:
        state_body = {"fingerprint": audit_verify.key_fingerprint(public_key), "chains": positions}
        write_atomic(state_path, json.dumps(state_body).encode())
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
    from keyservice.audit import pgmirror as audit_pgmirror
    from keyservice.audit import verify as audit_verify
    from keyservice.store import engine

    url = args.store or engine.recorded_url(data_dir)
    if not url:
        return False
    try:
        chains = audit_pgmirror.table_chains(url)
        prunes = audit_pgmirror.table_prunes(url)
    except Exception as error:  # noqa: BLE001 - any driver error is one line for the operator
        print(f"cannot read the audit table: {str(error).strip()[:200]}")
        return True
    failed = False
    for chain, lines in sorted(chains.items()):
        report = audit_verify.verify(
            data_dir, public_key, checkpoint_every=args.checkpoint_every,
            checkpoint_seconds=args.checkpoint_seconds, lines=lines, pruned=prunes.get(chain),
        )  # fmt: skip
        state = "OK" if report.ok else f"TAMPERED: {report.problems[0]}"
        print(f"table chain {chain}: {report.records} records, {report.checkpoints} checkpoints: {state}")
        failed = failed or not report.ok
    return failed


def _store_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--store", metavar="URL",
                        help="ask this PostgreSQL store's audit table, every node's chains (default: "
                             f"${STORE_ENV}, else the data dir's recorded store; on SQLite the data "
                             "dir's index)")


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
        p.add_argument("--scan", action="store_true",
                       help="read the whole log instead of using the index (default: the index)")
        _store_option(p)
        if name == "files":
            p.add_argument("--top", type=int, metavar="N", help="the N busiest files and users of the period "
                           "(counted in whole UTC hours) (default: the per-file table)")
        p.set_defaults(func=func, local=False)
    key = commands.add_parser("key", help="what happened to a key: management requests, refusals, uses")
    key.add_argument("key_id", help="key id or ARN")
    principals = commands.add_parser("principals", help="which principals used a key, how often")
    principals.add_argument("key_id", help="key id or ARN")
    for p, func in ((key, cmd_key), (principals, cmd_principals)):
        p.add_argument("--data-dir", required=True, help="the key service's data directory (required)")
        p.add_argument("--json", action="store_true", help="one JSON object per line (default: a table)")
        p.add_argument("--scan", action="store_true",
                       help="read the whole log instead of using the index (default: the index)")
        _store_option(p)
        p.set_defaults(func=func)
    key.add_argument("--since", type=_time, help="same forms as for list (default: the beginning)")
    key.add_argument("--until", type=_time, help="same forms as for list (default: now)")
    reindex = commands.add_parser("reindex", help="rebuild the audit index from the log")
    reindex.add_argument("--data-dir", required=True, help="the key service's data directory (required)")
    reindex.add_argument("--follow", action="store_true",
                         help="then keep indexing new records, a sidecar (default: stop)")
    reindex.add_argument("--interval", type=float, default=2.0, help="--follow: seconds between updates "
                         "(default 2)")
    reindex.set_defaults(func=cmd_reindex)
    export = commands.add_parser("export", help="records as JSON lines for a SIEM, resumable from a cursor")
    export.add_argument("--data-dir", required=True, help="the key service's data directory (required)")
    export.add_argument("--since", type=_time, help="only records from this time on (default: all)")
    export.add_argument("--cursor", metavar="FILE",
                        help="where to resume from and to save the position (default: none, from the start)")
    export.add_argument("--output", metavar="FILE", help="append to FILE (exactly once with --cursor) "
                        "(default: stdout, at least once)")
    export.add_argument("--follow", action="store_true",
                        help="keep exporting new records (default: stop at the end)")
    export.add_argument("--syslog", metavar="URL",
                        help="send RFC 5424 syslog over TLS to tcp+tls://HOST:PORT (default: JSON lines)")
    export.add_argument("--syslog-ca", metavar="FILE",
                        help="CA bundle of the receiver's certificate (default: the system's)")
    export.add_argument("--syslog-cert", metavar="FILE",
                        help="client certificate for --syslog (default: none)")
    export.add_argument("--syslog-key", metavar="FILE", help="its private key (default: in --syslog-cert)")
    export.set_defaults(func=cmd_export)
    prune = commands.add_parser("prune", help="remove whole sealed segments older than a date")
    prune.add_argument("--data-dir", required=True, help="the key service's data directory (required)")
    prune.add_argument("--before", type=_time, required=True,
                       help="segments sealed before this time (required)")
    _store_option(prune)
    prune.add_argument("--export-cursor", metavar="FILE",
                       help="the export cursor: only exported segments go (default: none)")
    prune.add_argument("--force", action="store_true",
                       help="prune even segments not exported (default: refuse)")
    prune.add_argument("--dev", action="store_true",
                       help="dev data directory, root key inside it (default: off)")
    prune.add_argument("--root-key-file", metavar="FILE",
                       help="root key file, to sign the prune record (default: passphrase)")
    prune.add_argument("--root-passphrase-file", metavar="FILE",
                       help="root passphrase file (default: prompt or the environment)")
    prune.set_defaults(func=cmd_prune)
    verify = commands.add_parser("verify", help="check the hash chain, signed checkpoints and head")
    verify.add_argument("--data-dir", required=True, help="the key service's data directory (required)")
    verify.add_argument("--public-key", help="pinned PEM public key (default: DATA_DIR/audit-signing.pub)")
    verify.add_argument(
        "--store",
        default=os.environ.get(STORE_ENV) or None,
        metavar="URL",
        help="also verify every chain in this PostgreSQL store's audit table (default: the data dir's)",
    )
    verify.add_argument("--checkpoint-every", type=int, default=DEFAULT_CHECKPOINT_EVERY,
                        help=f"records per checkpoint the server used (default {DEFAULT_CHECKPOINT_EVERY})")
    verify.add_argument("--checkpoint-seconds", type=float, default=DEFAULT_CHECKPOINT_SECONDS,
                        help="seconds per checkpoint the server used "
                             f"(default {DEFAULT_CHECKPOINT_SECONDS:g})")
    verify.add_argument("--since-last", action="store_true",
                        help="start from the checkpoint verified last time (kept in --state) (default: all)")
    verify.add_argument("--state", metavar="FILE", help=f"(default DATA_DIR/{VERIFY_STATE})")
    verify.set_defaults(func=cmd_verify)
