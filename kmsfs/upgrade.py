"""``kmsfs upgrade``: convert format-1/2 files to format 3, crash-safely, with the cipherdir unmounted.

Why a rewrite and not an edit in place: format 3 puts a prefix before block 0, so every block
moves, and its AAD names version 3. Each file is rebuilt beside the original under a hidden
temporary name (``.kmsfs-tmp-…``, which fsck reports as LEFTOVER and the next upgrade removes),
fsynced, and renamed over the original: a kill -9 at any moment leaves every name either the old
file or the complete new one. The data key and file id stay (the wrapped key is reused verbatim:
its encryption context is the file id), so the only key-service call is one audited Decrypt per
file (process ``kmsfs-upgrade``). Plaintext blocks that are all zeros become recorded holes.
Owner, mode, times and user xattrs are copied.

Hard links: every name of an inode is renamed to the one new inode. A crash in the middle of that
leaves the names as separate files with identical contents (each readable), not a broken one.

Unmounted only: a mount holding the old inode open would keep writing to it after the rename.
"""

from __future__ import annotations

import dataclasses
import os
import stat
from dataclasses import dataclass, field

from kmsfs.backing import backing_names, leftover_temporaries
from kmsfs.cipher import BlockCipher
from kmsfs.config import Config, ConfigError
from kmsfs.core import TEMP_PREFIX
from kmsfs.encfile import EncryptedFile
from kmsfs.format import FORMAT_V3, Header
from kmsfs.headers import read_header, write_new
from kmsfs.holes import all_zero
from kmsfs.keyclient import KeyClient, KeyServiceError
from kmsfs.mountlock import kmsfs_mounts
from kmsfs.names import is_reserved
from kmsfs.progress import Progress

_CHUNK = 1 << 20  # plaintext bytes copied per step


class UpgradeRefused(Exception):
    """The cipherdir is mounted (or otherwise cannot be upgraded now)."""


@dataclass
class UpgradeReport:
    upgraded: int = 0
    current: int = 0
    failed: dict[str, str] = field(default_factory=dict)


def is_mounted(cipherdir: str) -> bool:
    """Whether a kmsfs mount serves this cipherdir (from /proc/mounts)."""
    root = os.path.realpath(cipherdir)
    return any(os.path.realpath(source) == root for source, _ in kmsfs_mounts())


def inodes(cipherdir: str) -> list[list[str]]:
    """Every regular backing file's names, grouped by inode (hard links together), sorted. In a
    name-encrypting cipherdir the name bookkeeping files (directory ids, long-name side entries,
    long symlink targets) carry no header and are left alone."""
    try:
        encrypted = Config.load(cipherdir).encrypted_names
    except ConfigError:
        encrypted = False
    groups: dict[tuple[int, int], list[str]] = {}
    for dirpath, name in backing_names(cipherdir):
        if name.startswith(TEMP_PREFIX) or (encrypted and is_reserved(name)):
            continue
        path = os.path.join(dirpath, name)
        st = os.lstat(path)
        if stat.S_ISREG(st.st_mode):
            groups.setdefault((st.st_dev, st.st_ino), []).append(path)
    return sorted(groups.values())


def upgrade(cipherdir: str, client: KeyClient, progress: bool = True) -> UpgradeReport:
    if is_mounted(cipherdir):
        raise UpgradeRefused(f"{cipherdir} is mounted: unmount it before kmsfs upgrade")
    for leftover in leftover_temporaries(cipherdir):  # an interrupted upgrade's (or create's) copy
        os.unlink(leftover)
    report = UpgradeReport()
    groups = inodes(cipherdir)
    bar = Progress(len(groups), "upgrade") if progress else None
    root = os.path.realpath(cipherdir)
    for names in groups:
        rel = "/" + os.path.relpath(names[0], root)
        try:
            if upgrade_file(names, client):
                report.upgraded += 1
            else:
                report.current += 1
        except KeyServiceError as exc:
            report.failed[rel] = f"key: {exc}"
        except (OSError, ValueError) as exc:
            report.failed[rel] = str(exc)
        except Exception as exc:  # CorruptHeader, IntegrityError: reported, the file left as it is
            report.failed[rel] = f"{type(exc).__name__}: {exc}"
        if bar:
            bar.tick(rel)
    if bar:
        bar.done()
    return report


def upgrade_file(names: list[str], client: KeyClient) -> bool:
    """Rebuild one inode (all its ``names``) in format 3; False if it already is."""
    fd = os.open(names[0], os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
    try:
        header = read_header(fd, restore=False)
        if header.version >= FORMAT_V3:
            return False
        key = client.decrypt(header.wrapped_key, header.encryption_context(),
                             {"path": names[0], "process": "kmsfs-upgrade"}, key_id=header.key_arn)
        cipher = BlockCipher(key)
        old = EncryptedFile(fd, cipher, header.file_id, header.block_size, header.version)
        old.recover()  # an interrupted version-2 size change settles first
        temp = os.path.join(os.path.dirname(names[0]), TEMP_PREFIX + os.urandom(8).hex())
        tfd = os.open(temp, os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_CLOEXEC, 0o600)
        try:
            _rebuild(old, tfd, dataclasses.replace(header, version=FORMAT_V3), cipher)
            _copy_metadata(fd, tfd)
            os.fsync(tfd)
            _swap_in(temp, names)
        except BaseException:
            try:
                os.unlink(temp)
            except OSError:
                pass
            raise
        finally:
            os.close(tfd)
        for directory in {os.path.dirname(n) for n in names}:
            _fsync_dir(directory)
        return True
    finally:
        os.close(fd)


def _rebuild(old: EncryptedFile, tfd: int, header: Header, cipher: BlockCipher) -> None:
    """Write ``old``'s plaintext into the empty ``tfd`` as a format-3 file; zero blocks stay holes."""
    write_new(tfd, header, cipher)
    new = EncryptedFile(tfd, cipher, header.file_id, header.block_size, header.version)
    size = old.size()
    new.truncate(size)  # one hole run and a final block; writes below fill it
    bs = header.block_size
    for offset in range(0, size, _CHUNK):
        data = old.read(offset, _CHUNK)
        start = None
        for i in range(0, len(data) + bs, bs):  # runs of blocks that are not all zero
            zero = i >= len(data) or all_zero(data[i:i + bs])
            if not zero and start is None:
                start = i
            elif zero and start is not None:
                new.write(offset + start, data[start:i])
                start = None


def _copy_metadata(src: int, dst: int) -> None:
    st = os.fstat(src)
    for name in os.listxattr(src):
        if name.startswith("user.") and not name.startswith("user.kmsfs."):
            os.setxattr(dst, name, os.getxattr(src, name))
    if os.geteuid() == 0:
        os.fchown(dst, st.st_uid, st.st_gid)
    os.fchmod(dst, stat.S_IMODE(st.st_mode))
    os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns))


def _swap_in(temp: str, names: list[str]) -> None:
    """Rename the rebuilt file over every name of the old inode (one link per extra name)."""
    for name in names[1:]:
        extra = os.path.join(os.path.dirname(name), TEMP_PREFIX + os.urandom(8).hex())
        os.link(temp, extra)
        os.rename(extra, name)
    os.rename(temp, names[0])


def _fsync_dir(directory: str) -> None:
    dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)

