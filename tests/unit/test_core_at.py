"""The core reaches backing files one name at a time from the cipherdir's descriptor
(kmsfs/backing_at.py): paths longer than PATH_MAX once the cipherdir is prefixed work, ``..``
never climbs out, and a symlink in place of a backing directory is never followed."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from kmsfs.config import Config
from kmsfs.core import KmsfsCore
from tests.unit.test_core import ARN, FakeKeyService, caller

PATH_MAX = 4096
NAME_MAX = 255


def _core(root: Path) -> KmsfsCore:
    root.mkdir(parents=True)
    config = Config(endpoint="http://x", region="us-east-1", key_id="k1", key_arn=ARN)
    config.save(root)
    return KmsfsCore(str(root), config, FakeKeyService())  # type: ignore[arg-type]


def _long_dir(tmp_path: Path, length: int) -> Path:
    """A directory whose absolute path is about ``length`` characters (made relative to each
    parent: the path string itself would be too long for the kernel)."""
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    path = tmp_path
    try:
        while len(str(path)) < length:
            name = "p" * min(200, max(1, length - len(str(path)) - 1))
            os.mkdir(name, dir_fd=fd)
            child = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd, path = child, path / name
    finally:
        os.close(fd)
    return path


def test_mount_path_of_path_max_minus_one_under_a_long_cipherdir(tmp_path: Path) -> None:
    """A mount path of PATH_MAX-1 characters, cipherdir 1000 characters: fails on a core that
    builds cipherdir + path (ENAMETOOLONG), works here."""
    os.chdir(_long_dir(tmp_path, 1000))
    core = _core_from_cwd()
    components = []
    path = ""
    while PATH_MAX - 1 - len(path) > 1 + NAME_MAX:  # room left for more than one name
        name = "d" * min(NAME_MAX, PATH_MAX - 1 - len(path) - 3)
        path += "/" + name
        components.append(name)
        core.mkdir(path, 0o755, caller(path))
    last = "f" * (PATH_MAX - 1 - len(path) - 1)
    assert len(last) <= NAME_MAX
    fpath = f"{path}/{last}"
    assert len(fpath) == PATH_MAX - 1 and len(core.root) + len(fpath) > PATH_MAX
    fh = core.create(fpath, 0o644, caller(fpath))
    core.write(fpath, b"deep", 0, fh)
    core.release(fpath, fh)
    assert core.getattr(fpath)["st_size"] == 4
    fh = core.open(fpath, os.O_RDONLY, caller(fpath))
    assert core.read(fpath, 10, 0, fh) == b"deep"
    core.release(fpath, fh)
    core.chmod(fpath, 0o600)
    core.utimens(fpath, (10**9, 2 * 10**9))
    assert core.getattr(fpath)["st_mtime"] == 2 * 10**9
    core.setxattr(fpath, "user.x", b"1", 0)
    assert core.getxattr(fpath, "user.x") == b"1"
    core.truncate(fpath, 1)
    renamed = f"{path}/{'g' * len(last)}"
    core.rename(fpath, renamed)
    assert last not in core.readdir(path) and "g" * len(last) in core.readdir(path)
    core.link(fpath, renamed)
    assert core.getattr(fpath)["st_nlink"] == 2
    core.unlink(fpath)
    core.unlink(renamed)
    core.symlink(fpath, "target", caller(fpath))
    assert core.readlink(fpath) == "target"
    core.unlink(fpath)
    while components:
        core.rmdir("/" + "/".join(components))
        components.pop()


def _core_from_cwd() -> KmsfsCore:
    """A core whose cipherdir is made in the current directory (a long path)."""
    os.mkdir("cipher")
    config = Config(endpoint="http://x", region="us-east-1", key_id="k1", key_arn=ARN)
    config.save(Path("cipher"))
    core = KmsfsCore("cipher", config, FakeKeyService())  # type: ignore[arg-type]
    assert len(core.root) > 1000
    return core


@pytest.fixture(autouse=True)
def _restore_cwd() -> Iterator[None]:
    cwd = os.getcwd()
    yield None
    os.chdir(cwd)


def test_dot_and_dotdot_components_are_refused(tmp_path: Path) -> None:
    core = _core(tmp_path / "cipher")
    (tmp_path / "outside").write_bytes(b"x")
    for path in ("/../outside", "/a/../../outside", "/./x"):
        with pytest.raises(OSError) as info:
            core.getattr(path)
        assert info.value.errno == errno.EINVAL
    with pytest.raises(OSError):
        core.unlink("/../outside")
    assert (tmp_path / "outside").exists()


def test_symlinked_backing_directory_is_not_followed(tmp_path: Path) -> None:
    core = _core(tmp_path / "cipher")
    outside = tmp_path / "outside"
    (outside / "sub").mkdir(parents=True)
    (outside / "sub" / "f").write_bytes(b"host file")
    os.symlink(outside, tmp_path / "cipher" / "d")  # planted in the backing store
    for call in (lambda: core.getattr("/d/sub/f"), lambda: core.readdir("/d/sub"),
                 lambda: core.unlink("/d/sub/f"), lambda: core.chmod("/d/sub/f", 0o666),
                 lambda: core.mkdir("/d/sub/new", 0o755), lambda: core.create("/d/sub/g", 0o644),
                 lambda: core.rename("/d/sub/f", "/moved"), lambda: core.truncate("/d/sub/f", 0),
                 lambda: core.setxattr("/d/sub/f", "user.x", b"1", 0)):
        with pytest.raises(OSError) as info:
            call()
        assert info.value.errno == errno.ENOTDIR
    assert sorted(os.listdir(outside / "sub")) == ["f"]
    assert (outside / "sub" / "f").read_bytes() == b"host file"
    # the last component as a symlink is the symlink itself, never its target
    assert core.readlink("/d") == str(outside)
    core.chown("/d", os.getuid(), os.getgid())
    with pytest.raises(OSError) as info:
        core.chmod("/d", 0o777)
    assert info.value.errno == errno.EOPNOTSUPP
    with pytest.raises(OSError) as info:
        core.open("/d", os.O_RDONLY, caller("/d"))
    assert info.value.errno in (errno.ELOOP, errno.ENOTDIR)
    assert (outside.stat().st_mode & 0o777) != 0o777
