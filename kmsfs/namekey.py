"""The cipherdir's name key, unwrapped through the key service and re-validated like file keys.

Why a module: the name key is the one key a mount holds for its whole life (every lookup and
listing needs it), so revocation must reach it the way it reaches open files (F6 in
docs/SECURITY.md): after ``revalidate_after`` seconds the next use unwraps the wrapped key again
(``Decrypt``, audited as the mount, ``op: names``). A refusal (key disabled, pending deletion,
access denied) makes every later name operation fail with EACCES until a Decrypt succeeds again;
an unreachable service keeps the key (as for open files, F9). The plaintext key lives only in
this object (and the NameCipher's subkeys), never on disk.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
from typing import Any

from kmsfs.config import Config
from kmsfs.keyclient import KeyClient, KeyServiceError, KeyServiceUnavailable
from kmsfs.names import NAME_KEY_SIZE, NameCipher

log = logging.getLogger("kmsfs")


class NameKeyError(Exception):
    """The name key could not be unwrapped (the message says why, one line); ``denied``: the
    service refused access (disabled key, policy), as opposed to an outage or a damaged blob."""

    def __init__(self, message: str, denied: bool = False) -> None:
        super().__init__(message)
        self.denied = denied


def unwrap_name_key(client: KeyClient, config: Config, caller: dict[str, Any]) -> NameCipher:
    """Decrypt the cipherdir's wrapped name key (audited with ``caller``) into a NameCipher."""
    try:
        key = client.decrypt(config.wrapped_name_key, config.name_key_context(), caller,
                             key_id=config.key_arn)
    except KeyServiceError as exc:
        raise NameKeyError(f"the key service refused the name key: {exc}",
                           denied=exc.is_access_denied) from None
    except KeyServiceUnavailable as exc:
        raise NameKeyError(f"cannot unwrap the name key: {exc}") from None
    if len(key) != NAME_KEY_SIZE:
        raise NameKeyError("the unwrapped name key has the wrong size")
    return NameCipher(key)


def mount_caller(op: str = "names", **extra: Any) -> dict[str, Any]:
    """The caller record of the mount's own name-key requests (no user asked for them)."""
    return {"path": "/", "process": "kmsfs", "op": op, "pid": os.getpid(), "uid": os.getuid(), **extra}


class NameKey:
    """The mount's NameCipher, handed out only while the key service still allows it."""

    def __init__(self, client: KeyClient, config: Config, revalidate_after: float) -> None:
        self._client = client
        self._config = config
        self._revalidate_after = revalidate_after
        self._cipher: NameCipher | None = None
        self._revoked: str | None = None
        self._lock = threading.Lock()
        try:
            self._cipher = unwrap_name_key(client, config, mount_caller())
        except NameKeyError as exc:
            # A refusal mounts with names hidden (EACCES) until the key is usable again, as a
            # mount with an unusable file key does; an unreachable service fails the mount.
            if not exc.denied:
                raise
            log.warning("%s: names are hidden until it is allowed again", exc)
            self._revoked = str(exc)
        self._checked_at = time.monotonic()

    def cipher(self) -> NameCipher:
        """The cipher, after a revalidation if one is due; PermissionError (EACCES) if refused."""
        now = time.monotonic()
        cipher = self._cipher
        if cipher is not None and self._revoked is None and now - self._checked_at < self._revalidate_after:
            return cipher
        with self._lock:
            now = time.monotonic()
            due = self._revalidate_after if self._revoked is None else min(1.0, self._revalidate_after)
            if now - self._checked_at >= due:
                self._checked_at = now
                self._revalidate()
            cipher = self._cipher
            if self._revoked is not None or cipher is None:
                raise PermissionError(errno.EACCES, f"name key refused: {self._revoked}")
        return cipher

    def _revalidate(self) -> None:
        try:
            key = self._client.decrypt(self._config.wrapped_name_key, self._config.name_key_context(),
                                       mount_caller(revalidate=True), key_id=self._config.key_arn)
            if self._cipher is None and len(key) == NAME_KEY_SIZE:
                self._cipher = NameCipher(key)
        except KeyServiceError as exc:
            if exc.is_access_denied:
                if self._revoked is None:
                    log.warning("name key refused by the key service (%s): names are hidden", exc)
                self._revoked = str(exc)
                return
            log.warning("name key revalidation failed (%s); keeping the key", exc)
        except KeyServiceUnavailable as exc:
            log.warning("key service unavailable for the name key's revalidation (%s); keeping it", exc)
            return
        if self._revoked is not None:
            log.info("name key usable again")
        self._revoked = None
