"""Verifying the audit log: the hash chain, the signed checkpoints and the head file.

Read-only; used by ``keyservice audit verify`` and the tests. See docs/AUDIT.md for what each
layer of tamper evidence catches.
"""


from __future__ import annotations

import base64
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from keyservice.audit.records import (
    DEFAULT_CHECKPOINT_EVERY,
    DEFAULT_CHECKPOINT_SECONDS,
    GENESIS_HASH,
    HEAD_FILE,
    MAIN_CHAIN,
    audit_path,
    head_path,
    is_checkpoint,
    key_fingerprint,
    line_hash,
    read_lines,
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


def _parse_time(text: object) -> datetime | None:
    try:
        return datetime.fromisoformat(str(text).replace("Z", "+00:00"))
    except ValueError:
        return None


def verify(
    data_dir: Path,
    public_key: Ed25519PublicKey,
    *,
    checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY,
    checkpoint_seconds: float = DEFAULT_CHECKPOINT_SECONDS,
    now: datetime | None = None,
    chain: str = MAIN_CHAIN,
    lines: Iterable[bytes] | None = None,
) -> VerifyReport:
    """Check one chain (``main`` unless named), every checkpoint's signature and spacing, and its head file.

    Stops at the first bad line: everything after it is untrustworthy anyway. ``lines``: check
    these (a chain read from the PostgreSQL table) instead of the file; there is no head file then.
    """
    report = VerifyReport(fingerprint=key_fingerprint(public_key))
    prev = GENESIS_HASH
    last_checkpoint: dict[str, Any] | None = None
    last_checkpoint_hash: str | None = None
    since_checkpoint = 0
    first_unsealed_time: datetime | None = None
    grace = timedelta(seconds=checkpoint_seconds * 2 + 5)

    def fail(number: int, message: str) -> VerifyReport:
        report.problems.append(f"line {number}: {message}")
        return report

    number = 0
    source = read_lines(audit_path(data_dir, chain)) if lines is None else lines
    for number, line in enumerate(source, start=1):
        try:
            record = json.loads(line)
        except ValueError:
            return fail(number, "not a JSON record (damaged or tampered)")
        if not isinstance(record, dict):
            return fail(number, "not a JSON object (damaged or tampered)")
        if record.get("prev_hash") != prev:
            return fail(number, "hash chain broken: a record before or at this line was edited, inserted, "
                                "removed or reordered")
        if is_checkpoint(record):
            seq = record.get("seq")
            expected_seq = (last_checkpoint or {}).get("seq", 0) + 1
            if not _check_signature(record, public_key):
                return fail(number, f"checkpoint #{seq}: bad signature (forged, or signed by another key)")
            if seq != expected_seq or record.get("previous_checkpoint") != last_checkpoint_hash:
                return fail(number, f"checkpoint #{seq}: expected #{expected_seq} (a checkpoint is missing)")
            if record.get("records") != report.records or record.get("sealed") != since_checkpoint:
                return fail(number, f"checkpoint #{seq}: seals {record.get('sealed')} records but "
                                    f"{since_checkpoint} precede it")
            if since_checkpoint > checkpoint_every:
                return fail(number, f"missing checkpoint: {since_checkpoint} records sealed at once "
                                    f"(at most {checkpoint_every} allowed)")
            when = _parse_time(record.get("time"))
            if record.get("recovered"):
                report.notes.append(f"checkpoint #{seq} sealed {since_checkpoint} records late, after an "
                                    f"unclean shutdown")
            elif first_unsealed_time and when and when - first_unsealed_time > grace:
                return fail(number, f"missing checkpoint: checkpoint #{seq} came "
                                    f"{int((when - first_unsealed_time).total_seconds())} s after the first "
                                    f"record it seals (at most {checkpoint_seconds:g} s allowed)")
            report.checkpoints += 1
            last_checkpoint, last_checkpoint_hash = record, line_hash(line)
            since_checkpoint, first_unsealed_time = 0, None
        else:
            report.records += 1
            since_checkpoint += 1
            if first_unsealed_time is None:
                first_unsealed_time = _parse_time(record.get("time"))
        prev = line_hash(line)

    report.unsealed = since_checkpoint
    if since_checkpoint > checkpoint_every:
        return fail(number, f"missing checkpoint: the last {since_checkpoint} records are not sealed")
    head = _read_head(data_dir, chain) if lines is None else None
    if head is not None:
        if not _check_signature(head, public_key):
            report.problems.append(f"{HEAD_FILE}: bad signature")
        elif last_checkpoint is None or head.get("seq", 0) > last_checkpoint.get("seq", 0):
            report.problems.append(
                f"log cut: checkpoint #{head.get('seq')} recorded in {HEAD_FILE} is missing from the log "
                f"(it ends at checkpoint #{(last_checkpoint or {}).get('seq', 0)}, line {number})")
        elif head.get("seq") == last_checkpoint.get("seq") and head != last_checkpoint:
            report.problems.append(f"{HEAD_FILE}: differs from checkpoint #{head.get('seq')} in the log")
    elif report.checkpoints and lines is None:
        report.problems.append(f"{HEAD_FILE} is missing although the log has checkpoints")
    if since_checkpoint:
        moment = now or datetime.now(UTC)
        age = (moment - first_unsealed_time).total_seconds() if first_unsealed_time else 0.0
        report.notes.append(f"{since_checkpoint} newest records are not sealed by a checkpoint yet "
                            f"(oldest {int(age)} s old)")
    return report


def _read_head(data_dir: Path, chain: str) -> dict[str, Any] | None:
    try:
        head = json.loads(head_path(data_dir, chain).read_bytes())
    except FileNotFoundError:
        return None
    except ValueError:
        return {"signature": ""}
    return head if isinstance(head, dict) else {"signature": ""}
