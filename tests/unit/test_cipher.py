"""Known-answer vectors for the block cipher (AES-256-GCM) and its failure mode."""

import pytest

from kmsfs import format as fmt
from kmsfs.cipher import BlockCipher, IntegrityError

# McGrew & Viega, "The Galois/Counter Mode of Operation", test case 16 (AES-256, 60-byte P, AAD).
K16 = bytes.fromhex("feffe9928665731c6d6a8f9467308308feffe9928665731c6d6a8f9467308308")
IV16 = bytes.fromhex("cafebabefacedbaddecaf888")
P16 = bytes.fromhex("d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a72"
                    "1c3c0c95956809532fcf0e2449a6b525b16aedf5aa0de657ba637b39")
A16 = bytes.fromhex("feedfacedeadbeeffeedfacedeadbeefabaddad2")
C16 = bytes.fromhex("522dc1f099567d07f47f37a32a84427d643a8cdcbfe5c0c97598a2bd2555d1aa"
                    "8cb08e48590dbb3da7b08b1056828838c5f61e6393ba7a0abcc9f662")
T16 = bytes.fromhex("76fc6ece0f4e1768cddf8853bb2d551b")

# A kmsfs block: key 00..1f, file id 00..0f, block 7, nonce zero, plaintext "hello kmsfs".
KMSFS_BLOCK = bytes.fromhex("000000000000000000000000" "66d9d9b2da0ce8d07bceda"
                            "bde011b005e3219c210f2e52881e821d")


def test_gcm_test_case_16():
    sealed = BlockCipher(K16).seal(P16, A16, nonce=IV16)
    assert sealed == IV16 + C16 + T16
    assert BlockCipher(K16).open(sealed, A16) == P16


def test_kmsfs_block_vector():
    c = BlockCipher(bytes(range(32)))
    aad = fmt.block_aad(bytes(range(16)), 7, version=1)
    assert c.seal(b"hello kmsfs", aad, nonce=bytes(12)) == KMSFS_BLOCK
    assert c.open(KMSFS_BLOCK, aad) == b"hello kmsfs"


# Version 2: the same block, AAD with version 00 02 and the final flag (00 non-final, 01 final).
KMSFS_V2_BLOCK = bytes.fromhex("000000000000000000000000" "66d9d9b2da0ce8d07bceda"
                               "d0940c0cf74eb24c6a984f4df37836d0")
KMSFS_V2_FINAL_BLOCK = bytes.fromhex("000000000000000000000000" "66d9d9b2da0ce8d07bceda"
                                     "bd083f6a4e9dacb5ffc2be69995ab125")


def test_kmsfs_v2_block_vectors():
    c = BlockCipher(bytes(range(32)))
    for final, expected in ((False, KMSFS_V2_BLOCK), (True, KMSFS_V2_FINAL_BLOCK)):
        aad = fmt.block_aad(bytes(range(16)), 7, version=2, final=final)
        assert c.seal(b"hello kmsfs", aad, nonce=bytes(12)) == expected
        with pytest.raises(IntegrityError):  # the flag is authenticated
            c.open(expected, fmt.block_aad(bytes(range(16)), 7, version=2, final=not final))


def test_random_nonce_and_layout():
    c = BlockCipher(bytes(32))
    a, b = c.seal(b"x" * 100, b"aad"), c.seal(b"x" * 100, b"aad")
    assert a != b and len(a) == 12 + 100 + 16
    assert c.open(a, b"aad") == c.open(b, b"aad") == b"x" * 100


@pytest.mark.parametrize("tamper", [
    lambda s: bytes([s[0] ^ 1]) + s[1:],          # nonce
    lambda s: s[:20] + bytes([s[20] ^ 0x80]) + s[21:],  # ciphertext
    lambda s: s[:-1] + bytes([s[-1] ^ 1]),        # tag
    lambda s: s[:-1],                             # truncated
    lambda s: s[:10],                             # too short
])
def test_tamper_fails(tamper):
    with pytest.raises(IntegrityError):
        BlockCipher(bytes(range(32))).open(tamper(KMSFS_BLOCK), fmt.block_aad(bytes(range(16)), 7))


def test_wrong_aad_or_key_fails():
    with pytest.raises(IntegrityError):
        BlockCipher(bytes(range(32))).open(KMSFS_BLOCK, fmt.block_aad(bytes(range(16)), 8))
    with pytest.raises(IntegrityError):
        BlockCipher(bytes(32)).open(KMSFS_BLOCK, fmt.block_aad(bytes(range(16)), 7))


def test_key_size_enforced():
    with pytest.raises(ValueError):
        BlockCipher(bytes(16))
