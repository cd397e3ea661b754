"""The FUSE-free inode layer (kmsfs/inodes.py): one node per backing inode, lookup counts and
forget (no descriptor leak), reserved names, directory listings by offset, audit names."""

from __future__ import annotations

import errno
import gc
import os
import stat
from pathlib import Path

import pytest

from kmsfs.core import KmsfsCore
from kmsfs.inodes import ROOT_INODE, InodeFs
from tests.unit.test_core import caller, core  # noqa: F401 - the core fixture


def _open_fds() -> int:
    gc.collect()  # cores of earlier tests close their root descriptor when collected
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
def fs(core: KmsfsCore) -> InodeFs:  # noqa: F811
    return InodeFs(core)


def _file(fs: InodeFs, name: str, data: bytes = b"data", parent: int = ROOT_INODE) -> int:
    node, _, fh = fs.create(parent, name, 0o644, os.O_RDWR | os.O_CREAT, caller("/" + name))
    fs.core.write(None, data, 0, fh)
    fs.core.release(None, fh)
    return node.ino


def test_hard_links_are_one_node_with_one_link_count(fs: InodeFs) -> None:
    ino = _file(fs, "orig")
    node, attrs = fs.link(ino, ROOT_INODE, "hl")
    assert node.ino == ino and attrs["st_nlink"] == 2
    assert fs.lookup(ROOT_INODE, "hl")[0].ino == ino
    assert fs.getattr(ino)["st_nlink"] == 2
    fs.setattr(ino, {"mode": 0o600})
    assert stat.S_IMODE(fs.lookup(ROOT_INODE, "hl")[1]["st_mode"]) == 0o600
    fs.unlink(ROOT_INODE, "orig")
    assert fs.getattr(ino)["st_nlink"] == 1  # the node's descriptor still reaches the inode


def test_lookups_and_forget_hold_one_descriptor_per_inode(fs: InodeFs) -> None:
    ino = _file(fs, "f")
    fs.forget(ino, 1)  # the create's lookup
    before = _open_fds()
    for _ in range(100_000):
        node, _ = fs.lookup(ROOT_INODE, "f")
    assert node.nlookup == 100_000 and fs.nodes() == 2
    assert _open_fds() == before + 1
    fs.forget(node.ino, 99_999)
    assert fs.nodes() == 2
    fs.forget(node.ino, 1)
    assert fs.nodes() == 1 and _open_fds() == before
    with pytest.raises(OSError) as info:
        fs.getattr(node.ino)
    assert info.value.errno == errno.ESTALE


def test_listed_entries_reuse_held_nodes_and_count_one_lookup_each(
        fs: InodeFs, monkeypatch: pytest.MonkeyPatch) -> None:
    """READDIRPLUS's lookups (``lookup_listed``): a file whose inode is already a node is that
    node, counted once more without opening its name again; a file whose name now holds another
    inode, one that lost its last link, directories and unknown inodes go by name."""
    ino = _file(fs, "f", b"12345")
    sub, _ = fs.mkdir(ROOT_INODE, "sub", 0o755)
    dh = fs.opendir(ROOT_INODE)
    listed = {n: (i, m) for n, i, m in fs.readdir(dh, 0)}
    fs.releasedir(dh)
    opened: list[str] = []
    real_pin = fs.names.find

    def counting(parent: object, name: str) -> tuple[int, str]:
        opened.append(name)
        return real_pin(parent, name)  # type: ignore[arg-type]

    monkeypatch.setattr(fs.names, "find", counting)
    node, attrs = fs.lookup_listed(ROOT_INODE, "f", *listed["f"])
    assert node.ino == ino and node.nlookup == 2 and attrs["st_size"] == 5 and opened == []
    assert fs.lookup_listed(ROOT_INODE, "sub", *listed["sub"])[0].ino == sub.ino
    assert opened == ["sub"]  # directories always by name
    fs.unlink(ROOT_INODE, "f")
    _file(fs, "f", b"new")  # the name now holds another inode; the old one has no link
    node2, attrs2 = fs.lookup_listed(ROOT_INODE, "f", *listed["f"])
    assert node2.ino != ino and attrs2["st_size"] == 3 and opened == ["sub", "f"]
    assert fs.node(ino).nlookup == 2  # the refused fast path gave its count back
    with pytest.raises(FileNotFoundError):
        fs.lookup_listed(ROOT_INODE, "gone", listed["f"][0] + 10**9, stat.S_IFREG)


def test_many_inodes_are_all_released_by_forget(fs: InodeFs) -> None:
    d = fs.mkdir(ROOT_INODE, "d", 0o755, caller("/d"))[0].ino
    for i in range(300):
        os.close(_raw_create(fs, d, f"n{i}"))
    before = _open_fds()
    nodes = [fs.lookup(d, f"n{i}")[0] for i in range(300)]
    assert _open_fds() == before + 300
    for node in nodes:
        fs.forget(node.ino, 1)
    assert _open_fds() == before and fs.nodes() == 2


def _raw_create(fs: InodeFs, parent: int, name: str) -> int:
    """A plain backing file (no header) straight in the cipherdir: lookups only need the inode."""
    dir_fd = os.open(f"/proc/self/fd/{fs.node(parent).fd}", os.O_RDONLY | os.O_DIRECTORY)
    try:
        return os.open(name, os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=dir_fd)
    finally:
        os.close(dir_fd)


def test_reserved_names_do_not_exist_in_the_root(fs: InodeFs) -> None:
    for call in (lambda: fs.lookup(ROOT_INODE, ".kmsfs.json"),
                 lambda: fs.mkdir(ROOT_INODE, ".kmsfs-x", 0o755),
                 lambda: fs.unlink(ROOT_INODE, ".kmsfs.json")):
        with pytest.raises(OSError) as info:
            call()
        assert info.value.errno == errno.ENOENT
    dh = fs.opendir(ROOT_INODE)
    assert not [e for e in fs.readdir(dh, 0) if e[0].startswith(".kmsfs")]
    fs.releasedir(dh)
    assert Path(fs.core.root, ".kmsfs.json").exists()
    d = fs.mkdir(ROOT_INODE, "sub", 0o755)[0].ino
    _file(fs, ".kmsfs.json", parent=d)  # reserved only in the root
    assert fs.lookup(d, ".kmsfs.json")[1]["st_size"] == 4


def test_readdir_by_offset(fs: InodeFs) -> None:
    for i in range(5):
        _file(fs, f"f{i}")
    dh = fs.opendir(ROOT_INODE)
    everything = fs.readdir(dh, 0)
    names = [e[0] for e in everything]
    assert names[:2] == [".", ".."] and sorted(names[2:]) == [f"f{i}" for i in range(5)]
    assert everything[1][1] == everything[0][1] != 0  # ".." of the root: the root itself
    assert fs.readdir(dh, 3) == everything[3:]
    assert all(stat.S_ISREG(mode) for name, _, mode in everything[2:])
    fs.releasedir(dh)
    with pytest.raises(OSError):
        fs.readdir(dh, 0)
    sub = fs.mkdir(ROOT_INODE, "sub", 0o755)[0]
    dh = fs.opendir(sub.ino)
    assert fs.readdir(dh, 0)[1][1] == everything[0][1]  # ".." of a subdirectory: its parent
    fs.releasedir(dh)


def test_audit_path_follows_renames(fs: InodeFs) -> None:
    a = fs.mkdir(ROOT_INODE, "a", 0o755)[0]
    b = fs.mkdir(ROOT_INODE, "b", 0o755)[0]
    node, _, fh = fs.create(a.ino, "f", 0o644, os.O_RDWR, caller("/a/f"))
    fs.core.release(None, fh)
    assert fs.path_of(node) == "/a/f"
    fs.rename(a.ino, "f", b.ino, "g")
    assert fs.path_of(node) == "/b/g"
    fs.rename(ROOT_INODE, "b", ROOT_INODE, "c")
    assert fs.path_of(node) == "/c/g"
    fh = fs.open(node.ino, os.O_RDONLY, caller("/c/g"))
    fs.core.release(None, fh)
    assert fs.core.client.calls[-1][2]["path"] == "/c/g"  # type: ignore[attr-defined]


def test_node_descriptor_survives_renames_of_its_directory(fs: InodeFs) -> None:
    d = fs.mkdir(ROOT_INODE, "d", 0o755)[0]
    ino = _file(fs, "f", b"hello", parent=d.ino)
    os.rename(Path(fs.core.root, "d"), Path(fs.core.root, "moved"))  # behind the kernel's back
    fh = fs.open(ino, os.O_RDONLY, caller("/d/f"))
    assert fs.core.read(None, 10, 0, fh) == b"hello"
    fs.core.release(None, fh)
    assert fs.lookup(d.ino, "f")[0].ino == ino


def test_symlink_readlink_mknod_and_xattrs_by_node(fs: InodeFs) -> None:
    link, attrs = fs.symlink("target/x", ROOT_INODE, "s")
    assert stat.S_ISLNK(attrs["st_mode"]) and fs.readlink(link.ino) == "target/x"
    fifo, attrs = fs.mknod(ROOT_INODE, "p", stat.S_IFIFO | 0o600, 0)
    assert stat.S_ISFIFO(attrs["st_mode"])
    reg, attrs = fs.mknod(ROOT_INODE, "r", stat.S_IFREG | 0o640, 0, caller("/r"))
    assert stat.S_ISREG(attrs["st_mode"]) and attrs["st_size"] == 0
    with pytest.raises(FileExistsError):
        fs.mknod(ROOT_INODE, "r", stat.S_IFREG | 0o640, 0, caller("/r"))
    fs.setxattr(reg.ino, "user.k", b"v", 0)
    assert fs.getxattr(reg.ino, "user.k") == b"v" and fs.listxattr(reg.ino) == ["user.k"]
    fs.removexattr(reg.ino, "user.k")
    assert fs.listxattr(reg.ino) == []
    with pytest.raises(OSError) as info:
        fs.setattr(link.ino, {"mode": 0o777})
    assert info.value.errno == errno.EOPNOTSUPP


def test_posix_acls_are_refused_never_stored(fs: InodeFs) -> None:
    ino = _file(fs, "acl")
    acl = b"\x02\x00\x00\x00" + b"\x01\x00\x06\x00\xff\xff\xff\xff"  # version 2, user_obj rw-
    for name in ("system.posix_acl_access", "system.posix_acl_default"):
        with pytest.raises(OSError) as info:
            fs.setxattr(ino, name, acl, 0)
        assert info.value.errno == errno.EOPNOTSUPP
        with pytest.raises(OSError) as info:
            fs.getxattr(ino, name)
        assert info.value.errno == errno.EOPNOTSUPP
    assert not [n for n in os.listxattr(Path(fs.core.root, "acl")) if "acl" in n]


@pytest.mark.skipif(os.geteuid() != 0, reason="giving files to another group needs root")
def test_setgid_directory_gives_its_group_and_the_bit(fs: InodeFs) -> None:
    d = fs.mkdir(ROOT_INODE, "shared", 0o775)[0]
    os.chown(Path(fs.core.root, "shared"), 0, 4321)
    fs.setattr(d.ino, {"mode": 0o2775})
    user = {**caller("/shared/x"), "uid": 1000, "gid": 1000}
    node, attrs, fh = fs.create(d.ino, "file", 0o664, os.O_RDWR, user)
    fs.core.release(None, fh)
    assert (attrs["st_uid"], attrs["st_gid"]) == (1000, 4321)
    sub, attrs = fs.mkdir(d.ino, "sub", 0o775, user)
    assert attrs["st_gid"] == 4321 and attrs["st_mode"] & stat.S_ISGID
    link, attrs = fs.symlink("file", d.ino, "ln", user)
    assert attrs["st_gid"] == 4321
    plain = fs.mkdir(ROOT_INODE, "plain", 0o775, user)[1]
    assert plain["st_gid"] == 1000 and not plain["st_mode"] & stat.S_ISGID


def test_fallocate_in_plaintext_terms(fs: InodeFs) -> None:
    node, _, fh = fs.create(ROOT_INODE, "fa", 0o644, os.O_RDWR, caller("/fa"))
    kcore = fs.core
    kcore.write(None, b"x" * 5000, 0, fh)
    fs.fallocate(node.ino, 0, 0, 10000, fh)
    assert fs.getattr(node.ino, fh)["st_size"] == 10000
    fs.fallocate(node.ino, 0x01, 0, 50000, fh)  # KEEP_SIZE
    assert fs.getattr(node.ino, fh)["st_size"] == 10000
    fs.fallocate(node.ino, 0x03, 10, 100, fh)  # PUNCH_HOLE | KEEP_SIZE
    assert kcore.read(None, 200, 0, fh) == b"x" * 10 + bytes(100) + b"x" * 90
    fs.fallocate(node.ino, 0x10, 9990, 20, fh)  # ZERO_RANGE grows
    assert fs.getattr(node.ino, fh)["st_size"] == 10010
    for mode in (0x02, 0x08, 0x20):  # PUNCH_HOLE without KEEP_SIZE, COLLAPSE, INSERT
        with pytest.raises(OSError) as info:
            fs.fallocate(node.ino, mode, 0, 4096, fh)
        assert info.value.errno == errno.EOPNOTSUPP
    kcore.release(None, fh)
