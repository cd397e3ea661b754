"""The caller identity the offline tools (fsck, rewrap) send with each key request.

Why: the key service audits every unwrap with the caller's path. A mount sends the path inside
the filesystem (``/many/f7``); the offline tools must send the same, not the backing path
(``/srv/cipher/many/f7``), or ``keyservice audit list --file /many/f7`` misses what they did. The
``tool`` entry says which tool it was; uid, user and pid say who ran it.
"""

from __future__ import annotations

import os
import pwd
from typing import Any


def tool_caller(tool: str, path: str) -> dict[str, Any]:
    """Caller header for ``kmsfs <tool>`` acting on ``path`` (a path inside the filesystem)."""
    uid = os.getuid()
    try:
        user = pwd.getpwuid(uid).pw_name
    except KeyError:
        user = ""
    return {"path": path, "tool": f"kmsfs {tool}", "process": f"kmsfs-{tool}", "uid": uid,
            "user": user, "gid": os.getgid(), "pid": os.getpid()}


def plaintext_path(root: str, backing_path: str) -> str:
    """The path inside the filesystem of a backing file under the (real) cipherdir ``root``."""
    return "/" + os.path.relpath(backing_path, root)
