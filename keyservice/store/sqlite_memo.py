"""Per-thread memoisation of the SQLite store's hot lookups (see ``sqlite``'s module docstring).

A decorated method's results live in the calling thread's memo (``self._memo_for_thread()``),
which the store drops whenever the database may have changed.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

from keyservice.store.model import (
    KeyRecord,
)

MEMO_LIMIT = 4096
_F = TypeVar("_F", bound=Callable[..., Any])


def memo(method: _F) -> _F:
    """Memoise a read-only lookup in the calling thread until the database changes (see module doc).

    Results are handed out as copies where the record type is mutable (``KeyRecord``, lists), so
    a caller that edits what it got cannot edit the memo.
    """
    name = method.__name__

    @functools.wraps(method)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        memo = self._memo_for_thread()
        if memo is None:  # inside a transaction: read through
            return method(self, *args, **kwargs)
        key = (name, args, tuple(sorted(kwargs.items()))) if kwargs else (name, args)
        try:
            value = memo[key]
        except KeyError:
            value = method(self, *args, **kwargs)
            if len(memo) < MEMO_LIMIT:
                memo[key] = value
        if isinstance(value, list):
            return list(value)
        if isinstance(value, KeyRecord):
            return _copy_record(value)
        return value

    return wrapper  # type: ignore[return-value]


def _copy_record(record: KeyRecord) -> KeyRecord:
    """A shallow copy, as ``copy.copy`` makes (which goes through ``__reduce_ex__``: slower)."""
    new = object.__new__(KeyRecord)
    new.__dict__.update(record.__dict__)
    return new
