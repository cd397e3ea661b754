"""Retention: removing whole sealed segments, after a signed record of what was removed.

Why signed and outside the log directory: once the oldest segments are gone, the first remaining
line chains to a hash nobody can recompute. ``DATA_DIR/audit-pruned.<chain>.json`` names the last
pruned segment, its sealing checkpoint (sequence number, record count) and the hash of its last
line, signed with the audit signing key; ``verify`` starts the chain from there, so it still
proves every remaining line and shows exactly what was pruned. Removing more segments than the
record names, or the record itself, breaks the chain at the first remaining line.

Only sealed segments (ending with a ``segment_end`` checkpoint, never written again) whose seal
is older than the cut-off go, oldest first; segments not yet exported (per an export cursor) stay
unless forced.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from keyservice.audit import segments
from keyservice.audit.records import (
    format_time,
    is_checkpoint,
    line_hash,
    parse_line,
    read_signed_file,
    signed_bytes,
)
from keyservice.files import write_atomic

PRUNE_TYPE = "prune"
PRUNE_VERSION = 1


def prune_path(data_dir: Path, chain: str = segments.DEFAULT_CHAIN) -> Path:
    """The chain's prune record, outside the log directory."""
    return Path(data_dir) / f"audit-pruned.{segments.check_chain(chain)}.json"


def prune_record(data_dir: Path, chain: str = segments.DEFAULT_CHAIN) -> dict[str, Any] | None:
    """The chain's newest prune record (unverified), or None if nothing was ever pruned."""
    return read_signed_file(prune_path(data_dir, chain))


class PruneRefused(Exception):
    """Nothing was pruned: the message says why (unexported data without ``force``)."""


@dataclass
class PruneResult:
    removed: list[Path]
    record: dict[str, Any] | None
    kept_unexported: int = 0


def _seal_of(path: Path) -> tuple[dict[str, Any], bytes] | None:
    """The segment's sealing checkpoint and its line, if the segment is sealed."""
    line = segments.last_line(path)
    record = parse_line(line) if line is not None else None
    if line is None or record is None or not is_checkpoint(record) or not record.get("segment_end"):
        return None
    return record, line


def prune(
    data_dir: Path,
    signer: Ed25519PrivateKey,
    before: datetime,
    *,
    chain: str = segments.DEFAULT_CHAIN,
    exported: Mapping[str, Any] | None = None,
    force: bool = False,
    now: datetime | None = None,
    on_record: Callable[[dict[str, Any]], None] | None = None,
) -> PruneResult:
    """Remove the chain's oldest sealed segments whose seal is older than ``before``.

    ``exported``: the chain's export position (``{"segment": N, "offset": B}``): segments before N,
    and N itself if B is its size, were exported completely. Without it, or with segments not
    exported, raise ``PruneRefused`` unless ``force``. ``on_record``: called with the signed
    record after it is written and before any segment is removed (PostgreSQL mode removes the
    table's copy of those lines there; if it raises, nothing is removed).
    """
    files = segments.segments(data_dir, chain)
    chosen: list[tuple[int, Path, dict[str, Any], bytes]] = []
    for number, path in files[:-1]:  # the newest segment is the open one
        seal = _seal_of(path)
        if seal is None:
            break
        when = datetime.fromisoformat(str(seal[0].get("time", "")).replace("Z", "+00:00"))
        if when >= before:
            break
        chosen.append((number, path, *seal))
    if not chosen:
        return PruneResult([], None)
    at_segment, at_offset = int((exported or {}).get("segment", 0)), int((exported or {}).get("offset", 0))
    unexported = [c for c in chosen
                  if c[0] > at_segment or (c[0] == at_segment and at_offset < c[1].stat().st_size)]
    if unexported and not force:
        raise PruneRefused(
            f"{len(unexported)} of the {len(chosen)} segments to prune are not exported yet"
            + (" (no export cursor given)" if exported is None else "")
            + ": export them first, or pass --force")
    number, _path, seal, line = chosen[-1]
    record: dict[str, Any] = {
        "type": PRUNE_TYPE,
        "version": PRUNE_VERSION,
        "chain": chain,
        "time": format_time(now or datetime.now(UTC)),
        "before": format_time(before),
        "through_segment": number,
        "records": seal.get("records"),
        "checkpoint_seq": seal.get("seq"),
        "last_hash": line_hash(line),
        "previous_prune": (prune_record(data_dir, chain) or {}).get("signature"),
    }
    record["signature"] = base64.b64encode(signer.sign(signed_bytes(record))).decode()
    # The record first: a crash between it and the removals leaves segments the record says are
    # gone; verify then starts after them (and ``prune`` again removes them).
    write_atomic(prune_path(data_dir, chain), json.dumps(record).encode() + b"\n")
    if on_record is not None:
        on_record(record)
    removed = []
    for _number, path, _seal, _line in chosen:
        os.unlink(path)
        removed.append(path)
    segments.fsync_dir(segments.chain_dir(data_dir, chain))
    return PruneResult(removed, record, len(unexported))
