"""The background scheduler: automatic rotation, imported-material expiry and the deletion reaper.

All three are dates stored on key records, so a tick simply does whatever is due at ``clock.now()``:
work missed while the server was down is done on the first tick after a restart, and a test can
move an injected clock forward instead of waiting. Each transition is audited (principal
``keyservice``) and counted in /metrics. One thread; ``stop`` ends it between ticks; a failing
tick is logged and retried on the next one, never fatal.

Several nodes on one PostgreSQL store: a tick runs only on the node holding the scheduler lease
(a row timed by the database clock, renewed every tick, ``lease_seconds`` long), and each of
its transitions re-checks the lease's fencing token inside its own transaction
(``store.fenced``), so a node that lost the lease while paused changes nothing. The transitions
are conditional updates besides, so even a second run would be harmless. No advisory locks:
they vanish silently with a dropped connection.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from typing import TYPE_CHECKING

from keyservice.ops import deletion, importing, rotation
from keyservice.store.base import LeaseLostError
from keyservice.store.model import ENABLED, ROTATION_AUTOMATIC

if TYPE_CHECKING:
    from keyservice.service import KeyService

log = logging.getLogger(__name__)

DEFAULT_INTERVAL = 60.0
MIN_LEASE_SECONDS = 5.0


def run_due_work(service: KeyService) -> dict[str, int]:
    """Do everything that is due now; returns counts by kind (for logs and tests)."""
    now = service.now()
    done = {"rotated": 0, "expired": 0, "deleted": 0, "import_parameters_purged": 0}
    for key in service.store.keys_due_deletion(now):
        if deletion.reap(service, key, now):
            done["deleted"] += 1
    for key in service.store.keys_with_material_expiry():
        if key.valid_to is not None and key.valid_to <= now and importing.expire(service, key.key_id, now):
            done["expired"] += 1
    for candidate in service.store.keys_due_rotation(now):
        with service.store.transaction():
            key = service.store.get_key(candidate.key_id)
            # Disabled and pending keys are not rotated; they rotate when enabled again, if still due.
            if (
                key is None
                or not key.rotation_enabled
                or key.state != ENABLED
                or key.next_rotation_date is None
                or key.next_rotation_date > now
            ):
                continue
            due = key.next_rotation_date
            version = rotation.rotate(service, key, ROTATION_AUTOMATIC, now)
        service.audit_event(
            "RotateKey",
            key.arn,
            key_version=version,
            details={"rotation_type": ROTATION_AUTOMATIC, "due": due.isoformat()},
        )
        done["rotated"] += 1
    done["import_parameters_purged"] = service.store.purge_import_parameters(now)
    return done


class Scheduler:
    """Runs ``run_due_work`` every ``interval`` seconds on a daemon thread, starting immediately."""

    def __init__(self, service: KeyService, interval: float = DEFAULT_INTERVAL) -> None:
        if interval <= 0:
            raise ValueError("the scheduler interval must be positive")
        self.service = service
        self.interval = interval
        self.lease_seconds = max(MIN_LEASE_SECONDS, 3 * interval)
        self.holder = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="keyservice-scheduler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                store = self.service.store
                token = store.acquire_scheduler_lease(self.holder, self.lease_seconds)
                if token is not None:
                    with store.fenced(self.holder, token):
                        done = run_due_work(self.service)
                    if any(done.values()):
                        log.info("scheduler: %s", done)
            except LeaseLostError as error:
                log.info("scheduler: %s; another node runs it now", error)
            except Exception:
                log.exception("scheduler tick failed; retrying next tick")
            self._stop.wait(self.interval)
