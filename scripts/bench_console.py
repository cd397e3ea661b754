#!/usr/bin/env python3
"""How long the console's pages take: with N keys on a real server, and the audit timeline over a
synthetic log of M records.

Part 1 starts a real ``keyservice serve --dev`` (TLS) on 127.0.0.1, creates ``--keys`` keys through
boto3 (every third one with an alias, every fifth disabled), logs in to the console over HTTPS with
``requests`` and times each page (median of ``--repeat`` requests, server-side work and transfer
included). Every DescribeKey etc. a page makes is audited, so each list page appends ~100 records.

Part 2 times ``console.audit_views.timeline`` (the function the audit page calls) in-process over a
log of ``--records`` records made by repeating the server's own records: today's ``review.query``
reads the whole log for every page, so this grows with the log until the audit index lands.

    python scripts/bench_console.py --keys 1000 --records 1000000
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import boto3
import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from keyservice.console import audit_views  # noqa: E402


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _timed(http: requests.Session, url: str, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        reply = http.get(url, allow_redirects=False)
        times.append(time.perf_counter() - start)
        assert reply.status_code == 200, (url, reply.status_code, reply.text[:300])
    return statistics.median(times) * 1000


def bench_server(base: Path, keys: int, repeat: int) -> dict[str, float]:
    port = _free_port()
    data = base / "data"
    creds_file = base / "creds.json"
    log = (base / "server.log").open("wb")
    server = subprocess.Popen([sys.executable, "-m", "keyservice", "serve", "--dev", "--listen",
                               f"127.0.0.1:{port}", "--data-dir", str(data), "--credentials-out",
                               str(creds_file), "--max-keys", str(keys + 10)],
                              stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        endpoint = f"https://127.0.0.1:{port}"
        for _ in range(600):
            if creds_file.exists():
                break
            time.sleep(0.05)
        creds = json.loads(creds_file.read_text())
        kms = boto3.client("kms", endpoint_url=endpoint, region_name=creds["region"],
                           aws_access_key_id=creds["access_key_id"],
                           aws_secret_access_key=creds["secret_access_key"],
                           verify=creds["ca_bundle"])  # fmt: skip
        started = time.perf_counter()
        last = ""
        for i in range(keys):
            last = kms.create_key(Description=f"bench key {i}")["KeyMetadata"]["KeyId"]
            if i % 3 == 0:
                kms.create_alias(AliasName=f"alias/bench-{i}", TargetKeyId=last)
            if i % 5 == 0:
                kms.disable_key(KeyId=last)
        print(f"created {keys} keys in {time.perf_counter() - started:.1f} s", file=sys.stderr)
        http = requests.Session()
        http.trust_env = False
        http.verify = creds["ca_bundle"]
        console = endpoint + "/console"
        token = re.search(r'name="login_token" value="([^"]+)"', http.get(console + "/login").text)
        assert token
        http.post(console + "/login", data={"login_token": token.group(1), "access_key_id":
                  creds["access_key_id"], "secret_access_key": creds["secret_access_key"]})  # fmt: skip
        return {
            "keys list, first page (50 keys)": _timed(http, console + "/keys", repeat),
            "keys list, state=Disabled": _timed(http, console + "/keys?state=Disabled", repeat),
            "keys list, alias filter": _timed(http, console + "/keys?alias=bench-99", repeat),
            "key detail": _timed(http, f"{console}/keys/{last}", repeat),
            "audit timeline, page 1": _timed(http, console + "/audit", repeat),
            "audit timeline, key filter": _timed(http, f"{console}/audit?key={last}", repeat),
            "audit files view": _timed(http, console + "/audit/files", repeat),
        }
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


def bench_timeline(base: Path, source: Path, records: int, repeat: int) -> dict[str, float]:
    lines = [line for line in source.read_text().splitlines() if '"checkpoint"' not in line]
    data = base / "synthetic"
    (data / "audit").mkdir(parents=True)
    with (data / "audit" / "audit.log").open("w") as out:
        for i in range(records):
            out.write(lines[i % len(lines)] + "\n")
    results = {}
    for label, filters in ((f"timeline over {records} records, page 1", {}),
                           (f"timeline over {records} records, operation=Decrypt", {"operation": "Decrypt"})):
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            audit_views.timeline(data, filters, 1)
            times.append(time.perf_counter() - start)
        results[label] = statistics.median(times) * 1000
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, default=1000)
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="bench-console-"))
    try:
        results: dict[str, Any] = bench_server(base, args.keys, args.repeat)
        log = base / "data" / "audit" / "audit.log"
        results |= bench_timeline(base, log, args.records, min(args.repeat, 3))
    finally:
        shutil.rmtree(base, ignore_errors=True)
    width = max(map(len, results))
    for name, ms in results.items():
        print(f"{name.ljust(width)}  {ms:9.1f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
