"""Where the audit log lives on disk: chains, their segment files, and reading lines with positions.

Why a module of its own: the writer (``log``), the verifier, the index, export and prune all need
to find the same files in the same order; only this module knows the names (docs/AUDIT.md,
"On-disk layout"). It knows nothing of the record format — a line is bytes here.

    DATA_DIR/audit/<chain>/0000000001.log, 0000000002.log, ...

One directory per hash chain (``main`` for a single-process service). The segment with the highest
number is the open one; every other one is sealed (it ends with a ``segment_end`` checkpoint) and
never written again. A log from before segments (``DATA_DIR/audit/audit.log``) is read as segment 1
of ``main`` until the writer moves it there (``migrate_legacy``: a rename, the bytes unchanged).
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

AUDIT_DIR = "audit"
LEGACY_FILE = "audit.log"
DEFAULT_CHAIN = "main"
DEFAULT_SEGMENT_BYTES = 256 * 1024 * 1024
_SEGMENT = re.compile(r"^(\d{10})\.log$")
_CHAIN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
_READ_BLOCK = 4 * 1024 * 1024


def check_chain(chain: str) -> str:
    """A chain id is a directory name: letters, digits, ``._:-``; raise ValueError otherwise."""
    if not _CHAIN.match(chain):
        raise ValueError(f"invalid audit chain id {chain!r}")
    return chain


def audit_dir(data_dir: Path) -> Path:
    return Path(data_dir) / AUDIT_DIR


def legacy_path(data_dir: Path) -> Path:
    return audit_dir(data_dir) / LEGACY_FILE


def chain_dir(data_dir: Path, chain: str = DEFAULT_CHAIN) -> Path:
    return audit_dir(data_dir) / check_chain(chain)


def segment_name(number: int) -> str:
    return f"{number:010d}.log"


def chains(data_dir: Path) -> list[str]:
    """Every chain with a directory (or the legacy file, for ``main``), sorted."""
    found = set()
    base = audit_dir(data_dir)
    with contextlib.suppress(FileNotFoundError):
        for entry in base.iterdir():
            if entry.is_dir() and _CHAIN.match(entry.name):
                found.add(entry.name)
    if legacy_path(data_dir).exists():
        found.add(DEFAULT_CHAIN)
    return sorted(found)


def segments(data_dir: Path, chain: str = DEFAULT_CHAIN) -> list[tuple[int, Path]]:
    """The chain's segment files as (number, path), oldest first."""
    found: list[tuple[int, Path]] = []
    with contextlib.suppress(FileNotFoundError):
        for entry in chain_dir(data_dir, chain).iterdir():
            m = _SEGMENT.match(entry.name)
            if m:
                found.append((int(m.group(1)), entry))
    if chain == DEFAULT_CHAIN and not found and legacy_path(data_dir).exists():
        found.append((1, legacy_path(data_dir)))
    return sorted(found)


def current_segment(data_dir: Path, chain: str = DEFAULT_CHAIN) -> Path:
    """The open segment (the newest), or where the first one will be."""
    found = segments(data_dir, chain)
    return found[-1][1] if found else chain_dir(data_dir, chain) / segment_name(1)


def segment_path(data_dir: Path, chain: str, number: int) -> Path:
    if chain == DEFAULT_CHAIN and not (chain_dir(data_dir, chain)).exists() and number == 1:
        legacy = legacy_path(data_dir)
        if legacy.exists():
            return legacy
    return chain_dir(data_dir, chain) / segment_name(number)


def fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # some file systems cannot fsync a directory
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def migrate_legacy(data_dir: Path) -> None:
    """Move a pre-segment ``audit/audit.log`` to ``audit/main/0000000001.log`` (a rename)."""
    legacy = legacy_path(data_dir)
    if not legacy.exists():
        return
    target_dir = chain_dir(data_dir, DEFAULT_CHAIN)
    target_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    if any(_SEGMENT.match(p.name) for p in target_dir.iterdir()):
        raise RuntimeError(f"both {legacy} and segments in {target_dir} exist; move one away")
    os.rename(legacy, target_dir / segment_name(1))
    fsync_dir(target_dir)
    fsync_dir(legacy.parent)


@dataclass(frozen=True)
class Line:
    """One complete line of a segment (without its newline) and where it is."""

    segment: int
    offset: int
    data: bytes


def read_segment(path: Path, number: int, start: int = 0) -> Iterator[Line]:
    """Complete lines of one segment from byte ``start``; a final line without newline is skipped
    (a write in progress, or torn by a crash)."""
    try:
        f = path.open("rb")
    except FileNotFoundError:
        return
    with f:
        f.seek(start)
        offset = start
        rest = b""
        while True:
            block = f.read(_READ_BLOCK)
            if not block:
                return
            data = rest + block
            pos = 0
            while True:
                nl = data.find(b"\n", pos)
                if nl < 0:
                    break
                yield Line(number, offset + pos, data[pos:nl])
                pos = nl + 1
            offset += pos
            rest = data[pos:]


def read_chain(
    data_dir: Path, chain: str = DEFAULT_CHAIN, *, segment: int = 0, offset: int = 0
) -> Iterator[Line]:
    """Every complete line of a chain in order, starting at (``segment``, ``offset``)."""
    for number, path in segments(data_dir, chain):
        if number < segment:
            continue
        yield from read_segment(path, number, offset if number == segment else 0)


def last_line(path: Path) -> bytes | None:
    """The last complete line of a file (without newline), or None if it has none."""
    try:
        f = path.open("rb")
    except FileNotFoundError:
        return None
    with f:
        pos = f.seek(0, os.SEEK_END)
        data = b""
        while pos > 0:
            step = min(64 * 1024, pos)
            pos -= step
            f.seek(pos)
            data = f.read(step) + data
            end = data.rfind(b"\n")
            if end < 0:
                continue
            start = data.rfind(b"\n", 0, end)
            if start >= 0 or pos == 0:
                return data[start + 1:end]
        return None
