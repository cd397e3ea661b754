#!/usr/bin/env python3
"""Audit review at scale (issue 17): synthesize a signed log of N records, index it, time the questions.

Why synthesize with the project's own writer (``keyservice.audit.log.AuditLog``): the log must be
one the service could have written — hash chain, signed checkpoints every 100 records, segments
rotated at 256 MiB and at UTC midnight — so that ``verify`` and the index see the real format.
Records are realistic kmsfs opens: Decrypt with a ``caller`` (path, uid, user, pid, process) over
50,000 files in 500 directories (skewed: a few files are hot), five local users with very
different shares, three keys, one of which is disabled for a while (the opens of its files are
refused meanwhile), creates, and a few refusals. Time advances 10 ms per record (100 opens/s).

Only the appends' fsyncs are batched (one per 20,000 records through ``deferred_commits``), which
changes nothing in the bytes written. Each question is timed as an operator runs it: a
``python -m keyservice audit ...`` process, output to /dev/null, best of 3.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

from keyservice.audit import index as audit_index
from keyservice.audit import segments
from keyservice.audit.commit import deferred_commits
from keyservice.audit.log import AuditLog
from keyservice.audit.records import build_record, format_time
from keyservice.context import Principal, RequestContext
from keyservice.errors import AccessDeniedException, DisabledException

T0 = datetime(2026, 11, 27, 18, 0, 0, tzinfo=UTC)
STEP = timedelta(milliseconds=10)
ACCOUNT = "111122223333"
KEYS = [f"arn:aws:kms:us-east-1:{ACCOUNT}:key/{uuid.UUID(int=n + 1)}" for n in range(3)]
USERS = [("build", 1001, 0.50), ("alice", 1000, 0.25), ("bob", 1002, 0.15), ("carol", 1003, 0.09),
         ("mallory", 1004, 0.01)]
PROCESSES = {"build": ["make", "cc1", "ld"], "alice": ["vim", "cat", "less"], "bob": ["python3", "cat"],
             "carol": ["libreoffice", "cp"], "mallory": ["tar", "cp", "scp"]}
FILES = 50000
_BENCH_SIGNER = Ed25519PrivateKey.generate()  # signs the synthesized log and the records appended later
SIGNER_FILE = "bench-signer.key"  # a cached log's throwaway signing key (raw 32 bytes; benchmark only)


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now


def path_of(n: int) -> str:
    return f"/proj/dir{n // 100:03d}/file{n:05d}.dat"


def synthesize(data_dir: Path, count: int, seed: int = 7) -> dict[str, Any]:
    """Write ``count`` records; return facts the questions use (times, names)."""
    rng = random.Random(seed)
    signer = _BENCH_SIGNER
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / "audit-signing.pub").write_bytes(
        signer.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo))
    clock = Clock()
    log = AuditLog(data_dir, signer=signer, now=clock, checkpoint_seconds=60)
    principals = {name: Principal(ACCOUNT, f"arn:aws:iam::{ACCOUNT}:user/kmsfs-{name}",
                                  f"AKIA{name.upper():0<16}"[:20]) for name, _uid, _share in USERS}
    cumulative, total = [], 0.0
    for name, uid, share in USERS:
        total += share
        cumulative.append((total, name, uid))
    disable_at, enable_at = int(count * 0.40), int(count * 0.41)
    started = time.monotonic()
    with deferred_commits() as tickets:
        for n in range(count):
            clock.now += STEP
            draw = rng.random()
            name, uid = next((u, i) for c, u, i in cumulative if draw <= c)
            file_no = int(FILES * rng.random() ** 3)
            path = path_of(file_no)
            key = KEYS[0] if file_no % 10 else KEYS[1]
            if file_no % 97 == 0:
                key = KEYS[2]
            ctx = RequestContext(str(uuid.UUID(int=rng.getrandbits(128))), "127.0.0.1", principals[name],
                                 "kmsfs/0.1", {"path": path, "uid": uid, "user": name, "gid": uid,
                                               "pid": 1000 + rng.randrange(30000),
                                               "process": rng.choice(PROCESSES[name])})
            fid = f"{(file_no * 2654435761) % (1 << 64):016x}{file_no:016x}"
            operation, error = "Decrypt", None
            if n in (disable_at, enable_at):
                operation = "DisableKey" if n == disable_at else "EnableKey"
                admin = Principal(ACCOUNT, f"arn:aws:iam::{ACCOUNT}:root", "AKIAADMIN00000000000")
                ctx = RequestContext(ctx.request_id, "10.0.0.5", admin, "aws-cli/2", {})
                record = build_record(when=clock.now, ctx=ctx, operation=operation, key_arn=KEYS[1],
                                      requested_key_id=KEYS[1])
            else:
                if rng.random() < 0.01:
                    operation = "GenerateDataKey"
                    ctx.caller["op"] = "create"
                if key == KEYS[1] and disable_at < n < enable_at:
                    error = DisabledException(f"{KEYS[1]} is disabled.")
                elif rng.random() < 0.001:
                    error = AccessDeniedException("not authorized")
                record = build_record(when=clock.now, ctx=ctx, operation=operation, error=error, key_arn=key,
                                      key_version=1, encryption_context={"kmsfs:file-id": fid})
            log.append(record)
            if len(tickets) >= 20000:
                tickets[-1].commit()
                tickets.clear()
        if tickets:
            tickets[-1].commit()
            tickets.clear()
    log.close()
    elapsed = time.monotonic() - started
    return {"records": count, "seconds": elapsed, "first": T0, "last": clock.now,
            "disabled": (T0 + STEP * disable_at, T0 + STEP * enable_at)}


def cached_log(cache: Path, count: int, data_dir: Path) -> dict[str, Any]:
    """Synthesize into ``cache/<count>`` once, then give each run its own copy in ``data_dir``:
    sealed segments hard-linked (never written again), the open one and the other files copied.
    Synthesizing 10 M records takes about 20 minutes; the questions and the index do not change it."""
    global _BENCH_SIGNER
    home = cache / str(count)
    facts_file = home / "facts.json"
    if not facts_file.exists():
        shutil.rmtree(home, ignore_errors=True)
        home.mkdir(parents=True)
        facts = synthesize(home / "data", count)
        (home / SIGNER_FILE).write_bytes(_BENCH_SIGNER.private_bytes(Encoding.Raw, PrivateFormat.Raw,
                                                                     NoEncryption()))
        facts_file.write_text(json.dumps(facts, default=lambda t: t.isoformat()))
    _BENCH_SIGNER = Ed25519PrivateKey.from_private_bytes((home / SIGNER_FILE).read_bytes())
    facts = json.loads(facts_file.read_text())
    for name in ("first", "last"):
        facts[name] = datetime.fromisoformat(facts[name])
    facts["disabled"] = tuple(datetime.fromisoformat(t) for t in facts["disabled"])
    source = home / "data"
    for path in sorted(source.rglob("*")):
        target = data_dir / path.relative_to(source)
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        chain_segments = segments.segments(source, path.parent.name) if path.suffix == ".log" else []
        if chain_segments and path != chain_segments[-1][1]:
            target.hardlink_to(path)
        else:
            shutil.copy2(path, target)
    return facts


def log_bytes(data_dir: Path) -> int:
    return sum(p.stat().st_size for chain in segments.chains(data_dir)
               for _n, p in segments.segments(data_dir, chain))


def _child_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def cli(data_dir: Path, *args: str, reps: int = 3) -> tuple[float, int, float]:
    """Best wall time of ``keyservice audit ARGS``, the number of output lines, and the CPU time
    of that run (on a shared machine the wall time includes waiting for a core)."""
    best, lines, cpu = float("inf"), 0, 0.0
    for _ in range(reps):
        started, cpu_before = time.monotonic(), _child_cpu()
        command = [sys.executable, "-m", "keyservice", "audit", *args, "--data-dir", str(data_dir)]
        done = subprocess.run(command, capture_output=True, check=False)
        if time.monotonic() - started < best:
            best, cpu = time.monotonic() - started, _child_cpu() - cpu_before
        if done.returncode != 0:
            raise RuntimeError(f"audit {' '.join(args)} failed: {done.stderr.decode()[-500:]}")
        if b"warning" in done.stderr:
            raise RuntimeError(f"audit {' '.join(args)}: {done.stderr.decode()[-500:]}")
        lines = done.stdout.count(b"\n")
    return best, lines, cpu


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--audit", type=int, required=True, metavar="N", help="records to synthesize")
    p.add_argument("--run-dir", default="/var/tmp", help="parent of the data directory")
    p.add_argument("--keep", action="store_true")
    p.add_argument("--cache", metavar="DIR",
                   help="synthesize the log once into DIR/N, reuse it later (default: anew each run)")
    p.add_argument("--scan", action="store_true", help="also time one question by a full scan (slow)")
    p.add_argument("--json-out")
    args = p.parse_args(argv)
    run = Path(tempfile.mkdtemp(prefix="kmsfs-audit-bench-", dir=args.run_dir))
    data_dir = run / "data"
    rows: list[tuple[str, str]] = []
    result: dict[str, Any] = {"records": args.audit}
    try:
        say = lambda text: print(text, file=sys.stderr, flush=True)  # noqa: E731
        say(f"synthesizing {args.audit} records in {data_dir} ...")
        facts = (cached_log(Path(args.cache), args.audit, data_dir) if args.cache
                 else synthesize(data_dir, args.audit))
        size = log_bytes(data_dir)
        result["synthesis_records_per_s"] = args.audit / facts["seconds"]
        result["log_bytes"] = size
        result["segments"] = len(segments.segments(data_dir))
        rows.append(("synthesize (AuditLog.append, one fsync per 20,000)",
                     f"{facts['seconds']:.0f} s ({args.audit / facts['seconds']:.0f} records/s)"))
        rows.append(("log size", f"{size / 1e6:.0f} MB in {result['segments']} segments "
                                 f"({size / args.audit:.0f} B/record)"))
        say("reindexing ...")
        started, cpu = time.monotonic(), time.process_time()
        audit_index.reindex(data_dir)
        took, cpu = time.monotonic() - started, time.process_time() - cpu
        index_size = audit_index.index_path(data_dir).stat().st_size
        result.update(reindex_seconds=took, reindex_records_per_s=args.audit / took, index_bytes=index_size)
        result["reindex_cpu_records_per_s"] = args.audit / cpu
        rows.append(("audit reindex (bulk)", f"{took:.0f} s ({args.audit / took:.0f} records/s wall, "
                                             f"{args.audit / cpu:.0f} records/s of CPU)"))
        rows.append(("index size", f"{index_size / 1e6:.0f} MB ({index_size / size:.0%} of the log)"))
        last = facts["last"]
        hour = format_time(last - timedelta(hours=1))
        day0 = format_time(last.replace(hour=0, minute=0, second=0, microsecond=0))
        questions = [
            ("who opened this file (--file F, a typical file)", ["list", "--file", path_of(30003)]),
            ("who opened this file (--file F, the hottest file)", ["list", "--file", path_of(0), "--json"]),
            ("who opened files under a directory (--file D, 100 files)", ["list", "--file", "/proj/dir300"]),
            ("what did a user open in the last hour (light user, 1 %)",
             ["list", "--user", "mallory", "--since", hour]),
            ("same, --json", ["list", "--user", "mallory", "--since", hour, "--json"]),
            ("what did a user open in the last hour (heavy user, 25 %)",
             ["list", "--user", "alice", "--since", hour, "--json"]),
            ("every refused request (--outcome error)", ["list", "--outcome", "error", "--json"]),
            ("what happened to key K (audit key K)", ["key", KEYS[1]]),
            ("which principals used key K (audit principals K)", ["principals", KEYS[0]]),
            ("busiest files and users today (files --top 10)", ["files", "--top", "10", "--since", day0]),
            ("busiest files and users, whole log (files --top 10)", ["files", "--top", "10"]),
        ]
        result["questions"] = []
        for title, argv_q in questions:
            say(f"timing: {title}")
            seconds, lines, cpu = cli(data_dir, *argv_q)
            result["questions"].append({"question": title, "argv": argv_q, "seconds": seconds, "cpu": cpu,
                                        "lines": lines})
            rows.append((title, f"{seconds:.2f} s wall, {cpu:.2f} s CPU ({lines} lines)"))
        if args.scan:
            say("timing one question by a full scan ...")
            seconds, _, cpu = cli(data_dir, "list", "--file", path_of(30003), "--scan", reps=1)
            result["scan_seconds"], result["scan_cpu"] = seconds, cpu
            rows.append(("who opened this file, by a full scan (today's way)",
                         f"{seconds:.1f} s wall, {cpu:.1f} s CPU"))
        say("verify (full) ...")
        started = time.monotonic()
        subprocess.run([sys.executable, "-m", "keyservice", "audit", "verify", "--data-dir", str(data_dir)],
                       check=True, capture_output=True)
        took = time.monotonic() - started
        result["verify_full_seconds"] = took
        rows.append(("audit verify (full)", f"{took:.0f} s ({args.audit / took:.0f} records/s)"))
        say("verify --since-last after 10,000 more records ...")
        more = _more(data_dir, 10000, last)
        started = time.monotonic()
        done = subprocess.run([sys.executable, "-m", "keyservice", "audit", "verify", "--since-last",
                               "--data-dir", str(data_dir)], capture_output=True, check=False)
        took = time.monotonic() - started
        if done.returncode:
            raise RuntimeError(done.stdout.decode())
        result["verify_incremental_seconds"] = took
        rows.append(("audit verify --since-last (10,000 new records)", f"{took:.2f} s"))
        started, cpu = time.monotonic(), time.process_time()
        added = audit_index.update(data_dir)
        took, cpu = time.monotonic() - started, time.process_time() - cpu
        result["index_update_records_per_s"] = added / took
        result["index_update_cpu_records_per_s"] = added / cpu
        rows.append((f"index catch-up ({more} new records, indexes in place)",
                     f"{took:.2f} s ({added / took:.0f} records/s wall, {added / cpu:.0f} of CPU)"))
        width = max(len(r[0]) for r in rows)
        print(f"audit review at {args.audit} records")
        for name, value in rows:
            print(f"  {name.ljust(width)}  {value}")
        if args.json_out:
            Path(args.json_out).write_text(json.dumps(result, indent=2, default=str) + "\n")
    finally:
        if not args.keep:
            shutil.rmtree(run, ignore_errors=True)
        else:
            print(f"kept {run}", file=sys.stderr)
    return 0


def _more(data_dir: Path, count: int, after: datetime) -> int:
    """Append ``count`` records with a new writer, as the service does after a restart."""
    signer = _BENCH_SIGNER
    clock = Clock()
    clock.now = after
    log = AuditLog(data_dir, signer=signer, now=clock, checkpoint_seconds=60)
    with deferred_commits() as tickets:
        for n in range(count):
            clock.now += STEP
            caller = {"path": path_of(n), "uid": 1000}
            ctx = RequestContext(f"more-{n}", "127.0.0.1", None, "kmsfs/0.1", caller)
            log.append(build_record(when=clock.now, ctx=ctx, operation="Decrypt", key_arn=KEYS[0],
                                    key_version=1))
        if tickets:
            tickets[-1].commit()
    log.close()
    return count


if __name__ == "__main__":
    sys.exit(main())
