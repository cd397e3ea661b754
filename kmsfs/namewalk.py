"""Encrypted names for the offline tools: map a backing tree to plaintext paths and back.

Why apart from kmsfs/namespace.py: the mount works on pinned descriptors one lookup at a time;
the tools (``kmsfs fsck``, ``path encrypt/decrypt``, ``info``) walk a whole unmounted (or
mounted) cipherdir by path as the operator names it, and report what does not decrypt instead
of hiding it. Both use kmsfs/names.py for the format itself.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass, field

from kmsfs.config import RESERVED_PREFIX
from kmsfs.core import TEMP_PREFIX
from kmsfs.names import (
    DIRID_FILE,
    LONGNAME_SIDE_SUFFIX,
    BadName,
    NameCipher,
    is_long,
    is_reserved,
    long_side_name,
)

_SIDE_MAX = 512


@dataclass
class NameReport:
    plain: dict[str, str] = field(default_factory=dict)  # backing path -> path inside the fs
    bad: list[tuple[str, str]] = field(default_factory=list)  # (backing path, why): hidden entries
    orphans: list[str] = field(default_factory=list)  # side entries without their entry


def _read(path: str, limit: int) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        return os.read(fd, limit + 1)
    finally:
        os.close(fd)


def dir_id_of(cipher: NameCipher, backing_dir: str) -> bytes:
    """The directory id in ``backing_dir/kmsfs.dirid``; BadName if missing or not authentic."""
    try:
        return cipher.parse_dirid_file(_read(os.path.join(backing_dir, DIRID_FILE), 64))
    except OSError:
        raise BadName() from None


def _side(backing_dir: str, name: str) -> bytes | None:
    try:
        return _read(os.path.join(backing_dir, long_side_name(name)), _SIDE_MAX)
    except OSError:
        return None


def walk_names(cipherdir: str, cipher: NameCipher) -> NameReport:
    """Every backing entry's plaintext path, the entries that fail, and orphan side entries."""
    root = os.path.realpath(cipherdir)
    report = NameReport()
    pending = [(root, "")]
    while pending:
        backing_dir, plain_dir = pending.pop()
        try:
            names = sorted(os.listdir(backing_dir))
        except OSError as exc:
            report.bad.append((backing_dir, f"unreadable directory ({exc.strerror})"))
            continue
        try:
            dir_id = dir_id_of(cipher, backing_dir)
        except BadName:
            users = [n for n in names if not n.startswith((RESERVED_PREFIX, TEMP_PREFIX))
                     and not is_reserved(n)]
            if users:
                report.bad.append((backing_dir, f"{DIRID_FILE} missing or not authentic: "
                                   f"{len(users)} entries unreadable"))
            continue
        present = set(names)
        for name in names:
            path = os.path.join(backing_dir, name)
            if (backing_dir == root and name.startswith(RESERVED_PREFIX)) or name.startswith(TEMP_PREFIX):
                continue
            if is_reserved(name):
                if name.endswith(LONGNAME_SIDE_SUFFIX) and name[: -len(LONGNAME_SIDE_SUFFIX)] not in present:
                    report.orphans.append(path)
                continue
            try:
                plain = cipher.plain_name(dir_id, name, _side(backing_dir, name) if is_long(name) else None)
            except BadName:
                report.bad.append((path, "name fails authentication (edited, moved from another "
                                   "directory, or a side entry that is not its own)"))
                continue
            plain_path = plain_dir + "/" + os.fsdecode(plain)
            report.plain[path] = plain_path
            if stat.S_ISDIR(os.lstat(path).st_mode):
                pending.append((path, plain_path))
    return report


def encrypt_path(cipherdir: str, cipher: NameCipher, plain_path: str) -> str:
    """The backing path of ``/plain/path`` (its parent directories must exist)."""
    backing_dir = os.path.realpath(cipherdir)
    parts = [p for p in plain_path.split("/") if p]
    for i, part in enumerate(parts):
        if part in (".", ".."):
            raise ValueError("a path inside the filesystem has no . or .. components")
        try:
            dir_id = dir_id_of(cipher, backing_dir)
        except BadName:
            raise FileNotFoundError(errno.ENOENT, "no authentic directory id in",
                                    backing_dir) from None
        name, _ = cipher.backing_name(dir_id, os.fsencode(part))
        backing_dir = os.path.join(backing_dir, name)
        if i < len(parts) - 1 and not os.path.isdir(backing_dir):
            raise FileNotFoundError(errno.ENOENT, "no such directory", "/" + "/".join(parts[: i + 1]))
    return backing_dir


def decrypt_path(cipherdir: str, cipher: NameCipher, backing_path: str) -> str:
    """The path inside the filesystem of a backing path (absolute, or relative to the cipherdir)."""
    root = os.path.realpath(cipherdir)
    full = backing_path if os.path.isabs(backing_path) else os.path.join(root, backing_path)
    full = os.path.abspath(full)
    rel = os.path.relpath(full, root)
    if rel == ".":
        return "/"
    if rel.startswith(".."):
        raise ValueError(f"{backing_path} is not inside {cipherdir}")
    backing_dir, plain = root, []
    for part in rel.split("/"):
        dir_id = dir_id_of(cipher, backing_dir)
        side = _side(backing_dir, part) if is_long(part) else None
        plain.append(os.fsdecode(cipher.plain_name(dir_id, part, side)))
        backing_dir = os.path.join(backing_dir, part)
    return "/" + "/".join(plain)


def find_inode(cipherdir: str, ino: int) -> str | None:
    """The first backing path (sorted walk) of the regular file with inode number ``ino``."""
    for dirpath, dirnames, filenames in os.walk(os.path.realpath(cipherdir)):
        dirnames.sort()
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            if st.st_ino == ino and stat.S_ISREG(st.st_mode):
                return path
    return None
