"""Attacks on the backing store through a real mount: each reads as EIO (never wrong data) and is
logged with file and block; docs/SECURITY.md lists each with the test here."""

from __future__ import annotations

import errno
import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kmsfs import format as fmt
from kmsfs import headers
from tests.integration.kmsfs_mount_helpers import kmsfs, mounted, requires_fuse

pytestmark = [pytest.mark.integration, requires_fuse]
BS = fmt.DEFAULT_BLOCK_SIZE
S = fmt.stored_block_size()


class M:
    def __init__(self, cipherdir: Path, path: Path, creds: Path) -> None:
        self.cipherdir, self.path, self.creds = cipherdir, path, creds

    def log(self) -> str:
        return (self.cipherdir / ".kmsfs.log").read_text()


@pytest.fixture(scope="module")
def m(keyservice_dev: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[M]:
    tmp = tmp_path_factory.mktemp("attacks")
    key = keyservice_dev.boto3_client().create_key(Description="attacks")["KeyMetadata"]
    cipherdir = tmp / "cipher"
    # Plaintext names: these attacks address backing files by name (names: test_kmsfs_names.py).
    kmsfs("init", cipherdir, "--endpoint", keyservice_dev.endpoint, "--key", key["KeyId"],
          "--credentials", keyservice_dev.credentials_file, "--plaintext-names")
    with mounted(cipherdir, tmp / "mnt", keyservice_dev.credentials_file) as path:
        yield M(cipherdir, path, keyservice_dev.credentials_file)


def drop_caches() -> None:
    """Forget cached plaintext pages so reads reach the daemon (the attacker changed the store)."""
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("1")


def _eio(path: Path, offset: int = 0, length: int = 1 << 20) -> None:
    drop_caches()
    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(OSError) as info:
            os.pread(fd, length, offset)
        assert info.value.errno == errno.EIO
    finally:
        os.close(fd)


def _d(backing: Path) -> int:
    """Where block 0 starts in a backing file (after the format-3 prefix)."""
    fd = os.open(backing, os.O_RDONLY)
    try:
        return headers.data_offset(fd)
    finally:
        os.close(fd)


def _make(m: M, name: str, n: int) -> bytes:
    data = os.urandom(n)
    (m.path / name).write_bytes(data)
    return data


def test_flipped_bit_anywhere(m: M) -> None:
    for pos in (0, 11, 12, 500, S - 17, S - 1):  # nonce, ciphertext, tag
        data = _make(m, "flip.bin", 2 * BS)
        d = _d(m.cipherdir / "flip.bin")
        with open(m.cipherdir / "flip.bin", "r+b") as f:
            f.seek(d + pos)
            b = f.read(1)
            f.seek(d + pos)
            f.write(bytes([b[0] ^ 0x80]))
        _eio(m.path / "flip.bin", 0, BS)
        assert os.pread(os.open(m.path / "flip.bin", os.O_RDONLY), BS, BS) == data[BS:]
    assert "/flip.bin" in m.log() and "block 0" in m.log()


def test_block_swapped_within_file(m: M) -> None:
    _make(m, "swap.bin", 3 * BS)
    backing = m.cipherdir / "swap.bin"
    d = _d(backing)
    raw = backing.read_bytes()
    backing.write_bytes(raw[:d] + raw[d + S:d + 2 * S] + raw[d:d + S] + raw[d + 2 * S:])
    _eio(m.path / "swap.bin", 0, BS)
    _eio(m.path / "swap.bin", BS, BS)


def test_block_copied_from_another_file(m: M) -> None:
    _make(m, "victim.bin", 2 * BS)
    _make(m, "donor.bin", 2 * BS)
    d = _d(m.cipherdir / "donor.bin")
    raw = (m.cipherdir / "donor.bin").read_bytes()
    with open(m.cipherdir / "victim.bin", "r+b") as f:
        f.seek(_d(m.cipherdir / "victim.bin"))
        f.write(raw[d:d + S])
    _eio(m.path / "victim.bin", 0, BS)


def test_zeroed_block_is_not_a_hole(m: M) -> None:
    _make(m, "zero.bin", 3 * BS)
    with open(m.cipherdir / "zero.bin", "r+b") as f:
        f.seek(_d(m.cipherdir / "zero.bin") + S)
        f.write(bytes(S))
    _eio(m.path / "zero.bin", BS, BS)
    assert "block 1 is zeroed (not a hole)" in m.log()


def test_real_holes_read_as_zeros(m: M) -> None:
    with open(m.path / "sparse.bin", "wb") as f:
        f.write(b"start")
        f.seek(100 * BS)
        f.write(b"end")
    data = (m.path / "sparse.bin").read_bytes()
    assert data == b"start" + bytes(100 * BS - 5) + b"end"
    assert (m.cipherdir / "sparse.bin").stat().st_blocks * 512 < 64 * 1024


def test_truncation_at_block_boundary(m: M) -> None:
    _make(m, "cut.bin", 4 * BS)
    os.truncate(m.cipherdir / "cut.bin", _d(m.cipherdir / "cut.bin") + 3 * S)
    assert (m.path / "cut.bin").stat().st_size == 3 * BS
    _eio(m.path / "cut.bin", 2 * BS, BS)  # the new last block was never sealed as final


@pytest.mark.parametrize("junk", [1, 28, S])
def test_junk_appended(m: M, junk: int) -> None:
    _make(m, f"junk{junk}.bin", 2 * BS + 100)
    with open(m.cipherdir / f"junk{junk}.bin", "ab") as f:
        f.write(os.urandom(junk))
    size = (m.path / f"junk{junk}.bin").stat().st_size
    _eio(m.path / f"junk{junk}.bin", (size - 1) // BS * BS, BS)


def test_header_copied_from_another_file(m: M) -> None:
    _make(m, "h1.bin", 100)
    _make(m, "h2.bin", 100)
    fd = os.open(m.cipherdir / "h1.bin", os.O_RDWR)
    try:  # both places (the xattr alone differs from the in-file copy: test_kmsfs_backup.py)
        headers.update_copy(fd, fmt.parse_header(os.getxattr(m.cipherdir / "h2.bin", fmt.HEADER_XATTR)))
    finally:
        os.close(fd)
    with pytest.raises(OSError) as info:  # h1's state record and blocks carry h1's file id
        (m.path / "h1.bin").read_bytes()
    assert info.value.errno == errno.EIO


def test_header_for_another_file_id_is_refused_by_the_service(m: M) -> None:
    _make(m, "ctx.bin", 100)
    raw = os.getxattr(m.cipherdir / "ctx.bin", fmt.HEADER_XATTR)
    h = fmt.parse_header(raw)
    forged = fmt.Header(file_id=os.urandom(16), key_arn=h.key_arn, wrapped_key=h.wrapped_key)
    fd = os.open(m.cipherdir / "ctx.bin", os.O_RDWR)
    try:
        headers.update_copy(fd, forged)  # xattr and in-file copy agree: the service must refuse
    finally:
        os.close(fd)
    with pytest.raises(OSError) as info:
        (m.path / "ctx.bin").read_bytes()
    assert info.value.errno in (errno.EIO, errno.EACCES)


@pytest.mark.parametrize("header", [None, b"garbage", b"KMSFS\x00\x00\x02" + bytes(3000)],
                         ids=["missing", "garbage", "wrong-length"])  # oversize: test_format.py
def test_bad_header(m: M, header: bytes | None) -> None:
    name = f"badh{len(header or b'')}.bin"
    _make(m, name, 100)
    if header is None:  # no xattr and no in-file copy (a missing xattr alone: the copy serves)
        os.removexattr(m.cipherdir / name, fmt.HEADER_XATTR)
        with open(m.cipherdir / name, "r+b") as f:
            f.write(bytes(16))
    else:
        os.setxattr(m.cipherdir / name, fmt.HEADER_XATTR, header)
    with pytest.raises(OSError) as info:
        (m.path / name).read_bytes()
    assert info.value.errno == errno.EIO
    assert "corrupt header" in m.log()


def test_header_only_planted_file_gets_a_fresh_key(m: M) -> None:
    _make(m, "genuine.bin", 5000)
    genuine = fmt.parse_header(os.getxattr(m.cipherdir / "genuine.bin", fmt.HEADER_XATTR))
    planted = m.cipherdir / "planted.bin"
    genuine_raw = (m.cipherdir / "genuine.bin").read_bytes()
    planted.write_bytes(genuine_raw[:_d(m.cipherdir / "genuine.bin")])  # its prefix: an empty file
    os.setxattr(planted, fmt.HEADER_XATTR, os.getxattr(m.cipherdir / "genuine.bin", fmt.HEADER_XATTR))
    assert (m.path / "planted.bin").read_bytes() == b""
    (m.path / "planted.bin").write_bytes(b"new secret contents")
    fresh = fmt.parse_header(os.getxattr(planted, fmt.HEADER_XATTR))
    assert fresh.file_id != genuine.file_id and fresh.wrapped_key != genuine.wrapped_key
    assert (m.path / "planted.bin").read_bytes() == b"new secret contents"


def test_whole_file_rollback_is_not_detected(m: M, tmp_path: Path) -> None:
    """Pinned limitation (docs/SECURITY.md): an older copy of the same file (blocks + header)."""
    (m.path / "roll.bin").write_bytes(b"version one")
    old = tmp_path / "old"
    shutil.copyfile(m.cipherdir / "roll.bin", old)
    header = os.getxattr(m.cipherdir / "roll.bin", fmt.HEADER_XATTR)
    (m.path / "roll.bin").write_bytes(b"version two, longer")
    shutil.copyfile(old, m.cipherdir / "roll.bin")
    os.setxattr(m.cipherdir / "roll.bin", fmt.HEADER_XATTR, header)
    assert (m.path / "roll.bin").read_bytes() == b"version one"


def test_whole_file_swap_between_names_is_not_detected(m: M) -> None:
    """Pinned limitation: names are not bound to contents; renaming backing files swaps them
    (once the kernel's cached name -> inode entries expire: ENTRY_TIMEOUT)."""
    import time

    from kmsfs.operations import ENTRY_TIMEOUT

    (m.path / "a.txt").write_bytes(b"AAAA")
    (m.path / "b.txt").write_bytes(b"BBBB")
    os.rename(m.cipherdir / "a.txt", m.cipherdir / "tmp")
    os.rename(m.cipherdir / "b.txt", m.cipherdir / "a.txt")
    os.rename(m.cipherdir / "tmp", m.cipherdir / "b.txt")
    time.sleep(ENTRY_TIMEOUT + 0.3)
    assert (m.path / "a.txt").read_bytes() == b"BBBB"


def test_nonces_unique_under_concurrent_rewrites(m: M) -> None:
    path = m.path / "nonce.bin"
    path.write_bytes(bytes(4 * BS))
    d = _d(m.cipherdir / "nonce.bin")
    seen: list[bytes] = []
    lock = threading.Lock()

    def worker(i: int) -> None:
        fd = os.open(path, os.O_RDWR)
        try:
            for j in range(300):
                os.pwrite(fd, bytes([i, j % 256]) * 10, (j % 4) * BS + i * 20)
                backing = os.open(m.cipherdir / "nonce.bin", os.O_RDONLY)
                try:
                    with lock:
                        seen.append(os.pread(backing, 12, d + (j % 4) * S))
                finally:
                    os.close(backing)
        finally:
            os.close(fd)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    raw = (m.cipherdir / "nonce.bin").read_bytes()
    nonces = [raw[d + b * S:d + b * S + 12] for b in range(4)]
    assert len(set(nonces)) == 4
    assert len(set(seen)) > 0.9 * len(seen)  # distinct writes produce distinct nonces


def test_header_xattr_hidden_and_immutable_through_the_mount(m: M) -> None:
    (m.path / "x.bin").write_bytes(b"x")
    assert fmt.HEADER_XATTR not in os.listxattr(m.path / "x.bin")
    for call in (lambda: os.getxattr(m.path / "x.bin", fmt.HEADER_XATTR),
                 lambda: os.setxattr(m.path / "x.bin", fmt.HEADER_XATTR, b"evil"),
                 lambda: os.removexattr(m.path / "x.bin", fmt.HEADER_XATTR),
                 lambda: os.setxattr(m.path / "x.bin", fmt.RESIZE_XATTR, b"evil")):
        with pytest.raises(OSError):
            call()
    assert (m.path / "x.bin").read_bytes() == b"x"
