"""``kmsfs fsck``: verify every header and every block of a cipherdir through the key service.

Why offline and read-only: fsck must be safe to run on a damaged store and while mounted; it
unwraps each data key (Decrypt, audited like an open), authenticates every block with the same
code the mount uses, and reports — it never rewrites data. An interrupted size change (crash) is
reported as pending: the next open through the mount completes it.

Beyond damage it reports what backups need (issue 13): files whose header xattr is missing (the
in-file copy is used) or differs from the in-file copy (damage: tampering, or an interrupted
rewrap), and files of an old format — version 2 has no in-file copy, version 1 also cannot
authenticate its size ("not protected against truncation"). ``repair=True`` restores a missing
xattr from the in-file copy, only once the file's key unwrapped and every block authenticated;
the Decrypt it needs is audited with process ``kmsfs-fsck-repair``. Nothing is re-encrypted.
"""

from __future__ import annotations

import errno
import hmac
import os
from dataclasses import dataclass, field

from kmsfs.backing import backing_files, leftover_temporaries
from kmsfs.cipher import IntegrityError
from kmsfs.config import Config, ConfigError
from kmsfs.dirkeys import tool_file_key
from kmsfs.encfile import EncryptedFile
from kmsfs.format import FORMAT_V1, FORMAT_V3, FORMAT_V4, HEADER_XATTR, CorruptHeader, parse_header
from kmsfs.headers import NO_XATTRS, in_file_copy, restore_xattr
from kmsfs.keyclient import KeyClient, KeyServiceError, KeyServiceUnavailable
from kmsfs.names import NameCipher, is_reserved
from kmsfs.namewalk import walk_names
from kmsfs.progress import Progress
from kmsfs.toolcaller import plaintext_path, tool_caller

OLD_FORMAT = ("format version {v}: no in-file header copy (a copy that drops xattrs loses its key; "
              "run kmsfs upgrade)")
NOT_TRUNCATION_SAFE = "format version 1: not protected against truncation (run kmsfs upgrade)"
XATTR_MISSING = "header xattr missing: the in-file copy is used (kmsfs fsck --repair restores it)"
XATTR_DIFFERS = ("header xattr and in-file header copy differ (tampering, or an interrupted rewrap: "
                 "run it again)")


@dataclass
class FileCheck:
    """What fsck found in one backing file."""

    blocks: int = 0
    problems: list[str] = field(default_factory=list)  # damage: the file (or part) does not read
    notes: list[str] = field(default_factory=list)  # reads fine, but a backup or repair matters
    pending: bool = False
    repaired: bool = False


@dataclass
class FsckReport:
    files: int = 0
    blocks: int = 0
    damaged: dict[str, list[str]] = field(default_factory=dict)
    notes: dict[str, list[str]] = field(default_factory=dict)
    pending: list[str] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)
    temporaries: list[str] = field(default_factory=list)
    bad_names: list[tuple[str, str]] = field(default_factory=list)  # (backing path, why)
    orphan_names: list[str] = field(default_factory=list)  # long-name side entries left by a crash

    @property
    def clean(self) -> bool:
        return not self.damaged and not self.bad_names


def _header_sources(fd: int, check: FileCheck) -> bytes | None:
    """The header bytes to use, noting missing/old/differing copies; None if there is none."""
    supported = True
    try:
        xattr: bytes | None = os.getxattr(fd, HEADER_XATTR)
    except OSError as exc:
        xattr, supported = None, exc.errno not in NO_XATTRS
        if exc.errno != errno.ENODATA and supported:
            check.problems.append(f"header: unreadable ({exc.strerror})")
            return None
    try:
        copy = in_file_copy(fd)
    except CorruptHeader as exc:
        check.problems.append(f"in-file header copy: {exc}")
        return None
    if xattr is not None and copy is not None and not hmac.compare_digest(xattr, copy):
        check.problems.append(XATTR_DIFFERS)
        return None
    if xattr is None and copy is None:
        check.problems.append("header: missing (no xattr and no in-file copy)")
        return None
    if xattr is None and supported:  # (a filesystem without xattrs: the copy is the header)
        check.notes.append(XATTR_MISSING)
    return xattr if xattr is not None else copy


def check_file(path: str, client: KeyClient, repair: bool = False, name: str | None = None,
               cipherdir_id: str = "") -> FileCheck:
    """Check one backing file; with ``repair``, restore a missing xattr once all is verified.
    ``name`` is its path inside the filesystem, which the key service audits (default: the
    backing path). ``cipherdir_id``: part of a directory key's context (version-4 files)."""
    check = FileCheck()
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    try:
        raw = _header_sources(fd, check)
        if raw is None:
            return check
        try:
            header = parse_header(raw)
        except CorruptHeader as exc:
            check.problems.append(f"header: {exc}")
            return check
        if header.version < FORMAT_V3:
            if in_file_copy(fd) is not None:
                check.problems.append("header xattr is of an old version but the file has a version-3 prefix")
                return check
            check.notes.append(OLD_FORMAT.format(v=header.version))
            if header.version == FORMAT_V1:
                check.notes.append(NOT_TRUNCATION_SAFE)
        caller = tool_caller("fsck-repair" if repair else "fsck", name or path)
        try:
            if header.version == FORMAT_V4:  # one Decrypt of its directory key, then a local unwrap
                key = tool_file_key(client, cipherdir_id, header, caller)
            else:
                key = client.decrypt(header.wrapped_key, header.encryption_context(), caller,
                                     key_id=header.key_arn)
        except KeyServiceError as exc:
            reason = "key deleted: file unrecoverable" if exc.code == "NotFoundException" else str(exc)
            check.problems.append(f"key: {reason}")
            return check
        except CorruptHeader as exc:
            check.problems.append(f"key: {exc}")
            return check
        try:
            efile = EncryptedFile(fd, key, header.file_id, header.block_size, header.version)
            marker = efile.pending_marker()
        except CorruptHeader as exc:
            check.problems.append(f"size-change marker: {exc}")
            return check
        if marker is not None:
            check.pending = True
            return check
        check.blocks = -(-efile.size() // header.block_size)
        try:
            check.problems += [reason for _, reason in efile.verify()]
        except IntegrityError as exc:  # pragma: no cover - verify collects, never raises
            check.problems.append(str(exc))
        if repair and not check.problems and XATTR_MISSING in check.notes and restore_xattr(fd, raw):
            check.notes.remove(XATTR_MISSING)
            check.repaired = True
        return check
    finally:
        os.close(fd)


def fsck(cipherdir: str, client: KeyClient, progress: bool = True,
         names: NameCipher | None = None, repair: bool = False) -> FsckReport:
    """``names``: the name cipher of a name-encrypting cipherdir (every name is checked, and the
    audit records plaintext paths); files whose name fails are reported, not opened."""
    report = FsckReport()
    paths = list(backing_files(cipherdir))
    root = os.path.realpath(cipherdir)
    plain: dict[str, str] | None = None
    if names is not None:
        walked = walk_names(cipherdir, names)
        report.bad_names, report.orphan_names = walked.bad, walked.orphans
        plain = walked.plain
        paths = [p for p in paths if p in plain and not is_reserved(os.path.basename(p))]
    bar = Progress(len(paths), "fsck") if progress else None
    cipherdir_id = _cipherdir_id(cipherdir)
    for path in paths:
        rel = plaintext_path(root, path) if plain is None else plain[path]
        try:
            check = check_file(path, client, repair, rel, cipherdir_id)
        except KeyServiceUnavailable:
            raise
        except OSError as exc:
            check = FileCheck(problems=[f"I/O error: {exc}"])
        report.files += 1
        report.blocks += check.blocks
        if check.problems:
            report.damaged[rel] = check.problems
        if check.notes:
            report.notes[rel] = check.notes
        if check.pending:
            report.pending.append(rel)
        if check.repaired:
            report.repaired.append(rel)
        if bar:
            bar.tick(rel)
    if bar:
        bar.done()
    report.temporaries = ["/" + os.path.relpath(p, root) for p in leftover_temporaries(cipherdir)]
    return report


def _cipherdir_id(cipherdir: str) -> str:
    """The cipherdir id (part of a directory key's encryption context), "" if it has none."""
    try:
        return Config.load(cipherdir).cipherdir_id
    except ConfigError:
        return ""
