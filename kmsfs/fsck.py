"""``kmsfs fsck``: verify every header and every block of a cipherdir through the key service.

Why offline and read-only: fsck must be safe to run on a damaged store and while mounted; it
unwraps each data key (Decrypt, audited like an open), authenticates every block with the same
code the mount uses, and reports — it never rewrites. An interrupted size change (crash) is
reported as pending: the next open through the mount completes it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from kmsfs.backing import backing_files, leftover_temporaries
from kmsfs.cipher import IntegrityError
from kmsfs.encfile import EncryptedFile
from kmsfs.format import HEADER_XATTR, CorruptHeader, parse_header
from kmsfs.keyclient import KeyClient, KeyServiceError, KeyServiceUnavailable
from kmsfs.names import NameCipher, is_reserved
from kmsfs.namewalk import walk_names
from kmsfs.progress import Progress
from kmsfs.toolcaller import plaintext_path, tool_caller


@dataclass
class FsckReport:
    files: int = 0
    blocks: int = 0
    damaged: dict[str, list[str]] = field(default_factory=dict)
    pending: list[str] = field(default_factory=list)
    temporaries: list[str] = field(default_factory=list)
    bad_names: list[tuple[str, str]] = field(default_factory=list)  # (backing path, why)
    orphan_names: list[str] = field(default_factory=list)  # long-name side entries left by a crash

    @property
    def clean(self) -> bool:
        return not self.damaged and not self.bad_names


def check_file(path: str, client: KeyClient, name: str | None = None) -> tuple[int, list[str], bool]:
    """(blocks checked, problems, size change pending) for one backing file; ``name`` is its path
    inside the filesystem, which the key service audits (default: the backing path)."""
    try:
        header = parse_header(os.getxattr(path, HEADER_XATTR))
    except OSError as exc:
        return 0, [f"header: unreadable or missing ({exc.strerror})"], False
    except CorruptHeader as exc:
        return 0, [f"header: {exc}"], False
    try:
        key = client.decrypt(header.wrapped_key, header.encryption_context(),
                             tool_caller("fsck", name or path), key_id=header.key_arn)
    except KeyServiceError as exc:
        reason = "key deleted: file unrecoverable" if exc.code == "NotFoundException" else str(exc)
        return 0, [f"key: {reason}"], False
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        efile = EncryptedFile(fd, key, header.file_id, header.block_size, header.version)
        try:
            pending = efile.pending_marker() is not None
        except CorruptHeader as exc:
            return 0, [f"size-change marker: {exc}"], False
        if pending:
            return 0, [], True
        blocks = -(-efile.size() // header.block_size)
        try:
            problems = [reason for _, reason in efile.verify()]
        except IntegrityError as exc:  # pragma: no cover - verify collects, never raises
            problems = [str(exc)]
        return blocks, problems, False
    finally:
        os.close(fd)


def fsck(cipherdir: str, client: KeyClient, progress: bool = True,
         names: NameCipher | None = None) -> FsckReport:
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
    for path in paths:
        rel = plaintext_path(root, path) if plain is None else plain[path]
        try:
            blocks, problems, pending = check_file(path, client, rel)
        except KeyServiceUnavailable:
            raise
        except OSError as exc:
            blocks, problems, pending = 0, [f"I/O error: {exc}"], False
        report.files += 1
        report.blocks += blocks
        if problems:
            report.damaged[rel] = problems
        if pending:
            report.pending.append(rel)
        if bar:
            bar.tick(rel)
    if bar:
        bar.done()
    report.temporaries = ["/" + os.path.relpath(p, root) for p in leftover_temporaries(cipherdir)]
    return report
