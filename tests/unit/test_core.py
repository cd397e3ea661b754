"""The FUSE-free filesystem core over a temporary cipherdir, with a fake in-memory key service."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import pytest

from kmsfs import format as fmt
from kmsfs import headers
from kmsfs.config import Config
from kmsfs.core import UTIME_NOW, UTIME_OMIT, KmsfsCore
from kmsfs.keyclient import KeyServiceError
from kmsfs.operations import KmsfsOperations, translate

ARN = "arn:aws:kms:us-east-1:111122223333:key/k1"


class FakeKeyService:
    """Wraps data keys by XOR with a master key, binding the context; records every call."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, str], Any]] = []
        self.disabled = False

    def _wrap(self, key: bytes, ctx: dict[str, str]) -> bytes:
        return bytes(b ^ 0x5A for b in key) + repr(sorted(ctx.items())).encode()

    def generate_data_key(self, key_id: str, ctx: dict[str, str], caller: Any) -> tuple[bytes, bytes, str]:
        self.calls.append(("GenerateDataKey", ctx, caller))
        if self.disabled:
            raise KeyServiceError("DisabledException", "disabled")
        key = os.urandom(32)
        return key, self._wrap(key, ctx), ARN

    def decrypt(self, blob: bytes, ctx: dict[str, str], caller: Any, key_id: str | None = None) -> bytes:
        self.calls.append(("Decrypt", ctx, caller))
        if self.disabled:
            raise KeyServiceError("DisabledException", "disabled")
        if blob[32:] != repr(sorted(ctx.items())).encode():
            raise KeyServiceError("InvalidCiphertextException")
        return bytes(b ^ 0x5A for b in blob[:32])


@pytest.fixture
def core(tmp_path: Path) -> KmsfsCore:
    root = tmp_path / "cipher"
    root.mkdir()
    config = Config(endpoint="http://x", region="us-east-1", key_id="k1", key_arn=ARN)
    config.save(root)
    return KmsfsCore(str(root), config, FakeKeyService())  # type: ignore[arg-type]


def caller(path: str) -> dict[str, Any]:
    return {"path": path, "uid": os.getuid(), "gid": os.getgid(), "pid": 1, "process": "test"}


def test_create_write_read_reopen(core: KmsfsCore) -> None:
    fh = core.create("/a.txt", 0o100640, caller("/a.txt"))
    assert core.write("/a.txt", b"hello world", 0, fh) == 11
    assert core.read("/a.txt", 100, 6, fh) == b"world"
    core.release("/a.txt", fh)
    assert core.open_handles() == 0
    attrs = core.getattr("/a.txt")
    assert attrs["st_size"] == 11 and attrs["st_mode"] & 0o777 == 0o640
    fh = core.open("/a.txt", os.O_RDONLY, caller("/a.txt"))
    assert core.read("/a.txt", 100, 0, fh) == b"hello world"
    core.release("/a.txt", fh)
    ops = [c[0] for c in core.client.calls]  # type: ignore[attr-defined]
    assert ops == ["GenerateDataKey", "Decrypt"]
    assert all(c[2]["path"] == "/a.txt" for c in core.client.calls)  # type: ignore[attr-defined]
    header = fmt.parse_header(os.getxattr(os.path.join(core.root, "a.txt"), fmt.HEADER_XATTR))
    assert core.client.calls[1][1] == header.encryption_context()  # type: ignore[attr-defined]


def test_each_open_calls_decrypt_and_handles_share_inode(core: KmsfsCore) -> None:
    fh = core.create("/f", 0o644, caller("/f"))
    core.write("/f", b"x" * 5000, 0, fh)
    fh2 = core.open("/f", os.O_RDWR, caller("/f"))
    core.write("/f", b"YY", 4095, fh2)
    assert core.read("/f", 4, 4094, fh) == b"xYYx"
    assert core._handles[fh].inode is core._handles[fh2].inode
    # path truncate while open reuses the unwrapped key: no extra Decrypt
    n = len(core.client.calls)  # type: ignore[attr-defined]
    core.truncate("/f", 4096, None, caller("/f"))
    assert len(core.client.calls) == n  # type: ignore[attr-defined]
    assert core.getattr("/f", fh)["st_size"] == 4096
    core.release("/f", fh)
    core.release("/f", fh2)
    assert core._inodes == {}
    core.truncate("/f", 10, None, caller("/f"))  # not open: unwraps through the service
    assert core.client.calls[-1][0] == "Decrypt"  # type: ignore[attr-defined]
    assert core.getattr("/f")["st_size"] == 10


def test_open_trunc_and_wronly(core: KmsfsCore) -> None:
    fh = core.create("/t", 0o644, caller("/t"))
    core.write("/t", b"abcdef", 0, fh)
    core.release("/t", fh)
    fh = core.open("/t", os.O_WRONLY | os.O_TRUNC | os.O_APPEND, caller("/t"))
    assert core.getattr("/t")["st_size"] == 0
    core.write("/t", b"xyz", 0, fh)
    core.write("/t", b"12", 1, fh)  # backing fd has no O_APPEND: offsets are honoured
    core.release("/t", fh)
    fh = core.open("/t", os.O_RDONLY, caller("/t"))
    assert core.read("/t", 10, 0, fh) == b"x12"
    core.release("/t", fh)


def test_reserved_names_and_header_xattr_hidden(core: KmsfsCore) -> None:
    core.release("/", core.create("/f", 0o644, caller("/f")))
    assert core.readdir("/") == [".", "..", "f"]
    with pytest.raises(FileNotFoundError):
        core.getattr("/.kmsfs.json")
    with pytest.raises(FileNotFoundError):
        core.create("/.kmsfs.x", 0o644, caller("/.kmsfs.x"))
    assert fmt.HEADER_XATTR not in core.listxattr("/f")
    with pytest.raises(OSError) as info:
        core.getxattr("/f", fmt.HEADER_XATTR)
    assert info.value.errno == errno.ENODATA
    with pytest.raises(PermissionError):
        core.setxattr("/f", fmt.HEADER_XATTR, b"x", 0)
    with pytest.raises(PermissionError):
        core.removexattr("/f", fmt.HEADER_XATTR)


def test_utimens_now_and_omit(core: KmsfsCore) -> None:
    core.release("/", core.create("/u", 0o644, caller("/u")))
    core.utimens("/u", (1_000_000_000_000_000_000, 2_000_000_000_000_000_000))
    core.utimens("/u", (UTIME_OMIT, 1_500_000_000_123_456_789))  # what GNU tar does
    st = os.stat(os.path.join(core.root, "u"))
    assert (st.st_atime_ns, st.st_mtime_ns) == (1_000_000_000_000_000_000, 1_500_000_000_123_456_789)
    core.utimens("/u", (UTIME_NOW, UTIME_OMIT))
    st = os.stat(os.path.join(core.root, "u"))
    assert st.st_atime_ns > 1_700_000_000 * 10**9 and st.st_mtime_ns == 1_500_000_000_123_456_789


def test_missing_or_corrupt_header(core: KmsfsCore) -> None:
    Path(core.root, "plain").write_bytes(b"not encrypted")
    with pytest.raises(fmt.CorruptHeader):
        core.open("/plain", os.O_RDONLY, caller("/plain"))
    os.setxattr(os.path.join(core.root, "plain"), fmt.HEADER_XATTR, b"garbage")
    with pytest.raises(fmt.CorruptHeader):
        core.open("/plain", os.O_RDONLY, caller("/plain"))
    assert core.open_handles() == 0


def test_header_of_another_file_is_refused(core: KmsfsCore) -> None:
    for name in ("/a", "/b"):
        core.release(name, core.create(name, 0o644, caller(name)))
    hdr_a = fmt.parse_header(os.getxattr(os.path.join(core.root, "a"), fmt.HEADER_XATTR))
    hdr_b = fmt.parse_header(os.getxattr(os.path.join(core.root, "b"), fmt.HEADER_XATTR))
    forged = fmt.Header(file_id=hdr_b.file_id, key_arn=ARN, wrapped_key=hdr_a.wrapped_key)
    os.setxattr(os.path.join(core.root, "b"), fmt.HEADER_XATTR, fmt.pack_header(forged))
    with pytest.raises(fmt.CorruptHeader):  # the xattr alone: it differs from the in-file copy
        core.open("/b", os.O_RDONLY, caller("/b"))
    fd = os.open(os.path.join(core.root, "b"), os.O_RDWR)
    try:
        headers.update_copy(fd, forged)  # both places: the service refuses the unwrap
    finally:
        os.close(fd)
    with pytest.raises(KeyServiceError):
        core.open("/b", os.O_RDONLY, caller("/b"))


def test_disabled_key_and_errno_translation(core: KmsfsCore) -> None:
    core.release("/d", core.create("/d", 0o644, caller("/d")))
    core.client.disabled = True  # type: ignore[attr-defined]
    with pytest.raises(KeyServiceError) as info:
        core.open("/d", os.O_RDONLY, caller("/d"))
    assert translate(info.value, "open", "/d") == errno.EACCES
    assert translate(KeyServiceError("InvalidCiphertextException"), "open", "/d") == errno.EIO
    assert translate(fmt.CorruptHeader("x"), "open", "/d") == errno.EIO
    assert translate(ValueError("boom"), "read", "/d") == errno.EIO
    assert translate(FileNotFoundError(errno.ENOENT, "x"), "getattr", "/d") == errno.ENOENT


def test_adapter_never_leaks_domain_errors(core: KmsfsCore, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every handler answers an exception with exactly one errno reply (the reply function is
    libfuse's; here it records what the kernel would get)."""
    import ctypes

    from kmsfs import _fuse
    from kmsfs.inodes import InodeFs

    replies: list[int] = []
    monkeypatch.setattr(_fuse, "reply_err", lambda req, code: replies.append(code))
    ops = KmsfsOperations(InodeFs(core))
    fi = ctypes.pointer(_fuse.FileInfo(fh=999))
    ops.read(None, 1, 10, 0, fi)  # bad handle
    ops.lookup(None, 1, b"missing")
    ops.getattr(None, 12345, None)  # an inode the kernel never got

    def boom(*args: Any) -> int:
        raise ValueError("boom")

    monkeypatch.setattr(core, "read_into", boom)
    ops.read(None, 1, 10, 0, fi)
    assert replies == [errno.EBADF, errno.ENOENT, errno.ESTALE, errno.EIO]


def test_dirs_links_rename(core: KmsfsCore) -> None:
    core.mkdir("/d", 0o750, caller("/d"))
    assert core.getattr("/d")["st_mode"] & 0o777 == 0o750
    fh = core.create("/d/f", 0o600, caller("/d/f"))
    core.write("/d/f", b"data", 0, fh)
    core.release("/d/f", fh)
    core.rename("/d/f", "/d/g")
    core.link("/d/h", "/d/g")
    core.symlink("/d/s", "g", caller("/d/s"))
    assert core.readlink("/d/s") == "g"
    assert core.getattr("/d/h")["st_nlink"] == 2
    fh = core.open("/d/h", os.O_RDONLY, caller("/d/h"))
    assert core.read("/d/h", 10, 0, fh) == b"data"
    core.release("/d/h", fh)
    for name in ("/d/g", "/d/h", "/d/s"):
        core.unlink(name)
    core.rmdir("/d")
    assert core.statfs("/")["f_bsize"] > 0


def test_deleted_key_is_logged_as_unrecoverable(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("ERROR", logger="kmsfs"):
        code = translate(KeyServiceError("NotFoundException", "key does not exist"), "open", "/f")
    assert code == errno.EACCES
    assert "key deleted: file unrecoverable" in caplog.text


def test_revocation_reaches_an_open_handle(core: KmsfsCore) -> None:
    core.revalidate_after = 0.0
    fh = core.create("/r", 0o644, caller("/r"))
    core.write("/r", b"data", 0, fh)
    core.client.disabled = True  # type: ignore[attr-defined]
    with pytest.raises(KeyServiceError):
        core.read("/r", 4, 0, fh)
    core.client.disabled = False  # type: ignore[attr-defined]
    assert core.read("/r", 4, 0, fh) == b"data"
    core.release("/r", fh)


def test_create_never_leaves_a_file_without_header(core: KmsfsCore, tmp_path: Path) -> None:
    core.client.disabled = True  # type: ignore[attr-defined]
    with pytest.raises(KeyServiceError):
        core.create("/nokey", 0o644, caller("/nokey"))
    assert not (tmp_path / "cipher" / "nokey").exists()
    core.client.disabled = False  # type: ignore[attr-defined]
    fh = core.create("/ok", 0o4755, caller("/ok"))
    backing = tmp_path / "cipher" / "ok"
    assert fmt.parse_header(os.getxattr(backing, fmt.HEADER_XATTR)).version == 3
    assert backing.stat().st_mode & 0o7777 == 0o4755
    core.release("/ok", fh)
    with pytest.raises(FileExistsError):
        core.create("/ok", 0o644, caller("/ok"), os.O_RDWR | os.O_CREAT | os.O_EXCL)


@pytest.mark.parametrize("flags", [os.O_RDONLY, os.O_RDWR])
@pytest.mark.parametrize(("preferred", "fallback"), [(0, 5000), (3, 9000), (9000, 3)])
def test_interrupted_size_change_is_recovered_by_a_read_only_open(
    core: KmsfsCore, flags: int, preferred: int, fallback: int
) -> None:
    """A kill -9 can leave the size-change marker on a file (e.g. an `open(..., "wb")` cut down to
    0 bytes); the next open must settle it even when it only asks to read (it used to fail with
    EINVAL: ftruncate on the read-only backing descriptor)."""
    fh = core.create("/m.bin", 0o100644, caller("/m.bin"))
    data = os.urandom(fallback)
    core.write("/m.bin", data[:fallback], 0, fh)
    handle = core._handles[fh]  # noqa: SLF001 - simulating the crash point
    handle.efile._set_marker(preferred, fallback)  # noqa: SLF001
    if preferred == 0:
        os.ftruncate(handle.fd, handle.efile.data_offset)  # the truncate happened, not the clear
    core.release("/m.bin", fh)
    fh = core.open("/m.bin", flags, caller("/m.bin"))
    size = core.getattr("/m.bin", fh)["st_size"]
    assert size in (preferred, fallback)
    assert core.read("/m.bin", 20000, 0, fh) == (data + bytes(preferred))[:size]
    core.release("/m.bin", fh)
    assert fmt.RESIZE_XATTR not in os.listxattr(os.path.join(core.root, "m.bin"))
