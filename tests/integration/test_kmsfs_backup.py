"""Backups that work (issue 13): a cipherdir copied by tools that drop xattrs (and write holes as
zeros) mounts and reads back byte-identical; header tampering is still EIO; fsck reports and
repairs. Real key service, real mounts, real rsync / cp / tar / shutil."""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from kmsfs import format as fmt
from tests.integration.kmsfs_mount_helpers import backing_path, kmsfs, mounted, requires_fuse

pytestmark = [pytest.mark.integration, requires_fuse]
BS = fmt.DEFAULT_BLOCK_SIZE
BIG = (4 << 30) + 3 * BS + 123  # a sparse file past 4 GiB
BIG_DATA = {0: b"start" * 100, (1 << 30) + 7: b"one GiB", (4 << 30) - 5: b"across the 4 GiB line" * 300,
            BIG - 40: b"the last forty bytes of the big file!!!!"}


def _sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()


def _big_reference_sha() -> str:
    """sha256 of the big file's plaintext without materialising 4 GiB."""
    h = hashlib.sha256()
    pos = 0
    zeros = bytes(8 << 20)
    for off, data in sorted(BIG_DATA.items()):
        while pos < off:
            n = min(len(zeros), off - pos)
            h.update(zeros[:n])
            pos += n
        h.update(data)
        pos += len(data)
    assert pos == BIG
    return h.hexdigest()


@pytest.fixture(scope="module")
def source(keyservice_dev: Any,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, dict[str, str]]]:
    """A cipherdir with every kind of file a backup must keep, and each file's plaintext sha256."""
    tmp = tmp_path_factory.mktemp("backup-src")
    key = keyservice_dev.boto3_client().create_key(Description="backups")["KeyMetadata"]
    cipherdir = tmp / "cipher"
    kmsfs("init", cipherdir, "--endpoint", keyservice_dev.endpoint, "--key", key["KeyId"],
          "--credentials", keyservice_dev.credentials_file)
    with mounted(cipherdir, tmp / "mnt", keyservice_dev.credentials_file) as m:
        (m / "empty.txt").write_bytes(b"")
        (m / "small.txt").write_bytes(b"a small file\n")
        (m / "dir" / "deeper").mkdir(parents=True)
        (m / "dir" / "deeper" / "random.bin").write_bytes(os.urandom(300_000))
        (m / "dir" / "exact.bin").write_bytes(os.urandom(2 * BS))
        with open(m / "dir" / "sparse.bin", "wb") as f:  # holes between and after data
            f.write(b"S" * 5000)
            f.seek(40 * BS + 17)
            f.write(b"middle")
            f.seek(200 * BS)
            f.write(b"tail")
            f.truncate(300 * BS + 1)
        with open(m / "big.bin", "wb") as f:
            f.truncate(BIG)
            for off, data in BIG_DATA.items():
                f.seek(off)
                f.write(data)
        os.link(m / "small.txt", m / "hardlink.txt")
        os.symlink("small.txt", m / "symlink.txt")
        os.symlink("dir/deeper", m / "dirlink")
        expected = {str(p.relative_to(m)): _sha(p) for p in sorted(m.rglob("*"))
                    if p.is_file() and not p.is_symlink() and p.name != "big.bin"}
    yield cipherdir, expected
    shutil.rmtree(tmp, ignore_errors=True)


def _rsync(src: Path, dst: Path) -> None:
    subprocess.run(["rsync", "-a", f"{src}/", f"{dst}/"], check=True)


def _cp(src: Path, dst: Path) -> None:
    subprocess.run(["cp", "-r", str(src), str(dst)], check=True)


def _tar(src: Path, dst: Path) -> None:
    dst.mkdir()
    pack = subprocess.Popen(["tar", "-C", str(src), "-cf", "-", "."], stdout=subprocess.PIPE)
    subprocess.run(["tar", "-C", str(dst), "-xf", "-"], stdin=pack.stdout, check=True)
    assert pack.wait() == 0


def _copytree(src: Path, dst: Path) -> None:
    # symlinks=True: a name-encrypting cipherdir's symlinks hold encrypted targets, which dangle
    # in the backing tree, so following them (copytree's default) fails loudly (README).
    shutil.copytree(src, dst, copy_function=shutil.copyfile, symlinks=True)


TOOLS: dict[str, Callable[[Path, Path], None]] = {"rsync -a": _rsync, "cp -r": _cp, "tar": _tar,
                                                  "copytree(copyfile)": _copytree}


@pytest.mark.parametrize("tool", list(TOOLS))
def test_a_copy_without_xattrs_reads_back(keyservice_dev: Any, source: tuple[Path, dict[str, str]],
                                         tmp_path: Path, tool: str) -> None:
    cipherdir, expected = source
    copy = tmp_path / "copy"
    try:
        TOOLS[tool](cipherdir, copy)
        backing = backing_path(copy, "/small.txt", keyservice_dev.credentials_file)  # names encrypted
        assert fmt.HEADER_XATTR not in os.listxattr(backing)  # the tool really dropped them
        creds = keyservice_dev.credentials_file
        if tool == "rsync -a":  # fsck says what is missing, --repair restores it
            out = kmsfs("fsck", copy, "--credentials", creds, "-q").stdout
            assert "NOTE /small.txt: header xattr missing" in out and "fsck:" in out and "clean" in out
            out = kmsfs("fsck", copy, "--repair", "--credentials", creds, "-q").stdout
            assert "REPAIRED /small.txt" in out
            assert fmt.HEADER_XATTR in os.listxattr(backing)
        with mounted(copy, tmp_path / "mnt", creds) as m:
            got = {str(p.relative_to(m)): _sha(p) for p in sorted(m.rglob("*"))
                   if p.is_file() and not p.is_symlink() and p.name != "big.bin"}
            for name in ("hardlink.txt", "symlink.txt"):
                expected_name = expected.get(name, expected["small.txt"])
                assert _sha(m / name) == expected_name
            assert os.readlink(m / "symlink.txt") == "small.txt"
            got.pop("symlink.txt", None)
            for rel in [k for k in got if k.startswith("dirlink/")]:
                got.pop(rel)
            assert got == expected
            assert (m / "empty.txt").stat().st_size == 0
            assert (m / "big.bin").stat().st_size == BIG
            assert _sha(m / "big.bin") == _big_reference_sha()
            with open(m / "dir" / "sparse.bin", "r+b") as f:  # and the copy stays writable
                f.seek(100 * BS)
                f.write(b"written after the restore")
            data = (m / "dir" / "sparse.bin").read_bytes()
            assert data[100 * BS:100 * BS + 25] == b"written after the restore"
            assert data[:5000] == b"S" * 5000 and data[5000:40 * BS + 17] == bytes(40 * BS + 17 - 5000)
    finally:
        shutil.rmtree(copy, ignore_errors=True)  # up to 4 GiB of written-out holes


def test_tampered_header_pairs_are_eio_and_fsck_reports_them(keyservice_dev: Any, tmp_path: Path) -> None:
    key = keyservice_dev.boto3_client().create_key(Description="tamper")["KeyMetadata"]
    cipherdir = tmp_path / "cipher"
    creds = keyservice_dev.credentials_file
    kmsfs("init", cipherdir, "--endpoint", keyservice_dev.endpoint, "--key", key["KeyId"],
          "--credentials", creds, "--plaintext-names")  # headers are the subject, not names
    with mounted(cipherdir, tmp_path / "mnt", creds) as m:
        for name in ("a", "b", "c", "d", "e"):
            (m / name).write_bytes(name.encode() * 5000)
    a, b, c, d = (cipherdir / n for n in "abcd")
    os.setxattr(a, fmt.HEADER_XATTR, os.getxattr(b, fmt.HEADER_XATTR))  # xattr swapped in from b
    with open(b, "r+b") as f:  # in-file copy swapped in from c (its xattr stays b's own)
        f.write(c.read_bytes()[:512])
    with open(c, "r+b") as f:  # one bit of the in-file copy flipped
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0x04]))
    raw = bytearray(os.getxattr(d, fmt.HEADER_XATTR))  # one bit of the xattr flipped
    raw[50] ^= 0x01
    os.setxattr(d, fmt.HEADER_XATTR, bytes(raw))
    with mounted(cipherdir, tmp_path / "mnt", creds) as m:
        for name in "abcd":
            with pytest.raises(OSError) as info:
                (m / name).read_bytes()
            assert info.value.errno == errno.EIO, name
        assert (m / "e").read_bytes() == b"e" * 5000
    log = (cipherdir / ".kmsfs.log").read_text()
    assert "header xattr and in-file header copy differ" in log
    out = kmsfs("fsck", cipherdir, "--credentials", creds, "-q", check=False)
    assert out.returncode == 1
    for name in "abcd":
        assert f"DAMAGED /{name}: header xattr and in-file header copy differ" in out.stdout, out.stdout
    repaired = kmsfs("fsck", cipherdir, "--repair", "--credentials", creds, "-q", check=False)
    assert repaired.returncode == 1 and "REPAIRED" not in repaired.stdout  # never "resolved"


def _kernel_has(fstype: str) -> bool:
    with open("/proc/filesystems", encoding="utf-8") as f:
        return any(line.split()[-1] == fstype for line in f if line.strip())


@pytest.fixture
def no_xattr_dir(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A directory on a filesystem without user xattrs: a vfat loop image made by mkfs.vfat, or —
    on kernels without vfat (this test machine's) — an exFAT image through exfat-fuse."""
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a filesystem image")
    image, target = tmp_path / "fs.img", tmp_path / "fat"
    target.mkdir()
    with open(image, "wb") as f:
        f.truncate(96 << 20)
    loop = None
    try:
        if _kernel_has("vfat") and shutil.which("mkfs.vfat"):
            subprocess.run(["mkfs.vfat", str(image)], check=True, capture_output=True)
            subprocess.run(["mount", "-o", "loop", str(image), str(target)], check=True)
            kind = "vfat"
        elif shutil.which("mkfs.exfat") and shutil.which("mount.exfat-fuse"):
            subprocess.run(["mkfs.exfat", str(image)], check=True, capture_output=True)
            loop = subprocess.run(["losetup", "-f", "--show", str(image)], check=True, capture_output=True,
                                  text=True).stdout.strip()
            subprocess.run(["mount.exfat-fuse", loop, str(target)], check=True, capture_output=True)
            kind = "exfat"
        else:
            pytest.skip("neither vfat nor exfat-fuse available (scripts/setup.sh installs them)")
        yield target, kind
    finally:
        for cmd in (["umount", str(target)], ["umount", "-l", str(target)]):
            if os.path.ismount(target):
                subprocess.run(cmd, capture_output=True, check=False)
        if loop:
            subprocess.run(["losetup", "-d", loop], capture_output=True, check=False)


def test_cipherdir_on_a_filesystem_without_xattrs(keyservice_dev: Any, no_xattr_dir: tuple[Path, str],
                                                  tmp_path: Path) -> None:
    fat, kind = no_xattr_dir
    cipherdir = fat / "cipher"
    creds = keyservice_dev.credentials_file
    key = keyservice_dev.boto3_client().create_key(Description=kind)["KeyMetadata"]
    out = kmsfs("init", cipherdir, "--endpoint", keyservice_dev.endpoint, "--key", key["KeyId"],
                "--credentials", creds).stdout
    assert "does not keep user xattrs" in out, out
    data = os.urandom(3 * BS + 77)
    with mounted(cipherdir, tmp_path / "mnt", creds) as m:
        (m / "hello.txt").write_bytes(b"hello " + kind.encode())
        (m / "d").mkdir()
        (m / "d" / "data.bin").write_bytes(data)
        with open(m / "d" / "data.bin", "ab") as f:
            f.write(b"appended")
        with open(m / "sparse.bin", "wb") as f:  # no holes on FAT: the gap is written as zeros
            f.seek(50 * BS)
            f.write(b"after the gap")
        os.rename(m / "hello.txt", m / "d" / "renamed.txt")
        (m / "gone.txt").write_bytes(b"x")
        os.unlink(m / "gone.txt")
        os.truncate(m / "d" / "data.bin", 2 * BS + 1)
        assert (m / "d" / "renamed.txt").read_bytes() == b"hello " + kind.encode()
    with pytest.raises(OSError) as info:  # really no xattrs here: the headers live in the files
        os.getxattr(backing_path(cipherdir, "/d/data.bin", creds), fmt.HEADER_XATTR)
    assert info.value.errno in (errno.ENOTSUP, errno.EOPNOTSUPP)
    with mounted(cipherdir, tmp_path / "mnt", creds) as m:  # a fresh mount: in-file headers only
        assert (m / "d" / "renamed.txt").read_bytes() == b"hello " + kind.encode()
        assert (m / "d" / "data.bin").read_bytes() == data[:2 * BS + 1]
        assert (m / "sparse.bin").read_bytes() == bytes(50 * BS) + b"after the gap"
        assert sorted(os.listdir(m)) == ["d", "sparse.bin"]
    out = kmsfs("fsck", cipherdir, "--credentials", creds, "-q").stdout
    assert "clean" in out and "NOTE" not in out, out
