"""One encrypted file in plaintext terms, over a backing file descriptor. No FUSE here.

Why separate from the FUSE adapter: all the block arithmetic, read-modify-write and crash
recovery logic is testable with a plain temporary file and a fixed key, without a mount or a key
service.

Format version 2 (new files):

- the last block is sealed with the *final* flag in its AAD, every other block without it, so
  cutting the file at a block boundary or appending anything fails authentication;
- the backing length must be exactly ``backing_size(plain)``: trailing junk is an error;
- growing leaves **holes** (sparse on disk) where the backing filesystem supports them; a hole
  block reads as zeros only if it is a real hole (see ``kmsfs.holes``), zeroed data is EIO;
- a size change that needs several writes (extending write, truncate) first sets an
  authenticated *size-change marker* xattr and removes it when done; after a crash ``recover``
  settles the file at one of the two sizes, so a crash never leaves a file unreadable.

Format version 3 (new files): version 2's blocks, after an in-file prefix (``kmsfs.infile``)
holding a copy of the header and a sealed *state record* that replaces two things version 2 kept
outside the data: the size-change marker, and which blocks are holes. A gap left by growth is
recorded as a *hole run* before the size grows over it; an all-zero stored block reads as zeros
only if the record lists it, so holes survive copies that write them as zeros (rsync without -S,
tar) and a written block overwritten with zeros is still EIO. ``SEEK_HOLE`` is not consulted.

Format version 1 (read; writes refused unless the file is emptied first, see ``V1ReadOnly``): no
final flag, no holes, a trailing fragment of ≤ 28 bytes (a torn append) is ignored.

Locking is the caller's job: one EncryptedFile must not be used by two threads at once, and all
handles of one inode must share one lock (core.py does this).
"""

from __future__ import annotations

import errno
import os

from cryptography.exceptions import InvalidTag

from kmsfs import infile
from kmsfs.cipher import BlockCipher, IntegrityError
from kmsfs.filestate import FileState, shared
from kmsfs.format import (
    BLOCK_OVERHEAD,
    DEFAULT_BLOCK_SIZE,
    FORMAT_V1,
    FORMAT_V2,
    FORMAT_V3,
    RESIZE_XATTR,
    CorruptHeader,
    backing_size,
    block_aad_prefix,
    block_offset,
    marker_aad,
    pack_marker_sizes,
    plain_size,
    unpack_marker,
)
from kmsfs.holes import all_zero, overlaps_hole

# Largest run of blocks encrypted and written in one pwrite when filling a gap with zeros.
_FILL_BLOCKS = 256
# Reads at least this large (backing bytes) come from the kernel's read-ahead: the backing file is
# then read ahead by _PREFETCH_AHEAD bytes beyond them (see EncryptedFile._prefetch).
_PREFETCH_MIN = 256 * 1024
_PREFETCH_AHEAD = 8 << 20
# Most blocks per pwritev: two iovecs each, within Linux's IOV_MAX of 1024.
_IOV_BLOCKS = 500


class V1ReadOnly(OSError):
    """A write to a non-empty format-1 file: v1 cannot authenticate its size (a file cut at a block
    boundary reads shorter without error), so kmsfs no longer extends that format. ``kmsfs
    upgrade`` converts such files; emptying one (O_TRUNC) gives it a fresh version-3 key."""

    def __init__(self) -> None:
        super().__init__(errno.EROFS, "format version 1 file is read-only; run kmsfs upgrade")


class EncryptedFile:
    """Read/write/truncate an encrypted file at plaintext offsets."""

    def __init__(self, fd: int, key: bytes | BlockCipher, file_id: bytes,
                 block_size: int = DEFAULT_BLOCK_SIZE, version: int = FORMAT_V2,
                 sparse: bool = True, legacy_writes: bool = False) -> None:
        """``version`` defaults to 2 for plain test files; a version-3 file must already have its
        prefix (``kmsfs.headers.write_new``), whose state is loaded here. ``legacy_writes`` lets
        tests build version-1 files (the mount and the tools never set it)."""
        self.fd = fd
        self._legacy_writes = legacy_writes
        self.cipher = key if isinstance(key, BlockCipher) else BlockCipher(key)
        self.block_size = block_size
        self._sparse_ok = sparse
        self._stored = block_size + BLOCK_OVERHEAD
        self._prefetched_to = 0  # backing offset up to which _prefetch has asked for read-ahead
        self._set_format(file_id, version)

    def _set_format(self, file_id: bytes, version: int) -> None:
        self.file_id, self.version = file_id, version
        self._aad_prefix = block_aad_prefix(file_id, version)
        self._v2 = version != FORMAT_V1
        self._v3 = version >= FORMAT_V3
        self.sparse = self._sparse_ok and self._v2 and not self._v3  # v2's SEEK_HOLE holes
        self._fs: FileState | None = shared(self.fd, self.cipher, file_id) if self._v3 else None
        self._base = self._fs.data_offset if self._fs else 0  # where block 0 starts

    def rekey(self, cipher: BlockCipher, file_id: bytes, version: int) -> None:
        """Switch to a new data key / file id (only valid while the backing file is empty and,
        for version 3, after ``headers.replace_empty`` wrote its new prefix)."""
        self.cipher = cipher
        self._set_format(file_id, version)

    @property
    def data_offset(self) -> int:
        """Where block 0 starts in the backing file (after a version-3 prefix; else 0)."""
        return self._base

    # -- sizes -----------------------------------------------------------------------------------
    def size(self) -> int:
        """Plaintext size, derived from the backing file length."""
        return plain_size(max(0, os.fstat(self.fd).st_size - self._base), self.block_size)

    def _sizes(self) -> tuple[int, int]:
        """(backing length after the prefix, plaintext size)."""
        backing = max(0, os.fstat(self.fd).st_size - self._base)
        return backing, plain_size(backing, self.block_size)

    def _final(self, size: int) -> int:
        return (size - 1) // self.block_size if size else -1

    def _check_tail(self, backing: int, size: int) -> None:
        """Version 2: bytes after the last block are junk (appended by someone else)."""
        if self._v2 and backing != backing_size(size, self.block_size):
            extra = backing - backing_size(size, self.block_size)
            raise IntegrityError(f"block {self._final(size)} is followed by {extra} bytes of junk",
                                 block=max(self._final(size), 0))

    # -- block primitives -------------------------------------------------------------------------
    def _aad(self, block_no: int, final: bool) -> bytes:
        """``block_aad`` from the cached prefix (same bytes, see format.block_aad_prefix)."""
        if not self._v2:
            return self._aad_prefix + block_no.to_bytes(8, "big")
        return self._aad_prefix + block_no.to_bytes(8, "big") + (b"\x01" if final else b"\x00")

    def _aads(self, first: int, count: int, final_block: int) -> list[bytes]:
        """``[_aad(b, b == final_block) for b in range(first, first + count)]``, built faster."""
        prefix = self._aad_prefix
        if not self._v2:
            return [prefix + b.to_bytes(8, "big") for b in range(first, first + count)]
        out = [prefix + b.to_bytes(8, "big") + b"\x00" for b in range(first, first + count)]
        if first <= final_block < first + count:
            out[final_block - first] = self._aad(final_block, True)
        return out

    def _open_block(self, block_no: int, stored: bytes, final: bool) -> bytes:
        try:
            return self.cipher.open(stored, self._aad(block_no, final))
        except IntegrityError:
            pass
        if all_zero(stored):
            if not final and self._hole(block_no, len(stored)):
                return bytes(len(stored) - BLOCK_OVERHEAD)
            what = "is zeroed (not a hole)" if self._v2 and not final else "is zeroed"
            raise IntegrityError(f"block {block_no} {what}", block=block_no)
        raise IntegrityError(f"block {block_no} failed authentication", block=block_no)

    def _hole(self, block_no: int, stored_len: int) -> bool:
        """Whether a non-final all-zero block is a hole: recorded as never written (v3), or
        overlapping a hole the backing filesystem reports (v2)."""
        if self._fs is not None:
            return infile.in_runs(self._fs.runs, block_no)
        return self._v2 and overlaps_hole(self.fd, block_offset(block_no, self.block_size), stored_len)

    def _read_block(self, block_no: int, size: int) -> bytes:
        """Plaintext of one existing block (``size`` is the current plaintext size)."""
        start = block_no * self.block_size
        want = min(self.block_size, size - start)
        if want <= 0:
            return b""
        stored = os.pread(self.fd, want + BLOCK_OVERHEAD,
                          self._base + block_offset(block_no, self.block_size))
        if len(stored) != want + BLOCK_OVERHEAD:
            raise IntegrityError(f"block {block_no} is short", block=block_no)
        return self._open_block(block_no, stored, block_no == self._final(size))

    def _prefetch(self, start: int) -> None:
        """Ask the kernel to read the backing file ahead of a large (read-ahead) request.

        Why: the kernel's read-ahead sends kmsfs 1 MiB requests for a sequential read, several
        at once (threads); their preads on the backing file arrive out of order and the backing
        file's own read-ahead then lags, so a request often waited for the disk. Starting the
        next ``_PREFETCH_AHEAD`` bytes now keeps the disk ahead of decryption. A hint only (no
        data is read here), at most one call per half window; the unlocked bookkeeping may race
        between concurrent readers, which costs at most a redundant hint."""
        ahead = self._prefetched_to - start
        if _PREFETCH_AHEAD // 2 <= ahead <= 2 * _PREFETCH_AHEAD:  # (out-of-order requests: up to 2x)
            return
        begin = start if ahead < 0 or ahead > 2 * _PREFETCH_AHEAD else self._prefetched_to
        self._prefetched_to = start + _PREFETCH_AHEAD
        try:
            os.posix_fadvise(self.fd, begin, self._prefetched_to - begin, os.POSIX_FADV_WILLNEED)
        except OSError:
            pass

    def _write_runs(self, blocks: dict[int, bytes | memoryview], final_block: int) -> None:
        """Seal and write blocks, one ``pwritev`` per run of consecutive block numbers, ascending.

        Each run is sealed in one ``seal_iov`` call (one urandom for all its nonces) and handed to
        the kernel as nonce/ciphertext pieces, without first copying them into one buffer. A
        single block (a 4 KiB random write) takes the shortest path: ``seal`` and ``pwrite``."""
        aad = self._aad
        bs = self.block_size
        if len(blocks) == 1:
            ((block_no, plain),) = blocks.items()
            _pwrite_all(self.fd, self.cipher.seal(plain, aad(block_no, block_no == final_block)),
                        self._base + block_offset(block_no, bs))
            return
        order = sorted(blocks)
        if order[-1] - order[0] == len(order) - 1 and len(order) <= _IOV_BLOCKS:  # one run
            _pwrite_all(self.fd, self.cipher.seal_iov([blocks[b] for b in order],
                                                      self._aads(order[0], len(order), final_block)),
                        self._base + block_offset(order[0], bs))
            return
        start = 0
        for i in range(1, len(order) + 1):
            if i < len(order) and order[i] == order[i - 1] + 1 and i - start < _IOV_BLOCKS:
                continue
            run = order[start:i]
            iov = self.cipher.seal_iov([blocks[b] for b in run],
                                       [aad(b, b == final_block) for b in run])
            _pwrite_all(self.fd, iov, self._base + block_offset(run[0], bs))
            start = i

    def _is_hole_block(self, block_no: int) -> bool:
        offset = block_offset(block_no, self.block_size)
        if not overlaps_hole(self.fd, offset, self._stored):
            return False
        return all_zero(os.pread(self.fd, self._stored, offset))

    def _keep_hole_runs_long(self, blocks: dict[int, bytes | memoryview], first: int, last: int,
                             final_block: int) -> None:
        """Never leave a hole run of exactly one block next to a written range (see holes.py)."""
        if not self.sparse:
            return
        bs = self.block_size
        before = first - 1
        if before < 0 and last + 1 >= final_block:
            return
        # One lseek(SEEK_HOLE) over the whole neighbourhood first: the probes below cost an lseek
        # and an fstat each, and a file without holes near the write answers them all at once
        # (no hole in the range implies no probe of a block inside it can succeed).
        if not _hole_in(self.fd, block_offset(max(before, first), bs), block_offset(last + 2, bs)):
            return
        if before >= 0 and before not in blocks and self._is_hole_block(before) and (
                before == 0 or (before - 1) in blocks or not self._is_hole_block(before - 1)):
            blocks[before] = bytes(bs)
        after = last + 1
        if after < final_block and after not in blocks and self._is_hole_block(after) and (
                after + 1 == final_block or (after + 1) in blocks or not self._is_hole_block(after + 1)):
            blocks[after] = bytes(bs)

    # -- size-change marker (version 2) ----------------------------------------------------------
    def _set_marker(self, preferred: int, fallback: int, runs: list[infile.Run] | None = None) -> None:
        """Record a size change about to start; version 3 also records ``runs`` (the new gap)."""
        if self._fs is not None:
            self._fs.save(self.fd, (preferred, fallback), self._fs.runs if runs is None else runs)
            return
        if not self._v2:
            return
        seal = self.cipher.seal(b"", marker_aad(self.file_id, preferred, fallback))
        os.setxattr(self.fd, RESIZE_XATTR, pack_marker_sizes(preferred, fallback) + seal)

    def _clear_marker(self, runs: list[infile.Run] | None = None) -> None:
        if self._fs is not None:
            self._fs.save(self.fd, None, self._fs.runs if runs is None else runs)
            return
        if not self._v2:
            return
        try:
            os.removexattr(self.fd, RESIZE_XATTR)
        except OSError as exc:
            if exc.errno not in (errno.ENODATA, errno.ENOTSUP):
                raise

    def pending_marker(self) -> tuple[int, int] | None:
        """The authenticated (preferred, fallback) sizes of an interrupted size change, if any."""
        if self._fs is not None:
            return self._fs.state.marker
        try:
            raw = os.getxattr(self.fd, RESIZE_XATTR)
        except OSError as exc:
            if exc.errno in (errno.ENODATA, errno.ENOTSUP):
                return None
            raise
        preferred, fallback, seal = unpack_marker(raw)
        try:
            self.cipher.open(seal, marker_aad(self.file_id, preferred, fallback))
        except IntegrityError:
            raise CorruptHeader("size-change marker fails authentication") from None
        return preferred, fallback

    def recover(self) -> int | None:
        """Finish or undo an interrupted size change; returns the settled size (None: nothing to do)."""
        pending = self.pending_marker()
        if pending is None:
            return None
        preferred, fallback = pending
        for target, other in ((preferred, fallback), (fallback, preferred)):
            if self._settle(target, other):
                final = self._final(target)
                self._clear_marker(self._runs_after({final}, final) if self._fs else None)
                return target
        raise IntegrityError("interrupted size change cannot be recovered", block=self._final(preferred))

    def _salvage(self, block_no: int, want: int, other: int) -> bytes | None:
        """Plaintext (``want`` bytes, zero padded) of a block in any state a crash can leave."""
        bs = self.block_size
        offset = block_offset(block_no, bs)
        raw = os.pread(self.fd, self._stored, self._base + offset)
        lengths = [want]
        if self._final(other) == block_no:
            lengths.append(other - block_no * bs)
        tries = [(True, n) for n in lengths] + [(False, bs)]
        for final, n in tries:
            if len(raw) >= n + BLOCK_OVERHEAD:
                try:
                    plain = self.cipher.open(raw[:n + BLOCK_OVERHEAD], self._aad(block_no, final))
                except IntegrityError:
                    continue
                return (plain + bytes(want))[:want]
        if not raw or (all_zero(raw) and (len(raw) < self._stored or self._hole(block_no, len(raw)))):
            return bytes(want)
        return None

    def _settle(self, target: int, other: int) -> bool:
        bs = self.block_size
        if target == 0:
            os.ftruncate(self.fd, self._base)
            return True
        final_block, final_len = self._final(target), target - self._final(target) * bs
        content = self._salvage(final_block, final_len, other)
        if content is None:
            return False
        blocks = {final_block: content}
        other_final = self._final(other)
        if 0 <= other_final < final_block:  # growing: the old last block must become non-final
            old = self._salvage(other_final, bs, other)
            if old is None:
                return False
            blocks[other_final] = old
        if other_final < final_block:  # the gap follows the same rule as in _grow
            gap = range(other_final + 1, final_block)
            if self._fs is not None:
                if gap and not infile.covering(self._fs.runs, gap.start, gap.stop):
                    self._fill_zeros(gap)  # recorded before the crash, or filled then: fill again
            elif not self.sparse:
                self._fill_zeros(gap)
            elif len(gap) == 1:  # a one-block hole could not be told from a zeroed block
                blocks[gap[0]] = bytes(bs)
        self._write_runs(blocks, final_block)
        os.ftruncate(self.fd, self._base + backing_size(target, bs))
        return True

    # -- plaintext API ----------------------------------------------------------------------------
    def read(self, offset: int, length: int) -> bytes:
        """Up to ``length`` bytes from ``offset``; short at EOF; IntegrityError on a bad block."""
        if offset < 0 or length < 0:
            raise ValueError("negative offset or length")
        out = bytearray(max(0, min(length, self.size() - offset)))
        count = self.read_into(offset, memoryview(out))
        return bytes(out) if count == len(out) else bytes(out[:count])

    def read_into(self, offset: int, out: memoryview) -> int:
        """Decrypt up to ``len(out)`` bytes from ``offset`` into ``out``; returns how many (short
        at EOF). IntegrityError on a bad block, and then ``out`` holds zeros, never plaintext.

        Why into a caller's buffer: the FUSE layer passes the kernel's reply buffer, so whole
        blocks are authenticated and decrypted straight into it, with no per-block ``bytes``, no
        join and no final copy. Only partial edge blocks go through a temporary.
        """
        if offset < 0:
            raise ValueError("negative offset")
        backing, size = self._sizes()
        end = min(offset + len(out), size)
        if offset >= end:
            return 0
        bs = self.block_size
        first, last = offset // bs, (end - 1) // bs
        final_block = self._final(size)
        if last == final_block:
            self._check_tail(backing, size)
        stored_len = backing_size(min(size, (last + 1) * bs), bs) - block_offset(first, bs)
        if stored_len >= _PREFETCH_MIN:
            self._prefetch(self._base + block_offset(first, bs) + stored_len)
        raw = memoryview(os.pread(self.fd, stored_len, self._base + block_offset(first, bs)))
        if len(raw) != stored_len:
            raise IntegrityError(f"block {first + len(raw) // self._stored} is short",
                                 block=first + len(raw) // self._stored)
        if (self._fs is not None and self._fs.runs and last != final_block
                and infile.covering(self._fs.runs, first, last + 1) and all_zero(raw)):
            out[:end - offset] = bytes(end - offset)  # wholly inside a recorded hole run
            return end - offset
        open_into = self.cipher.open_into
        stored = self._stored
        pos = dst = 0
        try:
            for block_no in (first, last) if last != first else (first,):  # edges: maybe partial
                if block_no == last and last - first > 1:  # the whole blocks in between
                    for n, aad in enumerate(self._aads(first + 1, last - first - 1, -1), first + 1):
                        try:
                            open_into(raw[pos:pos + stored], aad, out[dst:dst + bs])
                        except InvalidTag:  # a hole, or damage: the slow path tells which
                            out[dst:dst + bs] = self._open_block(n, bytes(raw[pos:pos + stored]), False)
                        pos += stored
                        dst += bs
                b_start = block_no * bs
                b_len = min(bs, size - b_start)
                stop = pos + b_len + BLOCK_OVERHEAD
                lo, hi = max(offset, b_start), min(end, b_start + b_len)
                final = block_no == final_block
                if lo == b_start and hi == b_start + b_len:  # whole block: straight into out
                    try:
                        open_into(raw[pos:stop], self._aad(block_no, final), out[dst:dst + b_len])
                    except InvalidTag:
                        out[dst:dst + b_len] = self._open_block(block_no, bytes(raw[pos:stop]), final)
                else:
                    try:
                        plain = self.cipher.open_raw(raw[pos:stop], self._aad(block_no, final))
                    except InvalidTag:
                        plain = self._open_block(block_no, bytes(raw[pos:stop]), final)
                    out[dst:dst + hi - lo] = plain[lo - b_start:hi - b_start]
                dst += hi - lo
                pos = stop
        except BaseException:
            out[:] = bytes(len(out))  # decrypt_into may have left unauthenticated bytes
            raise
        return end - offset

    def write(self, offset: int, data: bytes) -> int:
        """Write ``data`` at ``offset`` (read-modify-write of partial edge blocks)."""
        if offset < 0:
            raise ValueError("negative offset")
        if not data:
            return 0
        backing, size = self._sizes()
        if not self._v2 and size > 0 and not self._legacy_writes:
            raise V1ReadOnly()
        if not self._v2 and offset > size:
            self.truncate(offset)
            backing, size = self._sizes()
        self._check_tail(backing, size)
        bs = self.block_size
        end = offset + len(data)
        new_size = max(size, end)
        first, last = offset // bs, (end - 1) // bs
        old_final, new_final = self._final(size), self._final(new_size)
        blocks: dict[int, bytes | memoryview] = {}
        view = memoryview(data)
        if last - first > 1:  # middle blocks: whole, sealed straight from the buffer
            start = (first + 1) * bs - offset
            blocks.update(zip(range(first + 1, last),
                              [view[i:i + bs] for i in range(start, start + (last - first - 1) * bs, bs)],
                              strict=True))
        for block_no in (first, last) if last != first else (first,):  # edges: maybe partial
            b_start = block_no * bs
            b_len = min(bs, new_size - b_start)
            lo, hi = max(offset, b_start), min(end, b_start + b_len)
            if lo == b_start and hi == b_start + b_len:
                blocks[block_no] = view[lo - offset:hi - offset]  # sealed straight from the buffer
                continue
            buf = bytearray(b_len)
            if b_start < size:
                old = self._read_block(block_no, size)
                buf[:len(old)] = old
            buf[lo - b_start:hi - b_start] = view[lo - offset:hi - offset]
            blocks[block_no] = bytes(buf)
        if 0 <= old_final < first and new_final != old_final:  # old last block becomes non-final
            old = self._read_block(old_final, size)
            blocks[old_final] = old + bytes(bs - len(old))
        runs: list[infile.Run] | None = None
        fill: range | None = None
        if new_size > size:
            gap = range(old_final + 1, first)
            if self._fs is not None:
                runs, fill = self._gap_runs(old_final, first)
            elif not self.sparse:
                self._fill_zeros(gap)
            elif len(gap) == 1:
                blocks[gap[0]] = bytes(bs)
        self._keep_hole_runs_long(blocks, first, last, new_final)
        if new_size == size:
            self._write_runs(blocks, new_final)
            if self._fs is not None and self._fs.runs and infile.touches(self._fs.runs, first, last + 1):
                self._fs.save(self.fd, None, self._runs_after(blocks, new_final))  # holes filled
            return len(data)
        self._set_marker(size, new_size, runs)  # an interrupted append settles at the old size
        saved = (os.pread(self.fd, self._stored, self._base + block_offset(old_final, bs))
                 if old_final >= 0 else b"")
        try:
            if fill is not None:
                self._fill_zeros(fill)
            self._write_runs(blocks, new_final)
        except OSError:
            self._undo_growth(backing, old_final, saved)
            raise
        self._clear_marker(self._runs_after(blocks, new_final) if self._fs is not None else None)
        return len(data)

    # -- hole runs (version 3) -------------------------------------------------------------------
    def _gap_runs(self, old_final: int, stop: int) -> tuple[list[infile.Run], range | None]:
        """The runs once blocks old_final+1 .. stop-1 become a gap, and the gap to fill with
        encrypted zeros instead if the record has no room for another run."""
        assert self._fs is not None
        runs = infile.clip(self._fs.runs, max(old_final, 0))
        if old_final + 1 >= stop:
            return runs, None
        grown = infile.add_run(runs, old_final + 1, stop)
        if len(grown) <= infile.MAX_RUNS:
            return grown, None
        return runs, range(old_final + 1, stop)

    def _runs_after(self, written: dict[int, bytes | memoryview] | set[int], final: int) -> list[infile.Run]:
        """The current runs without the blocks just written and without anything from ``final``
        on; a split that leaves too many runs fills the smallest with encrypted zeros first."""
        assert self._fs is not None
        runs = infile.clip(self._fs.runs, max(final, 0))
        if runs:
            order = sorted(written)
            start = 0
            for i in range(1, len(order) + 1):
                if i == len(order) or order[i] != order[i - 1] + 1:
                    runs = infile.remove_blocks(runs, order[start], order[i - 1] + 1)
                    start = i
        while len(runs) > infile.MAX_RUNS:
            smallest = min(runs, key=lambda run: run[1] - run[0])
            self._fill_zeros(range(*smallest))
            runs.remove(smallest)
        return runs

    def _undo_growth(self, backing: int, old_final: int, saved: bytes) -> None:
        """After a failed extending write (ENOSPC...): put the old last block and length back."""
        try:
            if saved:
                _pwrite_all(self.fd, saved, self._base + block_offset(old_final, self.block_size))
            os.ftruncate(self.fd, self._base + backing)
            self._clear_marker()
        except OSError:
            pass  # the marker stays; recover() settles the file at its next open

    def _fill_zeros(self, gap: range) -> None:
        """Encrypted zero blocks for a gap (version 1, or a backing filesystem without holes)."""
        bs = self.block_size
        for start in range(gap.start, gap.stop, _FILL_BLOCKS):
            stop = min(gap.stop, start + _FILL_BLOCKS)
            self._write_runs({b: bytes(bs) for b in range(start, stop)}, -1)

    def truncate(self, length: int) -> None:
        """Set the plaintext size; growing leaves holes (v2 real ones, v3 recorded ones)."""
        if length < 0:
            raise ValueError("negative length")
        backing, size = self._sizes()
        if length == size:
            return
        if not self._v2 and length > 0 and not self._legacy_writes:
            raise V1ReadOnly()
        if length > size:
            self._check_tail(backing, size)
        runs: list[infile.Run] | None = None
        fill: range | None = None
        if self._fs is not None and length > size:
            runs, fill = self._gap_runs(self._final(size), self._final(length))
        self._set_marker(length, size, runs)  # an interrupted truncate settles at the new size
        if length < size:
            self._shrink(length, size)
        else:
            self._grow(length, size, fill)
        final = self._final(length)
        self._clear_marker(self._runs_after({final}, final) if self._fs is not None else None)

    def _shrink(self, length: int, size: int) -> None:
        bs = self.block_size
        if length == 0:
            os.ftruncate(self.fd, self._base)
            return
        block_no = self._final(length)
        keep = length - block_no * bs
        plain = self._read_block(block_no, size)[:keep]
        # Cut after the old block (kept whole), rewrite it shorter and final, then cut again: a
        # crash in between leaves states recover() knows how to settle.
        blocks = {block_no: plain}
        self._keep_hole_runs_long(blocks, block_no, block_no, block_no)
        os.ftruncate(self.fd, self._base + block_offset(block_no, bs) + min(bs, size - block_no * bs)
                     + BLOCK_OVERHEAD)
        self._write_runs(blocks, block_no)
        os.ftruncate(self.fd, self._base + backing_size(length, bs))

    def _grow(self, length: int, size: int, fill: range | None = None) -> None:
        """Version 3 fills the gap only when ``fill`` says so (no room in the record); version 2
        on a filesystem without holes always."""
        bs = self.block_size
        old_final, new_final = self._final(size), self._final(length)
        blocks: dict[int, bytes | memoryview] = {}
        if old_final == new_final:
            old = self._read_block(old_final, size)
            blocks[new_final] = old + bytes(length - size)
        else:
            if old_final >= 0:
                old = self._read_block(old_final, size)
                blocks[old_final] = old + bytes(bs - len(old))
            gap = range(old_final + 1, new_final)
            if (self._fs is None and not self.sparse) or fill is not None:
                if old_final >= 0:
                    self._write_runs({old_final: blocks.pop(old_final)}, new_final)
                self._fill_zeros(gap)
            elif self._fs is None and len(gap) == 1:
                blocks[gap[0]] = bytes(bs)
            blocks[new_final] = bytes(length - new_final * bs)
        self._write_runs(blocks, new_final)
        os.ftruncate(self.fd, self._base + backing_size(length, bs))

    # -- verification (fsck) ---------------------------------------------------------------------
    def verify(self) -> list[tuple[int, str]]:
        """Authenticate every block; returns (block, reason) for each damaged one."""
        backing, size = self._sizes()
        damaged: list[tuple[int, str]] = []
        try:
            self._check_tail(backing, size)
        except IntegrityError as exc:
            damaged.append((exc.block or 0, str(exc)))
        chunk = 256 * self.block_size
        buf = memoryview(bytearray(chunk))
        for start in range(0, size, chunk):  # whole chunks at read speed; a bad one block by block
            try:
                self.read_into(start, buf)
                continue
            except IntegrityError:
                pass
            for block_no in range(start // self.block_size,
                                  -(-min(start + chunk, size) // self.block_size)):
                try:
                    self._read_block(block_no, size)
                except IntegrityError as exc:
                    damaged.append((block_no, str(exc)))
        return damaged


def _hole_in(fd: int, start: int, end: int) -> bool:
    """``overlaps_hole`` over [start, end): the fast pre-check above (a seam tests can force open)."""
    return overlaps_hole(fd, start, end - start)


def _pwrite_all(fd: int, data: bytes | bytearray | list[bytes], offset: int) -> None:
    """Write all of ``data`` at ``offset``: a buffer, or a list of pieces gathered by ``pwritev``
    (sealed blocks, see ``BlockCipher.seal_iov``); short writes are continued."""
    if isinstance(data, list):
        total = sum(map(len, data))
        done = os.pwritev(fd, data, offset) if data else 0
        if done == total:
            return
        data, offset = b"".join(data)[done:], offset + done  # rare: continue with pwrite
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n
