"""AES-256-GCM seal/open of one block: the only kmsfs module touching cryptography's AEAD.

Why a module of its own: keeping the primitive behind two functions makes the format auditable
(nonce || ciphertext || tag, nothing else) and lets a failed tag surface as one undetailed
domain error, ``IntegrityError``, which the FUSE layer maps to EIO.
"""

from __future__ import annotations

import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from kmsfs.format import DATA_KEY_SIZE, NONCE_SIZE, TAG_SIZE


class IntegrityError(Exception):
    """A block failed authentication (modified, swapped, truncated or wrong key).

    Deliberately carries no detail from the primitive; ``block`` is filled in by the caller that
    knows which block it was.
    """

    def __init__(self, message: str = "block failed authentication", block: int | None = None):
        super().__init__(message)
        self.block = block


class BlockCipher:
    """Seals and opens blocks under one 256-bit data key."""

    __slots__ = ("_aead",)

    def __init__(self, key: bytes) -> None:
        if len(key) != DATA_KEY_SIZE:
            raise ValueError("data key must be 32 bytes")
        self._aead = AESGCM(key)

    def seal(self, plaintext: bytes, aad: bytes, nonce: bytes | None = None) -> bytes:
        """Return nonce || ciphertext || tag. ``nonce`` is only for known-answer tests."""
        if nonce is None:
            nonce = os.urandom(NONCE_SIZE)
        elif len(nonce) != NONCE_SIZE:
            raise ValueError("nonce must be 12 bytes")
        return nonce + self._aead.encrypt(nonce, plaintext, aad)

    def seal_many(self, parts: list[tuple[bytes | memoryview, bytes]]) -> bytearray:
        """Seal several (plaintext, aad) pairs into one buffer of nonce || ciphertext || tag each.

        Why: one ``os.urandom`` call for all the nonces (96 fresh random bits each, exactly as
        ``seal``) and no per-block method calls; a 128 KiB FUSE write is 32 blocks.
        """
        nonces = os.urandom(NONCE_SIZE * len(parts))
        encrypt = self._aead.encrypt
        out = bytearray()
        pos = 0
        for plaintext, aad in parts:
            nonce = nonces[pos:pos + NONCE_SIZE]
            pos += NONCE_SIZE
            out += nonce
            out += encrypt(nonce, plaintext, aad)
        return out

    def seal_iov(self, plaintexts: list[bytes | memoryview], aads: list[bytes]) -> list[bytes]:
        """Seal blocks as a list ``[nonce, ciphertext || tag, nonce, ...]`` for one ``pwritev``.

        Why: ``seal_many`` copies every sealed block into one growing buffer, and its caller
        then writes that buffer; the kernel can gather the pieces itself. One ``os.urandom`` for
        all nonces, 96 fresh random bits per block, exactly as ``seal``.
        """
        count = len(plaintexts)
        pool = os.urandom(NONCE_SIZE * count)
        nonces = [pool[i:i + NONCE_SIZE] for i in range(0, NONCE_SIZE * count, NONCE_SIZE)]
        out: list[bytes] = [b""] * (2 * count)
        out[0::2] = nonces
        out[1::2] = map(self._aead.encrypt, nonces, plaintexts, aads)
        return out

    def open_into(self, block: bytes | memoryview, aad: bytes, out: memoryview) -> None:
        """Authenticate and decrypt ``block`` straight into ``out`` (exactly its plaintext size).

        Raises cryptography's InvalidTag, like ``open_raw``. On failure ``out`` may hold
        unauthenticated bytes: the caller must overwrite it or discard it (the read fast path
        does, see ``EncryptedFile.read_into``)."""
        self._aead.decrypt_into(block[:NONCE_SIZE], block[NONCE_SIZE:], aad, out)

    def open_raw(self, block: bytes | memoryview, aad: bytes) -> bytes:
        """``open`` without the IntegrityError wrapping: raises cryptography's InvalidTag.

        For the read fast path, which handles a failure (hole or damage) on its slow path.
        """
        return self._aead.decrypt(block[:NONCE_SIZE], block[NONCE_SIZE:], aad)

    def open(self, block: bytes, aad: bytes) -> bytes:
        """Authenticate and decrypt nonce || ciphertext || tag, or raise IntegrityError."""
        if len(block) < NONCE_SIZE + TAG_SIZE:
            raise IntegrityError("block too short")
        try:
            return self._aead.decrypt(block[:NONCE_SIZE], block[NONCE_SIZE:], aad)
        except InvalidTag:
            raise IntegrityError() from None
