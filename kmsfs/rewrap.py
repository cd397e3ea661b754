"""``kmsfs rewrap``: move every wrapped data key to the newest key version or another key (F7).

Why ReEncrypt: the service re-wraps the data key without showing it to us, and the contents (and
the file id, which is the encryption context) stay as they are. Safe while mounted: the mount
keeps using the data key it unwrapped, and the header is replaced with one atomic setxattr under
an exclusive flock that the mount also takes when it replaces a header. Resumable: finished paths
are appended to ``CIPHERDIR/.kmsfs.rewrap`` (first line: the target), so a rerun with the same
target skips them; the journal is removed when a run completes.
"""

from __future__ import annotations

import fcntl
import os
from dataclasses import dataclass, field

from kmsfs.backing import backing_files
from kmsfs.config import Config, ConfigError
from kmsfs.dirkeys import rewrap_dirkey_files
from kmsfs.format import FORMAT_V4, CorruptHeader, Header, directory_context, pack_dir_wrapped, parse_header
from kmsfs.headers import get_xattr, in_file_copy, update_copy
from kmsfs.keyclient import KeyClient, KeyServiceError
from kmsfs.names import NameCipher
from kmsfs.namewalk import walk_names
from kmsfs.progress import Progress
from kmsfs.toolcaller import plaintext_path, tool_caller

JOURNAL = ".kmsfs.rewrap"


@dataclass
class RewrapReport:
    rewrapped: int = 0
    skipped: int = 0
    failed: dict[str, str] = field(default_factory=dict)
    keys: dict[str, int] = field(default_factory=dict)


def _journal(cipherdir: str, target: str) -> tuple[set[str], int]:
    path = os.path.join(cipherdir, JOURNAL)
    done: set[str] = set()
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
        if lines and lines[0] == target:
            done = set(lines[1:])
    except FileNotFoundError:
        pass
    # O_NOFOLLOW: the journal lives in the (untrusted) cipherdir; never follow a planted symlink.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    if not done:
        os.ftruncate(fd, 0)
        os.write(fd, (target + "\n").encode())
    return done, fd


def rewrap_file(path: str, client: KeyClient, destination: str | None, name: str | None = None,
                cipherdir_id: str = "") -> str:
    """Re-wrap one file's key; returns the new key ARN. Raises on any failure. ``name`` is the
    path inside the filesystem, which the key service audits (default: the backing path). A
    version-4 file has its directory key's wrapped form re-wrapped (context: ``cipherdir_id`` and
    its directory id); its locally wrapped data key stays as it is."""
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        # The xattr is the primary. If it differs from the in-file copy, a rewrap was interrupted
        # between the two writes (or someone tampered): rewrapping from the xattr and writing
        # both settles the former; the latter stays unreadable (the file id binds the blocks).
        raw = get_xattr(fd) or in_file_copy(fd)
        if raw is None:
            raise CorruptHeader("backing file has no kmsfs header")
        header = parse_header(raw)
        caller = tool_caller("rewrap", name or path)
        if header.version == FORMAT_V4:
            inner = header.directory_wrapped
            context = directory_context(cipherdir_id, inner.dir_id)
            blob, arn = client.re_encrypt(inner.wrapped_dir_key, context, destination or header.key_arn,
                                          caller)
            blob = pack_dir_wrapped(inner.dir_id, blob, inner.sealed_key)
        else:
            blob, arn = client.re_encrypt(header.wrapped_key, header.encryption_context(),
                                          destination or header.key_arn, caller)
        new = Header(file_id=header.file_id, key_arn=arn, wrapped_key=blob,
                     block_size=header.block_size, version=header.version)
        update_copy(fd, new)  # the in-file copy (format 3), then the xattr
        return arn
    finally:
        os.close(fd)  # also releases the flock


def rewrap(cipherdir: str, client: KeyClient, destination: str | None,
           progress: bool = True, names: NameCipher | None = None) -> RewrapReport:
    """``names``: the name cipher of a name-encrypting cipherdir (bookkeeping entries are skipped,
    the audit records plaintext paths; entries whose name fails are left to fsck)."""
    report = RewrapReport()
    root = os.path.realpath(cipherdir)
    target = destination or "newest-version"
    done, journal = _journal(root, target)
    paths = list(backing_files(root))
    plain: dict[str, str] | None = None
    if names is not None:
        plain = walk_names(root, names).plain
        paths = [p for p in paths if p in plain]
    bar = Progress(len(paths), "rewrap") if progress else None
    try:
        cipherdir_id = Config.load(root).cipherdir_id
        dirkeys = Config.load(root).directory_keys
    except ConfigError:
        cipherdir_id, dirkeys = "", False
    try:
        for path in paths:
            rel = plaintext_path(root, path) if plain is None else plain[path]
            if rel in done:
                report.skipped += 1
            else:
                try:
                    arn = rewrap_file(path, client, destination, rel, cipherdir_id)
                except (OSError, CorruptHeader, KeyServiceError) as exc:
                    report.failed[rel] = str(exc)
                else:
                    report.rewrapped += 1
                    report.keys[arn] = report.keys.get(arn, 0) + 1
                    os.write(journal, (rel + "\n").encode())
            if bar:
                bar.tick(rel)
        if dirkeys:  # the directories' own keys, which new files are wrapped under
            for rel, problem in rewrap_dirkey_files(root, client, destination, cipherdir_id):
                report.failed[rel] = problem
    finally:
        os.close(journal)
        if bar:
            bar.done()
    if not report.failed:
        os.unlink(os.path.join(root, JOURNAL))
    return report
