"""The only module that imports the FUSE binding (fusepy).

Why: a later switch to another binding (e.g. mfusepy for libfuse3) must be a one-file change.
"""

from __future__ import annotations

import errno
from typing import Any

from fuse import FUSE as _FUSE
from fuse import FuseOSError, LoggingMixIn, Operations, fuse_exit, fuse_get_context

__all__ = ["FUSE", "FuseOSError", "LoggingMixIn", "Operations", "fuse_exit", "fuse_get_context"]


class FUSE(_FUSE):
    """fusepy's FUSE with a C-callback-level answer for ``security.*`` getxattr.

    Why: once getxattr is implemented, the kernel asks ``security.capability`` before every
    write(2) (FUSE-NOTES), e.g. ~19,000 times for an untar of 3,400 files. kmsfs never stores
    ``security.*`` attributes (operations.py answers ENODATA for them too), so this answers
    straight from the ctypes callback: no name decoding, no dispatch, no exception.
    """

    def getxattr(self, path: bytes, name: bytes, value: Any, size: int, *args: Any) -> int:
        if name.startswith(b"security."):
            return -errno.ENODATA
        return int(super().getxattr(path, name, value, size, *args))
