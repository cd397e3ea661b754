"""``keyservice serve --workers N``: N worker processes behind one listening socket.

CPython runs one request at a time per process (the GIL), so one process uses one core. The
parent binds the socket and unseals the root key, then forks N workers that inherit both: each
builds its own service (its own store connections and its own audit chain ``<node>:w<i>``,
docs/AUDIT.md) and accepts on the shared socket, where the kernel hands each new connection to
one of them. Nothing is opened before the fork that a thread or lock would tie to the parent.

The parent only supervises: a worker that dies (killed, crashed) is started again with the same
index, so it continues its own audit chain; SIGTERM/SIGINT stop every worker and then the parent.

Each worker writes its pid to ``DATA_DIR/run/w<i>.pid`` (for operators and the kill tests).
``/metrics`` sums the workers: each publishes its counters to ``DATA_DIR/run/metrics-w<i>.json``
once a second (``MetricsShare``), and the worker that answers a scrape adds its own live
counters to the others' files (so other workers' counts are at most a second old).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

from keyservice.files import write_atomic
from keyservice.metrics import Metrics

log = logging.getLogger(__name__)

RUN_DIR = "run"
RESPAWN_DELAY = 0.5
# A worker that dies this soon after its start, this many times in a row, cannot start at all
# (say, the database refuses it): the parent then stops everything instead of looping.
QUICK_DEATH_SECONDS = 5.0
QUICK_DEATHS = 3


def chain_id(node: str, index: int) -> str:
    """The audit chain of worker ``index`` of node ``node``."""
    return f"{node}:w{index}"


def supervise(count: int, start_worker: Callable[[int], int]) -> int:
    """Fork ``count`` workers running ``start_worker(index)`` (its return value is the worker's exit
    status) and keep them running until SIGTERM/SIGINT; returns the parent's exit status."""
    stopping = threading.Event()
    children: dict[int, int] = {}  # pid -> index
    started: dict[int, float] = {}  # pid -> time.monotonic() at fork
    quick_deaths = 0
    failed = False

    def fork(index: int) -> None:
        pid = os.fork()
        if pid == 0:  # the worker
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            status = 1
            try:
                status = start_worker(index)
            except BaseException:
                log.exception("worker %d failed", index)
            finally:
                os._exit(status)
        children[pid] = index
        started[pid] = time.monotonic()

    def stop(signum: int, frame: object) -> None:
        stopping.set()
        for pid in list(children):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for index in range(count):
        fork(index)
    while children:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        except InterruptedError:
            continue
        index = children.pop(pid, None)
        if index is None:
            continue
        quick = time.monotonic() - started.pop(pid, 0.0) < QUICK_DEATH_SECONDS
        quick_deaths = quick_deaths + 1 if quick and status != 0 else 0
        if quick_deaths >= QUICK_DEATHS and not stopping.is_set():
            log.error("workers keep dying at start (see above); stopping")
            failed = True
            stop(signal.SIGTERM, None)
        if not stopping.is_set():
            log.warning("worker %d (pid %d) ended with status %#x; starting it again", index, pid, status)
            time.sleep(RESPAWN_DELAY)
            if not stopping.is_set():
                fork(index)
    return 1 if failed else 0


class MetricsShare:
    """Publishes one worker's counters and sums every worker's (see the module docstring)."""

    def __init__(self, data_dir: Path, index: int, count: int, metrics: Metrics) -> None:
        self.dir = Path(data_dir) / RUN_DIR
        self.dir.mkdir(mode=0o700, exist_ok=True)
        self.index = index
        self.count = count
        self.metrics = metrics
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="keyservice-metrics-share", daemon=True)

    def _path(self, index: int) -> Path:
        return self.dir / f"metrics-w{index}.json"

    def start(self) -> None:
        write_atomic(self.dir / f"w{self.index}.pid", f"{os.getpid()}\n".encode(), mode=0o600)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2.0)

    def _run(self) -> None:
        last = None
        while not self._stop.wait(1.0):
            snapshot = self.metrics.snapshot()
            if snapshot != last:
                try:
                    write_atomic(self._path(self.index), json.dumps(snapshot).encode(), mode=0o600)
                    last = snapshot
                except OSError as error:
                    log.warning("cannot publish worker metrics: %s", error)

    def summed(self) -> Metrics:
        """This worker's live counters plus every other worker's last published ones."""
        total = Metrics()
        total.add(self.metrics.snapshot())
        for index in range(self.count):
            if index == self.index:
                continue
            try:
                total.add(json.loads(self._path(index).read_bytes()))
            except (OSError, ValueError):
                continue
        return total
