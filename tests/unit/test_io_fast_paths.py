"""The I/O fast paths (cached AAD prefix, batched sealing, raw opening) give exactly the bytes of
the reference functions, so the speed-ups cannot drift from docs/FORMAT.md."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kmsfs import format as fmt
from kmsfs.cipher import BlockCipher
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
