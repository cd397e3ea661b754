"""The filesystem in FUSE's inode terms (lookup counts, forget), still free of FUSE.

Why inodes: FUSE's high-level (path) API gives every *name* its own kernel inode, so hard links
were separate files to the kernel (stale mode, owner, link count and even contents through the
other name) and every request carried a full path for the daemon to resolve. Here, as in
libfuse's passthrough_hp example, a node is one backing inode: it holds an
``O_PATH|O_NOFOLLOW`` descriptor of it, found once by ``openat(parent_fd, name)`` at lookup, and
every later request on it uses that descriptor (kmsfs/backing_at.py, the core's ``*_fd`` /
``*_at`` methods). Two names of one backing inode are one node: one set of attributes and one
page cache in the kernel.

Lookup counts are kept as the kernel counts them (each reply that returns an entry is one
lookup) and ``forget`` drops the node and closes its descriptor when the count reaches zero, so
the daemon holds one descriptor per inode the kernel remembers, and no more.

Nodes also remember the (plaintext) name they were last seen under and their parent, only to
name the file in the audit record and in log lines (``path_of``); no access is ever made by that
name. What a name is called in the backing directory is the business of the name strategy
(kmsfs/namespace.py: plaintext, or encrypted names); this layer only ever sees plaintext names.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
from dataclasses import dataclass
from typing import Any

from kmsfs.backing_at import RENAME_EXCHANGE, pin
from kmsfs.core import Caller, KmsfsCore, attributes
from kmsfs.namespace import EncryptedNames, PlainNames

ROOT_INODE = 1  # FUSE_ROOT_ID
_MAX_DEPTH = 4096  # path_of gives up beyond this (a path cannot be longer than PATH_MAX anyway)


@dataclass(eq=False)
class Node:
    ino: int  # the FUSE node id (the kernel's handle for this inode)
    fd: int  # O_PATH|O_NOFOLLOW descriptor of the backing object
    ident: tuple[int, int]  # backing (st_dev, st_ino)
    nlookup: int
    parent: Node | None
    name: str
    dir_id: bytes | None = None  # a directory's id (encrypted names), read once


class InodeFs:
    """Inode-numbered operations over a ``KmsfsCore``; raises what the core raises."""

    def __init__(self, core: KmsfsCore, names: PlainNames | EncryptedNames | None = None) -> None:
        self.core = core
        self.names = names if names is not None else PlainNames()
        self._lock = threading.Lock()
        root_fd = os.open(".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=core.root_fd)
        st = os.fstat(root_fd)
        self.root = Node(ROOT_INODE, root_fd, (st.st_dev, st.st_ino), 1, None, "")
        self._nodes: dict[int, Node] = {ROOT_INODE: self.root}
        self._by_ident: dict[tuple[int, int], Node] = {self.root.ident: self.root}
        self._next = ROOT_INODE + 1
        self._dirs: dict[int, list[tuple[str, int, int]]] = {}
        self._next_dir = 1

    # -- the node table ---------------------------------------------------------------------------
    def node(self, ino: int) -> Node:
        node = self._nodes.get(ino)
        if node is None:
            raise OSError(errno.ESTALE, "unknown inode")
        return node

    def nodes(self) -> int:
        """How many nodes (and so backing descriptors) are held, the root included."""
        return len(self._nodes)

    def path_of(self, node: Node, name: str | None = None) -> str:
        """The mount path the node was last seen under (for the audit and logs only)."""
        names = [] if name is None else [name]
        depth = 0
        while node.parent is not None and depth < _MAX_DEPTH:
            names.append(node.name)
            node, depth = node.parent, depth + 1
        return "/" + "/".join(reversed(names))

    def _check_name(self, parent: Node, name: str) -> None:
        """Reserved names in the root do not exist in the mount; "." and ".." are never asked."""
        if "/" in name or name in (".", "..", ""):
            raise OSError(errno.EINVAL, "bad name", name)
        if self.names.reserved(parent is self.root, name):
            raise FileNotFoundError(errno.ENOENT, "reserved name", name)

    def _remember(self, fd: int, parent: Node, name: str) -> tuple[Node, dict[str, int]]:
        """Count one lookup of the object ``fd`` pins (the call takes ownership of ``fd``)."""
        try:
            st = os.fstat(fd)
            attrs = attributes(st, fd)  # through our own descriptor, still open here
        except BaseException:
            os.close(fd)
            raise
        ident = (st.st_dev, st.st_ino)
        if stat.S_ISLNK(st.st_mode) and self.names.encrypted:
            attrs["st_size"] = self.names.symlink_size(fd, st.st_size)
        with self._lock:
            node = self._by_ident.get(ident)
            if node is None:
                node = Node(self._next, fd, ident, 0, parent, name)
                self._next += 1
                self._nodes[node.ino] = node
                self._by_ident[ident] = node
                fd = -1
            elif node is not self.root:
                node.parent, node.name = parent, name
            node.nlookup += 1
        if fd >= 0:
            os.close(fd)  # the node already holds a descriptor of this inode
        return node, attrs

    def lookup(self, parent_ino: int, name: str) -> tuple[Node, dict[str, int]]:
        parent = self.node(parent_ino)
        self._check_name(parent, name)
        fd, _ = self.names.find(parent, name)
        return self._remember(fd, parent, name)

    def lookup_listed(self, parent_ino: int, name: str, inode: int, mode: int) -> tuple[Node, dict[str, int]]:
        """``lookup`` of an entry a listing just returned (READDIRPLUS), with the inode number and
        type the scan read. A regular file or symlink whose inode the table already holds is
        that node: its descriptor pins the very inode the scan saw, so it is counted and stat'ed
        without opening the name again (no openat/close, no name encryption). Directories,
        unknown types, inodes not held, and one that has lost its last link go by name."""
        parent = self.node(parent_ino)
        if stat.S_IFMT(mode) in (stat.S_IFREG, stat.S_IFLNK):
            with self._lock:
                node = self._by_ident.get((parent.ident[0], inode))
                if node is not None and node is not self.root and self._nodes.get(node.ino) is node:
                    node.nlookup += 1  # held from here: a concurrent forget cannot close it
                else:
                    node = None
            if node is not None:
                try:
                    st = os.fstat(node.fd)
                    if st.st_nlink > 0 and (st.st_dev, st.st_ino) == node.ident:
                        attrs = attributes(st, node.fd)
                        if stat.S_ISLNK(st.st_mode) and self.names.encrypted:
                            attrs["st_size"] = self.names.symlink_size(node.fd, st.st_size)
                        with self._lock:
                            node.parent, node.name = parent, name
                        return node, attrs
                except BaseException:
                    self.forget(node.ino, 1)
                    raise
                self.forget(node.ino, 1)
        return self.lookup(parent_ino, name)

    def forget(self, ino: int, count: int) -> None:
        """The kernel dropped ``count`` lookups; at zero the node and its descriptor go."""
        with self._lock:
            node = self._nodes.get(ino)
            if node is None or node is self.root:
                return
            node.nlookup -= count
            if node.nlookup > 0:
                return
            del self._nodes[ino]
            if self._by_ident.get(node.ident) is node:
                del self._by_ident[node.ident]
        os.close(node.fd)

    def forget_all(self) -> None:
        """Unmount: close every node's descriptor (the kernel forgets without telling)."""
        with self._lock:
            nodes = [n for n in self._nodes.values() if n is not self.root]
            self._nodes = {ROOT_INODE: self.root}
            self._by_ident = {self.root.ident: self.root}
        for node in nodes:
            os.close(node.fd)

    # -- attributes -------------------------------------------------------------------------------
    def getattr(self, ino: int, fh: int | None = None) -> dict[str, int]:
        if fh:
            fd = self.core.handle_fd(fh)
            return attributes(os.fstat(fd), fd)
        node = self.node(ino)
        attrs = self.core.stat_fd(node.fd)
        if self.names.encrypted and stat.S_ISLNK(attrs["st_mode"]):
            attrs["st_size"] = self.names.symlink_size(node.fd, attrs["st_size"])
        return attrs

    def setattr(self, ino: int, changes: dict[str, Any], fh: int | None = None,
                caller: Caller | None = None) -> dict[str, int]:
        """Apply ``changes`` (mode, uid, gid, size, atime/mtime in ns or UTIME_NOW/OMIT) in the
        kernel's order: owner, mode, size, times; returns the new attributes."""
        node = self.node(ino)
        if "uid" in changes or "gid" in changes:
            self.core.chown_fd(node.fd, changes.get("uid", -1), changes.get("gid", -1))
        if "mode" in changes:
            self.core.chmod_fd(node.fd, changes["mode"])
        if "size" in changes:
            if fh:
                self.core.truncate(self.path_of(node), changes["size"], fh, caller)
            else:
                self.core.truncate_pinned(node.fd, self.path_of(node), changes["size"], caller)
        if "times" in changes:
            self.core.utimens_fd(node.fd, changes["times"])
        return self.getattr(ino, fh)

    def readlink(self, ino: int) -> str:
        node = self.node(ino)
        if not self.names.encrypted:
            return self.core.readlink_fd(node.fd)
        return self.names.target_in(node.fd)

    def statfs(self, ino: int) -> dict[str, int]:
        return self.core.statfs_fd(self.node(ino).fd)

    # -- namespace --------------------------------------------------------------------------------
    def _made(self, parent: Node, backing: str, name: str) -> tuple[Node, dict[str, int]]:
        return self._remember(pin(parent.fd, backing), parent, name)

    def mknod(self, parent_ino: int, name: str, mode: int, rdev: int,
              caller: Caller | None = None) -> tuple[Node, dict[str, int]]:
        parent = self.node(parent_ino)
        self._check_name(parent, name)
        with self.names.new_entry(parent, name) as backing:
            if stat.S_ISREG(mode):
                fh = self.core.create_at(parent.fd, backing, self.path_of(parent, name), mode, caller,
                                         os.O_RDWR | os.O_EXCL, self._dir_id(parent))
                try:
                    return self._remember(self._pin_handle(fh), parent, name)
                finally:
                    self.core.release(None, fh)
            self.core.mknod_at(parent.fd, backing, mode, rdev, caller)
            return self._made(parent, backing, name)

    def mkdir(self, parent_ino: int, name: str, mode: int,
              caller: Caller | None = None) -> tuple[Node, dict[str, int]]:
        parent = self.node(parent_ino)
        self._check_name(parent, name)
        with self.names.new_entry(parent, name) as backing:
            fill = self.names.fill_dir if self.names.encrypted else None
            self.core.mkdir_at(parent.fd, backing, mode, caller, fill)
            return self._made(parent, backing, name)

    def symlink(self, target: str, parent_ino: int, name: str,
                caller: Caller | None = None) -> tuple[Node, dict[str, int]]:
        parent = self.node(parent_ino)
        self._check_name(parent, name)
        stored = self.names.target_out(target)
        with self.names.new_entry(parent, name) as backing:
            self.core.symlink_at(parent.fd, backing, stored, caller)
            return self._made(parent, backing, name)

    def link(self, ino: int, parent_ino: int, name: str) -> tuple[Node, dict[str, int]]:
        """A new name for the node: the reply is the same node, with the new link count."""
        node, parent = self.node(ino), self.node(parent_ino)
        self._check_name(parent, name)
        with self.names.new_entry(parent, name) as backing:
            self.core.link_fd(node.fd, parent.fd, backing)
            return self._remember(os.dup(node.fd), parent, name)

    def unlink(self, parent_ino: int, name: str) -> None:
        parent = self.node(parent_ino)
        self._check_name(parent, name)
        with self.names.old_entry(parent, name) as backing:
            os.unlink(backing, dir_fd=parent.fd)

    def rmdir(self, parent_ino: int, name: str) -> None:
        parent = self.node(parent_ino)
        self._check_name(parent, name)
        with self.names.old_entry(parent, name) as backing:
            self.names.rmdir(parent, backing)

    def rename(self, parent_ino: int, name: str, new_parent_ino: int, new_name: str,
               flags: int = 0) -> None:
        parent, new_parent = self.node(parent_ino), self.node(new_parent_ino)
        self._check_name(parent, name)
        self._check_name(new_parent, new_name)
        # Side entries of long names: the new one exists before the rename, the old one goes
        # after it, only if its entry is gone (RENAME_EXCHANGE keeps both names where they are).
        with self.names.new_entry(new_parent, new_name) as new_backing, \
                self.names.old_entry(parent, name) as backing, \
                self.names.replacing(new_parent, new_backing, flags):
            self.core.rename_at(parent.fd, backing, new_parent.fd, new_backing, flags)
        self._renamed(new_parent, new_backing, new_name)
        if flags & RENAME_EXCHANGE:  # the other one moved too
            self._renamed(parent, backing, name)

    def _renamed(self, parent: Node, backing: str, name: str) -> None:
        """Keep the audit name of a known node current after a rename (best effort)."""
        try:
            st = os.stat(backing, dir_fd=parent.fd, follow_symlinks=False)
        except OSError:
            return
        with self._lock:
            node = self._by_ident.get((st.st_dev, st.st_ino))
            if node is not None and node is not self.root:
                node.parent, node.name = parent, name

    # -- extended attributes ----------------------------------------------------------------------
    def getxattr(self, ino: int, name: str) -> bytes:
        return self.core.getxattr_fd(self.node(ino).fd, name)

    def listxattr(self, ino: int) -> list[str]:
        return self.core.listxattr_fd(self.node(ino).fd)

    def setxattr(self, ino: int, name: str, value: bytes, flags: int) -> None:
        self.core.setxattr_fd(self.node(ino).fd, name, value, flags)

    def removexattr(self, ino: int, name: str) -> None:
        self.core.removexattr_fd(self.node(ino).fd, name)

    # -- files ------------------------------------------------------------------------------------
    def _dir_id(self, parent: Node) -> bytes | None:
        """The directory's id, which a directory-key create wraps its file's key under."""
        if self.core.dirkeys is None or not self.names.encrypted:
            return None
        return self.names.dir_id(parent)  # type: ignore[union-attr]

    def _pin_handle(self, fh: int) -> int:
        """An O_PATH descriptor of the inode an open handle holds (exactly that inode)."""
        return os.open(f"/proc/self/fd/{self.core.handle_fd(fh)}", os.O_PATH | os.O_CLOEXEC)

    def create(self, parent_ino: int, name: str, mode: int, flags: int,
               caller: Caller | None = None) -> tuple[Node, dict[str, int], int]:
        """A new (or, without O_EXCL, existing) file, opened: (node, attributes, handle)."""
        parent = self.node(parent_ino)
        self._check_name(parent, name)
        with self.names.new_entry(parent, name) as backing:
            fh = self.core.create_at(parent.fd, backing, self.path_of(parent, name), mode, caller,
                                     flags, self._dir_id(parent))
        try:
            node, attrs = self._remember(self._pin_handle(fh), parent, name)
        except BaseException:
            self.core.release(None, fh)
            raise
        return node, attrs, fh

    def open(self, ino: int, flags: int, caller: Caller | None = None) -> int:
        node = self.node(ino)
        return self.core.open_fd(node.fd, self.path_of(node), flags, caller)

    def opendir(self, ino: int) -> int:
        """A directory handle: the listing is read once here and served by offset from it."""
        node = self.node(ino)
        entries = self.names.listing(node, self.core.scan_fd(node.fd), self.path_of(node))
        with self._lock:
            dh = self._next_dir
            self._next_dir += 1
            self._dirs[dh] = entries
        return dh

    def readdir(self, dh: int, offset: int) -> list[tuple[str, int, int]]:
        """The entries from ``offset`` on; entry i's next offset is i + 1."""
        entries = self._dirs.get(dh)
        if entries is None:
            raise OSError(errno.EBADF, "bad directory handle")
        return entries[offset:]

    def releasedir(self, dh: int) -> None:
        with self._lock:
            self._dirs.pop(dh, None)

    def fallocate(self, ino: int, mode: int, offset: int, length: int, fh: int,
                  caller: Caller | None = None) -> None:
        self.core.fallocate(self.path_of(self.node(ino)), mode, offset, length, fh, caller)
