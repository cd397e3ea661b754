"""Inode-based FUSE through a real mount (issue 11): hard links are one inode (attributes and
contents consistent across names at once, link counts right), paths of PATH_MAX-1 and names of
NAME_MAX work, the daemon holds no descriptor for inodes the kernel forgot, setgid directories
and POSIX ACLs behave as docs/SECURITY.md says. The pjdfstest checks that matter to us
(link/00.t, rename/00.t, */03.t, */02.t) in our own words."""

from __future__ import annotations

import errno
import os
import shutil
import stat
import struct
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.kmsfs_mount_helpers import backing_path, daemon_pid, kmsfs, mounted, requires_fuse
from tests.integration.test_kmsfs_posix import _as_nobody

pytestmark = [pytest.mark.integration, requires_fuse]
PATH_MAX = 4096
NAME_MAX = 255
root_only = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")


class M:
    def __init__(self, cipherdir: Path, path: Path, creds: Path | None = None) -> None:
        self.cipherdir, self.path, self.creds = cipherdir, path, creds


@pytest.fixture(scope="module")
def m(keyservice_dev: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[M]:
    tmp = tmp_path_factory.mktemp("inodes")
    key = keyservice_dev.boto3_client().create_key(Description="inodes")["KeyMetadata"]
    kmsfs("init", tmp / "cipher", "--endpoint", keyservice_dev.endpoint, "--key", key["KeyId"],
          "--credentials", keyservice_dev.credentials_file)
    public = Path(tempfile.mkdtemp(prefix="kmsfs-inodes-", dir="/tmp"))
    os.chmod(public, 0o755)
    try:
        creds = keyservice_dev.credentials_file
        with mounted(tmp / "cipher", public / "mnt", creds, "--allow-other") as path:
            os.chmod(path, 0o777)
            yield M(tmp / "cipher", path, creds)
    finally:
        if not os.path.ismount(public / "mnt"):
            shutil.rmtree(public, ignore_errors=True)


def _pair(m: M, name: str, data: bytes = b"linked") -> tuple[Path, Path]:
    a, b = m.path / f"{name}-a", m.path / f"{name}-b"
    a.write_bytes(data)
    os.lstat(a)  # the kernel caches a's attributes before the link
    os.link(a, b)
    return a, b


def test_link_count_right_after_ln(m: M) -> None:
    a, b = _pair(m, "ln")
    assert os.lstat(a).st_nlink == 2 and os.lstat(b).st_nlink == 2  # no wait for a timeout
    assert os.lstat(a).st_ino == os.lstat(b).st_ino
    listing = subprocess.run(["ls", "-li", str(a)], capture_output=True, text=True, check=True).stdout
    assert listing.split()[2] == "2", listing


def test_hard_link_attributes_follow_chmod_chown_unlink_rename(m: M) -> None:
    a, b = _pair(m, "attr")
    os.chmod(a, 0o640)
    assert stat.S_IMODE(os.lstat(b).st_mode) == 0o640
    if os.geteuid() == 0:
        os.chown(b, 1234, 4321)
        assert (os.lstat(a).st_uid, os.lstat(a).st_gid) == (1234, 4321)
    c = m.path / "attr-c"
    os.link(b, c)
    assert os.lstat(a).st_nlink == 3
    os.unlink(c)
    assert os.lstat(a).st_nlink == 2 and os.lstat(b).st_nlink == 2
    renamed = m.path / "attr-renamed"
    os.rename(b, renamed)
    os.chmod(renamed, 0o600)
    assert stat.S_IMODE(os.lstat(a).st_mode) == 0o600 and os.lstat(a).st_nlink == 2
    ctime = os.lstat(a).st_ctime_ns
    os.unlink(renamed)
    assert os.lstat(a).st_nlink == 1 and os.lstat(a).st_ctime_ns >= ctime


def test_hard_link_contents_are_one_page_cache(m: M) -> None:
    a, b = _pair(m, "pages", b"0" * 10000)
    reader = os.open(a, os.O_RDONLY)
    try:
        assert os.pread(reader, 4, 0) == b"0000"
        writer = os.open(b, os.O_WRONLY)
        os.pwrite(writer, b"WRITTEN", 0)
        os.close(writer)
        assert os.pread(reader, 7, 0) == b"WRITTEN"  # the open reader sees the write through b
    finally:
        os.close(reader)
    assert os.lstat(a).st_size == os.lstat(b).st_size == 10000
    with open(b, "ab") as appender:
        appender.write(b"tail")
    assert os.lstat(a).st_size == 10004 and a.read_bytes().endswith(b"tail")


@root_only
@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv")
def test_chmod_through_one_name_binds_the_other_at_once(m: M) -> None:
    a, b = _pair(m, "perm", b"secret")
    os.chmod(a, 0o644)
    assert _as_nobody("cat", str(b)).stdout == "secret"
    os.chmod(a, 0o600)
    denied = _as_nobody("cat", str(b))
    assert denied.returncode != 0 and "Permission denied" in denied.stderr


def _deep(root_fd: int, length: int) -> tuple[str, list[str]]:
    """A relative path of exactly ``length`` characters: directories of NAME_MAX, then a file."""
    parts: list[str] = []
    path = ""
    while length - len(path) > NAME_MAX + 1:
        room = length - len(path) - (1 if path else 0) - 2  # leave at least "/x"
        name = "d" * min(NAME_MAX, room)
        path = f"{path}/{name}" if path else name
        parts.append(name)
    last = "f" * (length - len(path) - 1)
    return f"{path}/{last}", parts


def test_path_max_minus_one_and_long_names(m: M) -> None:
    """pjdfstest */03.t: a path of PATH_MAX-1 bytes works for every call (the cipherdir's own
    length no longer counts), one of PATH_MAX fails with ENAMETOOLONG; NAME_MAX names work."""
    root = os.open(m.path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        rel, dirs = _deep(root, PATH_MAX - 1)
        assert len(rel) == PATH_MAX - 1
        made = ""
        for name in dirs:
            made = f"{made}/{name}" if made else name
            os.mkdir(made, dir_fd=root)
        fd = os.open(rel, os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=root)
        os.write(fd, b"deep")
        os.close(fd)
        assert os.stat(rel, dir_fd=root).st_size == 4
        os.chmod(rel, 0o600, dir_fd=root)
        if os.geteuid() == 0:
            os.chown(rel, 0, 0, dir_fd=root)
        os.utime(rel, ns=(10**9, 10**9), dir_fd=root)
        other = rel[:-1] + ("g" if rel[-1] != "g" else "h")
        os.link(rel, other, src_dir_fd=root, dst_dir_fd=root)
        assert os.stat(rel, dir_fd=root).st_nlink == 2
        os.rename(other, rel, src_dir_fd=root, dst_dir_fd=root)
        os.unlink(rel, dir_fd=root)
        os.symlink("t", rel, dir_fd=root)
        assert os.readlink(rel, dir_fd=root) == "t"
        os.unlink(rel, dir_fd=root)
        os.mkdir(rel, dir_fd=root)
        os.rmdir(rel, dir_fd=root)
        with pytest.raises(OSError) as info:
            os.mkdir(rel + "x", dir_fd=root)
        assert info.value.errno == errno.ENAMETOOLONG
    finally:
        os.close(root)
    long_name = m.path / ("n" * NAME_MAX)
    long_name.write_bytes(b"x")
    assert long_name.read_bytes() == b"x" and ("n" * NAME_MAX) in os.listdir(m.path)
    with pytest.raises(OSError) as info:
        (m.path / ("n" * (NAME_MAX + 1))).write_bytes(b"x")
    assert info.value.errno == errno.ENAMETOOLONG


@root_only
def test_forgotten_inodes_release_their_descriptors(m: M) -> None:
    """Looked-up inodes hold one O_PATH descriptor each until the kernel forgets them."""
    pid = daemon_pid(m.cipherdir, m.path)
    d = m.path / "many"
    d.mkdir()
    for i in range(2000):
        (d / f"f{i}").touch()

    def fds() -> int:
        return len(os.listdir(f"/proc/{pid}/fd"))

    for _ in range(3):  # 6,000 lookups of the same names: still one descriptor each
        for i in range(2000):
            os.lstat(d / f"f{i}")
        time.sleep(1.1)  # past the entry timeout: the kernel looks each name up again
    held = fds()
    assert held >= 2000
    Path("/proc/sys/vm/drop_caches").write_text("2")  # the kernel evicts and forgets them
    deadline = time.monotonic() + 10
    while fds() > held - 1900 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert fds() <= held - 1900, (held, fds())


@root_only
def test_listing_with_attributes_counts_each_entry_once(m: M) -> None:
    """READDIRPLUS: a listing returns each entry's attributes and counts one lookup per entry
    (a descriptor each, without a lookup request), the attributes are the ones lstat gives,
    and every entry is forgotten again: also the one a full reply had no room for (a
    2,000-entry directory takes several replies; the kernel asks "plus" for the first and for
    those after lookups in the directory, READDIRPLUS_AUTO)."""
    pid = daemon_pid(m.cipherdir, m.path)
    d = m.path / "plus"
    d.mkdir()
    for i in range(2000):
        (d / f"entry-with-a-longer-name-{i:05}").write_bytes(b"x" * (i % 7))
    (d / "sub").mkdir()
    os.symlink("entry-with-a-longer-name-00001", d / "link")

    def fds() -> int:
        return len(os.listdir(f"/proc/{pid}/fd"))

    Path("/proc/sys/vm/drop_caches").write_text("2")
    time.sleep(0.5)
    before = fds()
    with os.scandir(d) as it:  # getdents only: no stat, no lookup of a single name
        listed = {e.name: e.inode() for e in it}
    assert len(listed) == 2002
    assert fds() >= before + 100, ("the listing did not pin its entries (no readdirplus?)",
                                   before, fds())
    for name, ino in listed.items():
        st = os.lstat(d / name)
        assert st.st_ino == ino
        if name.startswith("entry"):
            assert stat.S_ISREG(st.st_mode) and st.st_size == int(name[-5:]) % 7
    assert stat.S_ISLNK(os.lstat(d / "link").st_mode)
    assert os.readlink(d / "link") == "entry-with-a-longer-name-00001"
    assert os.lstat(d / "link").st_size == len("entry-with-a-longer-name-00001")
    Path("/proc/sys/vm/drop_caches").write_text("2")
    deadline = time.monotonic() + 10
    while fds() > before + 50 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert fds() <= before + 50, (before, fds())
    shutil.rmtree(d)


@root_only
def test_setgid_directory_semantics(m: M) -> None:
    d = m.path / "sgid"
    d.mkdir()
    os.chown(d, 0, 4321)
    os.chmod(d, 0o2775)
    (d / "f").write_bytes(b"x")
    (d / "sub").mkdir()
    assert os.lstat(d / "f").st_gid == 4321
    sub = os.lstat(d / "sub")
    assert sub.st_gid == 4321 and sub.st_mode & stat.S_ISGID


def test_posix_acls_are_refused(m: M) -> None:
    p = m.path / "acl"
    p.write_bytes(b"x")
    # a valid ACL (version 2: user::rw-, user:65534:r--, group::r--, mask::r--, other::r--)
    entries = [(0x01, 6, 0xFFFFFFFF), (0x02, 4, 65534), (0x04, 4, 0xFFFFFFFF), (0x10, 4, 0xFFFFFFFF),
               (0x20, 4, 0xFFFFFFFF)]
    acl = b"\x02\x00\x00\x00" + b"".join(struct.pack("<HHI", *e) for e in entries)
    with pytest.raises(OSError) as info:
        os.setxattr(p, "system.posix_acl_access", acl)
    assert info.value.errno == errno.EOPNOTSUPP
    backing = backing_path(m.cipherdir, "/acl", m.creds)  # names are encrypted
    assert not [n for n in os.listxattr(backing) if "posix_acl" in n]
    if shutil.which("setfacl"):
        proc = subprocess.run(["setfacl", "-m", "u:65534:r", str(p)], capture_output=True, text=True)
        assert proc.returncode != 0 and "not supported" in proc.stderr.lower()


def test_security_attributes_are_not_supported(m: M) -> None:
    """security.* (labels, file capabilities) are not kept: EOPNOTSUPP for get, set and remove
    (``ls -l`` then asks once per listing instead of once per name), and a label the backing
    file carries is not listed; user attributes still work."""
    p = m.path / "labels"
    p.write_bytes(b"x")
    for name in ("security.selinux", "security.capability", "security.ima"):
        with pytest.raises(OSError) as info:
            os.getxattr(p, name)
        assert info.value.errno == errno.EOPNOTSUPP, name
    with pytest.raises(OSError) as info:
        os.setxattr(p, "security.test", b"v")
    assert info.value.errno == errno.EOPNOTSUPP
    with pytest.raises(OSError) as info:
        os.removexattr(p, "security.test")
    assert info.value.errno == errno.EOPNOTSUPP
    if os.geteuid() == 0:
        backing = backing_path(m.cipherdir, "/labels", m.creds)
        os.setxattr(backing, "security.kmsfs-test", b"backing label")
        assert not [n for n in os.listxattr(p) if n.startswith("security.")]
    os.setxattr(p, "user.kept", b"yes")
    assert os.getxattr(p, "user.kept") == b"yes"
    assert "user.kept" in os.listxattr(p)


def test_open_with_access_mode_3_is_allowed(m: M) -> None:
    """pjdfstest open/23.t: O_WRONLY|O_RDWR (Linux: an ioctl-only descriptor, read and write
    permission checked) opens (it gave EBADF: the backing file, opened the same way, could not
    read the header); reading through it is EBADF, as on any filesystem."""
    p = m.path / "accmode3"
    p.write_bytes(b"x")
    fd = os.open(p, os.O_WRONLY | os.O_RDWR)
    try:
        with pytest.raises(OSError) as info:
            os.read(fd, 1)
        assert info.value.errno == errno.EBADF
    finally:
        os.close(fd)
    assert p.read_bytes() == b"x"
