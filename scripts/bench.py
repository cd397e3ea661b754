#!/usr/bin/env python3
"""Side-by-side benchmark: kmsfs vs gocryptfs vs a fusepy passthrough vs the bare directory.

Why one script: absolute numbers on a VM's disk drift 20-50 % between runs (FUSE-NOTES), so the
only meaningful figures are ratios measured in one run, on one backing disk, with the same tools.
This script installs what it lacks (Debian ``fio`` and ``gocryptfs``; gocryptfs depends on
``fuse3``, which kmsfs itself needs since issue 11, so it is installed unless the conflicting
``fuse`` package provides fusermount: ``apt-get --no-remove`` never forces one over the other),
starts a real ``keyservice serve --dev`` (TLS), creates a key, mounts the targets under one
run directory, runs every workload (median of 3), measures the key service alone, one serial
round trip through kmsfs's client and kmsfs's peak RSS, prints one table with kmsfs/gocryptfs,
kmsfs/passthrough and kmsfs/floor ratios, the CPU time each FUSE daemon spent per workload and
the load average, and writes JSON. Everything it mounted or started is unmounted and stopped on
the way out, also on failure.

The **floor** of a workload that waits on the key service (issue 19) is the passthrough's time
for it plus one serial round trip per file measured in the same run through kmsfs's own
``KeyClient``: a GenerateDataKey per create (untar), a Decrypt per open (cat). Strict mode can
at best reach it; the ``kmsfs/floor`` ratio is what the FUSE layer and the core add on top.

Adding a target (another helper's mode, e.g. directory keys): a mount function in ``MOUNTERS``,
its name in ``TARGETS`` and, for a ratio column, a pair in ``RATIOS``; every workload, the CPU
table and the JSON pick it up. Adding a key-service figure: a ``Row`` in ``KMS_ROWS`` and its
value in the dict ``key_service_figures`` returns.

``--quick`` uses small sizes and one repetition (the test suite runs it; it never installs).
``--kms-only --workers N`` measures the key service alone, served by N worker processes
(``keyservice serve --workers N``; docs/OPERATIONS.md compares 1 and 2 on this 2-core machine).
Run as root: dropping the page cache needs it (``sync; echo 3 > /proc/sys/vm/drop_caches``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
TARGETS = ["bare", "passthrough", "gocryptfs", "kmsfs", "kmsfs-plain",  # kmsfs-plain: --plaintext-names
           "kmsfs-dirkeys"]  # kmsfs-dirkeys: init --directory-keys (docs/SECURITY.md "Directory keys")
QUICK_TARGETS = ["bare", "passthrough", "gocryptfs", "kmsfs"]  # --quick (the test suite runs it)
# Ratio columns (numerator, denominator, heading): shown when the numerator ran; "floor" is the
# computed floor of the row's workload (FLOORS), not a mount.
RATIOS = [("kmsfs", "gocryptfs", "kmsfs/gocryptfs"), ("kmsfs", "passthrough", "kmsfs/passthrough"),
          ("kmsfs", "kmsfs-plain", "kmsfs/plain"), ("kmsfs", "floor", "kmsfs/floor"),
          ("kmsfs-dirkeys", "gocryptfs", "dirkeys/gocryptfs")]


@dataclass(frozen=True)
class Row:
    """One line of the table: how to read it and which target it has."""

    key: str
    label: str
    unit: str
    higher_is_better: bool
    target: str = ""  # human-readable target for the kmsfs/gocryptfs ratio


FS_ROWS = (
    Row("seq_write", "seq write {size}, fsync", "MB/s", True, ">= 1.2x"),
    Row("seq_read", "seq read {size}, cold", "MB/s", True, ">= 1.2x"),
    Row("rand_iops", "random 4 KiB 50/50 ({fio_size})", "IOPS", True, ">= 1.0x"),
    Row("untar", "untar {files} files", "s", False, "<= 1.0x"),
    Row("find_ls", "find|wc -l + ls -lR, cold", "s", False, "<= 1.2x"),
    Row("cat_all", "cat every file, cold", "files/s", True, ">= 0.8x"),
    Row("rm", "rm -rf", "s", False, "<= 1.0x"),
    Row("tar_diff", "tar -d after untar (differences)", "lines", False, "0"),
)
KMS_ROWS = (
    Row("kms_decrypt_rps", "key service Decrypt, 16 clients", "req/s", True, ">= 5500"),
    Row("kms_decrypt_p50", "  Decrypt p50", "ms", False, ""),
    Row("kms_decrypt_p99", "  Decrypt p99", "ms", False, "< 5"),
    Row("kms_gdk_rps", "key service GenerateDataKey, 16 clients", "req/s", True, ""),
    Row("kms_gdk_p50", "  GenerateDataKey p50", "ms", False, ""),
    Row("kms_gdk_p99", "  GenerateDataKey p99", "ms", False, ""),
    Row("kms_serial_p50", "one Decrypt through kmsfs's client, serial, p50", "ms", False, "<= 0.5"),
    Row("kms_serial_gdk_p50", "one GenerateDataKey through kmsfs's client, serial, p50", "ms", False, ""),
    Row("kms_serial_unix_p50", "  the same Decrypt over the Unix socket, p50", "ms", False, ""),
    Row("kms_serial_unix_gdk_p50", "  the same GenerateDataKey over the Unix socket, p50", "ms", False, ""),
    Row("kmsfs_rss", "kmsfs peak RSS writing {rss_size}", "MiB", False, "<= 100"),
)

# Workloads with one key-service round trip per file: workload -> (round-trip figure, what asks);
# with --unix-socket the "_unix" figures (the mounts then talk to the service over the socket).
FLOORS = {"untar": ("kms_serial_gdk_p50", "GenerateDataKey per create"),
          "cat_all": ("kms_serial_p50", "Decrypt per open")}
FLOOR_TARGET = "<= 1.25x"


@dataclass
class Sizes:
    seq_mib: int
    fio_mib: int
    fio_seconds: int
    rss_mib: int
    kms_seconds: float
    reps: int
    serial_trips: int


FULL = Sizes(seq_mib=512, fio_mib=128, fio_seconds=15, rss_mib=2048, kms_seconds=8.0, reps=3,
             serial_trips=1000)
QUICK = Sizes(seq_mib=16, fio_mib=8, fio_seconds=2, rss_mib=64, kms_seconds=1.5, reps=1,
              serial_trips=100)


def say(msg: str) -> None:
    """Progress on stderr (the table goes to stdout)."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run(cmd: list[str] | str, *, check: bool = True, capture: bool = True, timeout: float = 3600,
        **kw: Any) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, text=True, capture_output=capture, timeout=timeout,
                          shell=isinstance(cmd, str), **kw)
    if check and proc.returncode != 0:
        raise RuntimeError(f"command failed ({proc.returncode}): {cmd}\n{proc.stdout}\n{proc.stderr}")
    return proc


# -- installing tools ----------------------------------------------------------------------------
def ensure_tools(want_gocryptfs: bool, install: bool) -> dict[str, bool]:
    """fio, wrk and gocryptfs, installed with apt-get when missing and allowed."""
    missing = [tool for tool, wanted in (("fio", True), ("wrk", True), ("gocryptfs", want_gocryptfs))
               if wanted and shutil.which(tool) is None]
    if missing and install:
        if os.geteuid() != 0:
            raise RuntimeError(f"need root to install {missing}")
        if "gocryptfs" in missing and _fuse2_provides_fusermount():
            say("not installing gocryptfs: it needs fuse3, which would remove the installed 'fuse' "
                "(libfuse2's fusermount)")
            missing.remove("gocryptfs")
        if missing:
            say(f"installing {' '.join(missing)} (apt-get)")
            env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
            run(["apt-get", "update", "-qq"], env=env, check=False)
            # --no-remove: never take away a package setup.sh installed (fuse vs fuse3)
            run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", "--no-remove", *missing],
                env=env)
    return {"fio": shutil.which("fio") is not None, "wrk": shutil.which("wrk") is not None,
            "gocryptfs": want_gocryptfs and shutil.which("gocryptfs") is not None}


def _fuse2_provides_fusermount() -> bool:
    proc = run(["dpkg-query", "-W", "-f=${Status}", "fuse"], check=False)
    return "install ok installed" in proc.stdout


# -- mounts ----------------------------------------------------------------------------------------
def is_mounted(path: Path) -> bool:
    target = os.path.abspath(path).replace(" ", "\\040")
    with open("/proc/mounts", encoding="utf-8") as mounts:
        return any(len(f := line.split()) > 1 and f[1] == target for line in mounts)


def unmount(path: Path) -> None:
    for cmd in (["fusermount", "-u"], ["fusermount3", "-u"], ["umount"], ["umount", "-l"]):
        if not is_mounted(path):
            return
        if shutil.which(cmd[0]):
            run([*cmd, str(path)], check=False)
            for _ in range(20):
                if not is_mounted(path):
                    return
                time.sleep(0.05)


def wait_mounted(path: Path, proc: subprocess.Popen[Any] | None = None, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if is_mounted(path):
            return
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"mount of {path} exited with {proc.returncode}")
        time.sleep(0.05)
    raise RuntimeError(f"{path} not mounted after {timeout} s")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def daemon_pid(mountpoint: Path, program: bytes = b"kmsfs") -> int | None:
    """The FUSE daemon serving ``mountpoint``: the process whose command line names it and
    ``program`` (scanned from /proc; kmsfs and gocryptfs run in the background)."""
    want = str(mountpoint).encode()
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                cmd = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if want in cmd and any(program in c for c in cmd) and (program != b"kmsfs" or b"mount" in cmd):
                return int(entry)
    return None


def cpu_seconds(pid: int | None) -> float | None:
    """user + system CPU seconds of ``pid`` so far (all its threads), from /proc/PID/stat."""
    if pid is None:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


@dataclass
class Env:
    """Everything started, so that ``close`` can stop it all."""

    run_dir: Path
    mounts: dict[str, Path] = field(default_factory=dict)
    procs: list[subprocess.Popen[Any]] = field(default_factory=list)
    creds: Path | None = None
    key_id: str = ""
    kms_pid: int | None = None
    unix_endpoint: str = ""  # unix:///RUN/ks.sock when the service also listens there
    pids: dict[str, int] = field(default_factory=dict)  # target -> daemon started here
    kmsfs_opts: list[str] = field(default_factory=list)

    def close(self) -> None:
        for mnt in self.mounts.values():
            if mnt.exists() and is_mounted(mnt):
                say(f"unmounting {mnt}")
                unmount(mnt)
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)


def unix_socket_path(run_dir: Path) -> Path:
    return run_dir / "ks.sock"


def start_keyservice(env: Env, workers: int = 1, unix: bool = False) -> None:
    """``keyservice serve --dev`` on a loopback TLS port (the credentials name it) and, with
    ``unix``, also on ``RUN/ks.sock`` (issue 19's Unix-domain listener, ``env.unix_endpoint``)."""
    data, creds = env.run_dir / "keyservice", env.run_dir / "creds.json"
    port = free_port()
    log = open(env.run_dir / "keyservice.log", "w")  # noqa: SIM115 - lives as long as the process
    listen = ["--listen", f"127.0.0.1:{port}"]
    if unix:
        listen += ["--listen", f"unix:{unix_socket_path(env.run_dir)}"]
        env.unix_endpoint = f"unix://{unix_socket_path(env.run_dir)}"
    proc = subprocess.Popen([PY, "-m", "keyservice", "serve", "--dev", "--data-dir", str(data),
                             *listen, "--credentials-out", str(creds), "--workers", str(workers)],
                            stdout=log, stderr=subprocess.STDOUT, cwd=env.run_dir)
    env.procs.append(proc)
    env.kms_pid = proc.pid
    deadline = time.monotonic() + 30
    while not creds.exists() or not creds.read_text().strip().endswith("}"):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("keyservice did not start:\n" + (env.run_dir / "keyservice.log").read_text())
        time.sleep(0.1)
    time.sleep(0.2)
    env.creds = creds
    info = json.loads(creds.read_text())
    import boto3

    kms = boto3.client("kms", endpoint_url=info["endpoint"], region_name=info["region"],
                       aws_access_key_id=info["access_key_id"],
                       aws_secret_access_key=info["secret_access_key"],
                       verify=info.get("ca_bundle") or True)
    env.key_id = kms.create_key(Description="bench")["KeyMetadata"]["KeyId"]
    kms.create_alias(AliasName="alias/bench", TargetKeyId=env.key_id)
    say(f"keyservice at {info['endpoint']} (pid {proc.pid}), key {env.key_id}")


def mount_kmsfs(env: Env, name: str = "kmsfs", plaintext_names: bool = False,
                init_flags: tuple[str, ...] = ()) -> Path:
    cipher, mnt = env.run_dir / f"{name}.cipher", env.run_dir / name
    mnt.mkdir(exist_ok=True)
    if not (cipher / ".kmsfs.json").exists():
        cipher.mkdir(exist_ok=True)
        run([PY, "-m", "kmsfs", "init", str(cipher), "--key", "alias/bench", "--credentials", str(env.creds),
             *(["--plaintext-names"] if plaintext_names else []), *init_flags])
    run([PY, "-m", "kmsfs", "mount", str(cipher), str(mnt), "--credentials", str(env.creds),
         *env.kmsfs_opts])
    env.mounts[name] = mnt
    return mnt


def mount_passthrough(env: Env) -> Path:
    back, mnt = env.run_dir / "passthrough.back", env.run_dir / "passthrough"
    back.mkdir(exist_ok=True)
    mnt.mkdir(exist_ok=True)
    proc = subprocess.Popen([PY, str(ROOT / "scripts" / "passthrough.py"), str(back), str(mnt)],
                            stdout=subprocess.DEVNULL, stderr=open(env.run_dir / "passthrough.log", "w"))  # noqa: SIM115
    env.procs.append(proc)
    env.pids["passthrough"] = proc.pid
    env.mounts["passthrough"] = mnt
    wait_mounted(mnt, proc)
    return mnt


def mount_gocryptfs(env: Env) -> Path:
    cipher, mnt = env.run_dir / "gocryptfs.cipher", env.run_dir / "gocryptfs"
    cipher.mkdir(exist_ok=True)
    mnt.mkdir(exist_ok=True)
    run(["gocryptfs", "-init", "-q", "-extpass", "echo pw", str(cipher)])
    run(["gocryptfs", "-q", "-extpass", "echo pw", str(cipher), str(mnt)])
    env.mounts["gocryptfs"] = mnt
    wait_mounted(mnt)
    return mnt


# -- workloads -------------------------------------------------------------------------------------
def drop_caches() -> None:
    os.sync()
    if os.geteuid() == 0:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")


def timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def seq_write(mnt: Path, mib: int) -> float:
    path = mnt / "seq.bin"
    secs = timed(lambda: run(["dd", "if=/dev/zero", f"of={path}", "bs=1M", f"count={mib}",
                              "conv=fsync"]))
    return mib * 1.048576 / secs


def seq_read(mnt: Path, mib: int) -> float:
    drop_caches()
    secs = timed(lambda: run(["dd", f"if={mnt / 'seq.bin'}", "of=/dev/null", "bs=1M"]))
    return mib * 1.048576 / secs


def rand_iops(mnt: Path, mib: int, seconds: int) -> float:
    out = run(["fio", "--name=rand", f"--filename={mnt / 'fio.bin'}", f"--size={mib}M",
               "--rw=randrw", "--rwmixread=50", "--bs=4k", "--ioengine=psync", "--iodepth=1",
               "--numjobs=1", "--time_based", f"--runtime={seconds}", "--randrepeat=0",
               "--output-format=json"]).stdout
    job = json.loads(out[out.index("{"):])["jobs"][0]
    (mnt / "fio.bin").unlink()
    return float(job["read"]["iops"] + job["write"]["iops"])


def tree_workloads(mnt: Path, tarball: Path, nfiles: int, check_diff: bool,
                   pid: int | None = None) -> tuple[dict[str, float], dict[str, float]]:
    """untar, find+ls cold, cat cold, (tar -d), rm -rf: one repetition; also the CPU seconds the
    daemon ``pid`` spent in each (empty without a pid)."""
    dest = mnt / "tree"
    dest.mkdir()
    res: dict[str, float] = {}
    cpu: dict[str, float] = {}

    def measure(key: str, fn: Callable[[], Any]) -> float:
        before = cpu_seconds(pid)
        res[key] = timed(fn)
        after = cpu_seconds(pid)
        if before is not None and after is not None:
            cpu[key] = after - before
        return res[key]

    drop_caches()
    measure("untar", lambda: run(["tar", "-xf", str(tarball), "-C", str(dest)]))
    drop_caches()
    measure("find_ls", lambda: (run(f"find '{dest}' | wc -l"), run(["ls", "-lR", str(dest)])))
    drop_caches()
    res["cat_all"] = nfiles / measure("cat_all", lambda: run(
        f"find '{dest}' -type f -print0 | xargs -0 -n 256 cat > /dev/null"))
    if check_diff:
        proc = run(["tar", "-df", str(tarball), "-C", str(dest)], check=False)
        res["tar_diff"] = float(len((proc.stdout + proc.stderr).splitlines()))
        if res["tar_diff"]:
            say(f"tar -d on {mnt.name} reports differences:\n{(proc.stdout + proc.stderr)[:2000]}")
    measure("rm", lambda: run(["rm", "-rf", str(dest)]))
    return res, cpu


def make_tarball(run_dir: Path) -> tuple[Path, int]:
    """The Python standard library (without site-packages), tarred once."""
    base = Path(sys.base_prefix) / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}"
    tarball = run_dir / "stdlib.tar"
    run(["tar", "-cf", str(tarball), "-C", str(base.parent), "--exclude", f"{base.name}/site-packages",
         base.name])
    listing = run(["tar", "-tvf", str(tarball)]).stdout.splitlines()
    nfiles = sum(1 for line in listing if line.startswith("-"))
    return tarball, nfiles


def quick_tarball(run_dir: Path) -> tuple[Path, int]:
    """A small tree for --quick: the kmsfs and scripts sources."""
    tarball = run_dir / "small.tar"
    run(["tar", "-cf", str(tarball), "-C", str(ROOT), "--exclude", "__pycache__", "kmsfs", "scripts",
         "docs"])
    listing = run(["tar", "-tvf", str(tarball)]).stdout.splitlines()
    return tarball, sum(1 for line in listing if line.startswith("-"))


def kmsfs_peak_rss(env: Env, mib: int) -> float:
    """Peak RSS (VmHWM) of a freshly mounted kmsfs daemon while writing ``mib`` MiB."""
    mnt = mount_kmsfs(env, "kmsfs-rss")
    pid = daemon_pid(mnt)
    if pid is None:
        raise RuntimeError("cannot find the kmsfs daemon")
    run(["dd", "if=/dev/zero", f"of={mnt / 'big.bin'}", "bs=1M", f"count={mib}", "conv=fsync"])
    hwm = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines()
               if line.startswith("VmHWM:"))
    (mnt / "big.bin").unlink()
    unmount(mnt)
    return int(hwm.split()[1]) / 1024


# -- the key service alone --------------------------------------------------------------------------
def _kms_request(creds: dict[str, Any], operation: str,
                 payload: dict[str, Any]) -> tuple[bytes, dict[str, str]]:
    """Body and signed headers of one KMS request (SigV4 by our own signer)."""
    from urllib.parse import urlsplit

    from keyservice.http.sigv4 import sign_request

    body = json.dumps(payload, separators=(",", ":")).encode()
    headers = {"Host": urlsplit(creds["endpoint"]).netloc, "Content-Type": "application/x-amz-json-1.1",
               "X-Amz-Target": f"TrentService.{operation}"}
    headers.update(sign_request(method="POST", url=creds["endpoint"].rstrip("/") + "/", headers=headers,
                                body=body, access_key_id=creds["access_key_id"],
                                secret_access_key=creds["secret_access_key"], region=creds["region"]))
    return body, headers


def _connection(creds: dict[str, Any]) -> Any:
    import http.client
    import ssl
    from urllib.parse import urlsplit

    parts = urlsplit(creds["endpoint"])
    if parts.scheme == "https":
        ctx = ssl.create_default_context(cafile=creds.get("ca_bundle") or None)
        return http.client.HTTPSConnection(parts.hostname, parts.port, context=ctx, timeout=10)
    return http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)


def _kms_call(conn: Any, body: bytes, headers: dict[str, str]) -> dict[str, Any]:
    conn.request("POST", "/", body=body, headers=headers)
    resp = conn.getresponse()
    data = resp.read()
    if resp.status != 200:
        raise RuntimeError(f"key service answered {resp.status}: {data[:300]!r}")
    return json.loads(data)


def _kms_worker(creds: dict[str, Any], operation: str, payload: dict[str, Any], threads: int,
                start_at: float, stop_at: float, out: Any) -> None:
    """One load process: ``threads`` keep-alive connections, each sending back-to-back requests.

    Requests are signed once per thread and re-signed every 60 s (SigV4 dates stay valid for
    minutes), so the client's cost per request is one HTTP round trip and a JSON parse.
    """
    import threading

    lat: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()

    def loop() -> None:
        mine: list[float] = []
        try:
            conn = _connection(creds)
            body, headers = _kms_request(creds, operation, payload)
            signed_at = time.time()
            _kms_call(conn, body, headers)  # connect + TLS handshake outside the window
            while time.time() < start_at:
                time.sleep(0.001)
            while (now := time.time()) < stop_at:
                if now - signed_at > 60:
                    body, headers = _kms_request(creds, operation, payload)
                    signed_at = now
                t0 = time.perf_counter()
                _kms_call(conn, body, headers)
                mine.append(time.perf_counter() - t0)
        except Exception as exc:  # noqa: BLE001 - reported to the parent
            with lock:
                errors.append(repr(exc))
        with lock:
            lat.extend(mine)

    workers = [threading.Thread(target=loop) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    out.put((lat, errors))


def _cpu_split(env: Env) -> tuple[float, float]:
    """CPU seconds used so far by the key service (its process and its workers) and by the load
    generators this script ran and reaped (wrk)."""
    import resource

    tick = os.sysconf("SC_CLK_TCK")
    pids = [env.kms_pid]
    with contextlib.suppress(OSError):
        pids += [int(p) for p in Path(f"/proc/{env.kms_pid}/task/{env.kms_pid}/children").read_text().split()]
    service = 0.0
    for pid in pids:
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            service += (int(fields[11]) + int(fields[12])) / tick
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return service, children.ru_utime + children.ru_stime


def _percentile(sorted_values: list[float], q: float) -> float:
    """In milliseconds, from seconds."""
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(len(sorted_values) * q))] * 1000


def _wrk_duration(text: str) -> float:
    """wrk's latency cell ('812.00us', '1.43ms', '2.01s') in milliseconds."""
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if not match:
        raise RuntimeError(f"cannot parse wrk latency {text!r}")
    return float(match.group(1)) * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}[match.group(2)]


def _wrk_load(run_dir: Path, creds: dict[str, Any], operation: str, payload: dict[str, Any], *,
              seconds: float, clients: int) -> tuple[float, float, float]:
    """(requests/s, p50 ms, p99 ms) of one operation under wrk (C, epoll, 2 threads).

    The request is signed once (SigV4 accepts a signature for 5 minutes, and replays within that
    window, as AWS does), so the load generator costs a few microseconds per request and the
    figure is the service's, not the client's. Every reply must be a 200.
    """
    body, headers = _kms_request(creds, operation, payload)
    script = run_dir / f"wrk-{operation}.lua"
    script.write_text("wrk.method = 'POST'\n" + f"wrk.body = {json.dumps(body.decode())}\n"
                      + "".join(f"wrk.headers[{json.dumps(k)}] = {json.dumps(v)}\n"
                                for k, v in headers.items() if k.lower() != "host"))
    proc = run(["wrk", "-t", "2", "-c", str(clients), "-d", f"{max(1, round(seconds))}s", "--latency",
                "-s", str(script), creds["endpoint"].rstrip("/") + "/"], timeout=seconds + 60)
    out = proc.stdout
    if "Non-2xx" in out or "Socket errors" in out:
        raise RuntimeError(f"wrk saw failed requests:\n{out}")
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p50 = _wrk_duration(re.search(r"\s50%\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    p99 = _wrk_duration(re.search(r"\s99%\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    return rps, p50, p99


def _python_load(creds: dict[str, Any], operation: str, payload: dict[str, Any], *, seconds: float,
                 clients: int, processes: int) -> tuple[float, float, float]:
    """The same measurement with Python clients (when wrk is missing): the clients' own CPU then
    competes with the service for the 2 cores, so this under-states the service."""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    start_at = time.time() + 1.0
    stop_at = start_at + seconds
    per = [clients // processes + (1 if i < clients % processes else 0) for i in range(processes)]
    procs = [ctx.Process(target=_kms_worker, args=(creds, operation, payload, n, start_at, stop_at, out))
             for n in per if n]
    for proc in procs:
        proc.start()
    lat: list[float] = []
    errors: list[str] = []
    for _ in procs:
        got_lat, got_err = out.get(timeout=seconds + 60)
        lat.extend(got_lat)
        errors.extend(got_err)
    for proc in procs:
        proc.join(10)
    if errors:
        say(f"{operation}: {len(errors)} client error(s), first: {errors[0]}")
    lat.sort()
    return len(lat) / seconds, _percentile(lat, 0.50), _percentile(lat, 0.99)


def kms_load(creds: dict[str, Any], key_id: str, *, seconds: float, clients: int = 16,
             processes: int = 4, run_dir: Path | None = None) -> dict[str, float]:
    """Decrypt and GenerateDataKey requests/s and p50/p99 latency from ``clients`` keep-alive
    clients: wrk when installed (and ``run_dir`` given), else Python clients spread over
    ``processes`` processes (2 cores and the GIL: one process would measure the client)."""
    import base64

    context = {"kmsfs:file-id": "00" * 16}
    gdk = {"KeyId": key_id, "KeySpec": "AES_256", "EncryptionContext": context}
    conn = _connection(creds)
    blob = _kms_call(conn, *_kms_request(creds, "GenerateDataKey", gdk))["CiphertextBlob"]
    conn.close()
    base64.b64decode(blob)
    use_wrk = run_dir is not None and shutil.which("wrk") is not None
    result: dict[str, float] = {"kms_load_generator_wrk": float(use_wrk)}
    decrypt = {"CiphertextBlob": blob, "EncryptionContext": context}
    for name, operation, payload in (("decrypt", "Decrypt", decrypt), ("gdk", "GenerateDataKey", gdk)):
        if use_wrk:
            assert run_dir is not None
            rps, p50, p99 = _wrk_load(run_dir, creds, operation, payload, seconds=seconds, clients=clients)
        else:
            rps, p50, p99 = _python_load(creds, operation, payload, seconds=seconds, clients=clients,
                                         processes=processes)
        result[f"kms_{name}_rps"], result[f"kms_{name}_p50"], result[f"kms_{name}_p99"] = rps, p50, p99
        say(f"{operation} ({'wrk' if use_wrk else 'Python clients'}): {rps:,.0f}/s, p50 {p50:.2f} ms, "
            f"p99 {p99:.2f} ms")
    return result


def serial_round_trips(creds_file: Path, key_id: str, n: int = 1000, endpoint: str = "",
                       suffix: str = "") -> dict[str, float]:
    """p50 (ms) of back-to-back Decrypts and GenerateDataKeys through kmsfs's own client: what every
    open and every create waits for, and so the per-file part of the floor (``FLOORS``).
    ``endpoint`` overrides the credentials' (e.g. the Unix socket); ``suffix`` goes into the keys."""
    from kmsfs.keyclient import KeyClient, load_credentials

    creds = load_credentials(creds_file)
    if not creds.endpoint or not creds.region:
        raise RuntimeError(f"{creds_file} names no endpoint or region")
    client = KeyClient(endpoint or creds.endpoint, creds.region, creds)
    context = {"kmsfs:file-id": "00" * 16}
    decrypt: list[float] = []
    gdk: list[float] = []
    try:
        _, blob, _ = client.generate_data_key(key_id, context)  # connects outside the timing
        for _ in range(n):  # interleaved, so both see the same machine
            t0 = time.perf_counter()
            client.decrypt(blob, context)
            t1 = time.perf_counter()
            client.generate_data_key(key_id, context)
            decrypt.append(t1 - t0)
            gdk.append(time.perf_counter() - t1)
    finally:
        client.close()
    decrypt.sort()
    gdk.sort()
    out = {f"kms_serial{suffix}_p50": _percentile(decrypt, 0.5),
           f"kms_serial{suffix}_gdk_p50": _percentile(gdk, 0.5)}
    say(f"one request at a time through kmsfs's KeyClient ({endpoint or creds.endpoint}): Decrypt p50 "
        f"{out[f'kms_serial{suffix}_p50']:.2f} ms, GenerateDataKey p50 "
        f"{out[f'kms_serial{suffix}_gdk_p50']:.2f} ms")
    return out


# -- main ------------------------------------------------------------------------------------------
def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.2f}" if abs(value) < 10 else f"{value:.1f}"


def _table(lines: list[list[str]]) -> list[str]:
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    out = []
    for n, line in enumerate(lines):
        cells = zip(line, widths, strict=True)
        out.append(" | ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(cells)))
        if n == 0:
            out.append("-+-".join("-" * w for w in widths))
    return out


def render(result: dict[str, Any]) -> str:
    """The side-by-side table, the daemons' CPU per workload, and the load average."""
    targets = result["targets"]
    shown = [t for t in TARGETS if t in targets]
    has_floor = any("floor" in row["values"] for row in result["rows"])
    ratios = [heading for num, den, heading in RATIOS
              if num in targets and (den in targets or heading == "kmsfs/gocryptfs"
                                     or (den == "floor" and has_floor))]
    cols = ["workload", "unit", *shown, *(["floor"] if has_floor else []), *ratios, "target"]
    lines = [cols]
    for row in result["rows"]:
        v = row["values"]
        if all(x is None for x in v.values()):
            continue  # not measured in this run (--tree-only)
        lines.append([row["label"], row["unit"], *(fmt(v.get(t)) for t in shown),
                      *([fmt(v.get("floor"))] if has_floor else []),
                      *(fmt(row.get("ratios", {}).get(h)) for h in ratios), row["target"]])
    out = _table(lines)
    cpu = result.get("cpu") or {}
    cpu_targets = [t for t in shown if any(cpu.get(w, {}).get(t) is not None for w in cpu)]
    if cpu_targets:
        out += ["", "CPU seconds of each FUSE daemon per workload (user+sys from /proc/PID/stat, median):"]
        rows = [["workload", "", *cpu_targets]]
        rows += [[w, "s", *(fmt(cpu[w].get(t)) for t in cpu_targets)] for w in cpu]
        out += _table(rows)
    load = result.get("load_average")
    if load:
        out += ["", f"load average (1/5/15 min): {load['start']} at the start, {load['end']} at the end"]
    return "\n".join(out)


def _ratios(values: dict[str, float | None]) -> dict[str, float | None]:
    return {heading: ratio(values.get(num), values.get(den)) for num, den, heading in RATIOS
            if values.get(num) is not None and values.get(den) is not None}


def floor_value(row: Row, passthrough: float | None, round_trip_ms: float | None,
                nfiles: int) -> float | None:
    """The workload's time on the passthrough plus one serial round trip per file, in the
    row's unit (seconds, or files/s for a rate)."""
    if passthrough is None or round_trip_ms is None or not passthrough:
        return None
    extra = nfiles * round_trip_ms / 1000
    if row.higher_is_better:  # files/s
        return nfiles / (nfiles / passthrough + extra)
    return passthrough + extra


def target_pid(target: str, mnt: Path, env: Env) -> int | None:
    """The process serving ``target`` (for its CPU time); None for the bare directory."""
    if target == "bare":
        return None
    if target == "passthrough":
        return env.pids.get(target)
    return daemon_pid(mnt, b"gocryptfs" if target == "gocryptfs" else b"kmsfs")


def key_service_figures(env: Env, sizes: Sizes, tree_only: bool) -> dict[str, Any]:
    """The KMS_ROWS values: the key service under load, the serial round trips, kmsfs's RSS.
    Only the serial round trips (the floor needs them) with ``tree_only``."""
    kms: dict[str, Any] = {}
    if not tree_only:
        say("key service alone: Decrypt and GenerateDataKey, 16 concurrent clients")
        kms = kms_load(json.loads(env.creds.read_text()), env.key_id, seconds=sizes.kms_seconds,
                       clients=16, processes=4, run_dir=env.run_dir)
    assert env.creds is not None
    kms.update(serial_round_trips(env.creds, env.key_id, n=sizes.serial_trips))
    if env.unix_endpoint:
        kms.update(serial_round_trips(env.creds, env.key_id, n=sizes.serial_trips,
                                      endpoint=env.unix_endpoint, suffix="_unix"))
    if not tree_only:
        say("kmsfs peak RSS")
        kms["kmsfs_rss"] = kmsfs_peak_rss(env, sizes.rss_mib)
    return kms


MOUNTERS: dict[str, Callable[[Env], Path]] = {
    "kmsfs": mount_kmsfs, "passthrough": mount_passthrough, "gocryptfs": mount_gocryptfs,
    "kmsfs-plain": lambda env: mount_kmsfs(env, "kmsfs-plain", plaintext_names=True),
    "kmsfs-dirkeys": lambda env: mount_kmsfs(env, "kmsfs-dirkeys", init_flags=("--directory-keys",))}


def bench(args: argparse.Namespace, env: Env) -> dict[str, Any]:
    sizes = QUICK if args.quick else FULL
    if args.reps:
        sizes.reps = args.reps
    load_start = load_average()
    tools = ensure_tools(want_gocryptfs="gocryptfs" in args.targets, install=not args.quick)
    targets = [t for t in args.targets if t != "gocryptfs" or tools["gocryptfs"]]
    if not tools["fio"]:
        say("fio missing: no random-I/O figures")
    say(f"run directory {env.run_dir}; targets {', '.join(targets)}; {sizes.reps} repetition(s); "
        f"load average {load_start}")
    start_keyservice(env, unix=True)
    tarball, nfiles = quick_tarball(env.run_dir) if args.quick else make_tarball(env.run_dir)
    say(f"tree: {nfiles} files in {tarball.name}")
    mnts: dict[str, Path] = {}
    pids: dict[str, int | None] = {}
    for t in targets:
        if t == "bare":
            mnts[t] = env.run_dir / "bare"
            mnts[t].mkdir(exist_ok=True)
        else:
            mnts[t] = MOUNTERS[t](env)
        pids[t] = target_pid(t, mnts[t], env)
        say(f"{t}: {mnts[t]} (daemon pid {pids[t]})")
    keys = [r.key for r in FS_ROWS]
    samples: dict[str, dict[str, list[float]]] = {k: {t: [] for t in targets} for k in keys}
    cpu: dict[str, dict[str, list[float]]] = {k: {t: [] for t in targets} for k in keys}
    for rep in range(sizes.reps):
        for t in targets:
            mnt, pid = mnts[t], pids[t]
            got: dict[str, float] = {}
            used: dict[str, float] = {}

            def step(key: str, fn: Callable[[], float], pid: int | None = pid,
                     got: dict[str, float] = got, used: dict[str, float] = used) -> None:
                before = cpu_seconds(pid)
                got[key] = fn()
                after = cpu_seconds(pid)
                if before is not None and after is not None:
                    used[key] = after - before

            if not args.tree_only:
                step("seq_write", lambda mnt=mnt: seq_write(mnt, sizes.seq_mib))
                step("seq_read", lambda mnt=mnt: seq_read(mnt, sizes.seq_mib))
                (mnt / "seq.bin").unlink()
            if tools["fio"] and not args.tree_only:
                step("rand_iops", lambda mnt=mnt: rand_iops(mnt, sizes.fio_mib, sizes.fio_seconds))
            tree, tree_cpu = tree_workloads(mnt, tarball, nfiles, check_diff=(rep == 0), pid=pid)
            got.update(tree)
            used.update(tree_cpu)
            for k, v in got.items():
                samples[k][t].append(v)
            for k, v in used.items():
                cpu[k][t].append(v)
            say(f"rep {rep + 1}/{sizes.reps} {t}: " + ", ".join(f"{k} {fmt(v)}" for k, v in got.items())
                + "; daemon CPU s: " + ", ".join(f"{k} {v:.2f}" for k, v in used.items()))
    kms = key_service_figures(env, sizes, args.tree_only)
    rows: list[dict[str, Any]] = []
    subst = {"size": f"{sizes.seq_mib} MiB", "fio_size": f"{sizes.fio_mib} MiB", "files": f"{nfiles:,}",
             "rss_size": f"{sizes.rss_mib} MiB"}

    def add(r: Row, values: dict[str, Any], row_samples: dict[str, list[float]]) -> None:
        ratios = _ratios(values)
        rows.append({"key": r.key, "label": r.label.format(**subst), "unit": r.unit,
                     "higher_is_better": r.higher_is_better, "target": r.target, "values": values,
                     "samples": row_samples, "ratios": ratios,
                     "ratio_gocryptfs": ratios.get("kmsfs/gocryptfs"),
                     "ratio_passthrough": ratios.get("kmsfs/passthrough"),
                     "ratio_plain": ratios.get("kmsfs/plain")})

    for r in FS_ROWS:
        values: dict[str, Any] = {t: median(samples[r.key][t]) for t in targets}
        add(r, values, samples[r.key])
        if r.key in FLOORS:
            trip, what = FLOORS[r.key]
            if args.unix_socket:
                trip, what = trip.replace("kms_serial", "kms_serial_unix"), what + " (Unix socket)"
            floor = floor_value(r, values.get("passthrough"), kms.get(trip), nfiles)
            if floor is not None:
                add(Row(f"{r.key}_floor", f"  floor: passthrough + 1 serial {what}", r.unit,
                        r.higher_is_better, ">= 0.8x" if r.higher_is_better else FLOOR_TARGET),
                    {"floor": floor}, {})
                # the ratio of the workload's kmsfs value (on the row above) to this floor
                rows[-1]["ratios"] = {"kmsfs/floor": ratio(values.get("kmsfs"), floor)}
    for r in KMS_ROWS:
        add(r, {"kmsfs": kms.get(r.key)}, {})
        rows[-1]["ratios"] = {}
    return {"quick": bool(args.quick), "kmsfs_options": env.kmsfs_opts, "reps": sizes.reps,
            "unix_socket": bool(args.unix_socket),
            "targets": targets, "files": nfiles,
            "sizes": sizes.__dict__, "kernel": os.uname().release, "time": time.strftime("%F %T %Z"),
            "load_average": {"start": load_start, "end": load_average()},
            "cpu": {k: {t: median(v) for t, v in per.items() if v} for k, per in cpu.items()
                    if any(per.values())},
            "cpu_samples": cpu, "rows": rows}


def default_targets(quick: bool) -> list[str]:
    """Every target for the full table; directory keys only where this kmsfs has them."""
    if quick:
        return list(QUICK_TARGETS)
    helptext = run([PY, "-m", "kmsfs", "init", "--help"], check=False).stdout
    return [t for t in TARGETS if t != "kmsfs-dirkeys" or "--directory-keys" in helptext]


@contextlib.contextmanager
def run_directory(path: str | None, keep: bool) -> Iterator[Path]:
    parent = Path(path).resolve() if path else Path("/var/tmp")
    parent.mkdir(parents=True, exist_ok=True)
    run_dir = Path(tempfile.mkdtemp(prefix="kmsfs-bench-", dir=parent))
    try:
        yield run_dir
    finally:
        if not keep:
            shutil.rmtree(run_dir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small sizes, one repetition, never installs")
    p.add_argument("--json-out", help="write the results as JSON here")
    p.add_argument("--run-dir",
                   help="parent of the run directory (a new kmsfs-bench-* inside it; default /var/tmp)")
    p.add_argument("--keep", action="store_true", help="keep the run directory")
    p.add_argument("--reps", type=int, help="repetitions (default 3, --quick 1)")
    p.add_argument("--targets",
                   help="comma-separated subset of " + ",".join(TARGETS) + " (default: all of them, "
                        "kmsfs-dirkeys only if this kmsfs has `init --directory-keys`; --quick: "
                        + ",".join(QUICK_TARGETS) + "). kmsfs-plain is a cipherdir made with "
                        "--plaintext-names (issue 16's ratio)")
    p.add_argument("--tree-only", action="store_true",
                   help="only the tree workloads (untar, find/ls, cat, rm): e.g. encrypted against "
                        "plaintext names, --targets kmsfs,kmsfs-plain")
    p.add_argument("--kms-only", action="store_true",
                   help="measure the key service alone (Decrypt and GenerateDataKey), no file systems")
    p.add_argument("--workers", type=int, default=1, help="keyservice serve --workers N (default 1)")
    p.add_argument("--seconds", type=float, default=10.0, help="--kms-only: seconds per operation")
    p.add_argument("--unix-socket", action="store_true",
                   help="the kmsfs mounts talk to the key service over its Unix socket (kmsfs mount "
                        "--endpoint unix://...), and the floor uses the round trips over it")
    p.add_argument("--key-pool", type=int, default=None, metavar="N",
                   help="kmsfs mount --key-pool N (default: kmsfs's own default, off; 32 measures "
                        "the pool with its claims)")
    args = p.parse_args(argv)
    args.targets = default_targets(args.quick) if args.targets is None else [
        t for t in args.targets.split(",") if t]
    if "kmsfs" not in args.targets:
        p.error("--targets must include kmsfs")
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    with run_directory(args.run_dir, args.keep) as run_dir:
        env = Env(run_dir, kmsfs_opts=[] if args.key_pool is None else [f"--key-pool={args.key_pool}"])
        if args.unix_socket:
            env.kmsfs_opts += ["--endpoint", f"unix://{unix_socket_path(run_dir)}"]
        try:
            if args.kms_only:
                start_keyservice(env, args.workers)
                before, started = _cpu_split(env), time.monotonic()
                kms = kms_load(json.loads(env.creds.read_text()), env.key_id, seconds=args.seconds,
                               clients=16, processes=4, run_dir=env.run_dir)
                elapsed = time.monotonic() - started
                after = _cpu_split(env)
                # Where the CPU went during both loads, in cores (2.0 = both cores of this machine).
                kms["keyservice_cpu_cores"] = round((after[0] - before[0]) / elapsed, 2)
                kms["load_generator_cpu_cores"] = round((after[1] - before[1]) / elapsed, 2)
                print(json.dumps({"workers": args.workers, **kms}, indent=2))
                return 0
            result = bench(args, env)
        finally:
            env.close()
    print(render(result))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=2) + "\n")
        say(f"JSON written to {args.json_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
