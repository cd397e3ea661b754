"""Header pack/parse, block math and AAD layout of kmsfs/format.py, pinned to exact bytes."""

import pytest

from kmsfs import format as fmt
from kmsfs.format import CorruptHeader, Header

FILE_ID = bytes(range(16))
ARN = "arn:aws:kms:us-east-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab"
BLOB = b"\x01\x02wrapped-key-blob"


def make_header(**kw):
    values = dict(file_id=FILE_ID, key_arn=ARN, wrapped_key=BLOB)
    values.update(kw)
    return Header(**values)


@pytest.mark.parametrize("version", [1, 2, 3])
def test_pack_known_bytes(version):
    raw = fmt.pack_header(make_header(version=version))
    expected = (b"KMSFS\x00" + version.to_bytes(2, "big") + b"\x00\x00\x10\x00" + FILE_ID
                + len(ARN).to_bytes(2, "big") + len(BLOB).to_bytes(2, "big") + ARN.encode() + BLOB)
    assert raw == expected
    assert len(raw) == 32 + len(ARN) + len(BLOB)


def test_roundtrip():
    h = make_header()
    assert fmt.parse_header(fmt.pack_header(h)) == h
    assert h.encryption_context() == {"kmsfs:file-id": FILE_ID.hex()}


@pytest.mark.parametrize("mutate", [
    lambda r: b"",
    lambda r: r[:10],
    lambda r: b"XMSFS\x00" + r[6:],
    lambda r: r[:6] + b"\x00\x05" + r[8:],            # unknown version
    lambda r: r[:6] + b"\x00\x00" + r[8:],            # version 0
    lambda r: r[:8] + b"\x00\x00\x20\x00" + r[12:],    # block size 8192 not in v1
    lambda r: r + b"\x00",                             # trailing garbage
    lambda r: r[:-1],                                  # truncated blob
    lambda r: r[:28] + b"\x00\x00" + r[30:],           # zero-length ARN
    lambda r: r[:30] + b"\xff\xff" + r[32:],           # blob too long
    lambda r: r + b"\x00" * 9000,                      # oversize
    lambda r: r[:32] + b"\xff" + r[33:],               # ARN not UTF-8
    lambda r: r[:32] + b"\n" + r[33:],                 # ARN not printable
])
def test_parse_rejects(mutate):
    raw = fmt.pack_header(make_header())
    with pytest.raises(CorruptHeader):
        fmt.parse_header(mutate(raw))


def test_parse_rejects_non_bytes():
    with pytest.raises(CorruptHeader):
        fmt.parse_header("text")  # type: ignore[arg-type]


def test_pack_refuses_invalid():
    with pytest.raises(ValueError):
        fmt.pack_header(make_header(file_id=b"short"))
    with pytest.raises(ValueError):
        fmt.pack_header(make_header(key_arn=""))
    with pytest.raises(ValueError):
        fmt.pack_header(make_header(wrapped_key=b"x" * 7000))


@pytest.mark.parametrize("plain,backing", [
    (0, 0), (1, 29), (4095, 4123), (4096, 4124), (4097, 4124 + 29), (5000, 4124 + 904 + 28),
    (8192, 8248), (5 * 2**30, (5 * 2**30 // 4096) * 4124),
])
def test_sizes(plain, backing):
    assert fmt.backing_size(plain) == backing
    assert fmt.plain_size(backing) == plain


def test_torn_tail_ignored():
    # a trailing fragment no longer than the overhead carries no plaintext
    assert fmt.plain_size(4124 + 28) == 4096
    assert fmt.plain_size(4124 + 5) == 4096
    assert fmt.plain_size(28) == 0


def test_block_math():
    assert list(fmt.block_range(0, 0)) == []
    assert list(fmt.block_range(0, 1)) == [0]
    assert list(fmt.block_range(4095, 2)) == [0, 1]
    assert list(fmt.block_range(4096, 4096)) == [1]
    assert fmt.block_offset(3) == 3 * 4124
    assert fmt.block_count(0) == 0 and fmt.block_count(1) == 1 and fmt.block_count(4097) == 2


def test_new_files_are_version_3():
    """(Directory-key cipherdirs write version 4: tests/unit/test_format_v4.py.)"""
    assert fmt.FORMAT_VERSION == 3 and make_header().version == 3
    assert fmt.READABLE_VERSIONS == {1, 2, 3, 4}


def test_aad_v2_layout():
    aad = fmt.block_aad(FILE_ID, 7, version=2)
    assert aad == b"KMSFS\x00" + b"\x00\x02" + FILE_ID + (7).to_bytes(8, "big") + b"\x00"
    assert fmt.block_aad(FILE_ID, 7, version=2, final=True) == aad[:-1] + b"\x01"
    assert len(aad) == fmt.AAD_V2_SIZE == 33


def test_marker_layout():
    assert fmt.marker_aad(FILE_ID, 5, 9) == b"KMSFS\x00resize" + FILE_ID + (5).to_bytes(8, "big") + (
        9).to_bytes(8, "big")
    raw = fmt.pack_marker_sizes(5, 9) + bytes(28)
    assert len(raw) == fmt.MARKER_SIZE == 44
    assert fmt.unpack_marker(raw) == (5, 9, bytes(28))
    with pytest.raises(CorruptHeader):
        fmt.unpack_marker(raw[:-1])


def test_aad_layout():
    aad = fmt.block_aad(FILE_ID, 7, version=1)
    assert aad == b"KMSFS\x00" + b"\x00\x01" + FILE_ID + (7).to_bytes(8, "big")
    assert len(aad) == fmt.AAD_SIZE == 32
    assert fmt.block_aad(FILE_ID, 8, version=1) != aad
    assert fmt.block_aad(bytes(16), 7, version=1) != aad
    assert fmt.block_aad(FILE_ID, 7, version=1, final=True) == aad  # v1 has no final flag
