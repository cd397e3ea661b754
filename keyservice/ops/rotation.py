"""Key rotation (SPEC K6): EnableKeyRotation, DisableKeyRotation, GetKeyRotationStatus,
RotateKeyOnDemand, ListKeyRotations, and ``rotate`` used by them and by the scheduler.

Rotation appends a key version with fresh material; every new encryption uses the newest
version and every ciphertext names the version it needs, so nothing is re-encrypted. Automatic
rotation is a date on the key record (``next_rotation_date``) that the scheduler acts on, so it
survives restarts and catches up on rotations missed while the server was down (one rotation,
then the period counts again from then, as AWS does for a key re-enabled after its date).
On-demand rotations leave the automatic schedule alone, and at most 10 are allowed per key.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from keyservice import errors
from keyservice.params import AuditInfo, decode_marker, encode_marker, get_enum, get_int
from keyservice.store.model import ROTATION_AUTOMATIC, ROTATION_ON_DEMAND, KeyRecord

if TYPE_CHECKING:
    from keyservice.service import KeyService

DEFAULT_PERIOD_DAYS = 365
MIN_PERIOD_DAYS = 90
MAX_PERIOD_DAYS = 2560
MAX_ON_DEMAND_ROTATIONS = 10


def rotate(service: KeyService, key: KeyRecord, rotation_type: str, now: datetime) -> int:
    """Append a new version with fresh material; returns its number. Caller runs it inside
    ``service.store.transaction()``."""
    latest = service.store.latest_key_version(key.key_id)
    number = (latest.version if latest else 0) + 1
    service.store.add_key_version(service.fresh_version(key.key_id, number, now, rotation_type))
    if rotation_type == ROTATION_AUTOMATIC and key.rotation_period_days:
        key.next_rotation_date = now + timedelta(days=key.rotation_period_days)
        service.store.update_key(key)
    return number


def enable_key_rotation(service: KeyService, params: dict[str, Any], info: AuditInfo) -> dict[str, Any]:
    key = service.key_param(params, info, allow_alias=False)
    period = get_int(params, "RotationPeriodInDays", MIN_PERIOD_DAYS, MAX_PERIOD_DAYS) or DEFAULT_PERIOD_DAYS
    service.check_usable(key, "EnableKeyRotation", info)
    if not (key.rotation_enabled and key.rotation_period_days == period):
        key.rotation_enabled = True
        key.rotation_period_days = period
        key.next_rotation_date = service.now() + timedelta(days=period)
        service.store.update_key(key)
    info.extra = {"rotation_period_days": period, "next_rotation_date": key.next_rotation_date.isoformat()}
    return {}


def disable_key_rotation(service: KeyService, params: dict[str, Any], info: AuditInfo) -> dict[str, Any]:
    key = service.key_param(params, info, allow_alias=False)
    service.check_usable(key, "DisableKeyRotation", info)
    if key.rotation_enabled:
        key.rotation_enabled = False
        key.rotation_period_days = None
        key.next_rotation_date = None
        service.store.update_key(key)
    return {}


def get_key_rotation_status(service: KeyService, params: dict[str, Any], info: AuditInfo) -> dict[str, Any]:
    key = service.key_param(params, info, allow_alias=False)
    service.check_usable(key, "GetKeyRotationStatus", info)
    result: dict[str, Any] = {"KeyRotationEnabled": key.rotation_enabled, "KeyId": key.arn}
    if key.rotation_enabled:
        result["RotationPeriodInDays"] = key.rotation_period_days
        result["NextRotationDate"] = key.next_rotation_date
    return result


def rotate_key_on_demand(service: KeyService, params: dict[str, Any], info: AuditInfo) -> dict[str, Any]:
    key = service.key_param(params, info, allow_alias=False)
    service.check_usable(key, "RotateKeyOnDemand", info)
    done = sum(
        1 for v in service.store.list_key_versions(key.key_id) if v.rotation_type == ROTATION_ON_DEMAND
    )
    if done >= MAX_ON_DEMAND_ROTATIONS:
        raise errors.LimitExceededException(
            f"{key.arn} has had {MAX_ON_DEMAND_ROTATIONS} on-demand rotations, the most allowed."
        )
    info.key_version = rotate(service, key, ROTATION_ON_DEMAND, service.now())
    return {"KeyId": key.arn}


def list_key_rotations(service: KeyService, params: dict[str, Any], info: AuditInfo) -> dict[str, Any]:
    key = service.key_param(params, info, allow_alias=False)
    limit = get_int(params, "Limit", 1, 1000) or 100
    marker = params.get("Marker")
    if marker is not None and not isinstance(marker, str):
        raise errors.ValidationException("Marker must be a string")
    after = decode_marker("rotations", marker)
    include = (
        get_enum(params, "IncludeKeyMaterial", ("ALL_KEY_MATERIAL", "ROTATIONS_ONLY")) or "ROTATIONS_ONLY"
    )
    service.check_usable(key, "ListKeyRotations", info)
    try:
        after_version = int(after) if after is not None else 0
    except ValueError:
        raise errors.InvalidMarkerException("The marker is not valid.") from None
    versions = [
        v
        for v in service.store.list_key_versions(key.key_id)
        if v.version > after_version and (include == "ALL_KEY_MATERIAL" or v.rotation_type is not None)
    ]
    page = versions[:limit]
    rotations = []
    for v in page:
        entry: dict[str, Any] = {"KeyId": key.arn}
        if v.rotation_type is not None:
            entry["RotationDate"] = v.creation_date
            entry["RotationType"] = v.rotation_type
        rotations.append(entry)
    result: dict[str, Any] = {"Rotations": rotations, "Truncated": len(versions) > limit}
    if len(versions) > limit:
        result["NextMarker"] = encode_marker("rotations", str(page[-1].version))
    return result


HANDLERS = {
    "EnableKeyRotation": enable_key_rotation,
    "DisableKeyRotation": disable_key_rotation,
    "GetKeyRotationStatus": get_key_rotation_status,
    "RotateKeyOnDemand": rotate_key_on_demand,
    "ListKeyRotations": list_key_rotations,
}
