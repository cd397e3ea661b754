"""EncryptedFile against a reference bytearray: random writes, truncates, tampering."""

import os
import random

import pytest

from kmsfs import format as fmt
from kmsfs.cipher import IntegrityError
from kmsfs.encfile import EncryptedFile
from kmsfs.headers import write_new

KEY = bytes(range(32))
FILE_ID = bytes.fromhex("00112233445566778899aabbccddeeff")
BS = fmt.DEFAULT_BLOCK_SIZE


HEADER = fmt.Header(file_id=FILE_ID, key_arn="arn:aws:kms:us-east-1:111122223333:key/k",
                    wrapped_key=b"w" * 150, version=fmt.FORMAT_V3)


@pytest.fixture(params=[(3, False), (2, True), (2, False), (1, False)],
                ids=["v3", "v2-sparse", "v2-dense", "v1"])
def ef(tmp_path, request):
    version, sparse = request.param
    fd = os.open(tmp_path / "backing", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        if version == 3:
            write_new(fd, HEADER, KEY)
        yield EncryptedFile(fd, KEY, FILE_ID, version=version, sparse=sparse, legacy_writes=version == 1)
    finally:
        os.close(fd)


def check(ef, ref):
    assert ef.size() == len(ref)
    assert os.fstat(ef.fd).st_size == ef.data_offset + fmt.backing_size(len(ref))
    assert ef.read(0, len(ref) + 100) == bytes(ref)


def test_empty(ef):
    check(ef, bytearray())
    assert ef.read(10, 10) == b""


@pytest.mark.parametrize("n", [1, 4095, 4096, 4097, 5000, 3 * BS])
def test_sizes_and_roundtrip(ef, n):
    data = os.urandom(n)
    assert ef.write(0, data) == n
    check(ef, bytearray(data))


def test_random_ops_against_reference(ef):
    rng = random.Random(1234)
    ref = bytearray()
    for _ in range(300):
        op = rng.random()
        if op < 0.6:
            off = rng.randrange(0, len(ref) + 3 * BS)
            data = rng.randbytes(rng.choice([1, 7, 100, BS - 1, BS, BS + 1, 3 * BS + 17]))
            ef.write(off, data)
            if off > len(ref):
                ref.extend(bytes(off - len(ref)))
            ref[off:off + len(data)] = data
        elif op < 0.8:
            n = rng.randrange(0, len(ref) + 2 * BS + 1)
            ef.truncate(n)
            if n < len(ref):
                del ref[n:]
            else:
                ref.extend(bytes(n - len(ref)))
        else:
            off = rng.randrange(0, len(ref) + 10)
            ln = rng.randrange(0, 3 * BS)
            assert ef.read(off, ln) == bytes(ref[off:off + ln])
        assert ef.size() == len(ref)
    check(ef, ref)


def test_truncate_up_writes_encrypted_zeros(ef):
    ef.write(0, b"abc")
    ef.truncate(3 * BS + 5)
    check(ef, bytearray(b"abc" + bytes(3 * BS + 2)))
    raw = os.pread(ef.fd, 10 * BS, 0)
    if not ef.sparse and ef.version < 3:  # v1 and v2 without holes: every block is ciphertext
        assert bytes(BS) not in raw


def test_truncate_down_mid_block(ef):
    data = os.urandom(3 * BS)
    ef.write(0, data)
    ef.truncate(BS + 10)
    check(ef, bytearray(data[:BS + 10]))
    ef.truncate(0)
    check(ef, bytearray())


def test_tamper_only_that_block_fails(ef):
    data = os.urandom(4 * BS)
    ef.write(0, data)
    pos = ef.data_offset + fmt.block_offset(2) + 100
    b = os.pread(ef.fd, 1, pos)
    os.pwrite(ef.fd, bytes([b[0] ^ 1]), pos)
    assert ef.read(0, 2 * BS) == data[:2 * BS]
    assert ef.read(3 * BS, BS) == data[3 * BS:]
    with pytest.raises(IntegrityError) as info:
        ef.read(2 * BS + 5, 10)
    assert info.value.block == 2
    with pytest.raises(IntegrityError):
        ef.read(0, 4 * BS)


def test_swapped_blocks_fail(ef):
    ef.write(0, os.urandom(2 * BS))
    s, o = fmt.stored_block_size(), ef.data_offset
    b0, b1 = os.pread(ef.fd, s, o), os.pread(ef.fd, s, o + s)
    os.pwrite(ef.fd, b1 + b0, o)
    with pytest.raises(IntegrityError):
        ef.read(0, 1)
    with pytest.raises(IntegrityError):
        ef.read(BS, 1)


def test_block_from_other_file_fails(ef, tmp_path):
    ef.write(0, b"secret" * 100)
    fd2 = os.open(tmp_path / "other", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        other = EncryptedFile(fd2, KEY, bytes(16), version=2)  # same key, different file id
        other.write(0, b"x" * 600)
        os.pwrite(ef.fd, os.pread(fd2, 600 + 28, 0), ef.data_offset)
    finally:
        os.close(fd2)
    with pytest.raises(IntegrityError):
        ef.read(0, 10)


def test_no_plaintext_in_backing(ef):
    msg = b"THE-PLAINTEXT-MARKER" * 500
    ef.write(0, msg)
    assert b"THE-PLAINTEXT-MARKER" not in os.pread(ef.fd, 1 << 20, 0)
