#!/usr/bin/env python3
"""The key service's request path alone (issue 19 A): Decrypt/s under wrk, CPU per request, and
one Decrypt at a time through kmsfs's client.

Run from the repository (after ``source scripts/setup.sh``)::

    python scripts/bench_keyservice.py --workers 2 --seconds 10

It starts a real ``keyservice serve --dev`` (TLS on loopback, ``--workers N``) in a temporary
directory, creates a key and a data key, then:

1. **load**: ``wrk`` (2 threads, 16 keep-alive TLS connections) replays one signed Decrypt for
   ``--seconds`` (SigV4 accepts a signature for 5 minutes, replays included, as AWS does; any
   non-2xx reply fails the run): requests/s, p50, p99, and the service's CPU (user + system,
   every thread of every worker, from /proc) per request, split into the event-loop threads
   (``main``) and the others (the audit commit threads, ...);
2. **serial**: ``--serial`` Decrypts one after another through ``kmsfs.keyclient.KeyClient``
   (with a caller header, as a mount sends): p50/p90 wall-clock, the client's CPU per call and
   the service's.

Every figure comes with the load average at its start: on a shared machine CPU per request is
the figure to compare, wall-clock ones move with the neighbours. Prints one JSON object. Needs
``wrk`` for the load part (``apt-get install wrk``); without it that part is skipped.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench import _kms_request as _signed  # noqa: E402  (one SigV4 request builder for both benches)

from kmsfs.keyclient import KeyClient, load_credentials  # noqa: E402

CONTEXT = {"kmsfs:file-id": "00" * 16}
CALLER = {"path": "/some/dir/file.txt", "uid": 1000, "pid": 4242, "process": "cat"}
TICK = os.sysconf("SC_CLK_TCK")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start(run_dir: Path, workers: int) -> tuple[subprocess.Popen[bytes], Path]:
    creds = run_dir / "creds.json"
    log = (run_dir / "keyservice.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "keyservice", "serve", "--dev", "--data-dir", str(run_dir / "data"),
         "--listen", f"127.0.0.1:{_free_port()}", "--credentials-out", str(creds), "--workers", str(workers)],
        stdout=log, stderr=subprocess.STDOUT, cwd=run_dir,
    )  # fmt: skip
    deadline = time.monotonic() + 30
    while not creds.exists() or not creds.read_text().strip().endswith("}"):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("keyservice did not start:\n" + (run_dir / "keyservice.log").read_text())
        time.sleep(0.1)
    time.sleep(0.3 * workers)
    return proc, creds


def _pids(parent: int) -> list[int]:
    pids = [parent]
    with contextlib.suppress(OSError):
        pids += [int(p) for p in Path(f"/proc/{parent}/task/{parent}/children").read_text().split()]
    return pids


def _thread_cpu(parent: int) -> dict[str, float]:
    """CPU seconds (user + system) so far: "main" = each process's main thread (its event loop),
    "other" = every other thread (audit commit, checkpoint timer, metrics, scheduler)."""
    out = {"main": 0.0, "other": 0.0}
    for pid in _pids(parent):
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{pid}/task").iterdir():
                with contextlib.suppress(OSError, ValueError, IndexError):
                    fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
                    used = (int(fields[11]) + int(fields[12])) / TICK
                    out["main" if task.name == str(pid) else "other"] += used
    return out


def _ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if not match:
        raise RuntimeError(f"cannot parse wrk latency {text!r}")
    return float(match.group(1)) * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}[match.group(2)]


def load(run_dir: Path, creds: dict[str, Any], blob: str, parent: int, seconds: int) -> dict[str, Any]:
    body, headers = _signed(creds, "Decrypt", {"CiphertextBlob": blob, "EncryptionContext": CONTEXT})
    script = run_dir / "decrypt.lua"
    script.write_text("wrk.method = 'POST'\n" + f"wrk.body = {json.dumps(body.decode())}\n"
                      + "".join(f"wrk.headers[{json.dumps(k)}] = {json.dumps(v)}\n"
                                for k, v in headers.items() if k.lower() != "host"))
    loadavg = os.getloadavg()[0]
    before, started = _thread_cpu(parent), time.monotonic()
    out = subprocess.run(["wrk", "-t", "2", "-c", "16", "-d", f"{seconds}s", "--latency", "-s", str(script),
                          creds["endpoint"].rstrip("/") + "/"], capture_output=True, text=True,
                         timeout=seconds + 60).stdout
    elapsed, after = time.monotonic() - started, _thread_cpu(parent)
    if "Non-2xx" in out or "Socket errors" in out:
        raise RuntimeError(f"wrk saw failed requests:\n{out}")
    total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    main, other = after["main"] - before["main"], after["other"] - before["other"]
    return {
        "decrypt_per_s": round(total / seconds),
        "p50_ms": _ms(re.search(r"\s50%\s+(\S+)", out).group(1)),  # type: ignore[union-attr]
        "p99_ms": _ms(re.search(r"\s99%\s+(\S+)", out).group(1)),  # type: ignore[union-attr]
        "server_cpu_ms_per_request": round((main + other) / total * 1000, 3),
        "event_loop_cpu_ms_per_request": round(main / total * 1000, 3),
        "other_threads_cpu_ms_per_request": round(other / total * 1000, 3),
        "server_cores": round((main + other) / elapsed, 2),
        "loadavg": round(loadavg, 2),
    }


def serial(creds_file: Path, blob: bytes, parent: int, count: int) -> dict[str, Any]:
    creds = load_credentials(creds_file)
    assert creds.endpoint and creds.region
    client = KeyClient(creds.endpoint, creds.region, creds)
    try:
        for _ in range(100):  # connect, warm the caches
            client.decrypt(blob, CONTEXT, CALLER)
        latencies = []
        loadavg = os.getloadavg()[0]
        server0, client0 = sum(_thread_cpu(parent).values()), time.process_time()
        for _ in range(count):
            started = time.perf_counter()
            client.decrypt(blob, CONTEXT, CALLER)
            latencies.append(time.perf_counter() - started)
        client_cpu, server_cpu = time.process_time() - client0, sum(_thread_cpu(parent).values()) - server0
    finally:
        client.close()
    latencies.sort()
    return {
        "p50_ms": round(latencies[count // 2] * 1000, 3),
        "p90_ms": round(latencies[count * 9 // 10] * 1000, 3),
        "client_cpu_ms_per_call": round(client_cpu / count * 1000, 3),
        "server_cpu_ms_per_call": round(server_cpu / count * 1000, 3),
        "loadavg": round(loadavg, 2),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", type=int, default=2, help="keyservice serve --workers N (default 2)")
    p.add_argument("--seconds", type=int, default=10, help="wrk duration (default 10)")
    p.add_argument("--serial", type=int, default=2000, help="serial Decrypts (default 2000; 0: skip)")
    args = p.parse_args(argv)
    run_dir = Path(tempfile.mkdtemp(prefix="kms-bench-", dir="/var/tmp"))
    proc = None
    try:
        proc, creds_file = _start(run_dir, args.workers)
        creds = json.loads(creds_file.read_text())
        client_creds = load_credentials(creds_file)
        assert client_creds.endpoint and client_creds.region
        client = KeyClient(client_creds.endpoint, client_creds.region, client_creds)
        try:
            key_id = client.call("CreateKey", {"Description": "bench"})["KeyMetadata"]["KeyId"]
            _, blob, _ = client.generate_data_key(key_id, CONTEXT)
        finally:
            client.close()
        result: dict[str, Any] = {"workers": args.workers}
        if shutil.which("wrk"):
            result["load"] = load(run_dir, creds, base64.b64encode(blob).decode(), proc.pid, args.seconds)
        else:
            print("wrk is not installed: load part skipped (apt-get install wrk)", file=sys.stderr)
        if args.serial:
            result["serial"] = serial(creds_file, blob, proc.pid, args.serial)
        print(json.dumps(result, indent=2))
    finally:
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        shutil.rmtree(run_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
