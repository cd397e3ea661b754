"""The state record of an open version-3 file: loaded once per inode, saved alternately to two slots.

Why shared per inode: the mount opens one ``EncryptedFile`` per handle, all under one inode lock
(core.py). The hole runs and the marker must be the same for all of them, or a handle with a stale
copy would write back blocks another handle already filled as holes. ``shared`` hands every
``EncryptedFile`` of one (device, inode, file id) the same ``FileState`` while any holds it.

Crash safety: a save writes the slot *not* holding the current record (sequence number + 1), in
one ``pwrite``; if that write is torn, the other slot still holds the previous record. Callers
order saves against block writes (see encfile.py): a gap is recorded before the size grows over
it, a filled hole is dropped from the record only after its block is written.
"""

from __future__ import annotations

import os
import threading
import weakref

from kmsfs.cipher import BlockCipher, IntegrityError
from kmsfs.format import CorruptHeader
from kmsfs.infile import (
    BODY_SIZE,
    PREFIX_READ,
    RECORD_SIZE,
    Prefix,
    State,
    data_offset_of,
    parse_prefix,
    record_aad,
    unpack_body,
)


class FileState:
    """Prefix geometry plus the current record of one version-3 file."""

    def __init__(self, prefix: Prefix, state: State, cipher: BlockCipher, file_id: bytes) -> None:
        self.prefix = prefix
        self.data_offset = prefix.data_offset
        self.state = state
        self._cipher = cipher
        self._file_id = file_id

    def use_cipher(self, cipher: BlockCipher) -> None:
        """Seal later saves with the caller's cipher object (the same data key)."""
        self._cipher = cipher

    @property
    def runs(self) -> list[tuple[int, int]]:
        return self.state.runs

    def save(self, fd: int, marker: tuple[int, int] | None, runs: list[tuple[int, int]]) -> None:
        """Write a new record (next sequence number) to the other slot."""
        new = State(seq=self.state.seq + 1, marker=marker, runs=list(runs))
        body = new.pack_body()
        seal = self._cipher.seal(b"", record_aad(self._file_id, self.prefix.fixed, body))
        os.pwrite(fd, body + seal, self.prefix.slot_offset(new.seq % 2))
        self.state = new


# The first bytes of files whose header was just read (headers.in_file_copy), keyed by device,
# inode, ctime and size: an open reads the prefix once for the header and the record.
_recent: dict[tuple[int, int, int, int], bytes] = {}
_RECENT_MAX = 64
_recent_lock = threading.Lock()


def stash_prefix(st: os.stat_result, first: bytes) -> None:
    with _recent_lock:
        if len(_recent) >= _RECENT_MAX:
            _recent.clear()
        _recent[(st.st_dev, st.st_ino, st.st_ctime_ns, st.st_size)] = first


def load(fd: int, cipher: BlockCipher, file_id: bytes) -> FileState:
    """Parse the prefix and authenticate both record slots; the valid one with the highest
    sequence number wins. No valid record is ``CorruptHeader`` unless the file is empty (an
    emptied file's records are voided, see headers.empty)."""
    st = os.fstat(fd)
    size = st.st_size
    with _recent_lock:
        first = _recent.pop((st.st_dev, st.st_ino, st.st_ctime_ns, size), None)
    if first is None:
        first = os.pread(fd, PREFIX_READ, 0)
    if data_offset_of(first) > len(first):
        first = os.pread(fd, data_offset_of(first), 0)
    prefix = parse_prefix(first, size)
    best: State | None = None
    for slot in (0, 1):
        start = prefix.slot_offset(slot)
        raw = first[start:start + RECORD_SIZE]
        body, seal = raw[:BODY_SIZE], raw[BODY_SIZE:]
        if not any(seal):
            continue  # a slot never written (or voided): no GCM attempt
        try:
            cipher.open(seal, record_aad(file_id, prefix.fixed, body))
        except IntegrityError:
            continue
        state = unpack_body(body)
        if state.seq % 2 != slot:
            continue  # a record copied into the other slot
        if best is None or state.seq > best.seq:
            best = state
    if best is None:
        if size > prefix.data_offset:
            raise CorruptHeader("state record fails authentication")
        best = State()
    return FileState(prefix, best, cipher, file_id)


_shared: weakref.WeakValueDictionary[tuple[int, int, bytes], FileState] = weakref.WeakValueDictionary()
_shared_lock = threading.Lock()


def shared(fd: int, cipher: BlockCipher, file_id: bytes) -> FileState:
    """The one FileState of this inode and file id, loaded on first use."""
    st = os.fstat(fd)
    ident = (st.st_dev, st.st_ino, file_id)
    with _shared_lock:
        found = _shared.get(ident)
        if found is not None:
            return found
        state = _fresh.pop(ident, None)  # same inode and file id: same data key
        if state is None:
            state = load(fd, cipher, file_id)
        else:
            state.use_cipher(cipher)
        _shared[ident] = state
        return state


# States just written by ``headers.write_new``, held until the first EncryptedFile takes them (a
# create opens its file at once; reading back what was just written would cost a pread and two
# GCM checks). Bounded: a create that failed before registering leaves at most a few behind.
_fresh: dict[tuple[int, int, bytes], FileState] = {}
_FRESH_MAX = 64


def remember(fd: int, prefix: Prefix, state: State, cipher: BlockCipher, file_id: bytes) -> None:
    st = os.fstat(fd)
    with _shared_lock:
        if len(_fresh) >= _FRESH_MAX:
            _fresh.clear()
        _fresh[(st.st_dev, st.st_ino, file_id)] = FileState(prefix, state, cipher, file_id)


def forget(fd: int, file_id: bytes) -> None:
    """Drop the shared state of an inode (its prefix was rewritten: re-key, upgrade)."""
    st = os.fstat(fd)
    with _shared_lock:
        _shared.pop((st.st_dev, st.st_ino, file_id), None)
