"""Format version 2 at the EncryptedFile level: authenticated size, real holes, crash recovery,
nonce uniqueness, and the frozen version-1 fixture still decrypting."""

from __future__ import annotations

import errno
import json
import os
import random
from pathlib import Path

import pytest

from kmsfs import format as fmt
from kmsfs.cipher import IntegrityError
from kmsfs.encfile import EncryptedFile

KEY = bytes(range(32))
FILE_ID = bytes.fromhex("00112233445566778899aabbccddeeff")
BS = fmt.DEFAULT_BLOCK_SIZE
S = fmt.stored_block_size()
V1_FIXTURE = Path(__file__).resolve().parents[1] / "data" / "kmsfs-v1"


@pytest.fixture
def ef(tmp_path: Path):
    fd = os.open(tmp_path / "backing", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        yield EncryptedFile(fd, KEY, FILE_ID)
    finally:
        os.close(fd)


def test_truncation_at_block_boundary_is_detected(ef: EncryptedFile) -> None:
    data = os.urandom(4 * BS)
    ef.write(0, data)
    os.ftruncate(ef.fd, 3 * S)  # attacker drops the last block
    assert ef.size() == 3 * BS
    assert ef.read(0, BS) == data[:BS]  # untouched blocks still read
    with pytest.raises(IntegrityError) as info:
        ef.read(2 * BS, BS)  # the new last block was not sealed as final
    assert info.value.block == 2


@pytest.mark.parametrize("junk", [1, 28, 29, S, 3 * S])
def test_appended_junk_is_detected(ef: EncryptedFile, junk: int) -> None:
    ef.write(0, os.urandom(2 * BS + 10))
    os.pwrite(ef.fd, os.urandom(junk), os.fstat(ef.fd).st_size)
    with pytest.raises(IntegrityError):
        ef.read(0, 10 * BS)
    assert ef.verify()


def test_appending_a_copy_of_the_last_block_is_detected(ef: EncryptedFile) -> None:
    ef.write(0, os.urandom(2 * BS))
    last = os.pread(ef.fd, S, S)
    os.pwrite(ef.fd, last, 2 * S)  # a final-sealed block, but at position 2 and not the only final
    with pytest.raises(IntegrityError):
        ef.read(0, 3 * BS)


def test_real_holes_read_as_zeros_and_stay_sparse(ef: EncryptedFile) -> None:
    ef.write(0, b"head")
    ef.truncate(64 << 20)
    ef.write((64 << 20) - 4, b"tail")
    st = os.fstat(ef.fd)
    assert st.st_size == fmt.backing_size(64 << 20)
    assert st.st_blocks * 512 < 1 << 20  # 64 MiB of plaintext, well under 1 MiB on disk
    assert ef.read(0, 4) == b"head"
    assert ef.read(10 << 20, 100) == bytes(100)
    assert ef.read((64 << 20) - 4, 4) == b"tail"
    assert ef.verify() == []


def test_zeroed_block_is_not_a_hole(ef: EncryptedFile) -> None:
    ef.write(0, os.urandom(4 * BS))
    os.pwrite(ef.fd, bytes(S), S)  # attacker writes zeros over block 1 (allocated data)
    with pytest.raises(IntegrityError) as info:
        ef.read(BS, 10)
    assert info.value.block == 1 and "zeroed" in str(info.value)
    assert ef.verify() == [(1, "block 1 is zeroed (not a hole)")]


def test_zeroed_final_block_fails_even_as_hole(ef: EncryptedFile) -> None:
    ef.write(0, os.urandom(3 * BS))
    import fcntl  # noqa: F401 - only to document that punching needs fallocate

    os.ftruncate(ef.fd, 2 * S)
    os.ftruncate(ef.fd, 3 * S)  # last block now a real hole
    with pytest.raises(IntegrityError):
        ef.read(2 * BS, 10)


def test_writes_inside_holes_never_leave_a_lone_hole_block(ef: EncryptedFile) -> None:
    rng = random.Random(7)
    ref = bytearray()
    for _ in range(400):
        op = rng.random()
        if op < 0.5:
            off = rng.randrange(0, len(ref) + 12 * BS)
            data = rng.randbytes(rng.choice([1, 100, BS, 2 * BS + 3]))
            ef.write(off, data)
            if off > len(ref):
                ref.extend(bytes(off - len(ref)))
            ref[off:off + len(data)] = data
        elif op < 0.7:
            n = rng.randrange(0, len(ref) + 20 * BS)
            ef.truncate(n)
            del ref[n:]
            ref.extend(bytes(n - len(ref)))
        else:
            off = rng.randrange(0, len(ref) + 1)
            assert ef.read(off, 5 * BS) == bytes(ref[off:off + 5 * BS])
    assert ef.read(0, len(ref)) == bytes(ref)
    assert ef.verify() == []


def test_nonces_never_repeat_over_100k_rewrites(ef: EncryptedFile) -> None:
    ef.write(0, bytes(BS))
    seen = set()
    for i in range(100_000):
        ef.write(0, i.to_bytes(4, "big"))
        nonce = os.pread(ef.fd, fmt.NONCE_SIZE, 0)
        seen.add(nonce)
    assert len(seen) == 100_000
    assert ef.read(0, 4) == (99_999).to_bytes(4, "big")


# -- crash recovery: every intermediate state of a size change settles to a readable file --------

def _marker_state(ef: EncryptedFile, preferred: int, fallback: int) -> None:
    ef._set_marker(preferred, fallback)  # noqa: SLF001 - simulating a crash after this step


def test_recover_shrink_after_first_cut(ef: EncryptedFile) -> None:
    data = os.urandom(3 * BS)
    ef.write(0, data)
    _marker_state(ef, BS + 10, 3 * BS)
    os.ftruncate(ef.fd, 2 * S)  # crash after cutting, before rewriting block 1 as final
    assert ef.recover() == BS + 10
    assert ef.read(0, 3 * BS) == data[:BS + 10]
    assert ef.pending_marker() is None and ef.verify() == []


def test_recover_shrink_after_rewrite(ef: EncryptedFile) -> None:
    data = os.urandom(3 * BS)
    ef.write(0, data)
    _marker_state(ef, BS + 10, 3 * BS)
    os.ftruncate(ef.fd, 2 * S)
    ef._write_runs({1: data[BS:BS + 10]}, 1)  # noqa: SLF001 - crash before the final cut
    assert ef.recover() == BS + 10
    assert ef.read(0, 3 * BS) == data[:BS + 10]


def test_recover_shrink_to_boundary(ef: EncryptedFile) -> None:
    data = os.urandom(3 * BS)
    ef.write(0, data)
    _marker_state(ef, 2 * BS, 3 * BS)
    os.ftruncate(ef.fd, 2 * S)  # block 1 is now last but sealed non-final
    with pytest.raises(IntegrityError):
        ef.read(BS, 1)
    assert ef.recover() == 2 * BS
    assert ef.read(0, 3 * BS) == data[:2 * BS]


def test_recover_interrupted_append_goes_back_to_old_size(ef: EncryptedFile) -> None:
    data = os.urandom(BS + 100)
    ef.write(0, data)
    _marker_state(ef, BS + 100, 5 * BS)
    # the append re-sealed block 1 as non-final and wrote part of block 2, then died
    ef._write_runs({1: data[BS:] + b"new" + bytes(BS - 103)}, 99)  # noqa: SLF001
    os.pwrite(ef.fd, os.urandom(100), 2 * S)
    assert ef.recover() == BS + 100
    assert ef.read(0, 10 * BS) == data


def test_recover_interrupted_grow(ef: EncryptedFile) -> None:
    ef.write(0, b"abc")
    _marker_state(ef, 10 * BS, 3)
    ef._write_runs({0: b"abc" + bytes(BS - 3)}, 99)  # noqa: SLF001 - old last block re-sealed
    assert ef.recover() == 10 * BS
    assert ef.read(0, 10 * BS) == b"abc" + bytes(10 * BS - 3)
    assert ef.verify() == []


def test_forged_marker_is_refused(ef: EncryptedFile) -> None:
    ef.write(0, os.urandom(2 * BS))
    os.setxattr(ef.fd, fmt.RESIZE_XATTR, fmt.pack_marker_sizes(BS, 2 * BS) + bytes(28))
    with pytest.raises(fmt.CorruptHeader):
        ef.recover()


def test_failed_extending_write_restores_the_file(ef: EncryptedFile, monkeypatch) -> None:
    data = os.urandom(BS + 7)
    ef.write(0, data)
    import kmsfs.encfile as encfile

    real = encfile._pwrite_all
    calls = {"n": 0}

    def failing(fd: int, buf: bytes, off: int) -> None:
        calls["n"] += 1
        if calls["n"] > 1:  # the restore of the old last block succeeds
            return real(fd, buf, off)
        real(fd, buf[:len(buf) // 2], off)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(encfile, "_pwrite_all", failing)
    with pytest.raises(OSError):
        ef.write(BS, os.urandom(8 * BS))
    monkeypatch.setattr(encfile, "_pwrite_all", real)
    assert ef.read(0, 20 * BS) == data and ef.pending_marker() is None


# -- the frozen version-1 cipherdir ---------------------------------------------------------------

def test_frozen_v1_files_decrypt_with_their_data_keys(tmp_path: Path) -> None:
    manifest = json.loads((V1_FIXTURE / "manifest.json").read_text())
    assert len(manifest["files"]) == 4
    for rel, entry in manifest["files"].items():
        header = fmt.parse_header(bytes.fromhex(entry["header_hex"]))
        assert header.version == 1 and header.key_arn == manifest["key_arn"]
        copy = tmp_path / rel.replace("/", "_")
        copy.write_bytes((V1_FIXTURE / "cipherdir" / rel).read_bytes())
        fd = os.open(copy, os.O_RDWR)
        try:
            ef = EncryptedFile(fd, bytes.fromhex(entry["data_key_hex"]), header.file_id,
                               version=header.version)
            plain = bytes.fromhex(entry["plaintext_hex"])
            assert ef.read(0, 1 << 20) == plain and ef.verify() == []
            if plain:  # v1 cannot authenticate its size: no more writes (issue 12, item 5)
                with pytest.raises(OSError) as info:
                    ef.write(len(plain), b"more")
                assert info.value.errno == errno.EROFS
                with pytest.raises(OSError):
                    ef.truncate(1)
                assert ef.read(0, 1 << 20) == plain
        finally:
            os.close(fd)


def test_truncation_inside_a_block_is_detected(ef: EncryptedFile) -> None:
    ef.write(0, os.urandom(2 * BS))
    os.ftruncate(ef.fd, S + 1000)
    with pytest.raises(IntegrityError) as info:
        ef.read(BS, 10)
    assert info.value.block == 1
