"""The key pages as KMS calls: what a page shows and what a form does, in wire operations.

Each function gets ``call(operation, params) -> result``, which runs the operation through the
service core as the logged-in principal (``app.Console._caller``), so this module knows nothing of
sessions or HTTP and never reads the store: the list page is ListKeys + ListAliases + DescribeKey
and GetKeyRotationStatus per shown key, as any API client would do it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from keyservice import errors

Call = Callable[[str, dict[str, Any]], dict[str, Any]]

PAGE_SIZE = 50
LIST_BATCH = 50  # the smallest maximum of the List* operations used (ListResourceTags)
STATES = ("Enabled", "Disabled", "PendingDeletion", "PendingImport", "Unavailable")


@dataclass
class KeyRow:
    key_id: str
    arn: str
    state: str
    description: str
    created: str
    manager: str
    aliases: list[str] = field(default_factory=list)
    tags: dict[str, str] = field(default_factory=dict)
    rotation: str = "-"


def _all(call: Call, operation: str, params: dict[str, Any], member: str) -> Iterator[dict[str, Any]]:
    """Every item of a paginated List* operation."""
    params = {**params, "Limit": LIST_BATCH}
    while True:
        result = call(operation, params)
        yield from result.get(member, [])
        if not result.get("Truncated"):
            return
        params = {**params, "Marker": result["NextMarker"]}


def when(value: Any) -> str:
    """A timestamp for people: ``2026-01-31 12:00:00 UTC``."""
    return value.strftime("%Y-%m-%d %H:%M:%S UTC") if hasattr(value, "strftime") else str(value or "")


def aliases_by_key(call: Call) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for alias in _all(call, "ListAliases", {}, "Aliases"):
        if alias.get("TargetKeyId"):
            found.setdefault(alias["TargetKeyId"], []).append(alias["AliasName"])
    return found


def tags_of(call: Call, key_id: str) -> dict[str, str]:
    return {t["TagKey"]: t["TagValue"] for t in _all(call, "ListResourceTags", {"KeyId": key_id}, "Tags")}


def _rotation(call: Call, key_id: str) -> str:
    try:
        status = call("GetKeyRotationStatus", {"KeyId": key_id})
    except errors.KMSError:
        return "-"
    if not status.get("KeyRotationEnabled"):
        return "off"
    return f"every {status.get('RotationPeriodInDays')} d, next {when(status.get('NextRotationDate'))[:10]}"


def _row(meta: Mapping[str, Any], aliases: list[str]) -> KeyRow:
    return KeyRow(key_id=meta["KeyId"], arn=meta["Arn"], state=meta["KeyState"],
                  description=meta.get("Description") or "", created=when(meta.get("CreationDate")),
                  manager=meta.get("KeyManager", ""), aliases=sorted(aliases))  # fmt: skip


@dataclass
class KeyList:
    rows: list[KeyRow]
    next_marker: str | None
    scanned: int


def list_keys(call: Call, *, state: str = "", alias: str = "", tag: str = "", marker: str = "") -> KeyList:
    """The keys of one ListKeys page (PAGE_SIZE keys from ``marker``) that match the filters.

    Filtering a page rather than filling one keeps a page's cost bounded (a filter that matches
    few keys shows short pages with a "next" link); ``tag`` is ``key`` or ``key=value``, ``alias``
    a part of an alias name. ``next_marker`` is ListKeys' own.
    """
    aliases = aliases_by_key(call)
    tag_key, has_value, tag_value = tag.partition("=")
    params: dict[str, Any] = {"Limit": PAGE_SIZE}
    if marker:
        params["Marker"] = marker
    result = call("ListKeys", params)
    rows: list[KeyRow] = []
    for entry in result.get("Keys", []):
        key_id = entry["KeyId"]
        if alias and not any(alias.lower() in name.lower() for name in aliases.get(key_id, [])):
            continue
        try:
            meta = call("DescribeKey", {"KeyId": key_id})["KeyMetadata"]
        except errors.AccessDeniedException:
            continue  # a key the caller may not describe is not listed
        if state and meta["KeyState"] != state:
            continue
        row = _row(meta, aliases.get(key_id, []))
        if tag:
            row.tags = tags_of(call, key_id)
            if tag_key not in row.tags or (has_value and row.tags[tag_key] != tag_value):
                continue
        row.rotation = _rotation(call, key_id)
        rows.append(row)
    next_marker = result.get("NextMarker") if result.get("Truncated") else None
    return KeyList(rows, next_marker, len(result.get("Keys", [])))


@dataclass
class KeyDetail:
    meta: dict[str, Any]
    aliases: list[str]
    tags: dict[str, str]
    grants: list[dict[str, Any]]
    rotation: dict[str, Any]
    rotations: list[dict[str, Any]]
    policy: str
    problems: list[str]


def key_detail(call: Call, key_id: str) -> KeyDetail:
    """Everything the detail page shows; a part the caller may not read is named in ``problems``."""
    meta = call("DescribeKey", {"KeyId": key_id})["KeyMetadata"]
    key_id = meta["KeyId"]
    problems: list[str] = []

    def part(default: Any, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except errors.KMSError as error:
            problems.append(f"{error.aws_type}: {error.message}")
            return default

    aliases = part([], lambda: sorted(a["AliasName"] for a in _all(call, "ListAliases", {"KeyId": key_id},
                                                                      "Aliases")))  # fmt: skip
    tags = part({}, lambda: tags_of(call, key_id))
    grants = part([], lambda: list(_all(call, "ListGrants", {"KeyId": key_id}, "Grants")))
    rotation = part({}, lambda: call("GetKeyRotationStatus", {"KeyId": key_id}))
    rotations = part([], lambda: list(_all(call, "ListKeyRotations", {"KeyId": key_id}, "Rotations")))
    policy = part("", lambda: call("GetKeyPolicy", {"KeyId": key_id, "PolicyName": "default"})["Policy"])
    return KeyDetail(meta, aliases, tags, grants, rotation, rotations, policy, problems)


# --------------------------------------------------------------------------- actions
# Each returns the message shown after it succeeded; a KMSError propagates to the page.


def create_key(call: Call, form: Mapping[str, str]) -> tuple[str, str]:
    params: dict[str, Any] = {"Description": form.get("description", "")}
    if form.get("tag_key"):
        params["Tags"] = [{"TagKey": form["tag_key"], "TagValue": form.get("tag_value", "")}]
    meta = call("CreateKey", params)["KeyMetadata"]
    if form.get("alias"):
        call("CreateAlias", {"AliasName": form["alias"], "TargetKeyId": meta["KeyId"]})
    return meta["KeyId"], f"Created key {meta['KeyId']}."


def key_action(call: Call, key_id: str, action: str, form: Mapping[str, str]) -> str:
    """One action of the detail page; ``action`` is a path segment (see ``ACTIONS``)."""
    if action not in ACTIONS:
        raise errors.UnsupportedOperationException(f"Unknown console action {action[:40]!r}.")
    return ACTIONS[action](call, key_id, form)


def _simple(operation: str, done: str) -> Callable[[Call, str, Mapping[str, str]], str]:
    def act(call: Call, key_id: str, form: Mapping[str, str]) -> str:
        call(operation, {"KeyId": key_id})
        return done

    return act


def _int(form: Mapping[str, str], name: str, label: str) -> int:
    try:
        return int(form.get(name, ""))
    except ValueError:
        raise errors.ValidationException(f"{label} must be a whole number.") from None


def _enable_rotation(call: Call, key_id: str, form: Mapping[str, str]) -> str:
    params: dict[str, Any] = {"KeyId": key_id}
    if form.get("period"):
        params["RotationPeriodInDays"] = _int(form, "period", "The rotation period")
    call("EnableKeyRotation", params)
    return "Automatic rotation enabled."


def _schedule_deletion(call: Call, key_id: str, form: Mapping[str, str]) -> str:
    if form.get("confirm", "").strip() != key_id:
        raise errors.ValidationException("Type the key id exactly to confirm the deletion.")
    days = _int(form, "days", "The waiting period")
    result = call("ScheduleKeyDeletion", {"KeyId": key_id, "PendingWindowInDays": days})
    return f"Deletion scheduled for {when(result.get('DeletionDate'))}."


def _create_alias(call: Call, key_id: str, form: Mapping[str, str]) -> str:
    call("CreateAlias", {"AliasName": form.get("alias", ""), "TargetKeyId": key_id})
    return f"Alias {form.get('alias')} created."


def _delete_alias(call: Call, key_id: str, form: Mapping[str, str]) -> str:
    call("DeleteAlias", {"AliasName": form.get("alias", "")})
    return f"Alias {form.get('alias')} deleted."


def _put_policy(call: Call, key_id: str, form: Mapping[str, str]) -> str:
    call("PutKeyPolicy", {"KeyId": key_id, "PolicyName": "default", "Policy": form.get("policy", "")})
    return "Key policy saved."


def _tag(call: Call, key_id: str, form: Mapping[str, str]) -> str:
    call("TagResource", {"KeyId": key_id, "Tags": [{"TagKey": form.get("tag_key", ""),
                                                    "TagValue": form.get("tag_value", "")}]})  # fmt: skip
    return "Tag saved."


def _untag(call: Call, key_id: str, form: Mapping[str, str]) -> str:
    call("UntagResource", {"KeyId": key_id, "TagKeys": [form.get("tag_key", "")]})
    return "Tag removed."


def _description(call: Call, key_id: str, form: Mapping[str, str]) -> str:
    call("UpdateKeyDescription", {"KeyId": key_id, "Description": form.get("description", "")})
    return "Description saved."


ACTIONS: dict[str, Callable[[Call, str, Mapping[str, str]], str]] = {
    "enable": _simple("EnableKey", "Key enabled."),
    "disable": _simple("DisableKey", "Key disabled."),
    "rotate": _simple("RotateKeyOnDemand", "Rotation started: a new key version is in use."),
    "enable-rotation": _enable_rotation,
    "disable-rotation": _simple("DisableKeyRotation", "Automatic rotation disabled."),
    "schedule-deletion": _schedule_deletion,
    "cancel-deletion": _simple("CancelKeyDeletion", "Deletion cancelled; the key is disabled."),
    "create-alias": _create_alias,
    "delete-alias": _delete_alias,
    "policy": _put_policy,
    "tag": _tag,
    "untag": _untag,
    "description": _description,
}
