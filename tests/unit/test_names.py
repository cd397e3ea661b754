"""kmsfs.names: encrypted, authenticated, deterministic names (docs/FORMAT.md "Names")."""

from __future__ import annotations

import os

import pytest

from kmsfs import names
from kmsfs.names import BadName, NameCipher

KEY = bytes(range(32))
DIR_A = bytes(16)
DIR_B = bytes([1]) * 16


@pytest.fixture
def cipher() -> NameCipher:
    return NameCipher(KEY)


def test_known_answer_vector(cipher: NameCipher) -> None:
    """Pins the format: HKDF labels, AES-SIV AD order and the encoding must never drift."""
    assert cipher.encrypt(DIR_A, b"hello.txt") == KAT_HELLO
    assert cipher.dirid_file(DIR_A).hex() == KAT_DIRID


KAT_HELLO = "OW0-P6Z2gnZ8_LvI7pSEvnxodGU43Urk2g"
KAT_DIRID = "0100000000000000000000000000000000db60df558a48fd8dc4bd24ab885a7c70"


@pytest.mark.parametrize(
    "name",
    [b"a", b"hello.txt", "ünïcødé ✓".encode(), b"new\nline", b"\xff\xfe not utf-8", b"x" * 175, b"y" * 255],
)
def test_round_trip(cipher: NameCipher, name: bytes) -> None:
    backing, side = cipher.backing_name(DIR_A, name)
    assert len(backing) <= names.MAX_BACKING_NAME
    assert name not in backing.encode("utf-8", "surrogateescape")
    assert cipher.plain_name(DIR_A, backing, side.encode() if side else None) == name


def test_deterministic_per_directory(cipher: NameCipher) -> None:
    assert cipher.encrypt(DIR_A, b"f") == cipher.encrypt(DIR_A, b"f")
    assert cipher.encrypt(DIR_A, b"f") != cipher.encrypt(DIR_B, b"f")
    assert NameCipher(os.urandom(32)).encrypt(DIR_A, b"f") != cipher.encrypt(DIR_A, b"f")


def test_moved_to_another_directory_fails(cipher: NameCipher) -> None:
    backing, _ = cipher.backing_name(DIR_A, b"secret.pdf")
    with pytest.raises(BadName):
        cipher.plain_name(DIR_B, backing)


def test_every_flipped_character_fails(cipher: NameCipher) -> None:
    backing = cipher.encrypt(DIR_A, b"report.pdf")
    for i in range(len(backing)):
        for replacement in "A_":
            if backing[i] == replacement:
                continue
            with pytest.raises(BadName):
                cipher.plain_name(DIR_A, backing[:i] + replacement + backing[i + 1 :])


@pytest.mark.parametrize("junk", ["", ".", "..", "a", "kmsfs.dirid", "plain name.txt", "=" * 30, "é" * 30])
def test_junk_names_fail(cipher: NameCipher, junk: str) -> None:
    with pytest.raises(BadName):
        cipher.plain_name(DIR_A, junk)


def test_long_name_threshold(cipher: NameCipher) -> None:
    """175 bytes still fit a 255-byte backing name; 176 need a side entry."""
    assert cipher.backing_name(DIR_A, b"a" * 175)[1] is None
    backing, side = cipher.backing_name(DIR_A, b"a" * 176)
    assert side is not None and names.is_long(backing) and len(backing) == len("kmsfs.longname.") + 43
    assert names.long_side_name(backing) == backing + ".name"
    assert names.is_reserved(names.long_side_name(backing)) and not names.is_reserved(backing)


def test_long_name_side_entry_checks(cipher: NameCipher) -> None:
    one, side_one = cipher.backing_name(DIR_A, b"1" * 200)
    two, side_two = cipher.backing_name(DIR_A, b"2" * 200)
    assert side_one and side_two
    assert cipher.plain_name(DIR_A, one, side_one.encode()) == b"1" * 200
    for bad_side in (None, side_two.encode(), side_one.encode()[:-1], b"\xff" + side_one.encode()[1:]):
        with pytest.raises(BadName):
            cipher.plain_name(DIR_A, one, bad_side)
    # A side entry that hashes right but was made for another directory still fails.
    other, other_side = cipher.backing_name(DIR_B, b"1" * 200)
    assert other == names.LONGNAME_PREFIX + names._hash_name(other_side or "")
    with pytest.raises(BadName):
        cipher.plain_name(DIR_A, other, (other_side or "").encode())


@pytest.mark.parametrize("bad", [b"", b".", b"..", b"a/b", b"a\0b", b"x" * 256])
def test_invalid_names_refused(cipher: NameCipher, bad: bytes) -> None:
    with pytest.raises(ValueError):
        cipher.encrypt(DIR_A, bad)


def test_dirid_file(cipher: NameCipher) -> None:
    dir_id = cipher.new_dir_id()
    data = cipher.dirid_file(dir_id)
    assert len(data) == names.DIRID_FILE_SIZE
    assert cipher.parse_dirid_file(data) == dir_id
    for i in range(len(data)):
        flipped = bytearray(data)
        flipped[i] ^= 0x01
        with pytest.raises(BadName):
            cipher.parse_dirid_file(bytes(flipped))
    with pytest.raises(BadName):
        NameCipher(os.urandom(32)).parse_dirid_file(data)  # forged without the name key
    with pytest.raises(BadName):
        cipher.parse_dirid_file(data[:-1])


@pytest.mark.parametrize("length", [1, 100, 3000, 4095])
def test_symlink_targets(cipher: NameCipher, length: int) -> None:
    target = (b"../d/" * 1000)[:length]
    stored = cipher.encrypt_target(target)
    assert target not in stored or length < 3
    assert cipher.decrypt_target(stored) == target
    assert names.needs_long_target(stored) == (len(stored) > 4095)
    if names.needs_long_target(stored):
        side = names.long_target_name(stored)
        assert len(side) < 255 and names.is_reserved(side)


def test_symlink_target_tampering(cipher: NameCipher) -> None:
    stored = cipher.encrypt_target(b"/etc/passwd")
    for i in range(len(stored)):
        flipped = bytearray(stored)
        flipped[i] = ord("A") if flipped[i] != ord("A") else ord("B")
        with pytest.raises(BadName):
            cipher.decrypt_target(bytes(flipped))
    with pytest.raises(BadName):
        NameCipher(os.urandom(32)).decrypt_target(stored)
    with pytest.raises(BadName):
        cipher.decrypt_target(b"/plain/target")


def test_name_key_size() -> None:
    with pytest.raises(ValueError):
        NameCipher(b"short")


def test_only_the_canonical_encoding_decodes() -> None:
    """base64url's last character carries unused bits: a renamed entry that differs only there
    must not decrypt (two backing names for one plaintext would list twice, open once)."""
    cipher = names.NameCipher(bytes(32))
    dir_id = bytes(16)
    encoded = cipher.encrypt(dir_id, b"hello.txt")  # 25 bytes: 34 characters, 4 unused bits
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    index = alphabet.index(encoded[-1])
    twin = encoded[:-1] + alphabet[index ^ 1]
    assert cipher.decrypt(dir_id, encoded) == b"hello.txt"
    with pytest.raises(names.BadName):
        cipher.decrypt(dir_id, twin)
    stored = cipher.encrypt_target(b"target")
    with pytest.raises(names.BadName):
        cipher.decrypt_target(stored[:-1] + alphabet[alphabet.index(chr(stored[-1])) ^ 1].encode())
