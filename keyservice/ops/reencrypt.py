"""ReEncrypt (SPEC K11): decrypt under the source key and encrypt under the destination key (or the
newest version of the same key) inside the service, so the caller never sees the plaintext.

Both keys go through ``check_usable`` for ReEncrypt: the source key (the one named inside the blob,
never SourceKeyId) is authorized for kms:ReEncryptFrom under the source context, the destination
for kms:ReEncryptTo under the destination context. The audit record names the
destination key and version in its key fields and context; the source key, version and context
go under ``caller.keyservice`` until the audit record has fields for them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from keyservice import envelope
from keyservice.ops.encryption import blob_key, blob_version
from keyservice.params import MAX_CIPHERTEXT, AuditInfo, check_grant_tokens, get_bytes
from keyservice.store.model import ENCRYPTION_ALGORITHM

if TYPE_CHECKING:
    from keyservice.service import KeyService


def re_encrypt(service: KeyService, params: dict[str, Any], info: AuditInfo) -> dict[str, Any]:
    blob = get_bytes(params, "CiphertextBlob", 1, MAX_CIPHERTEXT)
    assert blob is not None
    source_context = service.context(params, AuditInfo(), "SourceEncryptionContext")
    destination_context = service.context(params, info, "DestinationEncryptionContext")
    info.encryption_context = destination_context
    check_grant_tokens(params)
    for name in ("SourceEncryptionAlgorithm", "DestinationEncryptionAlgorithm"):
        service.check_algorithm(params, name, label=name)
    source_info = AuditInfo()
    wanted = None
    if params.get("SourceKeyId") is not None:
        wanted = service.key_param(params, source_info, allow_alias=True, name="SourceKeyId")
    destination = service.key_param(
        params, info, allow_alias=True, name="DestinationKeyId", create_default=True
    )
    parsed = envelope.parse_blob(blob)
    info.extra = {
        "source_key_id": service.key_arn(parsed.key_id),
        "source_key_version": parsed.key_version,
        "source_encryption_context": source_context,
    }
    source = blob_key(service, parsed, wanted)
    service.check_usable(source, "ReEncrypt", info, action="kms:ReEncryptFrom", context=source_context)
    service.check_usable(
        destination, "ReEncrypt", info, action="kms:ReEncryptTo", context=destination_context
    )
    version = blob_version(service, source, parsed)
    service.dry_run(params)
    plaintext = envelope.open_blob(service.material(version), parsed, source_context)
    new_version, material = service.latest_version(destination, info)
    out = envelope.seal_blob(
        material, destination.key_id, new_version.version, plaintext, destination_context
    )
    return {
        "CiphertextBlob": out,
        "SourceKeyId": source.arn,
        "KeyId": destination.arn,
        "SourceEncryptionAlgorithm": ENCRYPTION_ALGORITHM,
        "DestinationEncryptionAlgorithm": ENCRYPTION_ALGORITHM,
    }


HANDLERS = {"ReEncrypt": re_encrypt}
