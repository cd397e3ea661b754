"""The one table of operations: ``{AWS operation name: handler}``, handed to ``KeyService``.

The service core knows no operation module (they import it, not the reverse); whoever builds a
service (``bootstrap.open_service``) passes it ``OPERATIONS``. Adding an operation means adding
it to its group module's ``HANDLERS``; this table collects every group.
"""

from __future__ import annotations

from keyservice.ops import (
    aliases,
    default_keys,
    deletion,
    encryption,
    grants,
    importing,
    key_policies,
    keys,
    kmsfs_reports,
    reencrypt,
    rotation,
    tagging,
)
from keyservice.service import OperationTable

_GROUPS = (keys, aliases, encryption, rotation, deletion, importing, tagging, reencrypt, key_policies, grants,
           kmsfs_reports)


def _collect() -> dict:
    table: dict = {}
    for module in _GROUPS:
        for name, handler in module.HANDLERS.items():
            if name in table:
                raise RuntimeError(f"operation {name} is defined twice")
            table[name] = handler
    return table


OPERATIONS = OperationTable(handlers=_collect(), ensure_default_alias=default_keys.ensure)
