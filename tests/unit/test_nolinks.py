"""Creates on filesystems without hard links: rename that never replaces."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from kmsfs import nolinks


def test_rename_noreplace_refuses_an_existing_name(tmp_path: Path) -> None:
    (tmp_path / "tmp").write_bytes(b"new")
    (tmp_path / "taken").write_bytes(b"old")
    with pytest.raises(OSError) as info:
        nolinks.rename_noreplace(str(tmp_path / "tmp"), str(tmp_path / "taken"))
    assert info.value.errno == errno.EEXIST and (tmp_path / "taken").read_bytes() == b"old"
    nolinks.rename_noreplace(str(tmp_path / "tmp"), str(tmp_path / "free"))
    assert (tmp_path / "free").read_bytes() == b"new" and not (tmp_path / "tmp").exists()


def test_link_or_rename_falls_back_when_links_are_refused(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "tmp").write_bytes(b"data")

    def no_links(*_: object, **__: object) -> None:
        raise OSError(errno.EPERM, "hard links not supported")

    monkeypatch.setattr(os, "link", no_links)
    nolinks.link_or_rename(str(tmp_path / "tmp"), str(tmp_path / "name"))
    assert (tmp_path / "name").read_bytes() == b"data"
