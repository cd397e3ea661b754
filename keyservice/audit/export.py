"""Export to a SIEM: every request record as one JSON line, resumable from a cursor.

Why a cursor file and an output file moved together: a shipper (Splunk forwarder, Elastic agent,
Promtail/Alloy for Loki, Vector, Fluent Bit) tails a file; after a kill the export must go on
exactly where the last *durable* line ended. ``export`` appends lines to ``output``, fsyncs it,
then writes the cursor (per chain: segment, byte offset and sequence number of the next line, and
the output's size) atomically. On start it cuts the output back to the size the cursor names, so
lines written after the last cursor are written again exactly once: no loss, no duplicate.
Without an output file (stdout) delivery is at-least-once; every line carries ``chain`` and
``seq``, which identify a record uniquely, for the receiver to drop repeats.

Lines are the records as logged (the CloudTrail-like shape of docs/AUDIT.md) plus ``chain`` and
``seq`` (the record's ordinal in its chain, from 1). Checkpoints are not exported.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO, Any

from keyservice.audit import segments
from keyservice.audit.prune import prune_record
from keyservice.audit.records import is_checkpoint, parse_line, parse_time
from keyservice.files import write_atomic

CURSOR_VERSION = 1
_BATCH = 5000


@dataclass
class Cursor:
    """Per chain, the next line to export: ``{"segment": N, "offset": B, "seq": S}``."""

    chains: dict[str, dict[str, int]] = field(default_factory=dict)
    output_size: int | None = None

    @classmethod
    def load(cls, path: Path) -> Cursor:
        try:
            data = json.loads(Path(path).read_bytes())
        except FileNotFoundError:
            return cls()
        if not isinstance(data, dict) or data.get("version") != CURSOR_VERSION:
            raise ValueError(f"{path} is not an export cursor")
        return cls(dict(data.get("chains", {})), data.get("output_size"))

    def save(self, path: Path) -> None:
        body = {"version": CURSOR_VERSION, "chains": self.chains, "output_size": self.output_size}
        write_atomic(Path(path), json.dumps(body, sort_keys=True).encode() + b"\n")


def _new_lines(
    data_dir: Path, chain: str, position: dict[str, int]
) -> Iterator[tuple[dict[str, Any], dict[str, int]]]:
    """(record, position after it) for each request record from ``position`` on."""
    segment, offset, seq = position.get("segment", 0), position.get("offset", 0), position.get("seq", 0)
    files = segments.segments(data_dir, chain)
    if files and segment < files[0][0]:
        if segment == 0 and files[0][0] > 1:  # a fresh cursor on a pruned chain
            seq = int((prune_record(data_dir, chain) or {}).get("records") or 0)
        segment, offset = files[0][0], 0
    for line in segments.read_chain(data_dir, chain, segment=segment, offset=offset):
        record = parse_line(line.data)
        after = {"segment": line.segment, "offset": line.offset + len(line.data) + 1}
        if record is None:
            continue
        if is_checkpoint(record):
            after["seq"] = seq
            yield {}, after
            continue
        seq += 1
        after["seq"] = seq
        yield record, after


def export(
    data_dir: Path,
    out: IO[bytes],
    *,
    cursor_path: Path | None = None,
    since: datetime | None = None,
    follow: bool = False,
    poll: float = 0.5,
    stop: Callable[[], bool] = lambda: False,
    batch: int | None = None,
) -> int:
    """Write the records after the cursor (and not older than ``since``) to ``out``; return how many.

    ``out`` should be a file opened for appending (exactly-once with a cursor), stdout, or a
    ``syslog.SyslogOut`` (at least once); the cursor moves every ``batch`` records, after
    ``out.flush()``."""
    batch = batch or _BATCH
    cursor = Cursor.load(cursor_path) if cursor_path is not None else Cursor()
    seekable = _seekable(out)
    if seekable and cursor.output_size is not None:
        out.flush()
        os.ftruncate(out.fileno(), cursor.output_size)
        out.seek(cursor.output_size)
    total = 0
    while True:
        wrote = 0
        for chain in segments.chains(data_dir):
            position = cursor.chains.setdefault(chain, {"segment": 0, "offset": 0, "seq": 0})
            pending = 0
            for record, after in _new_lines(data_dir, chain, position):
                if record and (since is None or (parse_time(record.get("time")) or since) >= since):
                    out.write(json.dumps({**record, "chain": chain, "seq": after["seq"]},
                                         ensure_ascii=False, separators=(",", ":")).encode() + b"\n")
                    pending += 1
                    wrote += 1
                position.update(after)
                if pending >= batch:
                    _commit(out, cursor, cursor_path, seekable)
                    pending = 0
        _commit(out, cursor, cursor_path, seekable)
        total += wrote
        if not follow or stop():
            return total
        if not wrote:
            time.sleep(poll)


def _seekable(out: IO[bytes]) -> bool:
    try:
        return out.seekable() and os.path.isfile(f"/proc/self/fd/{out.fileno()}")
    except (OSError, ValueError, AttributeError):
        return False


def _commit(out: IO[bytes], cursor: Cursor, cursor_path: Path | None, seekable: bool) -> None:
    """Make the written lines durable, then move the cursor past them."""
    out.flush()
    if seekable:
        with contextlib.suppress(OSError):
            os.fsync(out.fileno())
        cursor.output_size = out.tell()
    if cursor_path is not None:
        cursor.save(cursor_path)
