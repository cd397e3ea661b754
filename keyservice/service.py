"""The key service façade: validate -> resolve the key -> check its state -> act -> audit.

No HTTP here. The HTTP layer verifies SigV4 (using the secret from ``authenticate``), decodes
JSON and base64, and calls ``call(operation, params, ctx)``; binary fields arrive and leave as
``bytes`` and timestamps leave as ``datetime``. Every ``call`` appends exactly one audit record,
success or error, before it returns or raises; if the record cannot be written the caller gets
``KMSInternalException`` instead of the result (fail closed). A request that changes the store
first appends a durable *intent* record (``write_ahead``: ``self.store`` is a ``WriteAheadStore``),
so no change is ever visible without a record of it.

Authorization (K4/K5) is ``authz.authorize``'s: every handler's ``check_usable(key, operation,
info)`` authorizes the caller on the key before checking its state, and ``call`` authorizes
operations that are not about one key and refuses to return a key operation whose key was never
authorized. Key material is unsealed only inside the operation that needs it (and kept in this
process's memory for reuse, keyed by its sealed bytes: ``_unseal``).

This module knows no operation. The operations live in ``keyservice.ops`` (one module per group),
collected by ``keyservice.ops.registry`` into the ``OperationTable`` that whoever builds the
service hands in; each handler is ``fn(service, params, info) -> result`` and uses the helpers
here. Parameter checks and limits are ``params.py``'s; state rules are ``lifecycle.py``'s alone.
Operations that change keys, and the background ``scheduler.py``, run each read-modify-write as
one ``store.transaction()`` (SQLite: ``BEGIN IMMEDIATE``; PostgreSQL: the key row read ``FOR
UPDATE``), so a concurrent change from another thread, worker process or node is never lost.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import hmac
import logging
import os
import uuid
from collections.abc import Callable, Iterator, Mapping
from datetime import datetime
from typing import Any

from keyservice import envelope, errors, lifecycle, write_ahead
from keyservice.audit.log import AuditLog
from keyservice.audit.records import build_record
from keyservice.authz import authorize, policy
from keyservice.clock import Clock
from keyservice.context import Principal, RequestContext
from keyservice.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from keyservice.metrics import Metrics
from keyservice.params import (
    ENCRYPTION_ALGORITHMS,
    MAX_KEY_ID,
    AuditInfo,
    Handler,
    canonical_uuid,
    get_bool,
    get_enum,
    get_str,
    wire_name,
)
from keyservice.store import rootkey
from keyservice.store.base import Store, material_aad, secret_aad
from keyservice.store.model import (
    ENABLED,
    ENCRYPTION_ALGORITHM,
    ORIGIN_EXTERNAL,
    PENDING_IMPORT,
    AliasRecord,
    KeyRecord,
    KeyVersionRecord,
)

log = logging.getLogger(__name__)

DEFAULT_MAX_KEYS = 1000

# Unsealed values (key material, access-key secrets) kept for reuse (see ``KeyService._unseal``).
UNSEALED_CACHE_SIZE = 1024

# Who the audit log names for transitions the service makes by itself.
SERVICE_PRINCIPAL = "keyservice"

# The /metrics label of every request whose operation this service does not implement.
UNKNOWN_OPERATION = "unknown"

# Operations that never change a key record run outside a store transaction (and, for the same
# reason, on the HTTP server's event loop: keyservice/http/api.py).
READ_ONLY_OPERATIONS = frozenset(
    {
        "DescribeKey",
        "ListKeys",
        "ListAliases",
        "Encrypt",
        "Decrypt",
        "ReEncrypt",
        "GenerateDataKey",
        "GenerateDataKeyWithoutPlaintext",
        "GenerateRandom",
        "GetKeyRotationStatus",
        "ListKeyRotations",
        "ListResourceTags",
        "GetKeyPolicy",
        "ListKeyPolicies",
        "ListGrants",
        "ListRetirableGrants",
        "KmsfsReportAccess",  # kmsfs's open reports: audit records only, no store change
    }
)


# An operation: ``fn(service, params, info) -> result`` (``params.AuditInfo`` collects what the
# audit record names).
OperationHandler = Callable[["KeyService", dict[str, Any], AuditInfo], dict[str, Any]]


@dataclasses.dataclass(frozen=True)
class OperationTable:
    """What the service runs, handed in by whoever builds it (``keyservice.ops.registry``).

    ``ensure_default_alias(service, alias_name)``: the alias of a service-managed default key,
    created with its key on first use (SPEC K15), or None if ``alias_name`` is not one.
    """

    handlers: Mapping[str, OperationHandler]
    ensure_default_alias: Callable[[KeyService, str], AliasRecord | None]


# --------------------------------------------------------------------------- the service


class KeyService:
    """The key service core, shared by every request thread."""

    def __init__(
        self,
        store: Store,
        audit_log: AuditLog,
        *,
        region: str,
        account_id: str,
        clock: Clock,
        root_key: bytes,
        operations: OperationTable,
        max_keys: int = DEFAULT_MAX_KEYS,
        allow_pkcs1_import: bool = False,
    ) -> None:
        if len(root_key) != rootkey.ROOT_KEY_LEN:
            raise ValueError("the root key must be 32 bytes")
        # Every write first makes the current request's intent record durable (write_ahead).
        self.store: Store = write_ahead.WriteAheadStore(store)  # type: ignore[assignment]
        self.audit_log = audit_log
        self.region = region
        self.account_id = account_id
        self.clock = clock
        self.max_keys = max_keys
        self.allow_pkcs1_import = allow_pkcs1_import
        self.metrics = Metrics()
        self._root_key = bytes(root_key)
        self._unsealed: dict[tuple[bytes, bytes], bytes] = {}
        self._ensure_default_alias = operations.ensure_default_alias
        self._handlers: dict[str, Handler] = {
            name: functools.partial(fn, self) for name, fn in operations.handlers.items()
        }

    @property
    def operations(self) -> frozenset[str]:
        """The AWS operation names ``call`` implements."""
        return frozenset(self._handlers)

    def close(self) -> None:
        self.store.close()
        self.audit_log.close()

    # ----------------------------------------------------------------- entry points

    def request_scope(self) -> contextlib.AbstractContextManager[None]:
        """Bracket one request: its store lookups share one check for outside commits."""
        return self.store.one_read_check()

    def authenticate(self, access_key_id: str) -> tuple[str, Principal]:
        """The secret access key and principal of ``access_key_id``, or UnrecognizedClientException."""
        cred = self.store.get_credential(access_key_id) if access_key_id else None
        if cred is None or not cred.enabled:
            raise errors.UnrecognizedClientException("The security token included in the request is invalid.")
        try:
            secret = self._secret(access_key_id, cred.sealed_secret)
        except rootkey.UnsealError:
            log.error("credential %s does not unseal under the root key", access_key_id)
            raise errors.KMSInternalException("An internal error occurred.") from None
        return secret, Principal(
            account_id=cred.account_id, arn=cred.principal_arn, access_key_id=access_key_id
        )

    def _secret(self, access_key_id: str, sealed: bytes) -> str:
        """An access key's secret: SigV4 needs it on every request."""
        return self._unseal(sealed, secret_aad(access_key_id)).decode()

    def _unseal(self, sealed: bytes, aad: bytes) -> bytes:
        """``rootkey.unseal``, remembering the result for the next request (raises UnsealError).

        Keyed by the sealed bytes and their AAD (which names the row), so rotated, new or deleted
        material or secrets never hit a stale entry: the store is still asked for the row, and the
        key's state checked, on every request. The values live only in this process's memory, as
        they must while they are used.
        """
        cache_key = (sealed, aad)
        value = self._unsealed.get(cache_key)
        if value is None:
            value = rootkey.unseal(self._root_key, sealed, aad)
            if len(self._unsealed) >= UNSEALED_CACHE_SIZE:
                self._unsealed.clear()
            self._unsealed[cache_key] = value
        return value

    def call(self, operation: str, params: dict[str, Any], ctx: RequestContext) -> dict[str, Any]:
        """Run one AWS KMS operation for an authenticated caller and audit it."""
        info = AuditInfo()
        try:
            handler = self._handlers.get(operation)
            if handler is None:
                raise errors.UnknownOperationException(f"Operation {operation[:128]!r} is not supported.")
            self._check_principal(ctx)
            info.principal = ctx.principal
            info.source_address = ctx.source_address
            info.peer = ctx.peer
            if not isinstance(params, dict):
                raise errors.SerializationException("The request body must be a JSON object.")
            if operation in authorize.ACCOUNT_OPERATIONS:
                authorize.authorize_account(self, info, operation)
            authorize.check_grant_tokens(self, params)
            with write_ahead.scope(functools.partial(self._audit_intent, operation, ctx, info)):
                if operation in READ_ONLY_OPERATIONS:
                    result = handler(params, info)
                else:
                    with self.store.transaction():
                        result = handler(params, info)
            if operation not in authorize.ACCOUNT_OPERATIONS and not info.authorized_keys:
                # Fail closed: a key operation that never authorized its key is a bug, not a grant.
                log.error("%s returned without authorizing a key", operation)
                raise errors.KMSInternalException("An internal error occurred.")
        except errors.KMSError as exc:
            self._audit(operation, ctx, info, exc)
            raise
        except Exception as exc:
            log.exception("internal error in %s", operation)
            internal = errors.KMSInternalException("An internal error occurred.")
            self._audit(operation, ctx, info, internal)
            raise internal from exc
        self._audit(operation, ctx, info, None)
        return result

    def record_refused(
        self,
        operation: str,
        ctx: RequestContext,
        error: errors.KMSError,
        *,
        access_key_id: str | None = None,
    ) -> None:
        """Audit a request refused before ``call`` (bad signature, unknown access key, bad body).

        ``access_key_id``: the key id the request claimed, recorded when ``ctx.principal`` is None.
        """
        self._audit(operation or "", ctx, AuditInfo(), error, claimed_access_key_id=access_key_id)

    def authorize_action(self, operation: str, ctx: RequestContext) -> None:
        """Authorize and audit an account-wide action that is not a KMS operation, such as the
        console's ``ReadAuditLog`` (IAM action ``kms:ReadAuditLog``): identity policies decide, as
        for ListKeys; one audit record either way. Raises AccessDeniedException."""
        info = AuditInfo()
        try:
            self._check_principal(ctx)
            info.principal = ctx.principal
            info.source_address = ctx.source_address  # aws:SourceIp conditions see the browser's peer
            authorize.authorize_account(self, info, operation)
        except errors.KMSError as exc:
            self._audit(operation, ctx, info, exc)
            raise
        self._audit(operation, ctx, info, None)

    def allows(self, operation: str, principal: Principal) -> bool:
        """Would ``authorize_action(operation)`` pass for ``principal``? Not audited: the console
        asks it to decide which links to show, and every page behind a link authorizes again."""
        info = AuditInfo()
        info.principal = principal
        try:
            self._check_principal(RequestContext(request_id="", source_address="", principal=principal))
            authorize.authorize_account(self, info, operation)
        except errors.KMSError:
            return False
        return True

    def record_event(self, operation: str, ctx: RequestContext) -> None:
        """Audit a successful event that is not a KMS operation (console login and logout)."""
        info = AuditInfo()
        info.principal = ctx.principal
        self._audit(operation, ctx, info, None)

    # ----------------------------------------------------------------- helpers

    def _audit(
        self,
        operation: str,
        ctx: RequestContext,
        info: AuditInfo,
        error: errors.KMSError | None,
        *,
        claimed_access_key_id: str | None = None,
        intent: bool = False,
    ) -> None:
        if info.extra:
            ctx = dataclasses.replace(ctx, caller={**ctx.caller, "keyservice": info.extra})
        if not intent:
            # Only operation names this service implements become metric labels: anything else a
            # client sends would add a series (memory) per distinct name.
            label = operation if operation in self._handlers else UNKNOWN_OPERATION
            self.metrics.count_request(label, error.aws_type if error is not None else None)
        record = build_record(
            when=self.clock.now(),
            ctx=ctx,
            operation=operation[:128],
            error=error,
            key_arn=info.key_arn,
            key_version=info.key_version,
            requested_key_id=info.requested_key_id[:MAX_KEY_ID] if info.requested_key_id else None,
            alias_name=info.alias_name,
            encryption_context=info.encryption_context,
            claimed_access_key_id=claimed_access_key_id[:128] if claimed_access_key_id else None,
            intent=intent,
        )
        self.audit_log.append(record, sync=intent)

    def _audit_intent(self, operation: str, ctx: RequestContext, info: AuditInfo) -> None:
        """The intent record of a request about to change the store: durable before the write."""
        self._audit(operation, ctx, info, None, intent=True)

    @contextlib.contextmanager
    def intent_scope(self, operation: str, key_arn: str | None) -> Iterator[str]:
        """Bracket a transition the service makes by itself (scheduler): its first store write is
        preceded by a durable intent record; if the block fails after that, an error record follows.
        Yields the request id, for the ``audit_event`` that records the outcome."""
        ctx = self._service_context({})
        info = AuditInfo(key_arn=key_arn)
        with write_ahead.scope(functools.partial(self._audit_intent, operation, ctx, info)) as current:
            try:
                yield ctx.request_id
            except Exception as exc:
                if current.written:
                    error = exc if isinstance(exc, errors.KMSError) else errors.KMSInternalException(
                        "The transition failed after its intent was recorded."
                    )
                    with contextlib.suppress(errors.KMSError):
                        self._audit(operation, ctx, info, error)
                raise

    def audit_event(
        self,
        operation: str,
        key_arn: str | None,
        *,
        key_version: int | None = None,
        details: dict[str, Any] | None = None,
        request_id: str | None = None,
    ) -> None:
        """Audit a transition the service made by itself (scheduler: rotation, expiry, deletion).

        The principal is ``SERVICE_PRINCIPAL``; event details go under ``caller.keyservice``.
        ``request_id``: the one ``intent_scope`` yielded, so intent and outcome pair up.
        """
        ctx = self._service_context(details or {}, request_id)
        self.metrics.count_event(operation)
        self.audit_log.append(
            build_record(
                when=self.clock.now(), ctx=ctx, operation=operation, key_arn=key_arn, key_version=key_version
            )
        )

    def _service_context(self, details: dict[str, Any], request_id: str | None = None) -> RequestContext:
        return RequestContext(
            request_id=request_id or str(uuid.uuid4()),
            source_address="",
            principal=Principal(self.account_id, SERVICE_PRINCIPAL, ""),
            user_agent="keyservice-scheduler",
            caller={"keyservice": details},
        )

    def metrics_text(self, counters: Metrics | None = None) -> tuple[str, str]:
        """``GET /metrics``: (content type, Prometheus text); ``counters`` instead of this process's
        own (``serve --workers``: every worker's, summed)."""
        expiring = [
            (k.key_id, k.arn, k.valid_to) for k in self.store.keys_with_material_expiry() if k.valid_to
        ]
        text = (counters or self.metrics).render(
            now=self.clock.now(), expiring=expiring, key_counts=self.store.count_keys_by_state()
        )
        return METRICS_CONTENT_TYPE, text

    def _check_principal(self, ctx: RequestContext) -> None:
        principal = ctx.principal
        if principal is None:
            raise errors.AccessDeniedException("The request is not authenticated.")
        if principal.account_id != self.account_id:
            raise errors.AccessDeniedException(
                f"{principal.arn} is not authorized to access keys of account {self.account_id}."
            )

    def key_arn(self, key_id: str) -> str:
        return f"arn:aws:kms:{self.region}:{self.account_id}:key/{key_id}"

    def alias_arn(self, alias_name: str) -> str:
        return f"arn:aws:kms:{self.region}:{self.account_id}:{alias_name}"

    def find_key(
        self, ident: str, info: AuditInfo, *, allow_alias: bool, create_default: bool = False
    ) -> KeyRecord:
        """Resolve a key identifier (id, ARN, and if allowed alias name / alias ARN) to a key.

        ``create_default``: a missing service default alias (``alias/aws/kmsfs``) is created with its
        key on first use, as AWS does for AWS managed keys (SPEC K15).
        """
        info.requested_key_id = ident
        resource = ident
        if ident.startswith("arn:"):
            parts = ident.split(":", 5)
            if len(parts) != 6 or parts[1] != "aws" or parts[2] != "kms":
                raise errors.NotFoundException(f"Invalid keyId '{ident}'")
            if parts[3] != self.region or parts[4] != self.account_id:
                raise errors.NotFoundException(
                    f"'{ident}' names a key of another region or account; this service is "
                    f"{self.region}/{self.account_id}"
                )
            resource = parts[5]
            if resource.startswith("key/"):
                resource = resource[4:]
            elif not resource.startswith("alias/"):
                raise errors.NotFoundException(f"Invalid keyId '{ident}'")
        if resource.startswith("alias/"):
            if not allow_alias:
                raise errors.NotFoundException(
                    f"Invalid keyId '{ident}': this operation takes a key id or key ARN, not an alias"
                )
            alias = self.store.get_alias(resource)
            info.alias_name = resource
            if alias is None and create_default:
                alias = self._ensure_default_alias(self, resource)
            if alias is None:
                raise errors.NotFoundException(f"Alias {self.alias_arn(resource)} is not found.")
            resource = alias.target_key_id
        key_id = canonical_uuid(resource)
        if key_id is None:
            raise errors.NotFoundException(f"Invalid keyId '{ident}'")
        key = self.load_key(key_id)
        if key is None:
            raise errors.NotFoundException(f"Key '{self.key_arn(key_id)}' does not exist")
        info.key_arn = key.arn
        return key

    def load_key(self, key_id: str) -> KeyRecord | None:
        """The key, or None if it does not exist (or its deletion date has passed)."""
        key = self.store.get_key(key_id)
        if key is None or lifecycle.is_destroyed(key, self.clock.now()):
            return None
        return key

    def seal_material(self, key_id: str, version: int, material: bytes) -> bytes:
        return rootkey.seal(self._root_key, material, material_aad(key_id, version))

    def fresh_version(
        self, key_id: str, number: int, now: datetime, rotation_type: str | None = None
    ) -> KeyVersionRecord:
        """A key version with new service-generated material, sealed at once (CreateKey, rotation)."""
        return KeyVersionRecord(
            key_id=key_id,
            version=number,
            creation_date=now,
            sealed_material=self.seal_material(key_id, number, os.urandom(envelope.MATERIAL_LEN)),
            rotation_type=rotation_type,
        )

    def root_mac(self, purpose: bytes, data: bytes) -> bytes:
        """HMAC-SHA256 under a subkey of the root key, for fingerprints that must not be computable
        from the data directory alone (KeyMaterialId)."""
        subkey = hmac.new(self._root_key, b"keyservice/mac-subkey/v1\x00" + purpose, hashlib.sha256).digest()
        return hmac.new(subkey, data, hashlib.sha256).digest()

    def seal(self, plaintext: bytes, aad: bytes) -> bytes:
        return rootkey.seal(self._root_key, plaintext, aad)

    def unseal(self, sealed: bytes, aad: bytes) -> bytes:
        try:
            return rootkey.unseal(self._root_key, sealed, aad)
        except rootkey.UnsealError:
            log.error("a sealed value does not unseal under the root key")
            raise errors.KMSInternalException("An internal error occurred.") from None

    def now(self) -> datetime:
        return self.clock.now()

    def key_param(
        self,
        params: Mapping[str, Any],
        info: AuditInfo,
        *,
        allow_alias: bool,
        name: str = "KeyId",
        create_default: bool = False,
    ) -> KeyRecord:
        ident = get_str(params, name, required=True, min_len=1, max_len=MAX_KEY_ID)
        assert ident is not None
        return self.find_key(ident, info, allow_alias=allow_alias, create_default=create_default)

    def metadata(self, key: KeyRecord) -> dict[str, Any]:
        state = lifecycle.effective_state(key, self.clock.now())
        meta: dict[str, Any] = {
            "AWSAccountId": key.account_id,
            "KeyId": key.key_id,
            "Arn": key.arn,
            "CreationDate": key.creation_date,
            "Enabled": state == ENABLED,
            "Description": key.description,
            "KeyUsage": key.key_usage,
            "KeyState": state,
            "Origin": key.origin,
            "KeyManager": key.key_manager,
            "KeySpec": key.key_spec,
            "CustomerMasterKeySpec": key.key_spec,
            "EncryptionAlgorithms": [ENCRYPTION_ALGORITHM],
            "MultiRegion": False,
        }
        if key.deletion_date is not None:
            meta["DeletionDate"] = key.deletion_date
        if key.origin == ORIGIN_EXTERNAL and state != PENDING_IMPORT and key.expiration_model:
            meta["ExpirationModel"] = key.expiration_model
            if key.valid_to is not None:
                meta["ValidTo"] = key.valid_to
        return meta

    def check_usable(
        self,
        key: KeyRecord,
        operation: str,
        info: AuditInfo,
        *,
        action: str | None = None,
        context: Mapping[str, str] | None = None,
        also_allowed: bool = False,
    ) -> policy.Decision:
        """May the caller do ``operation`` on ``key`` now? Authorization first (so a caller without
        permission learns nothing about the key's state), then the key-state rules."""
        decision = self.authorize(
            key, operation, info, action=action, context=context, also_allowed=also_allowed
        )
        lifecycle.check_usable(key, operation, self.clock.now())
        return decision

    def authorize(
        self,
        key: KeyRecord,
        operation: str,
        info: AuditInfo,
        *,
        action: str | None = None,
        context: Mapping[str, str] | None = None,
        also_allowed: bool = False,
    ) -> policy.Decision:
        """Authorization alone (UpdateAlias's old target key): see ``authorize.authorize_key``."""
        return authorize.authorize_key(
            self, info, key, operation, action=action, context=context, also_allowed=also_allowed
        )

    def material(self, version: KeyVersionRecord) -> bytes:
        """A version's unsealed key material."""
        try:
            return self._unseal(version.sealed_material, material_aad(version.key_id, version.version))
        except rootkey.UnsealError:
            log.error("key material of %s v%d does not unseal", version.key_id, version.version)
            raise errors.KMSInternalException("An internal error occurred.") from None

    def latest_version(self, key: KeyRecord, info: AuditInfo) -> tuple[KeyVersionRecord, bytes]:
        """The newest version (every new encryption uses it, SPEC K6) and its unsealed material."""
        version = self.store.latest_key_version(key.key_id)
        if version is None:
            raise errors.KMSInvalidStateException(f"{key.arn} has no key material.")
        info.key_version = version.version
        return version, self.material(version)

    def context(
        self, params: Mapping[str, Any], info: AuditInfo, name: str = "EncryptionContext"
    ) -> dict[str, str]:
        context = envelope.validate_context(params.get(name), wire_name(name))
        if name == "EncryptionContext" or info.encryption_context is None:
            info.encryption_context = context
        return context

    @staticmethod
    def check_algorithm(
        params: Mapping[str, Any], name: str = "EncryptionAlgorithm", label: str = "Encryption algorithm"
    ) -> None:
        """Symmetric keys take SYMMETRIC_DEFAULT only; ``label`` names the parameter in the error."""
        algorithm = get_enum(params, name, ENCRYPTION_ALGORITHMS)
        if algorithm not in (None, ENCRYPTION_ALGORITHM):
            raise errors.InvalidKeyUsageException(
                f"{label} {algorithm} is not supported by symmetric keys; use SYMMETRIC_DEFAULT."
            )

    @staticmethod
    def dry_run(params: Mapping[str, Any]) -> None:
        if get_bool(params, "DryRun"):
            raise errors.DryRunOperationException(
                "The request would have succeeded, but the DryRun flag is set."
            )

    @staticmethod
    def no_recipient(params: Mapping[str, Any]) -> None:
        if params.get("Recipient") is not None:
            raise errors.UnsupportedOperationException(
                "Recipient (Nitro Enclaves attestation) is not supported."
            )
