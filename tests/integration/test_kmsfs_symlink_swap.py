"""The backing-directory symlink attack (issue 11, docs/SECURITY.md "Symlinks in the backing
store"): someone who can write the backing store replaces a backing directory by a symlink to a
directory outside the cipherdir while a mount user works below it.

For each component of a deep backing path ``a/b/c`` and for every operation the mount offers,
the component is swapped for a symlink to a same-shaped tree outside the cipherdir, the
operation runs through the mount, and the swap is undone. The outside tree must be exactly as
before (names, types, modes, owners, sizes, contents, xattrs, mtimes and atimes: a read or a
listing would move the atime, which is set older than the mtime so that relatime updates it):
nothing outside was read, listed or changed. Each operation either fails or acts inside the
cipherdir. The snapshot itself reads with O_NOATIME.

The planted symlink is *relative* (``../outside/a`` from the cipherdir) and the mount point is
one level deeper than the cipherdir (``m/mnt``): the daemon resolving a backing path would land
in the outside tree, but a process on the mount that meets the planted symlink (the kernel
shows it once its entry for the swapped name expires and it looks the name up again) lands in
``m/outside``, which does not exist. A symlink in the backing store shows in the mount as a
symlink (docs/SECURITY.md); what the test proves is that the daemon never follows one. Each
depth runs twice: with the kernel's entries warm (it acts on nodes it holds) and with the
dentry cache dropped after the swap, so that every name is looked up again while swapped.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import shutil
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.kmsfs_mount_helpers import kmsfs, mounted, requires_fuse

pytestmark = [pytest.mark.integration, requires_fuse,
              pytest.mark.skipif(os.geteuid() != 0, reason="the daemon must run as root (chown, O_NOATIME)")]

DEEP = ("a", "b", "c")
_libc = ctypes.CDLL(None, use_errno=True)


class M:
    def __init__(self, cipherdir: Path, path: Path, outside: Path) -> None:
        self.cipherdir, self.path, self.outside = cipherdir, path, outside


@pytest.fixture(scope="module")
def m(keyservice_dev: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[M]:
    tmp = tmp_path_factory.mktemp("swap")
    key = keyservice_dev.boto3_client().create_key(Description="swap")["KeyMetadata"]
    # Plaintext names: the attacker's outside tree mirrors backing names one to one (with
    # encrypted names a swapped-in tree would also need authentic directory ids and names).
    kmsfs("init", tmp / "cipher", "--endpoint", keyservice_dev.endpoint, "--key", key["KeyId"],
          "--credentials", keyservice_dev.credentials_file, "--plaintext-names")
    outside = tmp / "outside"
    with mounted(tmp / "cipher", tmp / "m" / "mnt", keyservice_dev.credentials_file) as path:
        yield M(tmp / "cipher", path, outside)


def _populate(top: Path, plain: bool) -> None:
    """The same names below ``top/a/b/c`` inside (through the mount) and outside (plain files)."""
    deep = top.joinpath(*DEEP)
    deep.mkdir(parents=True, exist_ok=True)
    for name, data in (("file", b"secret contents\n"), ("other", b"other\n")):
        (deep / name).write_bytes(data)
    (deep / "dir").mkdir(exist_ok=True)
    (deep / "empty").mkdir(exist_ok=True)
    (deep / "dir" / "inner").write_bytes(b"inner\n")
    if not (deep / "link").is_symlink():
        os.symlink("file", deep / "link")
    if not plain:
        return
    os.setxattr(deep / "file", "user.mark", b"outside")
    old = 1_000_000_000 * 10**9
    for path in sorted(top.rglob("*"), reverse=True) + [top]:
        # atime older than mtime: under relatime any read or listing moves the atime
        os.utime(path, ns=(old, old + 10**9), follow_symlinks=False)


def _snapshot(top: Path) -> dict[str, tuple[object, ...]]:
    """Everything observable about the outside tree, read without touching atimes."""
    out: dict[str, tuple[object, ...]] = {}

    def visit(path: Path) -> None:
        st = os.lstat(path)
        digest: object = None
        if stat.S_ISREG(st.st_mode):
            fd = os.open(path, os.O_RDONLY | os.O_NOATIME)
            try:
                digest = hashlib.sha256(os.read(fd, 1 << 20)).hexdigest()
            finally:
                os.close(fd)
        elif stat.S_ISDIR(st.st_mode):
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOATIME)
            try:
                digest = sorted(os.listdir(fd))
            finally:
                os.close(fd)
        elif stat.S_ISLNK(st.st_mode):
            digest = os.readlink(path)
        xattrs = () if stat.S_ISLNK(st.st_mode) else tuple(
            (n, os.getxattr(path, n)) for n in sorted(os.listxattr(path)))
        atime = None if stat.S_ISLNK(st.st_mode) else st.st_atime_ns  # readlink(2) here moves it
        out[str(path.relative_to(top))] = (st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_nlink,
                                           st.st_mtime_ns, atime, st.st_ctime_ns, digest, xattrs)
        if stat.S_ISDIR(st.st_mode):
            for name in digest:  # type: ignore[union-attr]
                visit(path / name)

    visit(top)
    return out


def _renameat2(old: Path, new: Path, flags: int) -> None:
    if _libc.renameat2(-100, os.fsencode(old), -100, os.fsencode(new), flags) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def _operations(mnt: Path) -> dict[str, Callable[[], object]]:
    """Every operation through the mount, each on a name below the swapped component."""
    d = mnt.joinpath(*DEEP)

    def read() -> bytes:
        return (d / "file").read_bytes()

    def write_open() -> None:
        with open(d / "file", "r+b") as f:
            f.write(b"X")

    return {
        "readdir": lambda: os.listdir(d),
        "readdir-sub": lambda: os.listdir(d / "dir"),
        "stat": lambda: os.lstat(d / "file"),
        "open-read": read,
        "open-write": write_open,
        "open-trunc": lambda: open(d / "file", "wb").close(),
        "create": lambda: (d / "new").write_bytes(b"new"),
        "create-excl": lambda: os.close(os.open(d / "new2", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)),
        "mkdir": lambda: (d / "newdir").mkdir(),
        "chmod": lambda: os.chmod(d / "file", 0o666),
        "chmod-dir": lambda: os.chmod(d / "dir", 0o777),
        "chown": lambda: os.chown(d / "file", 1234, 1234),
        "lchown-link": lambda: os.lchown(d / "link", 1234, 1234),
        "utimens": lambda: os.utime(d / "file", ns=(5 * 10**18, 5 * 10**18)),
        "utimens-now": lambda: os.utime(d / "file"),
        "truncate": lambda: os.truncate(d / "file", 0),
        "truncate-grow": lambda: os.truncate(d / "file", 100000),
        "unlink": lambda: os.unlink(d / "file"),
        "rmdir": lambda: os.rmdir(d / "empty"),
        "rename-within": lambda: os.rename(d / "file", d / "renamed"),
        "rename-over": lambda: os.rename(d / "other", d / "file"),
        "rename-out": lambda: os.rename(d / "file", mnt / "moved-out"),
        "rename-in": lambda: os.rename(mnt / "top", d / "other"),
        "rename-exchange": lambda: _renameat2(d / "file", d / "other", 2),
        "rename-noreplace": lambda: _renameat2(d / "file", d / "fresh", 1),
        "link": lambda: os.link(d / "file", d / "hardlink"),
        "link-out": lambda: os.link(d / "file", mnt / "hardlink-top"),
        "link-in": lambda: os.link(mnt / "top", d / "hardlink-in"),
        "symlink": lambda: os.symlink("/etc/passwd", d / "newlink"),
        "readlink": lambda: os.readlink(d / "link"),
        "getxattr": lambda: os.getxattr(d / "file", "user.mark"),
        "listxattr": lambda: os.listxattr(d / "file"),
        "setxattr": lambda: os.setxattr(d / "file", "user.mark", b"changed"),
        "removexattr": lambda: os.removexattr(d / "file", "user.mark"),
        "mknod-fifo": lambda: os.mkfifo(d / "fifo"),
        "statfs": lambda: os.statvfs(d / "file"),
    }


def _swap(cipherdir: Path, outside: Path, depth: int) -> Callable[[], None]:
    """Replace backing ``a``, ``a/b`` or ``a/b/c`` by a relative symlink to its outside twin
    (``../../outside/a/b`` for ``a/b``); returns undo."""
    rel = Path(*DEEP[:depth])
    backing = cipherdir / rel
    aside = cipherdir / f"aside-{depth}"
    os.rename(backing, aside)
    target = Path(*[".."] * depth, outside.relative_to(cipherdir.parent), rel)
    assert (backing.parent / target).resolve() == (outside / rel).resolve()
    os.symlink(target, backing)

    def undo() -> None:
        os.unlink(backing)
        os.rename(aside, backing)

    return undo


def _drop_dentries() -> None:
    """Make the kernel forget cached names (and so look them up again through the daemon)."""
    Path("/proc/sys/vm/drop_caches").write_text("2\n")


@pytest.mark.parametrize("cache", ["warm", "dropped"])
@pytest.mark.parametrize("depth", [1, 2, 3])
def test_swapped_backing_directory_never_reaches_outside(m: M, depth: int, cache: str) -> None:
    results: dict[str, str] = {}
    escaped: dict[str, object] = {}
    for name, operation in _operations(m.path).items():
        shutil.rmtree(m.outside, ignore_errors=True)
        _populate(m.outside, plain=True)
        before = _snapshot(m.outside)
        _populate(m.path, plain=False)  # fresh names inside, and the kernel has them cached
        (m.path / "top").write_bytes(b"top")
        for path in m.path.joinpath(*DEEP).iterdir():
            os.lstat(path)
        undo = _swap(m.cipherdir, m.outside, depth)
        try:
            if cache == "dropped":
                _drop_dentries()
            operation()
            results[name] = "ok"
        except OSError as exc:
            results[name] = errno.errorcode.get(exc.errno or 0, str(exc.errno))
        finally:
            undo()
        after = _snapshot(m.outside)
        changed = {k: (before.get(k), after.get(k)) for k in set(before) | set(after)
                   if before.get(k) != after.get(k)}
        if changed:
            escaped[name] = changed
        for leftover in ("moved-out", "hardlink-top"):
            (m.path / leftover).unlink(missing_ok=True)
    assert not escaped, f"component {depth} swapped: these operations reached outside: {sorted(escaped)}"
    # every operation got an error or acted inside; which one depends on the kernel's cache
    assert set(results) == set(_operations(m.path))
