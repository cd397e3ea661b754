"""The only module that imports the FUSE binding (fusepy).

Why: a later switch to another binding (e.g. mfusepy for libfuse3) must be a one-file change.
"""

from __future__ import annotations

from fuse import FUSE, FuseOSError, LoggingMixIn, Operations, fuse_exit, fuse_get_context

__all__ = ["FUSE", "FuseOSError", "LoggingMixIn", "Operations", "fuse_exit", "fuse_get_context"]
