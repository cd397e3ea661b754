"""The I/O fast paths (cached AAD prefix, batched sealing, raw opening) give exactly the bytes of
the reference functions, so the speed-ups cannot drift from docs/FORMAT.md."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kmsfs import format as fmt
from kmsfs.cipher import BlockCipher, IntegrityError
from kmsfs.encfile import EncryptedFile

FILE_ID = bytes(range(16))


@pytest.mark.parametrize("version", [fmt.FORMAT_V1, fmt.FORMAT_V2])
@pytest.mark.parametrize("block_no", [0, 7, 2**40 + 3])
@pytest.mark.parametrize("final", [False, True])
def test_cached_aad_equals_block_aad(tmp_path: Path, version: int, block_no: int, final: bool) -> None:
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        ef = EncryptedFile(fd, bytes(32), FILE_ID, version=version)
        assert ef._aad(block_no, final) == fmt.block_aad(FILE_ID, block_no, version, final)  # noqa: SLF001
    finally:
        os.close(fd)


def test_seal_many_matches_seal_and_uses_fresh_nonces() -> None:
    cipher = BlockCipher(bytes(range(32)))
    parts = [(b"a" * 4096, b"aad0"), (memoryview(b"b" * 100), b"aad1")]
    sealed = cipher.seal_many(parts)
    first, second = bytes(sealed[:4096 + 28]), bytes(sealed[4096 + 28:])
    assert cipher.open(first, b"aad0") == b"a" * 4096
    assert cipher.open(second, b"aad1") == b"b" * 100
    assert first[:12] != second[:12]
    assert cipher.seal(b"a" * 4096, b"aad0", nonce=first[:12]) == first
    assert cipher.open_raw(memoryview(second), b"aad1") == b"b" * 100


# -- issue 6, data path: read_into, the one-lseek hole probe, pwritev, the shared inode lock ---------
BS = fmt.DEFAULT_BLOCK_SIZE


def _reference_read(ef: EncryptedFile, offset: int, length: int) -> bytes:
    """Block by block through the slow path (``_read_block``): what every read must return."""
    size = ef.size()
    out = b"".join(ef._read_block(b, size) for b in range(fmt.block_count(size)))  # noqa: SLF001
    return out[offset:offset + length]


@pytest.mark.parametrize("version", [fmt.FORMAT_V1, fmt.FORMAT_V2])
def test_read_into_equals_block_by_block_reads(tmp_path: Path, version: int) -> None:
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        ef = EncryptedFile(fd, bytes(32), FILE_ID, version=version, legacy_writes=True)
        ef.write(0, os.urandom(3 * BS + 5))
        ef.write(40 * BS + 7, os.urandom(2 * BS))  # v2: leaves a hole run
        size = ef.size()
        for offset in (0, 1, BS - 1, BS, 3 * BS, 3 * BS + 5, 10 * BS + 3, 40 * BS, size - 3, size, size + 9):
            for length in (0, 1, 100, BS, BS + 1, 5 * BS, 64 * BS):
                want = _reference_read(ef, offset, length)
                out = bytearray(b"\xee" * length)
                count = ef.read_into(offset, memoryview(out))
                assert count == len(want) and bytes(out[:count]) == want
                assert ef.read(offset, length) == want
    finally:
        os.close(fd)


def test_read_into_a_damaged_block_leaves_only_zeros(tmp_path: Path) -> None:
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        ef = EncryptedFile(fd, bytes(32), FILE_ID)
        ef.write(0, os.urandom(4 * BS))
        stored = bytearray(os.pread(fd, 40, fmt.block_offset(2) + 100))
        stored[0] ^= 1
        os.pwrite(fd, bytes(stored), fmt.block_offset(2) + 100)
        out = bytearray(b"\xee" * (4 * BS))
        with pytest.raises(IntegrityError) as info:
            ef.read_into(0, memoryview(out))
        assert info.value.block == 2
        assert out == bytes(4 * BS)  # no plaintext, authenticated or not, is left behind
    finally:
        os.close(fd)


def test_one_lseek_hole_probe_keeps_hole_runs_long(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With the fast probe and without it (every write takes the slow path), the same writes
    leave the same holes and read the same, and no run of exactly one hole block appears."""
    import kmsfs.encfile as encfile

    contents = []
    for fast in (True, False):
        if not fast:
            monkeypatch.setattr(encfile, "_hole_in", lambda fd, start, end: True)
        fd = os.open(tmp_path / f"f{fast}", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            ef = EncryptedFile(fd, bytes(32), FILE_ID)
            ef.truncate(64 * BS)
            for block in (10, 12, 30, 31, 33, 5, 62, 0, 20):
                ef.write(block * BS, b"x" * BS)
            data = ef.read(0, 64 * BS)
            holes = [b for b in range(63) if ef._is_hole_block(b)]  # noqa: SLF001
            contents.append((data, holes))
            runs: list[list[int]] = []
            for b in holes:
                if runs and runs[-1][-1] == b - 1:
                    runs[-1].append(b)
                else:
                    runs.append([b])
            assert all(len(run) >= 2 for run in runs), runs
        finally:
            os.close(fd)
    assert contents[0] == contents[1]


def test_long_writes_are_split_within_iov_max(tmp_path: Path) -> None:
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        ef = EncryptedFile(fd, bytes(32), FILE_ID)
        data = os.urandom(1200 * BS + 17)  # > 512 blocks: more iovecs than one pwritev takes
        ef.write(0, data)
        assert ef.read(0, len(data)) == data and ef.verify() == []
    finally:
        os.close(fd)


def test_seal_iov_uses_fresh_nonces_and_matches_seal() -> None:
    cipher = BlockCipher(bytes(range(32)))
    iov = cipher.seal_iov([b"a" * BS, memoryview(b"b" * 100)], [b"aad0", b"aad1"])
    assert len(iov) == 4 and iov[0] != iov[2] and len(iov[0]) == fmt.NONCE_SIZE
    assert cipher.seal(b"a" * BS, b"aad0", nonce=iov[0]) == iov[0] + iov[1]
    assert cipher.open(iov[2] + iov[3], b"aad1") == b"b" * 100


def test_shared_lock_readers_overlap_and_writers_exclude() -> None:
    import threading
    import time

    from kmsfs.rwlock import SharedLock

    lock = SharedLock()
    inside, peak, order = [0], [0], []
    guard = threading.Lock()

    def reader() -> None:
        with lock.shared():
            with guard:
                inside[0] += 1
                peak[0] = max(peak[0], inside[0])
            time.sleep(0.05)
            with guard:
                inside[0] -= 1

    readers = [threading.Thread(target=reader) for _ in range(4)]
    for t in readers:
        t.start()
    for t in readers:
        t.join()
    assert peak[0] >= 2  # reads ran at the same time

    with lock:  # exclusive, reentrant, and its owner may also read
        with lock:
            with lock.shared():
                order.append("owner")

    def late_reader() -> None:
        with lock.shared():
            order.append("reader")

    lock.acquire()
    t = threading.Thread(target=late_reader)
    t.start()
    time.sleep(0.05)
    order.append("writer")  # the reader waits for the writer
    lock.release()
    t.join()
    assert order == ["owner", "writer", "reader"]
    with pytest.raises(RuntimeError):
        lock.release()


def test_mountinfo_unescape() -> None:
    from kmsfs._fuse import _unescape_mount

    assert _unescape_mount("/var/tmp/a\\040b\\134c") == "/var/tmp/a b\\c"


def test_large_reads_prefetch_the_backing_file_once_per_half_window(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import kmsfs.encfile as encfile

    hints: list[tuple[int, int]] = []
    real = os.posix_fadvise

    def spy(fd: int, offset: int, length: int, advice: int) -> None:
        if advice == os.POSIX_FADV_WILLNEED:
            hints.append((offset, length))
        real(fd, offset, length, advice)

    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        ef = EncryptedFile(fd, bytes(32), FILE_ID)
        data = os.urandom(24 << 20)
        ef.write(0, data)
        monkeypatch.setattr(encfile.os, "posix_fadvise", spy)
        assert ef.read(0, 4 * BS) == data[:4 * BS]  # small reads give no hint
        assert hints == []
        got = b"".join(ef.read(off, 1 << 20) for off in range(0, len(data), 1 << 20))
        assert got == data
        assert 4 <= len(hints) <= 8  # about one per half window (8 MiB ahead), not one per read
        assert hints[0][0] == fmt.backing_size(1 << 20)  # starts right after the first request
    finally:
        os.close(fd)


@pytest.mark.parametrize("version", [fmt.FORMAT_V1, fmt.FORMAT_V2])
def test_batched_aads_equal_block_aad(tmp_path: Path, version: int) -> None:
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        ef = EncryptedFile(fd, bytes(32), FILE_ID, version=version)
        for first, count, final in ((0, 1, 0), (5, 10, 9), (5, 10, 14), (5, 10, 15), (7, 3, -1)):
            assert ef._aads(first, count, final) == [  # noqa: SLF001
                fmt.block_aad(FILE_ID, b, version, b == final) for b in range(first, first + count)]
    finally:
        os.close(fd)


@pytest.mark.parametrize("offset", [0, 1, BS - 1, BS, 3 * BS + 7])
@pytest.mark.parametrize("length", [1, BS, 2 * BS, 2 * BS + 1, 3 * BS - 2, 70 * BS + 5])
def test_writes_of_every_alignment_read_back(tmp_path: Path, offset: int, length: int) -> None:
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        ef = EncryptedFile(fd, bytes(32), FILE_ID)
        model = bytearray(os.urandom(5 * BS + 3))
        ef.write(0, bytes(model))
        chunk = os.urandom(length)
        ef.write(offset, chunk)
        model[offset:offset + length] = chunk
        assert ef.read(0, len(model) + BS) == bytes(model) and ef.verify() == []
    finally:
        os.close(fd)
