"""The Unix-domain-socket listener: bind it safely, learn each connection's peer, remove it at the end.

Why a Unix socket: a key service on the same host as its kmsfs mounts saves the TCP/TLS work of
every round trip (docs/PERFORMANCE.md), and the kernel tells the server which local process
connected (``SO_PEERCRED``: uid, gid and pid at ``connect`` time) instead of the server only
being told (kmsfs's ``X-Kmsfs-Caller`` header). It is *not* an authentication shortcut: every
request on it is SigV4-verified exactly as on TCP; the peer only adds to the audit record.

Binding (``bind``): an existing path is removed only if it is a socket nobody listens on (a stale
one left by a crash); a live socket or anything that is not a socket is refused, never unlinked.
The socket file is born with ``--socket-mode`` (bound under the umask that leaves exactly those
bits: Linux creates a socket file 0777 & ~umask), then gets ``--socket-owner/--socket-group``
with ``lchown``, and only then listens: nobody can connect before its final mode and owner are in
place, and no step follows a symlink someone could swap in for the new file (no ``chmod`` at
all). ``remove`` unlinks it at shutdown only if the path is still the socket this process bound
(same device and inode).

The peer (``PeerProtocol``): read once per connection with ``getsockopt(SO_PEERCRED)``; the
process's ``comm`` and executable are read from ``/proc/PID`` at the same moment (best effort: a
process that already exited, or a ``/proc`` we may not read, leaves them out). The pid is the
connecting process's at connect time; a later request on the same kept-alive connection reports
the same peer (a connection cannot change hands without passing its file descriptor on, which the
kernel's credentials then still name the original connector for: documented in docs/SECURITY.md).
"""

from __future__ import annotations

import errno
import grp
import os
import pwd
import socket
import stat
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# The key, in uvicorn's per-connection ``app_state`` (copied into each request's ASGI
# ``scope["state"]``), under which a Unix-socket connection carries its ``Peer``.
PEER_STATE_KEY = "keyservice.peer"
# What a listener on a Unix socket is named in ``source_address`` and in URLs: unix:/abs/path.
SOURCE_PREFIX = "unix:"
DEFAULT_MODE = 0o600
MAX_COMM = 64
_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


class UnixListenError(Exception):
    """A Unix socket path that cannot be listened on; the message is one line for the operator."""


@dataclass(frozen=True)
class Peer:
    """The process at the other end of a Unix-socket connection (as the kernel saw it at connect)."""

    socket_path: str
    uid: int
    gid: int
    pid: int
    comm: str | None = None
    exe: str | None = None

    @property
    def source_address(self) -> str:
        return SOURCE_PREFIX + self.socket_path

    def audit_fields(self) -> dict[str, object]:
        """The audit record's ``peer`` object (docs/AUDIT.md)."""
        fields: dict[str, object] = {"uid": self.uid, "gid": self.gid, "pid": self.pid}
        if self.comm is not None:
            fields["comm"] = self.comm
        if self.exe is not None:
            fields["exe"] = self.exe
        return fields


def peer_of(sock: socket.socket, socket_path: str) -> Peer | None:
    """``SO_PEERCRED`` of a connected Unix socket, with the process's comm and exe if readable."""
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    except OSError:
        return None
    pid, uid, gid = _UCRED.unpack(raw)
    return Peer(socket_path, uid, gid, pid, *_process_names(pid))


def _process_names(pid: int) -> tuple[str | None, str | None]:
    """(comm, exe) of ``pid`` from /proc; None for what cannot be read (exited, hidepid, no root)."""
    if pid <= 0:
        return None, None
    try:
        with open(f"/proc/{pid}/comm", "rb") as f:
            comm: str | None = f.read(MAX_COMM).rstrip(b"\n").decode("utf-8", "backslashreplace")
    except OSError:
        comm = None
    try:
        exe: str | None = os.readlink(f"/proc/{pid}/exe")
    except OSError:
        exe = None
    return comm, exe


def peer_protocol(base: type) -> type:
    """uvicorn's HTTP protocol class ``base`` (httptools or h11) for the Unix listener: each
    connection learns its peer once and hands it to every request through ``scope["state"]``."""

    class PeerProtocol(base):  # type: ignore[misc, valid-type]
        peer: Peer | None = None

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            sock = transport.get_extra_info("socket")
            path = transport.get_extra_info("sockname")
            if sock is not None:
                self.peer = peer_of(sock, path if isinstance(path, str) else "")
            # Per connection: uvicorn copies app_state into every request's scope["state"].
            self.app_state = {**self.app_state, PEER_STATE_KEY: self.peer}

    PeerProtocol.__name__ = f"Peer{base.__name__}"
    return PeerProtocol


def scope_peer(scope: dict[str, Any]) -> Peer | None:
    """The peer a request arrived from on the Unix listener (None on TCP)."""
    state = scope.get("state")
    peer = state.get(PEER_STATE_KEY) if isinstance(state, dict) else None
    return peer if isinstance(peer, Peer) else None


# ------------------------------------------------------------------------------------ binding


@dataclass(frozen=True)
class SocketOptions:
    """``--listen unix:PATH`` with ``--socket-mode``, ``--socket-owner``, ``--socket-group``."""

    path: Path
    mode: int = DEFAULT_MODE
    owner: str | None = None
    group: str | None = None

    @property
    def url(self) -> str:
        """The endpoint kmsfs is given: ``unix:///abs/path``."""
        return f"unix://{self.path}"


def parse_mode(text: str) -> int:
    """An octal file mode such as ``0660``; ValueError if not octal or beyond 0777."""
    mode = int(text, 8)
    if not 0 <= mode <= 0o777:
        raise ValueError(f"mode {text!r} is beyond 0777")
    return mode


def _uid(owner: str) -> int:
    try:
        return int(owner) if owner.isdigit() else pwd.getpwnam(owner).pw_uid
    except KeyError:
        raise UnixListenError(f"--socket-owner {owner}: no such user") from None


def _gid(group: str) -> int:
    try:
        return int(group) if group.isdigit() else grp.getgrnam(group).gr_gid
    except KeyError:
        raise UnixListenError(f"--socket-group {group}: no such group") from None


def check(options: SocketOptions) -> None:
    """What ``bind`` would refuse, said before anything is created (the server binds for real later)."""
    _clear_stale(options.path, remove=False)
    where, parent = f"unix:{options.path}", options.path.parent
    if not parent.is_dir():
        raise UnixListenError(f"cannot listen on {where}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UnixListenError(f"cannot listen on {where}: {parent} is not writable")
    if options.owner is not None:
        _uid(options.owner)
    if options.group is not None:
        _gid(options.group)


def bind(options: SocketOptions, backlog: int) -> tuple[socket.socket, tuple[int, int]]:
    """The listening socket at ``options.path``, its mode and owner set before it listens, and the
    (device, inode) of its file (what ``Listener.remove`` checks before unlinking)."""
    path = options.path
    _clear_stale(path, remove=True)
    uid = _uid(options.owner) if options.owner is not None else -1
    gid = _gid(options.group) if options.group is not None else -1
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        old_umask = os.umask(0o777 & ~options.mode)  # process-wide, but only for this one call
        try:
            sock.bind(str(path))
        finally:
            os.umask(old_umask)
        info = os.lstat(path)
        identity = (info.st_dev, info.st_ino)
        try:
            if uid != -1 or gid != -1:
                os.chown(path, uid, gid, follow_symlinks=False)
        except OSError as exc:
            _unlink_if(path, identity)
            raise UnixListenError(f"cannot set the owner of unix:{path}: "
                                  f"{exc.strerror or exc}") from None
        sock.listen(backlog)
        sock.set_inheritable(True)
    except OSError as exc:
        sock.close()
        raise UnixListenError(f"cannot listen on unix:{path}: {exc.strerror or exc}") from None
    except BaseException:
        sock.close()
        raise
    return sock, identity


def _clear_stale(path: Path, *, remove: bool) -> None:
    """Nothing at ``path``, or a stale socket (removed if ``remove``); else UnixListenError."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise UnixListenError(f"cannot listen on unix:{path}: {exc.strerror or exc}") from None
    if not stat.S_ISSOCK(info.st_mode):
        raise UnixListenError(f"cannot listen on unix:{path}: it exists and is not a socket "
                              "(refusing to remove it; move it away or pick another path)")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(str(path))
        except ConnectionRefusedError:
            pass  # stale: nothing listens on it
        except FileNotFoundError:
            return
        except OSError as exc:
            if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
                raise UnixListenError(f"cannot listen on unix:{path}: {exc.strerror or exc}") from None
        else:
            raise UnixListenError(f"cannot listen on unix:{path}: a server is listening on it "
                                  "(another keyservice?); stop it or pick another path")
    if remove:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def _unlink_if(path: Path, identity: tuple[int, int]) -> None:
    """Unlink ``path`` only if it is still the socket file with this (device, inode)."""
    try:
        info = os.lstat(path)
    except OSError:
        return
    if stat.S_ISSOCK(info.st_mode) and (info.st_dev, info.st_ino) == identity:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


class Listener:
    """A bound Unix listener and the identity of its file, so ``remove`` unlinks only its own."""

    def __init__(self, options: SocketOptions, backlog: int) -> None:
        self.options = options
        self.socket, self._identity = bind(options, backlog)

    @property
    def url(self) -> str:
        return self.options.url

    def remove(self) -> None:
        """Close the socket; unlink its file if the path still names the socket we bound (a
        socket another server bound there since, or anything else, is left alone)."""
        self.socket.close()
        _unlink_if(self.options.path, self._identity)
