#!/usr/bin/env python3
"""One serial Decrypt through kmsfs's client over each transport: Unix socket, loopback TLS,
loopback plain HTTP (issue 19: the round trip every open waits for).

Why a script of its own (not a row of scripts/bench.py): it needs two servers (one process cannot
serve TLS and plain HTTP on TCP at once) and says nothing about file systems. It starts
``keyservice serve --dev`` twice: A with ``--listen unix:RUN/ks.sock --listen 127.0.0.1:P`` (TLS,
its private CA) and B with ``--insecure-http``; creates a key and one wrapped data key on each;
then times ``KeyClient.decrypt`` back to back, ``--calls`` per transport, in ``--rounds`` rounds
that rotate the transports (so drifting machine load touches each alike), after ``--warmup``
untimed calls per transport. Every request is signed, verified and durably audited as in
production (the caller header included).

Reported per transport: p50 / p99 / mean latency (ms), the client's CPU per call (this process,
``time.process_time``) and the server's (utime + stime of the serving process from
/proc/PID/stat, tick resolution, summed over the rounds), with the 1-minute load average before
and after (the machine is shared: prefer the CPU figures and the ratios to absolute times).

    .venv/bin/python scripts/bench_transport.py              # 2,000 calls per transport
    .venv/bin/python scripts/bench_transport.py --calls 200 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from kmsfs.keyclient import KeyClient, load_credentials  # noqa: E402

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
CONTEXT = {"kmsfs:file-id": "00" * 16}
CALLER = {"path": "/bench/file", "uid": 0, "user": "root", "pid": 1, "process": "bench"}


@dataclass
class Transport:
    name: str
    endpoint: str
    server_pid: int
    client: KeyClient
    blob: bytes = b""
    latencies: list[float] = field(default_factory=list)
    client_cpu: float = 0.0
    server_cpu: float = 0.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` (fields 14 and 15 of /proc/PID/stat, after the ``(comm)``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def _start(run: Path, name: str, *listen: str) -> tuple[subprocess.Popen[bytes], Path]:
    creds = run / f"{name}.json"
    log = (run / f"{name}.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "keyservice", "serve", "--dev", "--data-dir", str(run / name),
         "--credentials-out", str(creds), "--no-console", *listen],
        stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
    )
    deadline = time.monotonic() + 60
    while not creds.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"keyservice {name} did not start:\n{(run / f'{name}.log').read_text()}")
        time.sleep(0.05)
    return process, creds


def _transport(name: str, endpoint: str, creds_file: Path, pid: int) -> Transport:
    creds = load_credentials(creds_file)
    client = KeyClient(endpoint, creds.region or "us-east-1", creds)
    key = client.call("CreateKey", {})["KeyMetadata"]["KeyId"]
    _, blob, _ = client.generate_data_key(key, CONTEXT, CALLER)
    return Transport(name, endpoint, pid, client, blob)


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def measure(calls: int, rounds: int, warmup: int, run: Path) -> dict[str, Any]:
    port_tls, port_plain = _free_port(), _free_port()
    sock_path = run / "ks.sock"
    processes = []
    try:
        a, creds_a = _start(run, "a", "--listen", f"unix:{sock_path}", "--listen", f"127.0.0.1:{port_tls}")
        processes.append(a)
        b, creds_b = _start(run, "b", "--insecure-http", "--listen", f"127.0.0.1:{port_plain}")
        processes.append(b)
        transports = [
            _transport("unix socket", f"unix://{sock_path}", creds_a, a.pid),
            _transport("loopback TLS", f"https://127.0.0.1:{port_tls}", creds_a, a.pid),
            _transport("loopback plain HTTP", f"http://127.0.0.1:{port_plain}", creds_b, b.pid),
        ]
        load_before = os.getloadavg()[0]
        for t in transports:
            for _ in range(warmup):
                t.client.decrypt(t.blob, CONTEXT, CALLER)
        per_round = max(1, calls // rounds)
        for _ in range(rounds):
            for t in transports:
                server0, client0 = _cpu_seconds(t.server_pid), time.process_time()
                for _ in range(per_round):
                    start = time.perf_counter()
                    t.client.decrypt(t.blob, CONTEXT, CALLER)
                    t.latencies.append(time.perf_counter() - start)
                t.client_cpu += time.process_time() - client0
                t.server_cpu += _cpu_seconds(t.server_pid) - server0
        load_after = os.getloadavg()[0]
        for t in transports:
            t.client.close()
    finally:
        for process in processes:
            process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
    results = {}
    for t in transports:
        n = len(t.latencies)
        results[t.name] = {
            "calls": n,
            "p50_ms": _percentile(t.latencies, 0.50) * 1e3,
            "p99_ms": _percentile(t.latencies, 0.99) * 1e3,
            "mean_ms": sum(t.latencies) / n * 1e3,
            "client_cpu_ms": t.client_cpu / n * 1e3,
            "server_cpu_ms": t.server_cpu / n * 1e3,
        }
    return {"load_before": load_before, "load_after": load_after, "cores": os.cpu_count(),
            "transports": results}


def render(result: dict[str, Any]) -> str:
    lines = [f"serial Decrypt through kmsfs's KeyClient (load avg {result['load_before']:.2f} -> "
             f"{result['load_after']:.2f}, {result['cores']} cores)",
             f"{'transport':<22}{'calls':>7}{'p50 ms':>9}{'p99 ms':>9}{'mean ms':>9}"
             f"{'client CPU ms':>15}{'server CPU ms':>15}"]
    for name, r in result["transports"].items():
        lines.append(f"{name:<22}{r['calls']:>7}{r['p50_ms']:>9.3f}{r['p99_ms']:>9.3f}{r['mean_ms']:>9.3f}"
                     f"{r['client_cpu_ms']:>15.3f}{r['server_cpu_ms']:>15.3f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000, help="timed calls per transport (default 2000)")
    parser.add_argument("--rounds", type=int, default=4, help="rounds rotating the transports (default 4)")
    parser.add_argument("--warmup", type=int, default=100,
                        help="untimed calls per transport first (default 100)")
    parser.add_argument("--json", metavar="FILE", help="also write the result as JSON (default: not written)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-transport-") as run:
        result = measure(args.calls, args.rounds, args.warmup, Path(run))
    print(render(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
