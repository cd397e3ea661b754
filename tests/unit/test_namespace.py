"""The encrypted-name strategy under the inode layer, FUSE-free (kmsfs/namespace.py): directory
ids written at mkdir and lazily for empty directories, long-name side entries written before and
removed after their entry (and kept when the entry stays), rmdir restoring the id it removed,
long symlink targets, and tampered entries hidden from listings."""

from __future__ import annotations

import base64
import errno
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from kmsfs.config import Config
from kmsfs.core import KmsfsCore
from kmsfs.inodes import ROOT_INODE, InodeFs
from kmsfs.namekey import NameKey
from kmsfs.names import DIRID_FILE, NameCipher
from kmsfs.namespace import TARGETS_DIR, EncryptedNames
from tests.unit.test_core import ARN, FakeKeyService, caller, core  # noqa: F401 - the core fixture

LONG = "l" * 200


@pytest.fixture
def fs(core: KmsfsCore) -> InodeFs:  # noqa: F811
    cipher = NameCipher(os.urandom(32))
    names = EncryptedNames(cipher, core.root_fd)
    return InodeFs(core, names)


def _root(fs: InodeFs) -> Path:
    return Path(fs.core.root)


def _file(fs: InodeFs, name: str, parent: int = ROOT_INODE) -> int:
    node, _, fh = fs.create(parent, name, 0o644, os.O_RDWR | os.O_CREAT, caller("/" + name))
    fs.core.write(None, b"data", 0, fh)
    fs.core.release(None, fh)
    return node.ino


def _listing(fs: InodeFs, ino: int = ROOT_INODE) -> list[str]:
    dh = fs.opendir(ino)
    try:
        return sorted(n for n, _, _ in fs.readdir(dh, 0) if n not in (".", ".."))
    finally:
        fs.releasedir(dh)


def _backing(fs: InodeFs, path: Path | None = None) -> list[str]:
    return sorted(n for n in os.listdir(path or _root(fs)) if not n.startswith(".kmsfs"))


def test_names_round_trip_and_never_appear(fs: InodeFs) -> None:
    _file(fs, "short")
    _file(fs, LONG)
    assert _listing(fs) == sorted(["short", LONG])
    backing = _backing(fs)
    assert "short" not in backing and LONG not in backing and DIRID_FILE in backing
    assert sum(n.startswith("kmsfs.longname.") and n.endswith(".name") for n in backing) == 1
    assert fs.lookup(ROOT_INODE, LONG)[0].ino == fs.lookup(ROOT_INODE, LONG)[0].ino
    fs.unlink(ROOT_INODE, LONG)
    assert not [n for n in _backing(fs) if n.startswith("kmsfs.longname.")]
    with pytest.raises(FileNotFoundError):
        fs.lookup(ROOT_INODE, LONG)


def test_rename_moves_side_entries_and_keeps_them_when_the_entry_stays(fs: InodeFs) -> None:
    sub, _ = fs.mkdir(ROOT_INODE, "sub", 0o755)
    _file(fs, LONG)
    fs.rename(ROOT_INODE, LONG, sub.ino, LONG + "x")
    assert _listing(fs) == ["sub"] and _listing(fs, sub.ino) == [LONG + "x"]
    assert not [n for n in _backing(fs) if n.startswith("kmsfs.longname.")]
    sub_backing = _root(fs) / fs.names.backing(fs.root, "sub")
    assert len([n for n in os.listdir(sub_backing) if n.endswith(".name")]) == 1
    # rename onto a hard link of itself: nothing moves, both names keep their side entries
    ino = fs.lookup(sub.ino, LONG + "x")[0].ino
    fs.link(ino, sub.ino, "y" * 190)
    fs.rename(sub.ino, LONG + "x", sub.ino, "y" * 190)
    assert _listing(fs, sub.ino) == sorted([LONG + "x", "y" * 190])
    # RENAME_EXCHANGE: names stay where they are
    _file(fs, "z" * 180, sub.ino)
    fs.rename(sub.ino, LONG + "x", sub.ino, "z" * 180, 2)
    assert len(_listing(fs, sub.ino)) == 3
    assert len([n for n in os.listdir(sub_backing) if n.endswith(".name")]) == 3


def test_rmdir_restores_the_directory_id_when_it_fails(fs: InodeFs) -> None:
    sub, _ = fs.mkdir(ROOT_INODE, "full", 0o755)
    _file(fs, "inside", sub.ino)
    sub_backing = _root(fs) / fs.names.backing(fs.root, "full")
    before = (sub_backing / DIRID_FILE).read_bytes()
    with pytest.raises(OSError) as err:
        fs.rmdir(ROOT_INODE, "full")
    assert err.value.errno == errno.ENOTEMPTY
    assert (sub_backing / DIRID_FILE).read_bytes() == before
    fs.unlink(sub.ino, "inside")
    fs.rmdir(ROOT_INODE, "full")
    assert _listing(fs) == []


def test_read_only_directory_still_gets_its_id(fs: InodeFs) -> None:
    sub, _ = fs.mkdir(ROOT_INODE, "ro", 0o555)
    assert stat.S_IMODE(os.stat(_root(fs) / fs.names.backing(fs.root, "ro")).st_mode) == 0o555
    assert _listing(fs, sub.ino) == []


def test_empty_directory_without_id_gets_one_and_a_full_one_fails(fs: InodeFs) -> None:
    sub, _ = fs.mkdir(ROOT_INODE, "lazy", 0o755)
    sub_backing = _root(fs) / fs.names.backing(fs.root, "lazy")
    os.unlink(sub_backing / DIRID_FILE)  # a crash between mkdir and writing the id
    fs.forget(sub.ino, 2)
    sub2, _ = fs.lookup(ROOT_INODE, "lazy")
    assert sub2.dir_id is None and _listing(fs, sub2.ino) == []
    assert (sub_backing / DIRID_FILE).stat().st_size == 33
    _file(fs, "child", sub2.ino)
    fs.forget(sub2.ino, 1)
    os.unlink(sub_backing / DIRID_FILE)
    sub3, _ = fs.lookup(ROOT_INODE, "lazy")
    with pytest.raises(OSError) as err:
        _listing(fs, sub3.ino)
    assert err.value.errno == errno.EIO


def test_symlink_targets_short_and_long(fs: InodeFs) -> None:
    for name, target in (("s", "short/target"), ("l", "/" + "t" * 4094)):
        node, attrs = fs.symlink(target, ROOT_INODE, name)
        assert fs.readlink(node.ino) == target and attrs["st_size"] == len(target)
        assert fs.getattr(node.ino)["st_size"] == len(target)
        assert target.encode() not in os.readlink(_root(fs) / fs.names.backing(fs.root, name)).encode()
    assert len(os.listdir(_root(fs) / TARGETS_DIR)) == 1
    with pytest.raises(OSError) as err:
        fs.symlink("t" * 4096, ROOT_INODE, "too-long")
    assert err.value.errno == errno.ENAMETOOLONG


def test_tampered_symlink_target_is_eio(fs: InodeFs) -> None:
    node, _ = fs.symlink("somewhere", ROOT_INODE, "lnk")
    backing = _root(fs) / fs.names.backing(fs.root, "lnk")
    stored = os.readlink(backing)
    os.unlink(backing)
    os.symlink(stored[:10] + ("A" if stored[10] != "A" else "B") + stored[11:], backing)
    fs.forget(node.ino, 1)
    node2, _ = fs.lookup(ROOT_INODE, "lnk")
    with pytest.raises(OSError) as err:
        fs.readlink(node2.ino)
    assert err.value.errno == errno.EIO


def test_reserved_plaintext_names_are_ordinary_names(fs: InodeFs) -> None:
    _file(fs, ".kmsfs.json")
    _file(fs, DIRID_FILE)
    assert _listing(fs) == sorted([".kmsfs.json", DIRID_FILE])


def test_listings_decrypt_each_name_once_and_still_hide_tampered_ones(
        fs: InodeFs, monkeypatch: pytest.MonkeyPatch) -> None:
    """Backing name -> plaintext is memoised (deterministic, so never stale): a name created
    or listed once is not decrypted again; a flipped or foreign backing name still fails."""
    sub, _ = fs.mkdir(ROOT_INODE, "sub", 0o755)
    for name in ("a", "b", LONG):
        _file(fs, name, sub.ino)
    cipher = fs.names._cipher()  # type: ignore[union-attr]
    calls: list[str] = []
    real = cipher.plain_name

    def counting(dir_id: bytes, backing: str, side: bytes | None = None) -> bytes:
        calls.append(backing)
        return real(dir_id, backing, side)

    monkeypatch.setattr(cipher, "plain_name", counting)
    assert _listing(fs, sub.ino) == sorted(["a", "b", LONG])
    assert len(calls) == 1  # the long name (its side entry is read each time); a, b were created here
    assert _listing(fs, sub.ino) == sorted(["a", "b", LONG])
    assert len(calls) == 2
    sub_backing = _root(fs) / fs.names.backing(fs.root, "sub")
    short = fs.names.backing(sub, "a")
    flipped = short[:-2] + ("A" if short[-2] != "A" else "B") + short[-1]
    os.rename(sub_backing / short, sub_backing / flipped)
    assert _listing(fs, sub.ino) == sorted(["b", LONG])
    moved = fs.names.backing(sub, "b")  # authentic in sub, listed (and memoised) there
    os.rename(sub_backing / moved, _root(fs) / moved)  # into another directory: another id
    assert _listing(fs) == ["sub"] and _listing(fs, sub.ino) == [LONG]


def test_rename_over_an_empty_directory(fs: InodeFs) -> None:
    """The empty target holds its directory id: it must not make the rename fail (ENOTEMPTY),
    and a failed rename (non-empty target) keeps the target's id."""
    d1, _ = fs.mkdir(ROOT_INODE, "d1", 0o755)
    _file(fs, "f", d1.ino)
    fs.mkdir(ROOT_INODE, "d2", 0o755)
    fs.rename(ROOT_INODE, "d1", ROOT_INODE, "d2")
    assert _listing(fs) == ["d2"] and _listing(fs, fs.lookup(ROOT_INODE, "d2")[0].ino) == ["f"]
    fs.mkdir(ROOT_INODE, "d3", 0o755)
    d2_backing = _root(fs) / fs.names.backing(fs.root, "d2")
    before = (d2_backing / DIRID_FILE).read_bytes()
    with pytest.raises(OSError) as err:
        fs.rename(ROOT_INODE, "d3", ROOT_INODE, "d2")
    assert err.value.errno in (errno.ENOTEMPTY, errno.EEXIST)
    assert (d2_backing / DIRID_FILE).read_bytes() == before
    _file(fs, "plain")
    with pytest.raises(OSError):
        fs.rename(ROOT_INODE, "plain", ROOT_INODE, "d3")  # a file over a directory: EISDIR
    assert _listing(fs, fs.lookup(ROOT_INODE, "d3")[0].ino) == []


def _name_key_config(svc: Any) -> Config:
    key, blob, _ = svc.generate_data_key(ARN, {"kmsfs:purpose": "names", "kmsfs:cipherdir": "ab" * 16}, {})
    return Config(endpoint="https://127.0.0.1:1", region="us-east-1", key_id=ARN, key_arn=ARN,
                  version=2, names="aes-siv", cipherdir_id="ab" * 16,
                  name_key=base64.b64encode(blob).decode())


def test_name_key_is_revalidated_and_refusal_hides_names(monkeypatch: pytest.MonkeyPatch) -> None:
    """Revocation reaches names on the --revalidate-after schedule; an outage keeps the key; a
    key refused at mount time mounts with names hidden and recovers once allowed."""
    svc = FakeKeyService()
    config = _name_key_config(svc)
    clock = [1000.0]
    monkeypatch.setattr("kmsfs.namekey.time.monotonic", lambda: clock[0])
    key = NameKey(svc, config, revalidate_after=5.0)  # type: ignore[arg-type]
    first = key.cipher()
    assert [c[0] for c in svc.calls] == ["GenerateDataKey", "Decrypt"]
    assert svc.calls[-1][2]["op"] == "names"
    svc.disabled = True
    clock[0] += 4.9
    assert key.cipher() is first  # within the bound: no request
    clock[0] += 0.2
    with pytest.raises(PermissionError):
        key.cipher()
    with pytest.raises(PermissionError):
        key.cipher()  # sticks, re-asked at most once a second
    svc.disabled = False
    clock[0] += 1.1
    assert key.cipher() is first
    svc.disabled = True
    late = NameKey(svc, config, revalidate_after=5.0)  # type: ignore[arg-type]
    with pytest.raises(PermissionError):
        late.cipher()
    svc.disabled = False
    clock[0] += 1.1
    assert late.cipher().decrypt(bytes(16), first.encrypt(bytes(16), b"x")) == b"x"
