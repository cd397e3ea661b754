"""POSIX behaviour (SPEC F8) through a real mount, one targeted test per case a conformance suite
(pjdfstest) would exercise; plus ENOSPC on a tiny backing store and two users with allow_other."""

from __future__ import annotations

import errno
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kmsfs import format as fmt
from tests.integration.kmsfs_mount_helpers import backing_path, data_offset, kmsfs, mounted, requires_fuse

pytestmark = [pytest.mark.integration, requires_fuse]
BS = fmt.DEFAULT_BLOCK_SIZE


class M:
    def __init__(self, cipherdir: Path, path: Path, creds: Path | None = None) -> None:
        self.cipherdir, self.path, self.creds = cipherdir, path, creds


def _init(service: Any, cipherdir: Path) -> None:
    key = service.boto3_client().create_key(Description="posix")["KeyMetadata"]
    kmsfs("init", cipherdir, "--endpoint", service.endpoint, "--key", key["KeyId"],
          "--credentials", service.credentials_file)


@pytest.fixture(scope="module")
def m(keyservice_dev: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[M]:
    tmp = tmp_path_factory.mktemp("posix")
    _init(keyservice_dev, tmp / "cipher")
    # the mount point must be reachable by the second user (pytest's tmp dirs are 0700)
    public = Path(tempfile.mkdtemp(prefix="kmsfs-posix-", dir="/tmp"))
    os.chmod(public, 0o755)
    try:
        with mounted(tmp / "cipher", public / "mnt", keyservice_dev.credentials_file,
                     "--allow-other") as path:
            os.chmod(path, 0o755)
            yield M(tmp / "cipher", path, keyservice_dev.credentials_file)
    finally:
        if not os.path.ismount(public / "mnt"):  # never recurse into a live mount
            shutil.rmtree(public, ignore_errors=True)


@pytest.fixture
def umask0() -> Iterator[None]:
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def test_o_excl(m: M) -> None:
    p = m.path / "excl"
    fd = os.open(p, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    os.close(fd)
    with pytest.raises(FileExistsError):
        os.open(p, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)


def test_o_append_from_two_handles_lands_at_the_end(m: M) -> None:
    p = m.path / "append"
    p.write_bytes(b"0123")
    a = os.open(p, os.O_WRONLY | os.O_APPEND)
    b = os.open(p, os.O_WRONLY | os.O_APPEND)
    try:
        for i in range(20):
            os.write(a if i % 2 else b, bytes([65 + i]) * 1000)
    finally:
        os.close(a)
        os.close(b)
    data = p.read_bytes()
    assert len(data) == 4 + 20 * 1000
    assert data[4:] == b"".join(bytes([65 + i]) * 1000 for i in range(20))


def test_o_trunc_and_truncate_ftruncate(m: M) -> None:
    p = m.path / "trunc"
    p.write_bytes(os.urandom(3 * BS))
    with open(p, "r+b") as f:
        os.ftruncate(f.fileno(), BS + 1)
        assert os.fstat(f.fileno()).st_size == BS + 1
        os.ftruncate(f.fileno(), 10 * BS)
    assert p.read_bytes()[BS + 1:] == bytes(9 * BS - 1)
    os.truncate(p, 5)
    assert p.stat().st_size == 5
    fd = os.open(p, os.O_WRONLY | os.O_TRUNC)
    os.close(fd)
    assert p.stat().st_size == 0


def test_files_beyond_4_gib_stay_sparse(m: M) -> None:
    p = m.path / "big"
    size = 5 * 2**30 + 7
    with open(p, "wb") as f:
        f.write(b"head")
        f.truncate(size)
        f.seek(size - 3)
        f.write(b"end")
        f.seek(4 * 2**30 + 5)
        f.write(b"middle")
    assert p.stat().st_size == size + 0
    backing = backing_path(m.cipherdir, "/big", m.creds)  # names are encrypted
    assert backing.stat().st_size == data_offset(backing) + fmt.backing_size(size)
    assert backing.stat().st_blocks * 512 < 1 << 20  # sparse on disk
    with open(p, "rb") as f:
        assert f.read(4) == b"head"
        f.seek(4 * 2**30 + 5)
        assert f.read(6) == b"middle"
        f.seek(3 * 2**30)
        assert f.read(BS) == bytes(BS)
        f.seek(size - 3)
        assert f.read() == b"end"
    p.unlink()


def test_rename_over_file_and_directory(m: M) -> None:
    (m.path / "ra").write_bytes(b"A")
    (m.path / "rb").write_bytes(b"B")
    os.rename(m.path / "ra", m.path / "rb")
    assert (m.path / "rb").read_bytes() == b"A" and not (m.path / "ra").exists()
    (m.path / "d1").mkdir()
    (m.path / "d1" / "f").write_bytes(b"in d1")
    (m.path / "d2").mkdir()
    os.rename(m.path / "d1", m.path / "d2")  # over an empty directory
    assert (m.path / "d2" / "f").read_bytes() == b"in d1"
    (m.path / "d3").mkdir()
    with pytest.raises(OSError) as info:
        os.rename(m.path / "d3", m.path / "d2")  # over a non-empty one
    assert info.value.errno in (errno.ENOTEMPTY, errno.EEXIST)


def test_renameat2_exchange_and_noreplace(m: M) -> None:
    """libfuse3 passes renameat2 flags; a binding that dropped them would turn RENAME_EXCHANGE
    into a plain rename and destroy the target (mfusepy 3.1 does): kmsfs/_fuse.py passes them on
    and the core does both with renameat2 on the backing directories."""
    import ctypes

    from kmsfs._fuse import LIBFUSE

    libc = ctypes.CDLL(None, use_errno=True)

    def renameat2(old: Path, new: Path, flags: int) -> int:
        at_fdcwd = -100
        if libc.renameat2(at_fdcwd, os.fsencode(old), at_fdcwd, os.fsencode(new), flags) == 0:
            return 0
        return ctypes.get_errno()

    (m.path / "xa").write_bytes(b"A")
    (m.path / "xb").write_bytes(b"B")
    assert renameat2(m.path / "xa", m.path / "xb", 1) == errno.EEXIST  # RENAME_NOREPLACE
    assert (m.path / "xa").read_bytes() == b"A" and (m.path / "xb").read_bytes() == b"B"
    if LIBFUSE.startswith("2"):  # libfuse2 has no rename flags: refused, nothing changed
        assert renameat2(m.path / "xa", m.path / "xb", 2) == errno.EINVAL
        return
    assert renameat2(m.path / "xa", m.path / "xb", 2) == 0  # RENAME_EXCHANGE
    assert (m.path / "xa").read_bytes() == b"B" and (m.path / "xb").read_bytes() == b"A"
    assert renameat2(m.path / "xa", m.path / "xnone", 2) == errno.ENOENT
    assert renameat2(m.path / "xa", m.path / "xc", 1) == 0
    assert (m.path / "xc").read_bytes() == b"B" and not (m.path / "xa").exists()
    (m.path / "xd").mkdir()
    assert renameat2(m.path / "xc", m.path / "xd", 2) == 0  # a file and a directory swap too
    assert (m.path / "xd").read_bytes() == b"B" and (m.path / "xc").is_dir()


def test_hard_links_share_one_header(m: M) -> None:
    (m.path / "h1").write_bytes(b"linked")
    os.link(m.path / "h1", m.path / "h2")
    assert (m.path / "h1").stat().st_nlink == 2
    assert (m.path / "h1").stat().st_ino == (m.path / "h2").stat().st_ino
    with open(m.path / "h2", "r+b") as f:
        f.write(b"LINKED")
    assert (m.path / "h1").read_bytes() == b"LINKED"
    (m.path / "h1").unlink()
    assert (m.path / "h2").stat().st_nlink == 1 and (m.path / "h2").read_bytes() == b"LINKED"


def test_symlink_target_of_path_max(m: M) -> None:
    target = "/".join(["x" * 200] * 20)
    target = (target + "/" + "y" * 255)[:4095]
    assert len(target) == 4095
    os.symlink(target, m.path / "longlink")
    assert os.readlink(m.path / "longlink") == target
    assert stat.S_ISLNK(os.lstat(m.path / "longlink").st_mode)


def test_mkfifo_and_mknod(m: M) -> None:
    os.mkfifo(m.path / "fifo", 0o640)
    assert stat.S_ISFIFO(os.lstat(m.path / "fifo").st_mode)
    os.mknod(m.path / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    st = os.lstat(m.path / "null")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(1, 3)


@pytest.mark.usefixtures("umask0")
def test_directory_modes_are_exact(m: M) -> None:
    for mode in (0o151, 0o700, 0o1777, 0o000):  # (mkdir(2) itself drops S_ISGID, as on ext4)
        d = m.path / f"mode{mode:o}"
        os.mkdir(d, mode)
        assert stat.S_IMODE(os.lstat(d).st_mode) == mode
        os.chmod(d, 0o755)
        os.rmdir(d)


def test_chmod_chown(m: M) -> None:
    p = m.path / "owned"
    p.write_bytes(b"x")
    os.chmod(p, 0o4751)
    assert stat.S_IMODE(p.stat().st_mode) == 0o4751
    os.chown(p, 65534, 65534)
    assert (p.stat().st_uid, p.stat().st_gid) == (65534, 65534)
    os.lchown(p, 0, 0)


def test_utimensat_nofollow_on_symlink(m: M) -> None:
    (m.path / "ttarget").write_bytes(b"t")
    os.utime(m.path / "ttarget", ns=(1_000_000_000, 1_000_000_000))
    os.symlink("ttarget", m.path / "tlink")
    os.utime(m.path / "tlink", ns=(2_000_000_001, 3_000_000_002), follow_symlinks=False)
    st = os.lstat(m.path / "tlink")
    assert (st.st_atime_ns, st.st_mtime_ns) == (2_000_000_001, 3_000_000_002)
    assert os.stat(m.path / "ttarget").st_mtime_ns == 1_000_000_000
    os.utime(m.path / "ttarget", ns=(5, 6))
    assert os.stat(m.path / "ttarget").st_mtime_ns == 6


def test_statfs_fsync_fdatasync(m: M) -> None:
    sv = os.statvfs(m.path)
    assert sv.f_blocks > 0 and sv.f_namemax >= 255
    with open(m.path / "synced", "wb") as f:
        f.write(b"data")
        os.fsync(f.fileno())
        os.fdatasync(f.fileno())


def test_fallocate_modes(m: M) -> None:
    """fallocate through the mount (issue 11): mode 0 grows with zeros, KEEP_SIZE changes nothing
    visible, PUNCH_HOLE and ZERO_RANGE read back as zeros; COLLAPSE_RANGE is refused cleanly."""
    p = m.path / "falloc"
    data = os.urandom(3 * BS + 100)
    p.write_bytes(data)
    fd = os.open(p, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, 5 * BS)  # mode 0: grows
        assert os.fstat(fd).st_size == 5 * BS
        assert os.pread(fd, 5 * BS, 0) == data + bytes(5 * BS - len(data))
        run = ["fallocate", "--keep-size", "-o", "0", "-l", str(10 * BS), str(p)]
        assert subprocess.run(run, capture_output=True).returncode == 0
        assert os.fstat(fd).st_size == 5 * BS
        run = ["fallocate", "--punch-hole", "-o", "100", "-l", str(BS), str(p)]
        assert subprocess.run(run, capture_output=True).returncode == 0
        expect = bytearray(data + bytes(5 * BS - len(data)))
        expect[100:100 + BS] = bytes(BS)
        assert os.pread(fd, 5 * BS, 0) == bytes(expect) and os.fstat(fd).st_size == 5 * BS
        run = ["fallocate", "--zero-range", "-o", str(5 * BS - 10), "-l", "20", str(p)]
        assert subprocess.run(run, capture_output=True).returncode == 0
        assert os.fstat(fd).st_size == 5 * BS + 10
        assert os.pread(fd, 100, 5 * BS - 10) == bytes(20)
        proc = subprocess.run(["fallocate", "--collapse-range", "-o", "0", "-l", str(BS), str(p)],
                              capture_output=True, text=True)
        assert proc.returncode != 0 and "not supported" in proc.stderr.lower()
    finally:
        os.close(fd)


def test_user_xattrs_pass_through(m: M) -> None:
    p = m.path / "xa"
    p.write_bytes(b"x")
    os.setxattr(p, "user.one", b"1")
    os.setxattr(p, "user.two", b"2" * 1000)
    assert sorted(os.listxattr(p)) == ["user.one", "user.two"]
    assert os.getxattr(p, "user.two") == b"2" * 1000
    os.removexattr(p, "user.one")
    assert os.listxattr(p) == ["user.two"]
    assert fmt.HEADER_XATTR in os.listxattr(backing_path(m.cipherdir, "/xa", m.creds))


def _as_nobody(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups", *cmd],
                          capture_output=True, text=True, timeout=30)


@pytest.mark.skipif(shutil.which("setpriv") is None or os.geteuid() != 0, reason="needs root and setpriv")
def test_two_users_with_allow_other_and_default_permissions(m: M) -> None:
    (m.path / "private").write_bytes(b"root only")
    os.chmod(m.path / "private", 0o600)
    (m.path / "public").write_bytes(b"everyone")
    os.chmod(m.path / "public", 0o644)
    shared = m.path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    denied = _as_nobody("cat", str(m.path / "private"))
    assert denied.returncode != 0 and "Permission denied" in denied.stderr
    assert _as_nobody("cat", str(m.path / "public")).stdout == "everyone"
    made = _as_nobody("sh", "-c", f"echo mine > {shared}/nobody.txt && cat {shared}/nobody.txt")
    assert made.returncode == 0 and made.stdout == "mine\n", made.stderr
    st = (shared / "nobody.txt").stat()
    assert (st.st_uid, st.st_gid) == (65534, 65534)
    assert _as_nobody("sh", "-c", f"echo x >> {m.path / 'public'}").returncode != 0


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to mount a tmpfs")
def test_enospc_is_a_clean_error_and_the_file_stays_readable(keyservice_dev: Any, tmp_path: Path) -> None:
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(small)], check=True)
    try:
        _init(keyservice_dev, small / "cipher")
        with mounted(small / "cipher", tmp_path / "mnt", keyservice_dev.credentials_file,
                     "--log", str(tmp_path / "kmsfs.log")) as mnt:
            written = bytearray()
            fd = os.open(mnt / "fill.bin", os.O_CREAT | os.O_WRONLY, 0o644)
            try:
                with pytest.raises(OSError) as info:
                    while True:
                        chunk = os.urandom(8192)
                        n = os.write(fd, chunk)
                        written += chunk[:n]
                assert info.value.errno == errno.ENOSPC
            finally:
                try:
                    os.close(fd)
                except OSError:
                    pass
            assert 500_000 < len(written) < 1 << 20
            assert (mnt / "fill.bin").read_bytes() == bytes(written)
            with pytest.raises(OSError) as info:  # a new file on the full store: header + data
                with open(mnt / "second.bin", "wb") as f:
                    f.write(os.urandom(64 * 1024))
            assert info.value.errno == errno.ENOSPC
            if (mnt / "second.bin").exists():  # created, but whatever it holds reads cleanly
                assert len((mnt / "second.bin").read_bytes()) < 64 * 1024
            assert (mnt / "fill.bin").read_bytes() == bytes(written)
            (mnt / "fill.bin").unlink()
            (mnt / "after.txt").write_text("space again")
            assert (mnt / "after.txt").read_text() == "space again"
    finally:
        subprocess.run(["umount", "-l", str(small)], check=False)


def test_processes_writing_one_block_never_lose_an_update(m: M) -> None:
    """Four processes write interleaved bytes of the same block (read-modify-write in the daemon):
    the per-inode lock must serialise them so every byte lands."""
    p = m.path / "shared-block"
    p.write_bytes(bytes(BS))
    script = ("import os,sys; i=int(sys.argv[2]); fd=os.open(sys.argv[1], os.O_RDWR)\n"
              "for j in range(250): os.pwrite(fd, bytes([i+1]), (j*4+i) % 1000 + 8 * (j // 250))\n")
    procs = [subprocess.Popen([sys.executable, "-c", script, str(p), str(i)]) for i in range(4)]
    for proc in procs:
        assert proc.wait(timeout=60) == 0
    data = p.read_bytes()
    for j in range(250):
        for i in range(4):
            assert data[(j * 4 + i) % 1000] == i + 1
