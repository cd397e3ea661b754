"""The ciphertext blob: layout, known answers, order-independent context AAD, tamper detection."""

from __future__ import annotations

import struct
import uuid

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from keyservice import envelope
from keyservice.errors import InvalidCiphertextException, ValidationException

MATERIAL = bytes(range(32))
KEY_ID = "11111111-2222-3333-4444-555555555555"
NONCE = bytes(range(12))
PLAINTEXT = b"kmsfs known answer"
CONTEXT = {"b": "2", "a": "1"}

# Pinned: changing the blob format must change this test on purpose.
EXPECTED_BLOB = bytes.fromhex(
    "01"  # format version
    "11111111222233334444555555555555"  # key id
    "00000007"  # key version
    "000102030405060708090a0b"  # nonce
    "2c6fa57db6c5a975e236f9abd0870b1ae6a4"  # ciphertext (18 bytes)
    "0d5f877ad540256eb09d71a798563b9b"  # tag
)


def test_context_encoding_known_answer() -> None:
    expected = (
        b"\x00\x00\x00\x02"
        + b"\x00\x00\x00\x01a"
        + b"\x00\x00\x00\x011"
        + b"\x00\x00\x00\x02bb"
        + b"\x00\x00\x00\x0222"
    )
    assert envelope.encode_context({"bb": "22", "a": "1"}) == expected
    assert envelope.encode_context(None) == b"\x00\x00\x00\x00"
    assert envelope.encode_context({}) == b"\x00\x00\x00\x00"


def test_context_encoding_is_order_independent_and_unambiguous() -> None:
    assert envelope.encode_context({"a": "1", "b": "2"}) == envelope.encode_context({"b": "2", "a": "1"})
    assert envelope.encode_context({"ab": "c"}) != envelope.encode_context({"a": "bc"})
    assert envelope.encode_context({"a": "b", "c": "d"}) != envelope.encode_context({"a": "b\x00c"})
    # Sorted by UTF-8 bytes, so non-ASCII keys have one canonical order.
    assert envelope.encode_context({"é": "1", "z": "2"}) == envelope.encode_context({"z": "2", "é": "1"})


def test_known_answer_blob() -> None:
    blob = envelope.seal_blob(MATERIAL, KEY_ID, 7, PLAINTEXT, CONTEXT, nonce=NONCE)
    assert blob == EXPECTED_BLOB


def test_layout_matches_an_independent_computation() -> None:
    header = b"\x01" + uuid.UUID(KEY_ID).bytes + struct.pack(">I", 7) + NONCE
    aad = header + envelope.encode_context({"a": "1", "b": "2"})
    assert header + AESGCM(MATERIAL).encrypt(NONCE, PLAINTEXT, aad) == EXPECTED_BLOB
    assert len(EXPECTED_BLOB) == envelope.HEADER_LEN + len(PLAINTEXT) + envelope.TAG_LEN


def test_parse_and_open() -> None:
    parsed = envelope.parse_blob(EXPECTED_BLOB)
    assert parsed.key_id == KEY_ID
    assert parsed.key_version == 7
    assert parsed.nonce == NONCE
    assert parsed.header == EXPECTED_BLOB[:33]
    assert envelope.open_blob(MATERIAL, parsed, {"a": "1", "b": "2"}) == PLAINTEXT


def test_random_nonces_differ() -> None:
    a = envelope.seal_blob(MATERIAL, KEY_ID, 1, b"x", None)
    b = envelope.seal_blob(MATERIAL, KEY_ID, 1, b"x", None)
    assert a != b
    assert envelope.open_blob(MATERIAL, envelope.parse_blob(a), {}) == b"x"


@pytest.mark.parametrize("position", range(len(EXPECTED_BLOB)))
def test_every_flipped_byte_is_refused(position: int) -> None:
    damaged = bytearray(EXPECTED_BLOB)
    damaged[position] ^= 0x01
    with pytest.raises(InvalidCiphertextException):
        parsed = envelope.parse_blob(bytes(damaged))
        envelope.open_blob(MATERIAL, parsed, CONTEXT)


@pytest.mark.parametrize(
    "context",
    [None, {}, {"a": "1"}, {"a": "1", "b": "3"}, {"a": "1", "b": "2", "c": "3"}, {"A": "1", "b": "2"}],
)
def test_context_mismatch_is_refused(context: dict[str, str] | None) -> None:
    with pytest.raises(InvalidCiphertextException) as info:
        envelope.open_blob(MATERIAL, envelope.parse_blob(EXPECTED_BLOB), context)
    assert "context" in info.value.message  # undetailed but helpful


def test_wrong_material_is_refused() -> None:
    with pytest.raises(InvalidCiphertextException):
        envelope.open_blob(bytes(32), envelope.parse_blob(EXPECTED_BLOB), CONTEXT)


@pytest.mark.parametrize(
    "blob",
    [
        b"",
        b"\x01",
        EXPECTED_BLOB[: envelope.MIN_BLOB_LEN - 1],
        b"\x02" + EXPECTED_BLOB[1:],
        EXPECTED_BLOB[:17] + b"\x00\x00\x00\x00" + EXPECTED_BLOB[21:],  # version 0
    ],
)
def test_malformed_blobs(blob: bytes) -> None:
    with pytest.raises(InvalidCiphertextException):
        envelope.parse_blob(blob)


def test_truncated_ciphertext_fails_to_open() -> None:
    parsed = envelope.parse_blob(EXPECTED_BLOB[:-1])
    with pytest.raises(InvalidCiphertextException):
        envelope.open_blob(MATERIAL, parsed, CONTEXT)


@pytest.mark.parametrize("context", ["a=b", ["a"], {"a": 1}, {1: "a"}, {"": "x"}, {"k": "v" * 9000}])
def test_validate_context_refuses(context: object) -> None:
    with pytest.raises(ValidationException):
        envelope.validate_context(context)


def test_validate_context_accepts() -> None:
    assert envelope.validate_context(None) == {}
    assert envelope.validate_context({"a": ""}) == {"a": ""}
