"""Write-ahead auditing: no change to the store becomes visible before a durable audit record says
it is about to happen.

The service audits each request once it has an outcome, which for a key management request is
*after* its store write. Alone, that let a change commit while its record could not be written
(a full or read-only audit disk): the caller got a 500 and the key had changed with no trace.
So every store method that changes something goes through ``WriteAheadStore``, which first asks
the current ``IntentScope`` to append its *intent record* and wait until it is on disk:

    intent record (durable)  ->  store write(s) / commit  ->  outcome record (success or error)

If the intent cannot be written the write is never attempted and the request fails. If the store
write fails, the outcome record says so. If the process dies, or the outcome record cannot be
written, between the commit and the outcome, the log still holds the intent: the change named
there may or may not have been committed (docs/AUDIT.md). A scope writes at most one intent,
before the first write of its request, however many writes follow.

Scopes are per thread / asyncio task (a ``ContextVar``): ``KeyService.call`` opens one per
request and ``KeyService.intent_scope`` one per scheduler transition. Writes outside any scope
(start-up bookkeeping, purging expired import tokens) pass straight through.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable
from typing import Any

# The ``store.base.Store`` methods that change state. A new writing method must be listed here,
# or its writes escape the intent record (tests/unit/test_write_ahead.py checks the list against
# the Store protocol).
MUTATING_METHODS = frozenset({
    "set_meta", "create_key", "update_key", "destroy_key", "add_key_version", "delete_key_material",
    "import_key_material", "add_import_parameters", "create_alias", "update_alias", "delete_alias",
    "add_credential", "delete_credentials", "create_principal", "delete_principal",
    "put_identity_policy", "delete_identity_policy", "create_grant", "delete_grant",
})  # fmt: skip

# Writes that need no intent record: housekeeping that removes nothing anyone can still use.
UNAUDITED_WRITES = frozenset({"purge_import_parameters"})

# Methods that open or join a store transaction, or take the scheduler's lease: no state change a
# client can see of their own (the lease row only says which node runs the scheduler), so they
# pass straight through; the writes made inside a transaction are each intent-checked as usual.
TRANSACTION_METHODS = frozenset({"transaction", "in_transaction", "fenced", "acquire_scheduler_lease"})


class IntentScope:
    """One request's (or one scheduler transition's) promise to audit before it writes."""

    def __init__(self, write_intent: Callable[[], None]) -> None:
        self._write_intent = write_intent
        self.written = False

    def before_write(self) -> None:
        """Append the intent record, durably, unless this scope already did."""
        if not self.written:
            self._write_intent()  # raises if the record cannot be made durable: no write follows
            self.written = True


_current: contextvars.ContextVar[IntentScope | None] = contextvars.ContextVar("intent_scope", default=None)


class scope:  # noqa: N801 - used as ``with write_ahead.scope(...)``, like the function it was
    """Within this block, the first store write first calls ``write_intent``. (A class rather than
    a generator context manager: every request opens one.)"""

    __slots__ = ("_current", "_token")

    def __init__(self, write_intent: Callable[[], None]) -> None:
        self._current = IntentScope(write_intent)

    def __enter__(self) -> IntentScope:
        self._token = _current.set(self._current)
        return self._current

    def __exit__(self, *exc: object) -> None:
        _current.reset(self._token)


class WriteAheadStore:
    """A store whose writing methods first make the current scope's intent record durable."""

    def __init__(self, store: Any) -> None:
        self.inner = store

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self.inner, name)
        if name in MUTATING_METHODS and callable(attribute):
            attribute = _after_intent(attribute)
        # Cached on the instance: later lookups skip __getattr__ (reads cost nothing extra).
        setattr(self, name, attribute)
        return attribute


def _after_intent(method: Callable[..., Any]) -> Callable[..., Any]:
    def write(*args: Any, **kwargs: Any) -> Any:
        current = _current.get()
        if current is not None:
            current.before_write()
        return method(*args, **kwargs)

    write.__name__ = method.__name__
    return write
