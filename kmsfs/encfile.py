"""One encrypted file in plaintext terms, over a backing file descriptor. No FUSE here.

Why separate from the FUSE adapter: all the block arithmetic and read-modify-write logic is
testable with a plain temporary file and a fixed key, without a mount or a key service.

Growth policy: extending a file (truncate up, or a write past the end) writes *encrypted zero
blocks* for the gap; there are no holes in the backing file. Every stored block therefore
authenticates, and an attacker cannot turn a block into zeros by punching a hole. The price is
that sparse files are not sparse on disk (documented in docs/FORMAT.md).

Locking is the caller's job: one EncryptedFile must not be used by two threads at once, and all
handles of one inode must share one lock (operations.py does this).
"""

from __future__ import annotations

import os

from kmsfs.cipher import BlockCipher, IntegrityError
from kmsfs.format import (
    BLOCK_OVERHEAD,
    DEFAULT_BLOCK_SIZE,
    FORMAT_VERSION,
    backing_size,
    block_aad,
    block_offset,
    plain_size,
)

# Largest run of blocks encrypted and written in one pwrite when filling a gap.
_FILL_BLOCKS = 256


class EncryptedFile:
    """Read/write/truncate an encrypted file at plaintext offsets."""

    def __init__(self, fd: int, key: bytes | BlockCipher, file_id: bytes,
                 block_size: int = DEFAULT_BLOCK_SIZE, version: int = FORMAT_VERSION) -> None:
        self.fd = fd
        self.cipher = key if isinstance(key, BlockCipher) else BlockCipher(key)
        self.file_id = file_id
        self.block_size = block_size
        self.version = version
        self._stored = block_size + BLOCK_OVERHEAD

    # -- sizes -----------------------------------------------------------------------------------
    def size(self) -> int:
        """Plaintext size, derived from the backing file length."""
        return plain_size(os.fstat(self.fd).st_size, self.block_size)

    # -- block primitives -------------------------------------------------------------------------
    def _aad(self, block_no: int) -> bytes:
        return block_aad(self.file_id, block_no, self.version)

    def _open_block(self, block_no: int, stored: bytes) -> bytes:
        try:
            return self.cipher.open(stored, self._aad(block_no))
        except IntegrityError as exc:
            raise IntegrityError(f"block {block_no} failed authentication", block=block_no) from exc

    def _read_block(self, block_no: int, size: int) -> bytes:
        """Plaintext of one existing block (``size`` is the current plaintext size)."""
        start = block_no * self.block_size
        want = min(self.block_size, size - start)
        if want <= 0:
            return b""
        stored = os.pread(self.fd, want + BLOCK_OVERHEAD, block_offset(block_no, self.block_size))
        if len(stored) != want + BLOCK_OVERHEAD:
            raise IntegrityError(f"block {block_no} is short", block=block_no)
        return self._open_block(block_no, stored)

    def _write_blocks(self, first_block: int, plaintext: bytes | bytearray | memoryview) -> None:
        """Encrypt block-aligned plaintext starting at ``first_block`` and write it in one pwrite."""
        bs = self.block_size
        view = memoryview(plaintext)
        out = bytearray()
        for i in range(0, len(view), bs):
            out += self.cipher.seal(bytes(view[i:i + bs]), self._aad(first_block + i // bs))
        _pwrite_all(self.fd, out, block_offset(first_block, bs))

    # -- plaintext API ----------------------------------------------------------------------------
    def read(self, offset: int, length: int) -> bytes:
        """Up to ``length`` bytes from ``offset``; short at EOF; IntegrityError on a bad block."""
        if offset < 0 or length < 0:
            raise ValueError("negative offset or length")
        size = self.size()
        end = min(offset + length, size)
        if offset >= end:
            return b""
        bs = self.block_size
        first, last = offset // bs, (end - 1) // bs
        stored_len = backing_size(min(size, (last + 1) * bs), bs) - block_offset(first, bs)
        raw = os.pread(self.fd, stored_len, block_offset(first, bs))
        out = bytearray()
        pos = 0
        for block_no in range(first, last + 1):
            plen = min(bs, size - block_no * bs)
            chunk = raw[pos:pos + plen + BLOCK_OVERHEAD]
            if len(chunk) != plen + BLOCK_OVERHEAD:
                raise IntegrityError(f"block {block_no} is short", block=block_no)
            out += self._open_block(block_no, chunk)
            pos += plen + BLOCK_OVERHEAD
        skip = offset - first * bs
        return bytes(out[skip:skip + (end - offset)])

    def write(self, offset: int, data: bytes) -> int:
        """Write ``data`` at ``offset`` (read-modify-write of partial edge blocks)."""
        if offset < 0:
            raise ValueError("negative offset")
        if not data:
            return 0
        size = self.size()
        if offset > size:
            self.truncate(offset)
            size = offset
        bs = self.block_size
        end = offset + len(data)
        first, last = offset // bs, (end - 1) // bs
        seg_start = first * bs
        seg_end = max(end, min(size, (last + 1) * bs))
        buf = bytearray(seg_end - seg_start)
        if offset > seg_start:  # partial head block: keep its old leading bytes
            head = self._read_block(first, size)
            buf[:len(head)] = head
        tail_start = last * bs
        if end < seg_end and (last != first or offset == seg_start):  # partial tail block
            tail = self._read_block(last, size)
            buf[tail_start - seg_start:tail_start - seg_start + len(tail)] = tail
        buf[offset - seg_start:end - seg_start] = data
        self._write_blocks(first, buf)
        return len(data)

    def truncate(self, length: int) -> None:
        """Set the plaintext size; growing writes encrypted zeros (no holes)."""
        if length < 0:
            raise ValueError("negative length")
        size = self.size()
        bs = self.block_size
        if length == size:
            # A torn trailing fragment (crash mid-append) is dropped here too.
            if os.fstat(self.fd).st_size != backing_size(size, bs):
                os.ftruncate(self.fd, backing_size(size, bs))
            return
        if length < size:
            block_no, rest = divmod(length, bs)
            if rest:
                plain = self._read_block(block_no, size)[:rest]
                # Keep the old block whole while rewriting it, then cut: a crash in between
                # damages only this block.
                os.ftruncate(self.fd, block_offset(block_no, bs) + min(bs, size - block_no * bs)
                             + BLOCK_OVERHEAD)
                self._write_blocks(block_no, plain)
            os.ftruncate(self.fd, backing_size(length, bs))
            return
        # Grow: re-encrypt the old partial last block padded with zeros, then append zero blocks.
        block_no, rest = divmod(size, bs)
        pos = block_no * bs
        if rest:
            head = self._read_block(block_no, size)
            n = min(bs, length - pos)
            self._write_blocks(block_no, head + bytes(n - len(head)))
            pos += n
            block_no += 1
        while pos < length:
            n = min(_FILL_BLOCKS * bs, length - pos)
            self._write_blocks(block_no, bytes(n))
            pos += n
            block_no += -(-n // bs)
        os.ftruncate(self.fd, backing_size(length, bs))


def _pwrite_all(fd: int, data: bytes | bytearray, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n
