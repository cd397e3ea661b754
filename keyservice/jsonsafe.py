"""Decoding JSON that a hostile client wrote: bounded nesting, and a check for text that is not Unicode.

``json.loads`` recurses once per nesting level and raises ``RecursionError`` (not ``ValueError``)
about 1,000 levels down; a document that stays under that limit can still blow the stack of the
next recursive reader (``json.dumps`` of an audit record, a policy walker). No KMS request, caller
header or policy needs more than a handful of levels, so documents deeper than ``max_depth`` are
refused here, before anyone else reads them.

JSON can also carry lone UTF-16 surrogates (``"\\ud800"``), which are Python ``str`` but not
Unicode: they cannot be UTF-8 encoded (SQLite, the audit log) and compare oddly. ``has_surrogate``
finds them so the HTTP layer can refuse such a body.
"""

from __future__ import annotations

import json
import re
from typing import Any

# Deeper than any KMS request body (a grant's Constraints: 3 levels), caller header or policy.
DEFAULT_MAX_DEPTH = 32

_SURROGATE = re.compile("[\ud800-\udfff]")


class JsonError(ValueError):
    """Not JSON, or JSON nested deeper than allowed; the message says which."""


def loads(data: str | bytes, *, max_depth: int = DEFAULT_MAX_DEPTH) -> Any:
    """``json.loads`` that raises only ``JsonError`` and refuses nesting deeper than ``max_depth``."""
    opening = data.count(b"[" if isinstance(data, bytes) else "[") + data.count(
        b"{" if isinstance(data, bytes) else "{"
    )
    try:
        value = json.loads(data)
    except RecursionError:
        raise JsonError(f"JSON nested deeper than {max_depth} levels") from None
    except (ValueError, UnicodeDecodeError) as error:  # JSONDecodeError is a ValueError
        raise JsonError(f"not valid JSON: {str(error)[:200]}") from None
    if opening > max_depth and depth(value) > max_depth:
        raise JsonError(f"JSON nested deeper than {max_depth} levels")
    return value


def depth(value: Any) -> int:
    """Nesting depth of a decoded document (a scalar is 0), without recursion."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        level += 1
        deepest = max(deepest, level)
        stack.extend((child, level) for child in children)
    return deepest


def has_surrogate(value: Any) -> bool:
    """True if any string (key or value) in a decoded document holds a lone surrogate."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if not item.isascii() and _SURROGATE.search(item):
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False
