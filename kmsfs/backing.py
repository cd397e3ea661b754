"""Walking a cipherdir's backing files, shared by the offline tools (fsck, rewrap, info).

Why here: which names are reserved, what counts as a backing file and how a mount path maps back
to its cipherdir are the same questions for every tool.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator

from kmsfs.config import RESERVED_PREFIX
from kmsfs.core import TEMP_PREFIX
from kmsfs.mountlock import kmsfs_mounts


def backing_names(cipherdir: str) -> Iterator[tuple[str, str]]:
    """``(dirpath, name)`` of every file name os.walk lists below the cipherdir (resolved), directories
    and names in sorted order, skipping the reserved names at its root."""
    root = os.path.realpath(cipherdir)
    for dirpath, dirnames, filenames in os.walk(root):
        if dirpath == root:
            dirnames[:] = [d for d in dirnames if not d.startswith(RESERVED_PREFIX)]
            filenames = [f for f in filenames if not f.startswith(RESERVED_PREFIX)]
        dirnames.sort()
        for name in sorted(filenames):
            yield dirpath, name


def backing_files(cipherdir: str) -> Iterator[str]:
    """Every regular backing file (one path per inode), sorted, skipping reserved root names."""
    seen: set[tuple[int, int]] = set()
    for dirpath, name in backing_names(cipherdir):
        path = os.path.join(dirpath, name)
        st = os.lstat(path)
        if not stat.S_ISREG(st.st_mode):
            continue
        ident = (st.st_dev, st.st_ino)
        if ident in seen:
            continue
        seen.add(ident)
        yield path


def leftover_temporaries(cipherdir: str) -> list[str]:
    """Temporary files of an interrupted create (only where O_TMPFILE is unsupported)."""
    found = []
    for dirpath, _, filenames in os.walk(os.path.realpath(cipherdir)):
        found += [os.path.join(dirpath, n) for n in filenames if n.startswith(TEMP_PREFIX)]
    return sorted(found)


def backing_path_of(path: str) -> str:
    """The backing file of a path inside a mounted kmsfs (via /proc/mounts), else ``path`` itself."""
    real = os.path.realpath(path)
    best = ("", "")
    for source, target in kmsfs_mounts():
        inside = real == target or real.startswith(target.rstrip("/") + "/")
        if inside and len(target) > len(best[0]):
            best = (target, source)
    if not best[0]:
        return path
    rel = os.path.relpath(real, best[0])
    return os.path.join(best[1], rel) if rel != "." else best[1]
