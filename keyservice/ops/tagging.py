"""Tags: TagResource, UntagResource, ListResourceTags.

Tags are metadata on the key record (a JSON list in the store), validated as CreateKey's are:
keys 1-128 characters, values 0-256, no ``aws:`` prefix, at most 50 per key. Tagging an existing
key overwrites the value; untagging a key that is not there is not an error (as in AWS).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from keyservice import errors
from keyservice.ops.keys import parse_tags
from keyservice.params import AuditInfo, decode_marker, encode_marker, get_int, get_str, get_str_list, null

if TYPE_CHECKING:
    from keyservice.service import KeyService

MAX_TAGS = 50


def tag_resource(service: KeyService, params: dict[str, Any], info: AuditInfo) -> dict[str, Any]:
    key = service.key_param(params, info, allow_alias=False)
    if params.get("Tags") is None:
        raise null("Tags")
    new = parse_tags(params.get("Tags"))
    service.check_usable(key, "TagResource", info)
    merged = {t["TagKey"]: t["TagValue"] for t in key.tags}
    merged.update({t["TagKey"]: t["TagValue"] for t in new})
    if len(merged) > MAX_TAGS:
        raise errors.LimitExceededException(f"A key can have at most {MAX_TAGS} tags.")
    key.tags = [{"TagKey": k, "TagValue": v} for k, v in merged.items()]
    service.store.update_key(key)
    info.extra = {"tag_keys": sorted(t["TagKey"] for t in new)}
    return {}


def untag_resource(service: KeyService, params: dict[str, Any], info: AuditInfo) -> dict[str, Any]:
    key = service.key_param(params, info, allow_alias=False)
    names = get_str_list(params, "TagKeys", required=True, max_items=MAX_TAGS, max_len=128)
    assert names is not None
    for name in names:
        if name.startswith("aws:"):
            raise errors.TagException("Tag keys beginning with 'aws:' are reserved.")
    service.check_usable(key, "UntagResource", info)
    key.tags = [t for t in key.tags if t["TagKey"] not in set(names)]
    service.store.update_key(key)
    info.extra = {"tag_keys": sorted(names)}
    return {}


def list_resource_tags(service: KeyService, params: dict[str, Any], info: AuditInfo) -> dict[str, Any]:
    key = service.key_param(params, info, allow_alias=False)
    limit = get_int(params, "Limit", 1, 50) or MAX_TAGS
    after = decode_marker("tags", get_str(params, "Marker", min_len=1, max_len=1024))
    service.check_usable(key, "ListResourceTags", info)
    tags = sorted(key.tags, key=lambda t: t["TagKey"])
    if after is not None:
        tags = [t for t in tags if t["TagKey"] > after]
    page = tags[:limit]
    result: dict[str, Any] = {"Tags": page, "Truncated": len(tags) > limit}
    if len(tags) > limit:
        result["NextMarker"] = encode_marker("tags", page[-1]["TagKey"])
    return result


HANDLERS = {
    "TagResource": tag_resource,
    "UntagResource": untag_resource,
    "ListResourceTags": list_resource_tags,
}
