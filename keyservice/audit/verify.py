"""Verifying the audit log: the hash chain, the signed checkpoints and the head file.

Read-only; used by ``keyservice audit verify`` and the tests. See docs/AUDIT.md for what each
layer of tamper evidence catches.
"""


from __future__ import annotations

import base64
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from keyservice.audit import segments
from keyservice.audit.prune import prune_path, prune_record
from keyservice.audit.records import (
    DEFAULT_CHECKPOINT_EVERY,
    DEFAULT_CHECKPOINT_SECONDS,
    GENESIS_HASH,
    head_path,
    is_checkpoint,
    is_intent,
    key_fingerprint,
    line_hash,
    parse_line,
    parse_time,
    read_signed_file,
    signed_bytes,
)

# --------------------------------------------------------------------------- verifying


@dataclass
class VerifyReport:
    """The outcome of ``verify``: ``problems[0]`` names the first bad line."""

    records: int = 0
    checkpoints: int = 0
    unsealed: int = 0
    fingerprint: str | None = None
    segments: int = 0
    pruned_records: int = 0
    # Per chain, the newest checkpoint verified: where ``--since-last`` starts next time.
    positions: dict[str, dict[str, Any]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _check_signature(checkpoint: Mapping[str, Any], public_key: Ed25519PublicKey) -> bool:
    try:
        public_key.verify(base64.b64decode(str(checkpoint.get("signature", ""))), signed_bytes(checkpoint))
    except (InvalidSignature, ValueError):
        return False
    return True


@dataclass
class _State:
    """Where a chain's walk stands: what the next line must chain to."""

    prev: str = GENESIS_HASH
    records: int = 0
    last_checkpoint: dict[str, Any] | None = None
    last_checkpoint_hash: str | None = None
    first_segment: int = 1


def _start_state(data_dir: Path, chain: str, public_key: Ed25519PublicKey, report: VerifyReport,
                 since: Mapping[str, Any] | None) -> _State | str:
    """The state to begin from: the genesis, a signed prune record, or the last verified checkpoint
    (``--since-last``); a string names why it cannot be trusted."""
    if since is not None:
        position = segments.segment_path(data_dir, chain, int(since.get("segment", 0)))
        number, offset = int(since.get("segment", 0)), int(since.get("offset", 0))
        line = next(iter(segments.read_segment(position, number, offset)), None)
        record = parse_line(line.data) if line is not None else None
        if line is None or record is None or line_hash(line.data) != since.get("hash"):
            return (f"the checkpoint verified last (segment {number}, byte {offset}) "
                    f"is no longer in the log: verify in full")
        if not is_checkpoint(record) or not _check_signature(record, public_key):
            return "the state of --since-last does not name a signed checkpoint: verify in full"
        report.notes.append(f"{chain}: verified from checkpoint #{record.get('seq')} on (--since-last)")
        return _State(line_hash(line.data), int(record.get("records", 0)), record, line_hash(line.data),
                      int(since["segment"]))
    return _pruned_state(prune_record(data_dir, chain), prune_path(data_dir, chain).name, chain, public_key,
                         report)


def _pruned_state(pruned: Mapping[str, Any] | None, source: str, chain: str, public_key: Ed25519PublicKey,
                  report: VerifyReport) -> _State | str:
    """The state after a signed prune record (the genesis without one)."""
    if pruned is None:
        return _State()
    if not _check_signature(pruned, public_key):
        return f"{source}: bad signature"
    report.notes.append(
        f"{chain}: segments 1-{pruned.get('through_segment')} were pruned on {pruned.get('time')} "
        f"({pruned.get('records')} records, through checkpoint #{pruned.get('checkpoint_seq')}, "
        f"last hash {str(pruned.get('last_hash'))[:16]}...)")
    report.pruned_records += int(pruned.get("records", 0))
    return _State(str(pruned.get("last_hash")), int(pruned.get("records", 0)),
                  {"seq": int(pruned.get("checkpoint_seq", 0))}, str(pruned.get("last_hash")),
                  int(pruned.get("through_segment", 0)) + 1)


def verify(
    data_dir: Path,
    public_key: Ed25519PublicKey,
    *,
    checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY,
    checkpoint_seconds: float = DEFAULT_CHECKPOINT_SECONDS,
    now: datetime | None = None,
    since: Mapping[str, Mapping[str, Any]] | None = None,
    chain: str | None = None,
    lines: Iterable[bytes] | None = None,
    pruned: Mapping[str, Any] | None = None,
) -> VerifyReport:
    """Check every chain: the hash chain through its segments, every checkpoint's signature and
    spacing, the segment seals, a prune record if any, and the head file.

    ``since`` (``--since-last``): per chain, the position of a checkpoint verified before; the
    walk starts there. Stops at the first bad line of a chain: everything after it is untrustworthy.
    ``chain``: only that chain. ``lines``: check these lines of ``chain`` (a chain read from the
    PostgreSQL table, from its first line) instead of its segments; there is no head file then.
    ``pruned``: with ``lines``, the signed prune record the first of them follows (the table's).
    """
    report = VerifyReport(fingerprint=key_fingerprint(public_key))
    names = [chain] if chain is not None else [segments.DEFAULT_CHAIN] if lines is not None else None
    for name in names or segments.chains(data_dir):
        _verify_chain(data_dir, name, public_key, report, checkpoint_every, checkpoint_seconds, now,
                      (since or {}).get(name), lines, pruned)
    return report


def _given(lines: Iterable[bytes]) -> Iterator[segments.Line]:
    offset = 0
    for data in lines:
        yield segments.Line(1, offset, data)
        offset += len(data) + 1


def _verify_chain(  # noqa: C901 - one walk, one check after the other
    data_dir: Path,
    chain: str,
    public_key: Ed25519PublicKey,
    report: VerifyReport,
    checkpoint_every: int,
    checkpoint_seconds: float,
    now: datetime | None,
    since: Mapping[str, Any] | None,
    lines: Iterable[bytes] | None = None,
    pruned: Mapping[str, Any] | None = None,
) -> None:
    grace = timedelta(seconds=checkpoint_seconds * 2 + 5)
    if lines is None:
        start = _start_state(data_dir, chain, public_key, report, since)
    else:
        start = _pruned_state(pruned, "the table's prune record", chain, public_key, report)
    if isinstance(start, str):
        report.problems.append(f"{chain}: {start}")
        return
    state = start
    since_checkpoint = 0
    first_unsealed_time: datetime | None = None
    where = f"{chain}: empty"
    at_line = 0
    files = [(n, p) for n, p in segments.segments(data_dir, chain) if n >= state.first_segment]
    if lines is not None:
        files = [(state.first_segment, Path(f"{chain} (given lines)"))]
    skip_first = since is not None

    def fail(message: str) -> None:
        report.problems.append(f"line {at_line}: {message} ({where})" if at_line else f"{where}: {message}")

    # Intent records (before a state change) whose request has no outcome record yet: request id ->
    # (where, operation, key). Left over at the end: the process stopped between the two.
    open_intents: dict[object, tuple[str, object, object]] = {}
    expected_number = state.first_segment
    for index, (number, path) in enumerate(files):
        where = f"{chain}/{path.name}"
        if number != expected_number:
            return fail(f"segment {expected_number} is missing (the next one is {number})")
        expected_number += 1
        ended = False
        line_no = 0
        start_offset = int(since.get("offset", 0)) if skip_first and since is not None else 0
        source = segments.read_segment(path, number, start_offset) if lines is None else _given(lines)
        for line_no, line in enumerate(source, start=1):
            if skip_first:
                skip_first = False
                continue
            where = f"{chain}/{path.name}" + (f" after byte {start_offset}" if start_offset else "")
            at_line = line_no
            if ended:
                if lines is None:
                    return fail("a line after the checkpoint that sealed this segment")
                ended = False  # the table's copy of a chain runs on through its segments' seals
                report.segments += 1
            record = parse_line(line.data)
            if record is None:
                return fail("not a JSON object (damaged or tampered)")
            if record.get("prev_hash") != state.prev:
                return fail("hash chain broken: a record before or at this line was edited, inserted, "
                            "removed or reordered")
            if is_checkpoint(record):
                seq = record.get("seq")
                expected_seq = (state.last_checkpoint or {}).get("seq", 0) + 1
                if not _check_signature(record, public_key):
                    return fail(f"checkpoint #{seq}: bad signature (forged, or signed by another key)")
                if seq != expected_seq or record.get("previous_checkpoint") != state.last_checkpoint_hash:
                    return fail(f"checkpoint #{seq}: expected #{expected_seq} (a checkpoint is missing)")
                if record.get("records") != state.records or record.get("sealed") != since_checkpoint:
                    return fail(f"checkpoint #{seq}: seals {record.get('sealed')} records but "
                                f"{since_checkpoint} precede it")
                if since_checkpoint > checkpoint_every:
                    return fail(f"missing checkpoint: {since_checkpoint} records sealed at once "
                                f"(at most {checkpoint_every} allowed)")
                when = parse_time(record.get("time"))
                if record.get("recovered"):
                    report.notes.append(f"{chain}: checkpoint #{seq} sealed {since_checkpoint} records late, "
                                        f"after an unclean shutdown")
                elif first_unsealed_time and when and when - first_unsealed_time > grace:
                    return fail(f"missing checkpoint: checkpoint #{seq} came "
                                f"{int((when - first_unsealed_time).total_seconds())} s after the first "
                                f"record it seals (at most {checkpoint_seconds:g} s allowed)")
                report.checkpoints += 1
                state.last_checkpoint, state.last_checkpoint_hash = record, line_hash(line.data)
                report.positions[chain] = {"segment": number, "offset": line.offset,
                                           "hash": state.last_checkpoint_hash, "seq": seq}
                since_checkpoint, first_unsealed_time = 0, None
                ended = bool(record.get("segment_end"))
            else:
                if is_intent(record):
                    intent = (f"line {line_no} ({where})", record.get("operation"), record.get("key_id"))
                    open_intents[record.get("request_id")] = intent
                else:
                    open_intents.pop(record.get("request_id"), None)
                report.records += 1
                state.records += 1
                since_checkpoint += 1
                if first_unsealed_time is None:
                    first_unsealed_time = parse_time(record.get("time"))
            state.prev = line_hash(line.data)
        if index < len(files) - 1 and not ended:
            where, at_line = f"{chain}/{path.name}", 0
            return fail("not sealed (no segment_end checkpoint at its end) although a later segment exists")
        report.segments += 1

    report.unsealed += since_checkpoint
    at_line = 0
    for place, operation, key in open_intents.values():
        report.notes.append(f"{place}: {operation} on {key or '-'} was about to change the store "
                            f"when the service stopped or could not record its outcome: the change may or "
                            f"may not have been made")
    if since_checkpoint > checkpoint_every:
        return fail(f"missing checkpoint: the last {since_checkpoint} records are not sealed")
    last_checkpoint = state.last_checkpoint
    head_file = head_path(data_dir, chain)
    head = read_signed_file(head_file) if lines is None else None
    if head is not None:
        if not _check_signature(head, public_key):
            report.problems.append(f"{head_file.name}: bad signature")
        elif last_checkpoint is None or head.get("seq", 0) > last_checkpoint.get("seq", 0):
            report.problems.append(
                f"log cut: checkpoint #{head.get('seq')} recorded in {head_file.name} is missing from the "
                f"log "
                f"(it ends at checkpoint #{(last_checkpoint or {}).get('seq', 0)}, {where})")
        elif head.get("seq") == last_checkpoint.get("seq") and head != last_checkpoint:
            report.problems.append(f"{head_file.name}: differs from checkpoint #{head.get('seq')} in the log")
    elif report.checkpoints and lines is None:
        report.problems.append(f"{head_file.name} is missing although the log has checkpoints")
    if since_checkpoint:
        moment = now or datetime.now(UTC)
        age = (moment - first_unsealed_time).total_seconds() if first_unsealed_time else 0.0
        report.notes.append(f"{since_checkpoint} newest records are not sealed by a checkpoint yet "
                            f"(oldest {int(age)} s old)")
    return None
