"""Service-managed default keys (SPEC K15): ``alias/aws/kmsfs``, created on first use.

Like AWS managed keys (``alias/aws/s3``, ...), the key appears the first time a caller names its
alias in DescribeKey, Encrypt or GenerateDataKey*; it has KeyManager AWS, rotates yearly on its
own, is not counted in the customer-key quota, and customers can use and view it but never
disable, delete, tag, re-alias or re-policy it: its key policy (``policy.aws_managed_key_policy``)
says so, and ``lifecycle.AWS_MANAGED_ALLOWED`` backs it up. Creation is
audited as part of the request that triggered it (that record names the new key).
"""

from __future__ import annotations

from datetime import timedelta
from typing import TYPE_CHECKING

from keyservice import errors
from keyservice.authz import policy
from keyservice.store.model import ENABLED, MANAGER_AWS, ORIGIN_AWS_KMS, AliasRecord

if TYPE_CHECKING:
    from keyservice.service import KeyService

# alias -> description. Only these aliases exist under alias/aws/ here.
DEFAULT_KEYS = {
    "alias/aws/kmsfs": "Default key that protects my kmsfs file systems when no other key is defined",
}
AWS_MANAGED_ROTATION_DAYS = 365


def ensure(service: KeyService, alias_name: str) -> AliasRecord | None:
    """The alias of the default key ``alias_name``, creating alias and key if missing; None if
    ``alias_name`` is not a default key this service manages."""
    description = DEFAULT_KEYS.get(alias_name)
    if description is None:
        return None
    with service.store.transaction():
        existing = service.store.get_alias(alias_name)
        if existing is not None:
            return existing
        now = service.now()
        key = service.new_key_record(
            now,
            description=description,
            state=ENABLED,
            origin=ORIGIN_AWS_KMS,
            key_manager=MANAGER_AWS,
            rotation_enabled=True,
            rotation_period_days=AWS_MANAGED_ROTATION_DAYS,
            next_rotation_date=now + timedelta(days=AWS_MANAGED_ROTATION_DAYS),
            policy=policy.aws_managed_key_policy(service.account_id),
        )
        version = service.fresh_version(key.key_id, 1, now)
        alias = AliasRecord(
            name=alias_name, target_key_id=key.key_id, creation_date=now, last_updated_date=now
        )
        try:
            service.store.create_key(key, version, max_customer_keys=service.max_keys, alias=alias)
        except errors.AlreadyExistsException:  # another process won the race
            return service.store.get_alias(alias_name)
        return alias
