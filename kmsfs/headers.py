"""Where a backing file's header comes from: the xattr (primary) and the in-file copy (format 3).

Why one module: every reader of headers (the mount, fsck, rewrap, upgrade, info) must apply the
same rule, and it is security relevant:

- the xattr ``user.kmsfs.header`` is the primary; a version-3 file also carries an exact copy in
  its prefix (``kmsfs.infile``). Both present: they must be byte-identical, else ``CorruptHeader``
  (EIO, logged) — a copy swapped in from another file or bit-flipped is never silently resolved;
- the xattr missing (a copy made with ``rsync -a``, ``cp -r``, ``tar``; a filesystem without user
  xattrs): the in-file copy is used and the xattr restored where the filesystem allows it;
- a version-1/2 xattr on a file that has a version-3 prefix (or the reverse) is tampering too.

The copy gives nothing the xattr did not: the wrapped key unwraps only through the key service,
bound to the file id, and the file id is in every block's AAD.

All functions take a file descriptor (not a path) except ``plain_size_at``, which getattr uses.
"""

from __future__ import annotations

import errno
import hmac
import logging
import os

from kmsfs import filestate
from kmsfs.cipher import BlockCipher
from kmsfs.format import (
    DEFAULT_BLOCK_SIZE,
    FORMAT_V3,
    HEADER_XATTR,
    RESIZE_XATTR,
    CorruptHeader,
    Header,
    pack_header,
    parse_header,
    plain_size,
)
from kmsfs.infile import (
    BOUND_SIZE,
    FIXED_SIZE,
    PREFIX_READ,
    RECORD_SIZE,
    State,
    data_offset_for,
    data_offset_of,
    has_prefix,
    pack_prefix,
    parse_prefix,
    record_aad,
)

log = logging.getLogger("kmsfs")

# errnos meaning "this filesystem keeps no user xattrs here" (vfat, some NFS and FUSE stores).
NO_XATTRS = (errno.ENOTSUP, errno.EOPNOTSUPP)
_ABSENT = (errno.ENODATA, *NO_XATTRS)


def get_xattr(fd: int) -> bytes | None:
    """The raw header xattr, or None if absent or unsupported."""
    try:
        return os.getxattr(fd, HEADER_XATTR)
    except OSError as exc:
        if exc.errno in _ABSENT:
            return None
        raise


def in_file_copy(fd: int) -> bytes | None:
    """The header copy in a version-3 prefix, None for a file without one (versions 1 and 2)."""
    first = os.pread(fd, PREFIX_READ, 0)
    if not has_prefix(first):
        return None
    st = os.fstat(fd)
    if len(first) >= FIXED_SIZE and data_offset_of(first) > len(first):
        first = os.pread(fd, data_offset_of(first), 0)
    copy = parse_prefix(first, st.st_size).header
    filestate.stash_prefix(st, first)  # the state record is read from the same bytes next
    return copy


def read_header(fd: int, *, restore: bool = True) -> Header:
    """The header of an open backing file, by the rules in the module docstring.

    ``restore``: write a missing xattr back from the in-file copy (ignored where unsupported)."""
    xattr = get_xattr(fd)
    copy = in_file_copy(fd)
    if xattr is not None:
        header = parse_header(xattr)
        if copy is None and header.version >= FORMAT_V3:
            raise CorruptHeader("header xattr is version 3 but the file has no in-file copy")
        if copy is not None and not hmac.compare_digest(copy, xattr):
            raise CorruptHeader("header xattr and in-file header copy differ")
        return header
    if copy is None:
        raise CorruptHeader("backing file has no kmsfs header")
    header = parse_header(copy)
    if header.version < FORMAT_V3:
        raise CorruptHeader("in-file header copy has an old version")
    if restore:
        restore_xattr(fd, copy)
    return header


def restore_xattr(fd: int, copy: bytes) -> bool:
    """Set the header xattr from the in-file copy; False where the filesystem cannot keep it."""
    try:
        os.setxattr(fd, HEADER_XATTR, copy, os.XATTR_CREATE)
    except OSError as exc:
        if exc.errno in (*NO_XATTRS, errno.EEXIST, errno.EROFS, errno.EPERM, errno.EACCES):
            return False
        raise
    log.info("restored a missing header xattr from the in-file copy (fd %d)", fd)
    return True


def _set_xattr(fd: int, raw: bytes) -> None:
    try:
        os.setxattr(fd, HEADER_XATTR, raw)
    except OSError as exc:
        if exc.errno not in NO_XATTRS:
            raise


def write_new(fd: int, header: Header, key: bytes | BlockCipher, truncate: bool = False) -> None:
    """Give an empty backing file its header: for version 3 the prefix (header copy and a first
    state record, sealed with the data key), then the xattr (skipped where unsupported).
    ``truncate``: the file may be longer than the new prefix (a re-key); cut it there."""
    raw = pack_header(header)
    if header.version >= FORMAT_V3:
        cipher = key if isinstance(key, BlockCipher) else BlockCipher(key)
        offset = data_offset_for(len(raw))
        prefix = pack_prefix(raw, offset)
        state = State(seq=1)
        body = state.pack_body()
        record = body + cipher.seal(b"", record_aad(header.file_id, prefix[:BOUND_SIZE], body))
        os.pwrite(fd, prefix + bytes(RECORD_SIZE) + record, 0)  # sequence 1 lives in slot 1
        if truncate:
            os.ftruncate(fd, offset)
        filestate.remember(fd, parse_prefix(prefix + bytes(2 * RECORD_SIZE), offset), state, cipher,
                           header.file_id)
    _set_xattr(fd, raw)


def replace_empty(fd: int, header: Header, key: bytes | BlockCipher) -> None:
    """Re-key an empty file (a planted header, or an O_TRUNC rewrite of an old-format file).

    Crash-safe order: remove the old xattr, rewrite the prefix, set the new xattr. A crash leaves
    either the old header alone in the file (the re-key repeats at the next write) or the new
    one; never two that differ."""
    try:
        os.removexattr(fd, HEADER_XATTR)
    except OSError as exc:
        if exc.errno not in _ABSENT:
            raise
    _remove_marker(fd)
    write_new(fd, header, key, truncate=True)


def update_copy(fd: int, header: Header) -> None:
    """Replace the header of a file in both places (``kmsfs rewrap``: same file id and data key,
    new wrapped key). The copy first, in one pwrite of the header slot: a crash in between leaves
    the two differing (EIO until the interrupted rewrap is run again, which rewrites both)."""
    raw = pack_header(header)
    first = os.pread(fd, FIXED_SIZE, 0)
    offset = data_offset_of(first)
    if header.version >= FORMAT_V3:
        if not offset:
            raise CorruptHeader("version-3 header for a file without an in-file copy")
        if FIXED_SIZE + len(raw) > offset - 2 * RECORD_SIZE:
            raise CorruptHeader("the new header does not fit the file's header slot")
        os.pwrite(fd, pack_prefix(raw, offset), 0)
    _set_xattr(fd, raw)


def empty(fd: int) -> None:
    """Cut a file to plaintext size 0 without its key (truncate to zero needs no Decrypt).

    Version 3 keeps its prefix and voids both state records (an empty file needs none; a stale
    marker must not grow it back)."""
    first = os.pread(fd, FIXED_SIZE, 0)
    offset = data_offset_of(first)
    os.ftruncate(fd, offset)
    if offset:
        os.pwrite(fd, bytes(2 * RECORD_SIZE), offset - 2 * RECORD_SIZE)
    _remove_marker(fd)


def _remove_marker(fd: int) -> None:
    try:
        os.removexattr(fd, RESIZE_XATTR)
    except OSError as exc:
        if exc.errno not in _ABSENT:
            raise


def data_offset(fd: int) -> int:
    """Where block 0 starts (0 for versions 1 and 2)."""
    return data_offset_of(os.pread(fd, FIXED_SIZE, 0))


class _Unreadable(Exception):
    """``fd`` is an ``O_PATH`` descriptor: it must be reopened to be read."""


def plain_size_at(path: str, st: os.stat_result, fd: int | None = None, *, follow: bool = False) -> int:
    """Plaintext size of a regular backing file with attributes ``st`` (getattr).

    Needs D: read from the file's first 16 bytes (an open, a pread and a close, ~1.5 µs; or one
    pread on ``fd``), remembered per inode with its ctime and size: D changes only when the file
    is rewritten, which changes its ctime. A file that cannot be read reports its backing-derived
    size; opening it reports the real error. ``follow``: ``path`` is a /proc/self/fd magic link
    (of a descriptor already pinned with O_NOFOLLOW) and must be followed."""
    if st.st_size == 0:
        return 0
    ident = (st.st_dev, st.st_ino)
    known = _offsets.get(ident)
    if known is not None and known[0] == st.st_ctime_ns and known[1] == st.st_size:
        offset = known[2]
    else:
        try:
            if fd is None:
                flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | (0 if follow else os.O_NOFOLLOW)
                own = os.open(path, flags)
                try:
                    first = os.pread(own, FIXED_SIZE, 0)
                finally:
                    os.close(own)
            else:
                first = os.pread(fd, FIXED_SIZE, 0)
        except OSError as exc:
            if fd is not None and exc.errno == errno.EBADF:
                raise _Unreadable() from None
            first = b""
        offset = data_offset_of(first)
        if len(_offsets) >= _OFFSETS_MAX and ident not in _offsets:
            _offsets.clear()
        _offsets[ident] = (st.st_ctime_ns, st.st_size, offset)
    return plain_size(max(0, st.st_size - offset), DEFAULT_BLOCK_SIZE)


def plain_size_of(st: os.stat_result, fd: int) -> int:
    """``plain_size_at`` for the inode-based core: ``fd`` is an open descriptor of the file or an
    ``O_PATH`` one (pinned with ``O_NOFOLLOW``, so it is the regular file ``st`` describes); an
    ``O_PATH`` descriptor cannot be read, so on a miss it is reopened through /proc/self/fd."""
    try:
        return plain_size_at("", st, fd)
    except _Unreadable:
        return plain_size_at(f"/proc/self/fd/{fd}", st, None, follow=True)


# getattr's memory of data offsets: (device, inode) -> (ctime, size, D), one entry per inode,
# bounded (cleared when full). A miss costs ~1.5 µs, plus a disk read when the page is cold.
_OFFSETS_MAX = 1 << 16
_offsets: dict[tuple[int, int], tuple[int, int, int]] = {}


def xattrs_supported(directory: str) -> bool:
    """Whether the filesystem of ``directory`` keeps user xattrs (probed on a throw-away file)."""
    path = os.path.join(directory, f".kmsfs-xattr-probe-{os.getpid()}")
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_CLOEXEC, 0o600)
    try:
        os.setxattr(fd, "user.kmsfs.probe", b"1")
        return True
    except OSError as exc:
        if exc.errno in NO_XATTRS:
            return False
        raise
    finally:
        os.close(fd)
        os.unlink(path)
