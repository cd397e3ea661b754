"""Prometheus text exposition for ``GET /metrics`` (SPEC K16).

Counters of requests by operation and outcome are kept in memory (they restart at zero with the
process, as Prometheus counters may); gauges about keys are computed from the store at scrape time,
so they are never stale: per imported key with an expiry, the seconds until its material expires
(negative once past, until the scheduler deletes it), and keys by manager and state.
Nothing here is secret: key ids, states, counts.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterable
from datetime import datetime

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(**labels: str) -> str:
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items()) + "}"


class Metrics:
    """Thread-safe request and event counters."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests: Counter[tuple[str, str, str]] = Counter()
        self._events: Counter[str] = Counter()

    def count_request(self, operation: str, error_code: str | None) -> None:
        outcome = "success" if error_code is None else "error"
        with self._lock:
            self._requests[(operation or "(none)", outcome, error_code or "")] += 1

    def count_event(self, event: str) -> None:
        with self._lock:
            self._events[event] += 1

    def snapshot(self) -> dict[str, list[list[object]]]:
        """The counters as JSON-able lists (``serve --workers``: each worker publishes its own)."""
        with self._lock:
            return {
                "requests": [[*key, n] for key, n in sorted(self._requests.items())],
                "events": [[event, n] for event, n in sorted(self._events.items())],
            }

    def add(self, snapshot: dict[str, list[list[object]]]) -> None:
        """Add another worker's ``snapshot`` to these counters."""
        with self._lock:
            for operation, outcome, code, n in snapshot.get("requests", []):
                self._requests[(str(operation), str(outcome), str(code))] += int(n)  # type: ignore[call-overload]
            for event, n in snapshot.get("events", []):
                self._events[str(event)] += int(n)  # type: ignore[call-overload]

    def render(
        self,
        *,
        now: datetime,
        expiring: Iterable[tuple[str, str, datetime]],
        key_counts: dict[tuple[str, str], int],
    ) -> str:
        """The exposition text; ``expiring`` is (key_id, arn, valid_to) per imported key with an expiry."""
        with self._lock:
            requests = sorted(self._requests.items())
            events = sorted(self._events.items())
        out = [
            "# HELP keyservice_requests_total Requests answered, by operation and outcome.",
            "# TYPE keyservice_requests_total counter",
        ]
        for (operation, outcome, code), n in requests:
            labels = _labels(operation=operation, outcome=outcome, error_code=code)
            out.append(f"keyservice_requests_total{labels} {n}")
        out += [
            "# HELP keyservice_scheduler_events_total Background transitions (rotation, expiry, deletion).",
            "# TYPE keyservice_scheduler_events_total counter",
        ]
        for event, n in events:
            out.append(f"keyservice_scheduler_events_total{_labels(event=event)} {n}")
        out += [
            "# HELP keyservice_imported_key_material_expiry_seconds Seconds until imported key material "
            "expires (ValidTo - now).",
            "# TYPE keyservice_imported_key_material_expiry_seconds gauge",
        ]
        for key_id, arn, valid_to in expiring:
            seconds = (valid_to - now).total_seconds()
            out.append(
                f"keyservice_imported_key_material_expiry_seconds{_labels(key_id=key_id, key_arn=arn)} "
                f"{seconds:.3f}"
            )
        out += ["# HELP keyservice_keys Keys by manager and state.", "# TYPE keyservice_keys gauge"]
        for (manager, state), n in sorted(key_counts.items()):
            out.append(f"keyservice_keys{_labels(key_manager=manager, state=state)} {n}")
        return "\n".join(out) + "\n"
