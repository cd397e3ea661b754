"""Offline tools over a temporary cipherdir with a fake key service: rewrap resumes, fsck reports."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import pytest
from test_core import ARN, FakeKeyService

from kmsfs import format as fmt
from kmsfs import headers
from kmsfs.config import Config
from kmsfs.core import KmsfsCore
from kmsfs.fsck import XATTR_DIFFERS, XATTR_MISSING, fsck
from kmsfs.keyclient import KeyServiceUnavailable
from kmsfs.progress import Progress
from kmsfs.rewrap import JOURNAL, rewrap


class RewrappingService(FakeKeyService):
    """Adds ReEncrypt (same wrapping, new ARN) and can fail after ``budget`` calls."""

    def __init__(self) -> None:
        super().__init__()
        self.budget: int | None = None

    def re_encrypt(self, blob: bytes, ctx: dict[str, str], dest: str, caller: Any) -> tuple[bytes, str]:
        if self.budget is not None:
            if self.budget <= 0:
                raise KeyServiceUnavailable("down")
            self.budget -= 1
        self.calls.append(("ReEncrypt", ctx, caller))
        return blob, dest


@pytest.fixture
def populated(tmp_path: Path) -> tuple[Path, RewrappingService]:
    root = tmp_path / "cipher"
    root.mkdir()
    config = Config(endpoint="http://x", region="us-east-1", key_id="k1", key_arn=ARN)
    config.save(root)
    service = RewrappingService()
    core = KmsfsCore(str(root), config, service)  # type: ignore[arg-type]
    for i in range(6):
        fh = core.create(f"/f{i}", 0o644, {"path": f"/f{i}"})
        core.write(f"/f{i}", os.urandom(i * 3000), 0, fh)
        core.release(f"/f{i}", fh)
    return root, service


def test_rewrap_is_resumable(populated: tuple[Path, RewrappingService]) -> None:
    root, service = populated
    service.budget = 4
    with pytest.raises(KeyServiceUnavailable):
        rewrap(str(root), service, "arn:new", progress=False)  # type: ignore[arg-type]
    assert len((root / JOURNAL).read_text().splitlines()) == 1 + 4
    service.budget = None
    report = rewrap(str(root), service, "arn:new", progress=False)  # type: ignore[arg-type]
    assert (report.rewrapped, report.skipped, report.failed) == (2, 4, {})
    assert not (root / JOURNAL).exists()
    for i in range(6):
        assert fmt.parse_header(os.getxattr(root / f"f{i}", fmt.HEADER_XATTR)).key_arn == "arn:new"


def test_fsck_reports_damage_and_pending(populated: tuple[Path, RewrappingService]) -> None:
    root, service = populated
    assert fsck(str(root), service, progress=False).clean  # type: ignore[arg-type]
    with open(root / "f3", "r+b") as f:
        f.seek(headers.data_offset(f.fileno()) + fmt.block_offset(1) + 50)
        f.write(b"\x00\x01")
    os.removexattr(root / "f4", fmt.HEADER_XATTR)  # a copy that dropped xattrs: the in-file copy serves
    os.setxattr(root / "f5", fmt.HEADER_XATTR, os.getxattr(root / "f1", fmt.HEADER_XATTR))  # swapped
    report = fsck(str(root), service, progress=False)  # type: ignore[arg-type]
    assert not report.clean and report.files == 6
    assert report.damaged["/f3"] == ["block 1 failed authentication"]
    assert "/f4" not in report.damaged and report.notes["/f4"] == [XATTR_MISSING]
    assert report.damaged["/f5"] == [XATTR_DIFFERS]
    assert fmt.HEADER_XATTR not in os.listxattr(root / "f4")  # fsck alone never writes
    report = fsck(str(root), service, progress=False, repair=True)  # type: ignore[arg-type]
    assert report.repaired == ["/f4"] and "/f4" not in report.notes
    with open(root / "f4", "rb") as f:
        assert os.getxattr(root / "f4", fmt.HEADER_XATTR) == headers.in_file_copy(f.fileno())
    assert report.damaged["/f5"] == [XATTR_DIFFERS]  # differing pairs are never "repaired"
    assert "kmsfs-fsck-repair" in {call[2]["process"] for call in service.calls if call[0] == "Decrypt"}


def test_rewrap_rewrites_the_in_file_copy_too(populated: tuple[Path, RewrappingService]) -> None:
    root, service = populated
    rewrap(str(root), service, "arn:new", progress=False)  # type: ignore[arg-type]
    for i in range(6):
        fd = os.open(root / f"f{i}", os.O_RDONLY)
        try:
            assert headers.in_file_copy(fd) == os.getxattr(root / f"f{i}", fmt.HEADER_XATTR)
            assert headers.read_header(fd).key_arn == "arn:new"
        finally:
            os.close(fd)


def test_progress_line_for_non_terminals() -> None:
    out = io.StringIO()
    bar = Progress(3, "job", stream=out, every=2)
    for _ in range(3):
        bar.tick("x")
    bar.done()
    assert out.getvalue() == "job: 2/3\njob: 3/3\n"
