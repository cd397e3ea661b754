"""Format version 3's in-file prefix, as pure functions: the header copy and the state record.

Why: copies made with ``rsync -a``, ``cp -r``, ``tar`` or a sync service drop extended
attributes, and with them the ``user.kmsfs.header`` xattr that holds each file's wrapped data key.
Version 3 keeps an exact copy of the header *inside* the backing file, before the first block, so
a copy of the cipherdir still decrypts. The xattr stays the primary; readers compare the two.

The same prefix holds the **state record**, which replaces two things version 2 kept outside the
data: the size-change marker (an xattr) and the filesystem's holes (``SEEK_HOLE``). Densifying
copies write holes as zeros, so version 3 records which blocks were never written (*hole runs*)
and reads an all-zero block as zeros only if the record says so; a written block that someone
overwrote with zeros stays EIO. The record is sealed with the data key (AES-GCM, AAD bound to the
file id and the prefix's fixed fields) and kept twice (slots 0 and 1, written alternately, highest
valid sequence number wins), so a torn write of one slot leaves the other.

Layout (all integers big-endian; docs/FORMAT.md has the byte tables and worked sizes)::

    0   6  magic "KMSFS\\0"        6  2  version 00 03       8  4  D = data offset (block 0)
    12  2  H = header length      14  2  reserved 00 00
    16  H  header copy (the xattr's bytes), zero padded to the header slot
    D - 2R  R  state record slot 0      D - R  R  state record slot 1      D  blocks...

No I/O here: ``kmsfs.headers`` and ``kmsfs.encfile`` read and write these bytes.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from kmsfs.format import FILE_ID_SIZE, FORMAT_V3, MAGIC, MAX_HEADER_SIZE, NONCE_SIZE, TAG_SIZE, CorruptHeader

_FIXED = struct.Struct(">6sHIHH")
FIXED_SIZE = _FIXED.size  # 16
# The fixed bytes bound into every state record's AAD: magic, version and D (not H, so a rewrap
# may store a header of another length in the same slot).
BOUND_SIZE = 12
# The header slot: room for the header plus growth from a later rewrap to a longer ARN or blob.
HEADER_SLOT_MIN = 512
HEADER_SLOT_STEP = 256
# Hole runs the record holds; a file that would need more gets its new gaps written as encrypted
# zero blocks (as on a filesystem without holes).
MAX_RUNS = 16
_BODY = struct.Struct(">QBQQB")  # sequence, flags, preferred size, fallback size, run count
_RUN = struct.Struct(">QQ")  # first block, block count
BODY_SIZE = _BODY.size + MAX_RUNS * _RUN.size  # 26 + 256 = 282
RECORD_SIZE = BODY_SIZE + NONCE_SIZE + TAG_SIZE  # 310
FLAG_MARKER = 0x01
RECORD_AAD_LABEL = b"KMSFS\x00state"
# A prefix is read with one pread of this many bytes (more only for an unusually long header).
PREFIX_READ = 4096

Run = tuple[int, int]  # (first block, stop block): blocks first .. stop-1 were never written


def header_slot(header_len: int) -> int:
    """Bytes reserved for the header copy: at least 512, and 256 more than the header rounded up."""
    return max(HEADER_SLOT_MIN, -(-header_len // HEADER_SLOT_STEP) * HEADER_SLOT_STEP + HEADER_SLOT_STEP)


def data_offset_for(header_len: int) -> int:
    """D, where block 0 starts, for a new file whose header is ``header_len`` bytes."""
    return FIXED_SIZE + header_slot(header_len) + 2 * RECORD_SIZE


@dataclass(frozen=True)
class Prefix:
    """The parsed fixed part of a version-3 prefix."""

    data_offset: int
    header: bytes  # exactly the header copy (H bytes)
    fixed: bytes  # magic, version and D (BOUND_SIZE bytes), bound into the record's AAD

    def slot_offset(self, slot: int) -> int:
        return self.data_offset - (2 - slot) * RECORD_SIZE


def pack_prefix(header: bytes, data_offset: int) -> bytes:
    """Fixed fields and header copy, zero padded up to the first record slot."""
    if not 0 < len(header) <= MAX_HEADER_SIZE:
        raise ValueError("header empty or too long")
    if data_offset < FIXED_SIZE + len(header) + 2 * RECORD_SIZE:
        raise ValueError("header does not fit its slot")
    fixed = _FIXED.pack(MAGIC, FORMAT_V3, data_offset, len(header), 0)
    return (fixed + header).ljust(data_offset - 2 * RECORD_SIZE, b"\0")


def has_prefix(first: bytes) -> bool:
    """True if a backing file starting with ``first`` (≥ 8 bytes) has a version-3 prefix."""
    return first[:8] == MAGIC + FORMAT_V3.to_bytes(2, "big")


def data_offset_of(first: bytes) -> int:
    """D from a file's first 16 bytes, 0 if it has no version-3 prefix (versions 1 and 2)."""
    if len(first) < FIXED_SIZE or not has_prefix(first):
        return 0
    return _FIXED.unpack_from(first)[2]


def parse_prefix(data: bytes, backing_size: int) -> Prefix:
    """Strictly parse a prefix from the file's first bytes; ``CorruptHeader`` on any defect."""
    if len(data) < FIXED_SIZE or not has_prefix(data):
        raise CorruptHeader("no in-file header copy")
    _, _, offset, header_len, reserved = _FIXED.unpack_from(data)
    if reserved != 0 or not 0 < header_len <= MAX_HEADER_SIZE:
        raise CorruptHeader("in-file header copy: bad fixed fields")
    if offset < FIXED_SIZE + header_len + 2 * RECORD_SIZE or offset > FIXED_SIZE + MAX_HEADER_SIZE + \
            HEADER_SLOT_STEP + 2 * RECORD_SIZE:
        raise CorruptHeader("in-file header copy: bad data offset")
    if backing_size < offset:
        raise CorruptHeader("backing file is shorter than its prefix")
    if len(data) < FIXED_SIZE + header_len:
        raise CorruptHeader("in-file header copy is short")
    return Prefix(offset, bytes(data[FIXED_SIZE:FIXED_SIZE + header_len]), bytes(data[:BOUND_SIZE]))


@dataclass
class State:
    """The state record: size-change marker and hole runs, with the sequence number of its slot."""

    seq: int = 0
    marker: tuple[int, int] | None = None  # (preferred, fallback) while a size change is under way
    runs: list[Run] = field(default_factory=list)

    def pack_body(self) -> bytes:
        if len(self.runs) > MAX_RUNS:
            raise ValueError("too many hole runs")
        preferred, fallback = self.marker or (0, 0)
        body = _BODY.pack(self.seq, FLAG_MARKER if self.marker else 0, preferred, fallback, len(self.runs))
        body += b"".join(_RUN.pack(first, stop - first) for first, stop in self.runs)
        return body.ljust(BODY_SIZE, b"\0")


def record_aad(file_id: bytes, fixed: bytes, body: bytes) -> bytes:
    """AAD sealing a state record: label, file id, magic/version/D of the prefix, the body."""
    if len(file_id) != FILE_ID_SIZE or len(fixed) != BOUND_SIZE:
        raise ValueError("file id must be 16 bytes, fixed part 12")
    return RECORD_AAD_LABEL + file_id + fixed + body


def unpack_body(body: bytes) -> State:
    """Parse an authenticated record body; ``CorruptHeader`` if its fields are inconsistent."""
    seq, flags, preferred, fallback, count = _BODY.unpack_from(body)
    if flags & ~FLAG_MARKER or count > MAX_RUNS:
        raise CorruptHeader("state record: bad fields")
    runs = []
    for i in range(count):
        first, length = _RUN.unpack_from(body, _BODY.size + i * _RUN.size)
        if length == 0 or (runs and first < runs[-1][1]):
            raise CorruptHeader("state record: hole runs out of order")
        runs.append((first, first + length))
    marker = (preferred, fallback) if flags & FLAG_MARKER else None
    return State(seq=seq, marker=marker, runs=runs)


# -- hole-run arithmetic (sorted, disjoint, non-adjacent half-open block ranges) ------------------
def add_run(runs: list[Run], first: int, stop: int) -> list[Run]:
    """``runs`` with blocks first..stop-1 added (merged with neighbours)."""
    if first >= stop:
        return list(runs)
    out: list[Run] = []
    for a, b in sorted([*runs, (first, stop)]):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def remove_blocks(runs: list[Run], first: int, stop: int) -> list[Run]:
    """``runs`` without blocks first..stop-1 (a run may split in two)."""
    out: list[Run] = []
    for a, b in runs:
        if b <= first or a >= stop:
            out.append((a, b))
            continue
        if a < first:
            out.append((a, first))
        if b > stop:
            out.append((stop, b))
    return out


def clip(runs: list[Run], stop: int) -> list[Run]:
    """``runs`` limited to blocks before ``stop`` (the final block is never a hole)."""
    return remove_blocks(runs, stop, 1 << 64) if runs else runs


def in_runs(runs: list[Run], block: int) -> bool:
    return any(a <= block < b for a, b in runs)


def covering(runs: list[Run], first: int, stop: int) -> bool:
    """True if blocks first..stop-1 all lie in one run."""
    return any(a <= first and stop <= b for a, b in runs)


def touches(runs: list[Run], first: int, stop: int) -> bool:
    return any(a < stop and first < b for a, b in runs)
