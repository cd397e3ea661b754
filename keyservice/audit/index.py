"""The audit index: a SQLite cache beside the log that finds records without reading them all.

Why a cache and not a second log: the log (``segments``) is the source of truth, signed and
chained; the index holds, per request record (not intents), its chain, sequence number (its ordinal in the
chain), segment and byte offset, and the fields a security officer asks about (docs/AUDIT.md,
"Index"). Queries read the records themselves from the log at those offsets. The index is filled
from complete lines already in the log (``update``: never ahead of the log), can be deleted at any
time and rebuilt (``reindex``), and is checked before it answers (``coverage``): sequence numbers
contiguous, the last indexed line's hash equal to the log's line at that offset, nothing indexed
past the log's end. An index that fails the check is not used.

Strings (paths, users, principals, key ARNs, ...) are stored once in ``strings`` and referred to
by number, which keeps the index under half the log's size. ``activity`` and ``activity_day``
(per UTC hour / day, file and local user) and ``key_principals`` are summaries kept in the same
transactions as the rows they summarize, for ``audit files --top`` and ``audit principals``.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from hashlib import blake2b as _blake2b
from pathlib import Path
from typing import Any

from keyservice.audit import segments
from keyservice.audit.prune import prune_record
from keyservice.audit.records import is_checkpoint, is_create, is_intent, is_open, line_hash, parse_line

INDEX_FILE = "index.sqlite"
INDEX_VERSION = 7  # 7: directory-key mounts' reported opens and creates counted in the summaries
_BATCH = 20000
SEQ_BITS = 40  # a row's id is chain << SEQ_BITS | seq: contiguity is then a count and a few seeks
FILE_ID_CONTEXT = "kmsfs:file-id"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS chains (
    id INTEGER PRIMARY KEY, name TEXT UNIQUE NOT NULL,
    first_seq INTEGER NOT NULL,  -- the first record indexed (after a prune: not 1)
    seq INTEGER NOT NULL,        -- the last record indexed (first_seq - 1 when none)
    segment INTEGER NOT NULL, offset INTEGER NOT NULL, length INTEGER NOT NULL, -- last line indexed
    hash TEXT NOT NULL           -- its line hash
);
CREATE TABLE IF NOT EXISTS chain_lines (chain INTEGER PRIMARY KEY, lines INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS damaged (chain INTEGER NOT NULL, line INTEGER NOT NULL);  -- not a JSON object
CREATE TABLE IF NOT EXISTS strings (id INTEGER PRIMARY KEY, s TEXT UNIQUE NOT NULL);
CREATE TABLE IF NOT EXISTS rec (
    id INTEGER PRIMARY KEY,  -- chains.id << 40 | seq (the record's ordinal in its chain)
    seg INTEGER NOT NULL, off INTEGER NOT NULL, len INTEGER NOT NULL,
    t INTEGER NOT NULL,  -- ms since the epoch
    op INTEGER, outcome INTEGER NOT NULL, principal INTEGER, akid INTEGER, key INTEGER, kver INTEGER,
    path INTEGER, user INTEGER, uid INTEGER, proc INTEGER, fid INTEGER, rid INTEGER
);
CREATE TABLE IF NOT EXISTS activity (
    hour INTEGER NOT NULL, path INTEGER NOT NULL, user INTEGER NOT NULL,
    opens INTEGER NOT NULL, created INTEGER NOT NULL, refused INTEGER NOT NULL, last INTEGER NOT NULL,
    PRIMARY KEY (hour, path, user)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS activity_day (  -- the same per UTC day: whole days of a period in one row each
    day INTEGER NOT NULL, path INTEGER NOT NULL, user INTEGER NOT NULL,
    opens INTEGER NOT NULL, created INTEGER NOT NULL, refused INTEGER NOT NULL, last INTEGER NOT NULL,
    PRIMARY KEY (day, path, user)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS key_principals (
    key INTEGER NOT NULL, principal INTEGER NOT NULL, akid INTEGER NOT NULL, op INTEGER NOT NULL,
    n INTEGER NOT NULL, refused INTEGER NOT NULL, first INTEGER NOT NULL, last INTEGER NOT NULL,
    PRIMARY KEY (key, principal, akid, op)
) WITHOUT ROWID;
"""

# Secondary indexes, created after a bulk load (faster than maintaining them row by row). Those of
# the file and the local user, whose answers are the largest (a hot file's opens, a heavy user's
# hour), cover the answer's columns in its order: no table row read per record, no sort. The
# process and the request id are kept in every row but have no B-tree: no question selects by
# them, and the request id's, in random order, was the dearest to keep up (docs/AUDIT.md, "Index").
_INDEXES = """
CREATE INDEX IF NOT EXISTS rec_t ON rec (t);
CREATE INDEX IF NOT EXISTS rec_op ON rec (op, t);
CREATE INDEX IF NOT EXISTS rec_error ON rec (t) WHERE outcome = 1;
CREATE INDEX IF NOT EXISTS rec_principal ON rec (principal, t);
CREATE INDEX IF NOT EXISTS rec_akid ON rec (akid, t);
CREATE INDEX IF NOT EXISTS rec_key ON rec (key, t);
CREATE INDEX IF NOT EXISTS rec_path ON rec (path, t, id, seg, off, len) WHERE path IS NOT NULL;
CREATE INDEX IF NOT EXISTS rec_user ON rec (user, t, id, seg, off, len) WHERE user IS NOT NULL;
CREATE INDEX IF NOT EXISTS rec_uid ON rec (uid, t) WHERE uid IS NOT NULL;
CREATE INDEX IF NOT EXISTS rec_fid ON rec (fid) WHERE fid IS NOT NULL;
"""


class IndexMismatch(Exception):
    """The index does not describe the log (edited, stale after a rollback, or for another log)."""


class IndexOutdated(IndexMismatch):
    """The index was written by another version of this module: rebuild it."""


def row_id(chain_id: int, seq: int) -> int:
    return chain_id << SEQ_BITS | seq


def index_path(data_dir: Path) -> Path:
    return segments.audit_dir(data_dir) / INDEX_FILE


def request_number(request_id: object) -> int | None:
    """A 63-bit number standing for a request id (looked up, then confirmed on the record)."""
    if request_id.__class__ is not str or not request_id:
        return None
    return int.from_bytes(_blake2b(request_id.encode(), digest_size=8).digest()) >> 1  # type: ignore[union-attr]


def connect(data_dir: Path, *, create: bool = True) -> sqlite3.Connection:
    """Open (creating it if asked) the index with its schema."""
    path = index_path(data_dir)
    if not create and not path.exists():
        raise FileNotFoundError(path)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fresh = not path.exists()
    if fresh:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600))
    conn = sqlite3.connect(path, timeout=60, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")  # a cache: a lost tail is re-indexed from the log
    _tune(conn)
    conn.executescript(_SCHEMA)
    version = conn.execute("SELECT v FROM meta WHERE k='version'").fetchone()
    if version is None:
        conn.execute("INSERT INTO meta VALUES ('version', ?)", (str(INDEX_VERSION),))
    elif version[0] != str(INDEX_VERSION):
        conn.close()
        raise IndexOutdated(f"index format {version[0]}, expected {INDEX_VERSION}: "
                            "run `keyservice audit reindex`")
    return conn


def _tune(conn: sqlite3.Connection) -> None:
    conn.execute("PRAGMA cache_size=-262144")  # up to 256 MiB, allocated as pages are read
    # Pages read through a memory map, not one pread each: at 10 M records the index is ~2 GB
    # and a question or a catch-up touches pages all over it (address space only, not memory).
    conn.execute("PRAGMA mmap_size=68719476736")
    conn.execute("PRAGMA temp_store=MEMORY")


@dataclass
class ChainPosition:
    id: int
    name: str
    first_seq: int
    seq: int
    segment: int
    offset: int
    length: int
    hash: str

    @property
    def next(self) -> tuple[int, int]:
        """Where the first line not indexed yet starts."""
        return self.segment, self.offset + self.length + 1 if self.hash else 0


def _positions(conn: sqlite3.Connection) -> dict[str, ChainPosition]:
    rows = conn.execute("SELECT id, name, first_seq, seq, segment, offset, length, hash FROM chains")
    return {row[1]: ChainPosition(*row) for row in rows}


class _Strings:
    """The ``strings`` table through a cache: text -> number. Filled as texts are met (a catch-up
    of a few thousand records meets a few hundred texts; loading the whole table, 100,000 texts at
    10 M records, cost more than indexing them)."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self.ids: dict[str, int] = {}

    def id(self, text: object) -> int | None:
        if text is None:
            return None
        if not isinstance(text, str):
            text = str(text)
        found = self.ids.get(text)
        if found is None:
            row = self.conn.execute("SELECT id FROM strings WHERE s = ?", (text,)).fetchone()
            if row is None:
                found = self.conn.execute("INSERT INTO strings (s) VALUES (?)", (text,)).lastrowid
            else:
                found = row[0]
            assert found is not None
            self.ids[text] = found
        return found


_SECONDS: dict[str, int] = {}


def time_ms(text: object) -> int:
    """``2026-05-01T09:00:00.123Z`` -> ms since the epoch (0 when unparseable)."""
    if not isinstance(text, str) or len(text) < 19:
        return 0
    head = text[:19]
    seconds = _SECONDS.get(head)
    if seconds is None:
        try:
            seconds = int(datetime.fromisoformat(head).replace(tzinfo=UTC).timestamp())
        except ValueError:
            return 0
        if len(_SECONDS) > 100000:
            _SECONDS.clear()
        _SECONDS[head] = seconds
    millis = text[20:23]
    return seconds * 1000 + (int(millis) if millis.isdigit() else 0)


class _Writer:
    """Turns records into rows and summaries; flushed in one transaction per batch."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self._strings: _Strings | None = None  # loaded on the first record: most catch-ups add none
        self.rows: list[tuple[Any, ...]] = []
        self.activity: dict[tuple[int, int, int], list[int]] = {}
        self.keys: dict[tuple[int, int, int, int], list[int]] = {}

    def add(self, rid: int, segment: int, offset: int, length: int, r: dict[str, Any]) -> None:
        # The hot loop of indexing (tens of thousands of records a second): plain dict look-ups.
        strings = self._strings
        if strings is None:
            strings = self._strings = _Strings(self.conn)
        ids = strings.ids
        sid = strings.id
        get = r.get
        caller = get("caller")
        if caller.__class__ is not dict:
            caller = {}
        cget = caller.get
        context = get("encryption_context")
        fid = context.get(FILE_ID_CONTEXT) if context.__class__ is dict else None
        t = time_ms(get("time"))
        error = 0 if get("outcome") == "success" else 1
        path = cget("path")
        if path.__class__ is not str:
            path = None
        user = cget("user")
        uid = cget("uid")
        if uid.__class__ is not int or not -(1 << 62) < uid < 1 << 62:
            uid = None
        kver = get("key_version")
        if kver.__class__ is not int or not -(1 << 62) < kver < 1 << 62:
            kver = None
        operation, principal = get("operation"), get("principal")
        akid, key = get("access_key_id"), get("key_id")
        process = cget("process")
        op = None if operation is None else ids.get(operation) or sid(operation)
        principal = None if principal is None else ids.get(principal) or sid(principal)
        akid = None if akid is None else ids.get(akid) or sid(akid)
        key = None if key is None else ids.get(key) or sid(key)
        path_id = None if path is None else ids.get(path) or sid(path)
        user_id = None if user is None else ids.get(user) or sid(user)
        proc = None if process is None else ids.get(process) or sid(process)
        fid_id = None if fid is None else ids.get(fid) or sid(fid)
        self.rows.append((rid, segment, offset, length, t, op, error, principal, akid, key, kver,
                          path_id, user_id, uid, proc, fid_id, request_number(get("request_id"))))
        if path_id is not None:
            who = user_id if user_id is not None else sid(f"uid={uid}" if uid is not None else "-")
            group = (t // 3600000, path_id, who)
            slot = self.activity.get(group)
            if slot is None:
                slot = self.activity[group] = [0, 0, 0, 0]
            if error:
                slot[2] += 1
            elif is_create(r):
                slot[1] += 1
            elif is_open(r):
                slot[0] += 1
            if t > slot[3]:
                slot[3] = t
        if key is not None:
            kgroup = (key, principal or 0, akid or 0, op or 0)
            entry = self.keys.get(kgroup)
            if entry is None:
                self.keys[kgroup] = [1, error, t, t]
            else:
                entry[0] += 1
                entry[1] += error
                if t < entry[2]:
                    entry[2] = t
                if t > entry[3]:
                    entry[3] = t

    def flush(self) -> None:
        self.conn.executemany(
            "INSERT INTO rec (id, seg, off, len, t, op, outcome, principal, akid, key, kver, path,"
            " user, uid, proc, fid, rid) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)", self.rows)
        self.conn.executemany(
            "INSERT INTO activity VALUES (?,?,?,?,?,?,?) ON CONFLICT DO UPDATE SET"
            " opens = opens + excluded.opens, created = created + excluded.created,"
            " refused = refused + excluded.refused,"
            " last = max(last, excluded.last)", [(*k, *v) for k, v in self.activity.items()])
        # Hours already summed into activity_day (``_close_hours``) get late records directly
        # (another chain's, behind); the open hours are summed from the hourly rows once they end,
        # in key order: keeping each day's row per file and user up to date record by record
        # rewrote scattered pages for every catch-up batch at 10 M records (29 % of its CPU).
        done = closed_hours(self.conn)
        days: dict[tuple[int, int, int], list[int]] = {}
        newest_hour = 0
        for (hour, path, user), (opens, created, refused, last) in self.activity.items():
            newest_hour = max(newest_hour, hour)
            if hour >= done:
                continue
            day = days.setdefault((hour // 24, path, user), [0, 0, 0, 0])
            day[0] += opens
            day[1] += created
            day[2] += refused
            day[3] = max(day[3], last)
        self.conn.executemany(
            "INSERT INTO activity_day VALUES (?,?,?,?,?,?,?) ON CONFLICT DO UPDATE SET"
            " opens = opens + excluded.opens, created = created + excluded.created,"
            " refused = refused + excluded.refused,"
            " last = max(last, excluded.last)", [(*k, *v) for k, v in days.items()])
        self.conn.executemany(
            "INSERT INTO key_principals VALUES (?,?,?,?,?,?,?,?) ON CONFLICT DO UPDATE SET"
            " n = n + excluded.n, refused = refused + excluded.refused, first = min(first, excluded.first),"
            " last = max(last, excluded.last)", [(*k, *v) for k, v in self.keys.items()])
        if newest_hour > done:
            _close_hours(self.conn, done, newest_hour)
        self.rows.clear()
        self.activity.clear()
        self.keys.clear()


def closed_hours(conn: sqlite3.Connection) -> int:
    """The first UTC hour (hours since the epoch) not yet summed into ``activity_day``: the hours
    before it are in their day's row there, it and the later ones only in ``activity``."""
    row = conn.execute("SELECT v FROM meta WHERE k = 'closed_hours'").fetchone()
    return int(row[0]) if row else 0


def _close_hours(conn: sqlite3.Connection, first: int, end: int) -> None:
    """Add the hourly rows of hours ``first..end-1`` (ended: a newer record exists) to their
    days' rows in ``activity_day``, in key order."""
    conn.execute(
        "INSERT INTO activity_day SELECT hour / 24, path, user, sum(opens), sum(created), sum(refused), "
        "max(last) FROM activity WHERE hour >= ? AND hour < ? GROUP BY 1, 2, 3 ORDER BY 1, 2, 3 "
        "ON CONFLICT DO UPDATE SET opens = opens + excluded.opens, created = created + excluded.created, "
        "refused = refused + excluded.refused, last = max(last, excluded.last)",
        (first if first else -(1 << 62), end))
    conn.execute("INSERT OR REPLACE INTO meta VALUES ('closed_hours', ?)", (str(end),))


def _line_at(data_dir: Path, chain: str, segment: int, offset: int, length: int) -> bytes | None:
    path = segments.segment_path(data_dir, chain, segment)
    try:
        with path.open("rb") as f:
            f.seek(offset)
            data = f.read(length + 1)
    except FileNotFoundError:
        return None
    return data[:-1] if len(data) == length + 1 and data.endswith(b"\n") else None


def _check_position(data_dir: Path, position: ChainPosition) -> None:
    if not position.hash:
        return
    line = _line_at(data_dir, position.name, position.segment, position.offset, position.length)
    if line is None or line_hash(line) != position.hash:
        # A pruned segment is gone legitimately: the position then lies before the prune record.
        pruned = prune_record(data_dir, position.name) or {}
        if line is None and position.segment <= int(pruned.get("through_segment") or 0):
            return
        raise IndexMismatch(f"chain {position.name}: the last line indexed (segment {position.segment}, byte "
                            f"{position.offset}) is not in the log any more, or differs")


def update(data_dir: Path, *, conn: sqlite3.Connection | None = None, limit: int | None = None) -> int:
    """Index every complete line not indexed yet; return how many records were added.

    Raises ``IndexMismatch`` if the index does not continue the log."""
    own = conn is None
    conn = conn or connect(data_dir)
    added = 0
    try:
        for chain in segments.chains(data_dir):
            added += _update_chain(data_dir, conn, chain, limit)
    finally:
        if own:
            conn.close()
    return added


def _update_chain(data_dir: Path, conn: sqlite3.Connection, chain: str, limit: int | None) -> int:
    conn.execute("BEGIN IMMEDIATE")
    try:
        position = _positions(conn).get(chain)
        if position is None:
            first = int((prune_record(data_dir, chain) or {}).get("records") or 0) + 1
            cur = conn.execute("INSERT INTO chains (name, first_seq, seq, segment, offset, length, hash) "
                               "VALUES (?, ?, ?, 0, 0, 0, '')", (chain, first, first - 1))
            assert cur.lastrowid is not None
            position = ChainPosition(cur.lastrowid, chain, first, first - 1, 0, 0, 0, "")
        _check_position(data_dir, position)
        writer = _Writer(conn)
        segment, offset = position.next
        files = segments.segments(data_dir, chain)
        if files and segment < files[0][0]:
            segment, offset = files[0][0], 0
        seq, added, last = position.seq, 0, None
        base = row_id(position.id, 0)
        counted = conn.execute("SELECT lines FROM chain_lines WHERE chain = ?", (position.id,)).fetchone()
        number = counted[0] if counted else 0  # lines read so far, checkpoints and damaged ones included
        for line in segments.read_chain(data_dir, chain, segment=segment, offset=offset):
            last = line
            number += 1
            if b'"checkpoint"' in line.data:
                record = parse_line(line.data)
                if record is not None and is_checkpoint(record):
                    continue
            else:
                record = parse_line(line.data)
            if record is None:  # damaged: reported with every answer (and by verify)
                conn.execute("INSERT INTO damaged VALUES (?, ?)", (position.id, number))
                continue
            if is_intent(record):
                continue  # the write-ahead line of a state change: its outcome record is indexed
            seq += 1
            added += 1
            writer.add(base | seq, line.segment, line.offset, len(line.data), record)
            if len(writer.rows) >= _BATCH:
                writer.flush()
                _save_position(conn, position.id, seq, line, number)
                conn.execute("COMMIT")
                conn.execute("BEGIN IMMEDIATE")
                if limit is not None and added >= limit:
                    break
        writer.flush()
        if last is not None:
            _save_position(conn, position.id, seq, last, number)
        conn.execute("COMMIT")
    except BaseException:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")
        raise
    return added


def _save_position(
    conn: sqlite3.Connection, chain_id: int, seq: int, line: segments.Line, number: int
) -> None:
    conn.execute("UPDATE chains SET seq = ?, segment = ?, offset = ?, length = ?, hash = ? WHERE id = ?",
                 (seq, line.segment, line.offset, len(line.data), line_hash(line.data), chain_id))
    conn.execute("INSERT OR REPLACE INTO chain_lines VALUES (?, ?)", (chain_id, number))


def damaged_lines(conn: sqlite3.Connection) -> list[int]:
    """Line numbers (1-based, through each chain's segments) that are not a JSON object."""
    return [line for (line,) in conn.execute("SELECT line FROM damaged ORDER BY chain, line")]


def reindex(data_dir: Path) -> int:
    """Rebuild the index from the log; return the records indexed. The old index is replaced at
    the end (a reader meanwhile keeps using, and checking, the old one)."""
    final = index_path(data_dir)
    tmp = final.with_name(final.name + ".new")
    for leftover in (tmp, tmp.with_name(tmp.name + "-wal"), tmp.with_name(tmp.name + "-shm")):
        with contextlib.suppress(FileNotFoundError):
            leftover.unlink()
    final.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600))
    conn = sqlite3.connect(tmp, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=OFF")
        conn.execute("PRAGMA synchronous=OFF")
        _tune(conn)
        conn.executescript(_SCHEMA)
        conn.execute("INSERT INTO meta VALUES ('version', ?)", (str(INDEX_VERSION),))
        added = update(data_dir, conn=conn)
        conn.executescript(_INDEXES)
        conn.execute("ANALYZE")
    finally:
        conn.close()
    os.replace(tmp, final)
    for stale in (final.with_name(final.name + "-wal"), final.with_name(final.name + "-shm")):
        with contextlib.suppress(FileNotFoundError):
            stale.unlink()
    segments.fsync_dir(final.parent)
    return added


def open_checked(data_dir: Path) -> sqlite3.Connection:
    """The index, brought up to the log's head and checked to cover it; raises ``IndexMismatch``
    (or ``FileNotFoundError`` when there is none) if it cannot answer for the whole log."""
    conn = connect(data_dir, create=False)
    try:
        conn.executescript(_INDEXES)
        update(data_dir, conn=conn)
        coverage(data_dir, conn)
    except BaseException:
        conn.close()
        raise
    return conn


def coverage(data_dir: Path, conn: sqlite3.Connection) -> None:
    """Raise ``IndexMismatch`` unless, for every chain, the index holds rows for exactly the
    sequence numbers ``first_seq..seq`` and its last indexed line is, byte for byte, in the log.
    (Lines the writer appended after ``update`` ran are newer than the question: not a mismatch.)

    Cheap at any size: a row's id is ``chain << 40 | seq``, so the rows are exactly those ids iff
    every chain's lowest and highest id are its first and last, no id lies outside the chains'
    ranges (a few B-tree seeks), and the table holds as many rows as the ranges have numbers (one
    ``count(*)``, which SQLite answers from the leaf pages of its narrowest index, not row by row)."""
    positions = _positions(conn)
    expected_rows = 0
    ranges: list[tuple[int, int]] = []
    for chain in segments.chains(data_dir):
        position = positions.pop(chain, None)
        files = segments.segments(data_dir, chain)
        if position is None:
            if any(f.stat().st_size for _n, f in files):
                raise IndexMismatch(f"chain {chain} is not indexed")
            continue
        pruned = int((prune_record(data_dir, chain) or {}).get("records") or 0)
        if pruned >= position.first_seq:
            raise IndexMismatch(f"chain {chain}: records up to {pruned} were pruned after they were "
                                f"indexed (`keyservice audit prune` rebuilds the index; run "
                                f"`keyservice audit reindex`)")
        low, high = row_id(position.id, 0), row_id(position.id + 1, 0)
        first = conn.execute("SELECT min(id) FROM rec WHERE id >= ? AND id < ?", (low, high)).fetchone()[0]
        last = conn.execute("SELECT max(id) FROM rec WHERE id >= ? AND id < ?", (low, high)).fetchone()[0]
        count = position.seq - position.first_seq + 1
        if count < 0 or (count and (first, last) != (low | position.first_seq, low | position.seq)) or (
                not count and first is not None):
            raise IndexMismatch(f"chain {chain}: the index's rows do not run from {position.first_seq} to "
                                f"{position.seq} (rows removed, added or renumbered)")
        expected_rows += count
        ranges.append((low, high))
        _check_position(data_dir, position)
    if positions:
        raise IndexMismatch(f"the index names chains the log does not have: {', '.join(sorted(positions))}")
    ranges.sort()
    gaps = ["id < 0"] + [f"(id >= {high} AND id < {low})"
                         for (_l, high), (low, _h) in zip(ranges, ranges[1:], strict=False)]
    gaps.append(f"id >= {ranges[-1][1]}" if ranges else "1")
    gaps.append(f"id < {ranges[0][0]}" if ranges else "1")
    for gap in gaps:  # each a seek in the table's B-tree
        if conn.execute(f"SELECT 1 FROM rec WHERE {gap} LIMIT 1").fetchone():
            raise IndexMismatch("the index holds rows of no chain it knows (rows added)")
    (rows,) = conn.execute("SELECT count(*) FROM rec").fetchone()
    if rows != expected_rows:
        raise IndexMismatch(f"the index holds {rows} records, {expected_rows} expected "
                            "(rows removed or added)")


_MAX_LINE = 16 * 1024 * 1024  # a row claiming a longer line is not believed (nor allocated)
_GAP = 4096  # rows whose lines lie closer than this are read with one pread
_CLUSTER = 1024 * 1024


def lines(data_dir: Path, conn: sqlite3.Connection, where: str, params: list[Any], *,
          newest_first: bool = False, limit: int | None = None) -> Iterator[bytes]:
    """The log lines of the rows of ``rec`` matching ``where``, in time order (or newest first,
    at most ``limit``), read at the rows' offsets.

    Read in file order (a row's id orders it within its chain), with one ``pread`` for each run
    of lines closer than 4 KiB to one another: a heavy user's hour is a quarter of the lines of
    that stretch of the log, and a syscall per line was a fifth of such an answer's CPU.

    Raises ``IndexMismatch`` if a row does not point at a whole line of the log (the bytes before
    and after it must be line ends), or if two rows point at the same line (a row of one record
    moved onto another's would hide the first)."""
    order = "r.t DESC, r.id DESC" if newest_first else "r.t, r.id"
    tail = f" LIMIT {int(limit)}" if limit is not None else ""
    rows = conn.execute(f"SELECT r.id, r.seg, r.off, r.len FROM rec r WHERE {where} ORDER BY {order}{tail}",
                        params).fetchall()
    found = _read_rows(data_dir, dict(conn.execute("SELECT id, name FROM chains")), sorted(rows))
    for row in rows:
        yield found[row[0]]


def _read_rows(
    data_dir: Path, names: dict[int, str], rows: list[tuple[int, int, int, int]]
) -> dict[int, bytes]:
    """Row id -> its line, for ``rows`` sorted by id (so by chain, segment and offset)."""
    found: dict[int, bytes] = {}
    seen: set[tuple[int, int, int]] = set()
    fds: dict[tuple[int, int], int] = {}
    pread = os.pread
    count = len(rows)
    try:
        i = 0
        while i < count:
            rid, segment, offset, length = rows[i]
            chain = rid >> SEQ_BITS
            # the run of rows from i whose lines follow closely in the same segment
            j, end = i + 1, offset + length + 1
            while j < count:
                nid, nseg, noff, nlen = rows[j]
                if nid >> SEQ_BITS != chain or nseg != segment or not end <= noff < end + _GAP or \
                        noff + nlen + 1 - offset > _CLUSTER:
                    break
                end = noff + nlen + 1
                j += 1
            fd = fds.get((chain, segment))
            if fd is None:
                fd = fds[(chain, segment)] = _open_segment(data_dir, names, chain, segment)
            start = offset - 1 if offset else 0
            if not 0 < length <= _MAX_LINE or offset < 0:
                raise IndexMismatch(f"a row of the index does not point at a line of the log (segment "
                                    f"{segment}, byte {offset})")
            block = pread(fd, end - start, start)
            for k in range(i, j):
                rid, _segment, offset, length = rows[k]
                place = (chain, segment, offset)
                if place in seen:
                    raise IndexMismatch(f"two rows of the index point at one line (segment {segment}, "
                                        f"byte {offset})")
                seen.add(place)
                at = offset - start
                before = block[at - 1] if offset else 10
                if at + length >= len(block) or before != 10 or block[at + length] != 10 or length <= 0:
                    raise IndexMismatch(f"a row of the index does not point at a line of the log (segment "
                                        f"{segment}, byte {offset})")
                found[rid] = block[at:at + length]
            i = j
    finally:
        for fd in fds.values():
            os.close(fd)
    return found


def _open_segment(data_dir: Path, names: dict[int, str], chain: int, segment: int) -> int:
    name = names.get(chain)
    if name is None:
        raise IndexMismatch("a row of the index names no chain")
    try:
        return os.open(segments.segment_path(data_dir, name, segment), os.O_RDONLY | os.O_CLOEXEC)
    except (FileNotFoundError, ValueError):
        raise IndexMismatch(f"chain {name}: the index points into segment {segment}, "
                            "not in the log") from None
