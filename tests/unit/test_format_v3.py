"""Format version 3 at the file level: the in-file header copy, the state record, recorded holes.

Plays the attacker with write access to the backing file and the backup tools that drop xattrs
and write holes as zeros.
"""

from __future__ import annotations

import errno
import os
import random
from pathlib import Path

import pytest

from kmsfs import format as fmt
from kmsfs import headers, infile
from kmsfs.cipher import IntegrityError
from kmsfs.encfile import EncryptedFile
from kmsfs.filestate import load

KEY = bytes(range(32))
FILE_ID = bytes.fromhex("00112233445566778899aabbccddeeff")
ARN = "arn:aws:kms:us-east-1:111122223333:key/0f42d105-bbdf-4fad-8d34-2e6bce77c5e4"
BS = fmt.DEFAULT_BLOCK_SIZE
S = fmt.stored_block_size()


def _header(file_id: bytes = FILE_ID, blob_len: int = 150) -> fmt.Header:
    return fmt.Header(file_id=file_id, key_arn=ARN, wrapped_key=bytes([7]) * blob_len, version=3)


def _new(path: Path, file_id: bytes = FILE_ID) -> tuple[int, EncryptedFile]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    headers.write_new(fd, _header(file_id), KEY)
    return fd, EncryptedFile(fd, KEY, file_id, version=3)


def _dense_copy(src: Path, dst: Path, keep_xattrs: bool = False) -> None:
    """What rsync -a (no -S, no -X) and tar (no -S, no --xattrs) do: holes become zeros."""
    dst.write_bytes(src.read_bytes())
    if keep_xattrs:
        os.setxattr(dst, fmt.HEADER_XATTR, os.getxattr(src, fmt.HEADER_XATTR))


def test_prefix_layout_and_worked_sizes(tmp_path: Path) -> None:
    raw = fmt.pack_header(_header())
    assert len(raw) == 32 + len(ARN) + 150 == 257
    assert infile.header_slot(257) == 768 and infile.header_slot(188) == 512
    assert infile.RECORD_SIZE == 310 and infile.BODY_SIZE == 282
    assert infile.data_offset_for(188) == 16 + 512 + 620 == 1148
    fd, ef = _new(tmp_path / "f")
    try:
        first = os.pread(fd, 64, 0)
        d = infile.data_offset_for(257)
        assert first[:16] == (b"KMSFS\x00" + b"\x00\x03" + d.to_bytes(4, "big") + (257).to_bytes(2, "big")
                              + b"\0\0")
        assert os.pread(fd, 257, 16) == raw and ef.data_offset == d
        assert os.fstat(fd).st_size == d  # an empty file is its prefix
        ef.write(0, b"x")
        assert os.fstat(fd).st_size == d + 29
        assert headers.plain_size_at(str(tmp_path / "f"), os.stat(tmp_path / "f")) == 1
        assert fmt.block_aad(FILE_ID, 7, version=3)[6:8] == b"\x00\x03"  # blocks of v2 never read as v3
    finally:
        os.close(fd)


def test_header_copy_serves_when_the_xattr_is_gone_and_is_restored(tmp_path: Path) -> None:
    fd, ef = _new(tmp_path / "f")
    ef.write(0, b"hello")
    os.close(fd)
    copy = tmp_path / "copy"
    _dense_copy(tmp_path / "f", copy)
    fd = os.open(copy, os.O_RDONLY)
    try:
        assert fmt.HEADER_XATTR not in os.listxattr(copy)
        assert headers.read_header(fd, restore=False) == _header()
        assert fmt.HEADER_XATTR not in os.listxattr(copy)
        assert headers.read_header(fd) == _header()  # and puts the xattr back
        assert os.getxattr(copy, fmt.HEADER_XATTR) == fmt.pack_header(_header())
        assert EncryptedFile(fd, KEY, FILE_ID, version=3).read(0, 100) == b"hello"
    finally:
        os.close(fd)


@pytest.mark.parametrize("attack", ["xattr-from-other-file", "copy-from-other-file", "xattr-bitflip",
                                    "copy-bitflip", "v2-xattr-on-v3-file", "v3-xattr-on-v2-file"])
def test_header_and_copy_disagreeing_is_refused(tmp_path: Path, attack: str) -> None:
    fd, ef = _new(tmp_path / "a")
    ef.write(0, b"a" * 5000)
    fd2, other = _new(tmp_path / "b", bytes(16))
    other.write(0, b"b" * 10)
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    try:
        if attack == "xattr-from-other-file":
            os.setxattr(a, fmt.HEADER_XATTR, os.getxattr(b, fmt.HEADER_XATTR))
        elif attack == "copy-from-other-file":
            os.pwrite(fd, os.pread(fd2, 16 + 257, 0), 0)
        elif attack == "xattr-bitflip":
            raw = bytearray(os.getxattr(a, fmt.HEADER_XATTR))
            raw[-3] ^= 0x10
            os.setxattr(a, fmt.HEADER_XATTR, bytes(raw))
        elif attack == "copy-bitflip":
            os.pwrite(fd, bytes([os.pread(fd, 1, 200)[0] ^ 1]), 200)
        elif attack == "v2-xattr-on-v3-file":
            old = fmt.Header(FILE_ID, ARN, bytes([7]) * 150, version=2)
            os.setxattr(a, fmt.HEADER_XATTR, fmt.pack_header(old))
        else:  # a v3 header as xattr of a v2 file (no prefix)
            os.truncate(a, 0)
            EncryptedFile(fd, KEY, FILE_ID, version=2).write(0, b"x" * 100)
        with pytest.raises(fmt.CorruptHeader):
            headers.read_header(fd)
    finally:
        os.close(fd)
        os.close(fd2)


def test_sparse_file_survives_a_densifying_copy_but_zeroed_data_does_not(tmp_path: Path) -> None:
    fd, ef = _new(tmp_path / "f")
    try:
        ef.write(0, b"A" * BS)
        ef.write(9 * BS, b"B" * BS)  # blocks 1..8 never written: one recorded hole run
        ef.truncate(20 * BS + 5)  # 10..19 too
        want = ef.read(0, 30 * BS)
        assert want == b"A" * BS + bytes(8 * BS) + b"B" * BS + bytes(10 * BS + 5)
    finally:
        os.close(fd)
    copy = tmp_path / "copy"
    _dense_copy(tmp_path / "f", copy, keep_xattrs=True)
    assert os.stat(copy).st_blocks * 512 >= os.stat(copy).st_size - 4096  # really dense
    fd = os.open(copy, os.O_RDWR)
    try:
        ef = EncryptedFile(fd, KEY, FILE_ID, version=3)
        assert ef.read(0, 30 * BS) == want and ef.verify() == []
        # an attacker zeroes a block that was written: EIO, not zeros
        os.pwrite(fd, bytes(S), ef.data_offset + fmt.block_offset(9))
        with pytest.raises(IntegrityError) as info:
            ef.read(9 * BS, 10)
        assert info.value.block == 9 and "zeroed" in str(info.value)
        assert ef.read(BS, 8 * BS) == bytes(8 * BS)
    finally:
        os.close(fd)


def test_filling_a_hole_drops_it_from_the_record(tmp_path: Path) -> None:
    fd, ef = _new(tmp_path / "f")
    try:
        ef.truncate(10 * BS)
        assert ef._fs is not None and ef._fs.runs == [(0, 9)]  # noqa: SLF001
        ef.write(4 * BS, b"C" * BS)
        assert ef._fs.runs == [(0, 4), (5, 9)]  # noqa: SLF001
        os.pwrite(fd, bytes(S), ef.data_offset + fmt.block_offset(4))  # zero the filled block
        with pytest.raises(IntegrityError):
            ef.read(4 * BS, 1)
        again = load(fd, ef.cipher, FILE_ID)  # the record on disk says the same
        assert again.runs == [(0, 4), (5, 9)] and again.state.marker is None
    finally:
        os.close(fd)


def test_more_gaps_than_the_record_holds_are_written_as_zeros(tmp_path: Path) -> None:
    fd, ef = _new(tmp_path / "f")
    ref = bytearray()
    try:
        for _ in range(infile.MAX_RUNS + 6):
            off = len(ref) + 3 * BS
            ef.write(off, b"D" * 100)
            ref += bytes(3 * BS) + b"D" * 100
        assert ef._fs is not None and len(ef._fs.runs) <= infile.MAX_RUNS  # noqa: SLF001
        assert ef.read(0, len(ref) + 10) == bytes(ref)
        for i in range(0, len(ref) // BS, 2):  # splitting runs keeps them within the bound too
            ef.write(i * BS + 1, b"E")
            ref[i * BS + 1] = ord("E")
        assert len(ef._fs.runs) <= infile.MAX_RUNS  # noqa: SLF001
        assert ef.read(0, len(ref) + 10) == bytes(ref) and ef.verify() == []
    finally:
        os.close(fd)


def test_state_record_torn_forged_or_replayed(tmp_path: Path) -> None:
    fd, ef = _new(tmp_path / "f")
    try:
        ef.write(0, b"x" * 3 * BS)
        ef.truncate(30 * BS)
        fs = ef._fs  # noqa: SLF001
        assert fs is not None
        cur, seq = fs.prefix.slot_offset(fs.state.seq % 2), fs.state.seq
        os.pwrite(fd, b"\xff" * 40, cur)  # a torn write of the newest slot: the other one serves
        assert load(fd, ef.cipher, FILE_ID).state.seq == seq - 1
        other = fs.prefix.slot_offset((seq + 1) % 2)
        os.pwrite(fd, b"\xff" * 40, other)
        with pytest.raises(fmt.CorruptHeader):  # no valid record in a non-empty file
            load(fd, ef.cipher, FILE_ID)
        with pytest.raises(fmt.CorruptHeader):  # a record under another file id
            fd2, _ = _new(tmp_path / "g", bytes(16))
            slots = fs.prefix.slot_offset(0)
            os.pwrite(fd, os.pread(fd2, 2 * infile.RECORD_SIZE, slots), slots)
            os.close(fd2)
            load(fd, ef.cipher, FILE_ID)
    finally:
        os.close(fd)


def test_emptying_without_the_key_keeps_the_prefix(tmp_path: Path) -> None:
    fd, ef = _new(tmp_path / "f")
    try:
        ef.write(0, b"y" * 10000)
        ef._set_marker(0, 10000)  # noqa: SLF001 - a stale marker must not grow the file back
        headers.empty(fd)
        assert os.fstat(fd).st_size == ef.data_offset
        fresh = load(fd, ef.cipher, FILE_ID)
        assert fresh.state.marker is None and fresh.runs == []
        assert headers.read_header(fd) == _header()
    finally:
        os.close(fd)


@pytest.mark.parametrize("seed", range(3))
def test_random_ops_then_a_dense_copy_reads_the_same(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    fd, ef = _new(tmp_path / "f")
    ref = bytearray()
    try:
        for _ in range(150):
            op = rng.random()
            if op < 0.55:
                off = rng.randrange(0, len(ref) + 12 * BS)
                data = rng.randbytes(rng.choice([1, 100, BS - 1, BS, 3 * BS + 5]))
                ef.write(off, data)
                ref.extend(bytes(max(0, off - len(ref))))
                ref[off:off + len(data)] = data
            elif op < 0.8:
                n = rng.randrange(0, len(ref) + 20 * BS)
                ef.truncate(n)
                del ref[n:]
                ref.extend(bytes(n - len(ref)))
            else:
                off = rng.randrange(0, len(ref) + 5)
                assert ef.read(off, 5 * BS) == bytes(ref[off:off + 5 * BS])
        assert ef.read(0, len(ref) + 1) == bytes(ref)
    finally:
        os.close(fd)
    _dense_copy(tmp_path / "f", tmp_path / "copy")
    fd = os.open(tmp_path / "copy", os.O_RDONLY)
    try:
        header = headers.read_header(fd, restore=False)
        copy = EncryptedFile(fd, KEY, header.file_id, version=header.version)
        assert copy.read(0, len(ref) + 1) == bytes(ref) and copy.verify() == []
    finally:
        os.close(fd)


def test_v1_refuses_writes_but_may_be_emptied(tmp_path: Path) -> None:
    fd = os.open(tmp_path / "v1", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        EncryptedFile(fd, KEY, FILE_ID, version=1, legacy_writes=True).write(0, b"old" * 2000)
        ef = EncryptedFile(fd, KEY, FILE_ID, version=1)
        for attempt in (lambda: ef.write(0, b"new"), lambda: ef.truncate(5)):
            with pytest.raises(OSError) as info:
                attempt()
            assert info.value.errno == errno.EROFS
        ef.truncate(0)
        assert ef.size() == 0
    finally:
        os.close(fd)


def _after_crash(tmp_path: Path, fd: int) -> tuple[int, EncryptedFile]:
    """The file as a new process finds it after a kill -9 (a copy: nothing shared in memory)."""
    size = os.fstat(fd).st_size
    crashed = tmp_path / "crashed"
    crashed.write_bytes(os.pread(fd, size, 0))
    fd2 = os.open(crashed, os.O_RDWR)
    return fd2, EncryptedFile(fd2, KEY, FILE_ID, version=3)


def test_recover_interrupted_append_in_format_3(tmp_path: Path) -> None:
    fd, ef = _new(tmp_path / "f")
    try:
        data = os.urandom(BS + 100)
        ef.write(0, data)
        ef._set_marker(BS + 100, 5 * BS)  # noqa: SLF001 - the append's first step, in the record
        ef._write_runs({1: data[BS:] + b"new" + bytes(BS - 103)}, 99)  # noqa: SLF001 - re-sealed non-final
        os.pwrite(fd, os.urandom(100), ef.data_offset + 2 * S)  # part of the next block, then death
        fd2, crashed = _after_crash(tmp_path, fd)
        try:
            assert crashed.pending_marker() == (BS + 100, 5 * BS)
            assert crashed.recover() == BS + 100
            assert crashed.read(0, 10 * BS) == data and crashed.verify() == []
            assert load(fd2, crashed.cipher, FILE_ID).state.marker is None
        finally:
            os.close(fd2)
    finally:
        os.close(fd)


def test_recover_interrupted_grow_in_format_3_keeps_the_recorded_gap(tmp_path: Path) -> None:
    fd, ef = _new(tmp_path / "f")
    try:
        ef.write(0, b"abc")
        ef._set_marker(10 * BS, 3, [(1, 9)])  # noqa: SLF001 - marker and gap saved together
        ef._write_runs({0: b"abc" + bytes(BS - 3)}, 99)  # noqa: SLF001 - old last block re-sealed
        fd2, crashed = _after_crash(tmp_path, fd)
        try:
            assert crashed.recover() == 10 * BS
            assert crashed.read(0, 20 * BS) == b"abc" + bytes(10 * BS - 3)
            assert crashed.verify() == []
            assert load(fd2, crashed.cipher, FILE_ID).runs == [(1, 9)]
        finally:
            os.close(fd2)
    finally:
        os.close(fd)
