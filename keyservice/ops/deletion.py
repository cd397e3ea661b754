"""Key deletion (SPEC K8): ScheduleKeyDeletion, CancelKeyDeletion, and ``reap``, which the scheduler
calls when a waiting period has ended.

Scheduling sets the key PendingDeletion with a DeletionDate 7-30 days ahead (default 30); the key
refuses crypto from then on (``lifecycle``). Cancelling returns it Disabled (PendingImport if it is
an imported key without material), as AWS does. At the DeletionDate the key counts as gone at once
(``lifecycle.is_destroyed``) and the reaper removes its row, every version's sealed material, its
aliases and import parameters in one transaction; its ciphertexts are then unrecoverable.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from keyservice import errors
from keyservice.params import AuditInfo, constraint_failed
from keyservice.store.model import DISABLED, ORIGIN_EXTERNAL, PENDING_DELETION, PENDING_IMPORT, KeyRecord

if TYPE_CHECKING:
    from keyservice.service import KeyService

MIN_WINDOW_DAYS = 7
MAX_WINDOW_DAYS = 30
DEFAULT_WINDOW_DAYS = 30


def _window(params: dict[str, Any]) -> int:
    value = params.get("PendingWindowInDays")
    if value is None:
        return DEFAULT_WINDOW_DAYS
    if isinstance(value, bool) or not isinstance(value, int):
        raise errors.ValidationException("PendingWindowInDays must be an integer")
    if not MIN_WINDOW_DAYS <= value <= MAX_WINDOW_DAYS:
        raise constraint_failed(
            "PendingWindowInDays", f"have value between {MIN_WINDOW_DAYS} and {MAX_WINDOW_DAYS}", value
        )
    return value


def schedule_key_deletion(service: KeyService, params: dict[str, Any], info: AuditInfo) -> dict[str, Any]:
    key = service.key_param(params, info, allow_alias=False)
    days = _window(params)
    service.check_usable(key, "ScheduleKeyDeletion", info)
    key.state = PENDING_DELETION
    key.deletion_date = service.now() + timedelta(days=days)
    service.store.update_key(key)
    info.extra = {"pending_window_in_days": days, "deletion_date": key.deletion_date.isoformat()}
    return {
        "KeyId": key.arn,
        "DeletionDate": key.deletion_date,
        "KeyState": PENDING_DELETION,
        "PendingWindowInDays": days,
    }


def cancel_key_deletion(service: KeyService, params: dict[str, Any], info: AuditInfo) -> dict[str, Any]:
    key = service.key_param(params, info, allow_alias=False)
    service.check_usable(key, "CancelKeyDeletion", info)
    no_material = key.origin == ORIGIN_EXTERNAL and service.store.latest_key_version(key.key_id) is None
    key.state = PENDING_IMPORT if no_material else DISABLED
    key.deletion_date = None
    service.store.update_key(key)
    return {"KeyId": key.arn}


def reap(service: KeyService, key: KeyRecord, now: datetime) -> bool:
    """Destroy ``key`` if its deletion is (still) due; audit it as ``DeleteKey``. One store
    transaction, preceded by a durable intent record."""
    with service.intent_scope("DeleteKey", key.arn) as request_id, service.store.transaction():
        if not service.store.destroy_key(key.key_id, now):
            return False
    service.audit_event(
        "DeleteKey",
        key.arn,
        details={"deletion_date": key.deletion_date.isoformat() if key.deletion_date else None},
        request_id=request_id,
    )
    return True


HANDLERS = {
    "ScheduleKeyDeletion": schedule_key_deletion,
    "CancelKeyDeletion": cancel_key_deletion,
}
