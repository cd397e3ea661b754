"""A key service whose audit directory is a small tmpfs that tests can fill to the last byte."""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.conftest import DevKeyService, start_dev_service, stop_dev_service


@contextmanager
def small_audit_disk(base: Path, size: str = "512k") -> Iterator[tuple[DevKeyService, Path]]:
    """A dev service under ``base`` whose audit directory is a ``size`` tmpfs, unmounted afterwards."""
    audit_dir = base / "keyservice-data" / "audit"
    audit_dir.mkdir(parents=True)
    options = f"size={size},mode=0700"
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(audit_dir)], check=True)
    try:
        service = start_dev_service(base)
        try:
            yield service, audit_dir
        finally:
            stop_dev_service(service)
    finally:
        subprocess.run(["umount", "-l", str(audit_dir)], check=False)


def fill(directory: Path) -> Path:
    """Fill the file system to the last byte; returns the filler file (unlink it to free the space)."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (1 << 16, 4096, 1):
            while True:
                try:
                    os.write(fd, b"\0" * size)
                except OSError as error:
                    assert error.errno == errno.ENOSPC
                    break
    finally:
        os.close(fd)
    return filler
