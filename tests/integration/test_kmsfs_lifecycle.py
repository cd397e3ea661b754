"""Revocation reaching open handles, tools (fsck, rewrap, info), crashes, outages, the frozen v1
cipherdir, and a seeded model test — all through real mounts over a real key service."""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from keyservice.audit.review import is_create
from kmsfs import format as fmt
from tests.integration.kmsfs_mount_helpers import (
    daemon_pid,
    data_offset,
    force_unmount,
    is_mounted,
    kill_daemon_during,
    kmsfs,
    mounted,
    requires_fuse,
    wait_for_records,
    wait_pool_full,
)

pytestmark = [pytest.mark.integration, requires_fuse]
BS = fmt.DEFAULT_BLOCK_SIZE
V1_FIXTURE = Path(__file__).resolve().parents[1] / "data" / "kmsfs-v1"


def _init(service: Any, tmp: Path, description: str = "lifecycle") -> tuple[Path, str]:
    key = service.boto3_client().create_key(Description=description)["KeyMetadata"]
    cipherdir = tmp / "cipher"
    kmsfs("init", cipherdir, "--endpoint", service.endpoint, "--key", key["KeyId"],
          "--credentials", service.credentials_file)
    return cipherdir, key["Arn"]


def _backing(cipherdir: Path, plain: str, creds: Any) -> Path:
    """The backing file of a path inside a name-encrypting cipherdir (``kmsfs path encrypt``)."""
    return Path(kmsfs("path", "encrypt", cipherdir, plain, "--credentials", creds).stdout.strip())


def _drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("1")


def test_revocation_reaches_open_handles(keyservice_dev: Any, tmp_path: Path) -> None:
    cipherdir, arn = _init(keyservice_dev, tmp_path)
    kms = keyservice_dev.boto3_client()
    with mounted(cipherdir, tmp_path / "mnt", keyservice_dev.credentials_file,
                 "--revalidate-after", "1") as m:
        (m / "doc.txt").write_bytes(b"revocable" * 1000)
        fd = os.open(m / "doc.txt", os.O_RDWR)
        try:
            assert os.pread(fd, 9, 0) == b"revocable"
            kms.disable_key(KeyId=arn)
            try:
                time.sleep(1.2)
                _drop_caches()
                with pytest.raises(OSError) as info:
                    os.pread(fd, 9, 4096)
                assert info.value.errno == errno.EACCES
                with pytest.raises(OSError) as info:
                    os.pwrite(fd, b"x", 0)
                assert info.value.errno == errno.EACCES
            finally:
                kms.enable_key(KeyId=arn)
            time.sleep(1.2)
            _drop_caches()
            assert os.pread(fd, 9, 0) == b"revocable"  # re-enabling restores the open handle
        finally:
            os.close(fd)


def test_scheduled_deletion_refuses_and_says_so(keyservice_dev: Any, tmp_path: Path) -> None:
    cipherdir, arn = _init(keyservice_dev, tmp_path)
    kms = keyservice_dev.boto3_client()
    with mounted(cipherdir, tmp_path / "mnt", keyservice_dev.credentials_file) as m:
        (m / "gone.txt").write_text("soon unrecoverable")
        try:
            kms.schedule_key_deletion(KeyId=arn, PendingWindowInDays=7)
        except Exception as exc:  # noqa: BLE001 - service without deletion yet
            pytest.skip(f"key service cannot schedule deletion yet: {exc}")
        _drop_caches()
        with pytest.raises(OSError) as info:
            (m / "gone.txt").read_text()
        assert info.value.errno == errno.EACCES
        kms.cancel_key_deletion(KeyId=arn)
        kms.enable_key(KeyId=arn)
        assert (m / "gone.txt").read_text() == "soon unrecoverable"


def test_fsck_info_and_rewrap(keyservice_dev: Any, tmp_path: Path) -> None:
    cipherdir, arn = _init(keyservice_dev, tmp_path)
    creds = keyservice_dev.credentials_file
    with mounted(cipherdir, tmp_path / "mnt", creds) as m:
        for i in range(5):
            (m / f"f{i}.bin").write_bytes(os.urandom(i * 5000))
        info = json.loads(kmsfs("info", m / "f2.bin").stdout)
        assert info["format_version"] == 3 and info["key_arn"] == arn
        assert info["plaintext_size"] == 10000 and "data_key" not in json.dumps(info)
        proc = kmsfs("fsck", cipherdir, "--credentials", creds)
        assert "5 files" in proc.stdout and "clean" in proc.stdout
        other = keyservice_dev.boto3_client().create_key(Description="rewrap target")["KeyMetadata"]
        proc = kmsfs("rewrap", cipherdir, "--to-key", other["KeyId"], "--credentials", creds,
                     check=False)
        if "UnsupportedOperation" in proc.stdout + proc.stderr or (
                proc.returncode != 0 and "ReEncrypt" in proc.stdout + proc.stderr):
            pytest.skip("key service has no ReEncrypt yet")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "5 re-wrapped" in proc.stdout and "rewrap [" in proc.stderr or "rewrap:" in proc.stderr
        backing = {i: _backing(cipherdir, f"/f{i}.bin", creds) for i in range(5)}  # names encrypted
        for i in range(5):  # contents untouched, readable through the mount (safe while mounted)
            h = fmt.parse_header(os.getxattr(backing[i], fmt.HEADER_XATTR))
            assert h.key_arn == other["Arn"]
        _drop_caches()
        assert len((m / "f4.bin").read_bytes()) == 20000
        assert not (cipherdir / ".kmsfs.rewrap").exists()
        with open(backing[3], "r+b") as f:
            f.seek(data_offset(backing[3]) + 4124 + 3)
            f.write(b"\xff")
        proc = kmsfs("fsck", cipherdir, "--credentials", creds, check=False)
        assert proc.returncode == 1 and "DAMAGED /f3.bin: block 1" in proc.stdout


def test_kill_9_during_writes_truncates_creates_renames(keyservice_dev: Any, tmp_path: Path) -> None:
    cipherdir, _ = _init(keyservice_dev, tmp_path)
    creds = keyservice_dev.credentials_file
    mnt = tmp_path / "mnt"
    workload = r'''
import os, random, sys
m = sys.argv[1]; rng = random.Random(int(sys.argv[2]))
with open(os.path.join(m, "synced.bin"), "wb") as f:
    f.write(b"S" * 50000); f.flush(); os.fsync(f.fileno())
print("synced", flush=True)
i = 0
while True:
    i += 1
    p = os.path.join(m, f"w{i % 7}.bin")
    with open(p, "ab") as f:
        f.write(os.urandom(rng.randrange(1, 20000)))
    os.truncate(p, rng.randrange(0, 60000))
    q = os.path.join(m, f"n{i % 5}.tmp")
    with open(q, "wb") as f:
        f.write(os.urandom(rng.randrange(0, 9000)))
    os.replace(q, os.path.join(m, f"r{i % 3}.bin"))
'''
    kill_daemon_during(cipherdir, mnt, creds, workload, rounds=3, ready="synced", first_sleep=0.4, step=0.3)
    with mounted(cipherdir, mnt, creds) as m:
        assert (m / "synced.bin").read_bytes() == b"S" * 50000
        for p in sorted(m.iterdir()):
            p.read_bytes()  # every file readable (also completes interrupted size changes)
    proc = kmsfs("fsck", cipherdir, "--credentials", creds, check=False)
    assert proc.returncode == 0, proc.stdout
    assert "DAMAGED" not in proc.stdout


def test_dead_mount_is_recovered_by_umount_and_by_mount(keyservice_dev: Any, tmp_path: Path) -> None:
    """After kill -9 of the daemon the mount point answers ENOTCONN; ``kmsfs umount`` and
    ``kmsfs mount`` both recover it (they used to refuse: "not mounted" / "not a directory")."""
    cipherdir, _ = _init(keyservice_dev, tmp_path, "dead mount")
    creds = keyservice_dev.credentials_file
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        for recover_with in ("umount", "mount"):
            kmsfs("mount", cipherdir, mnt, "--credentials", creds)
            (mnt / f"{recover_with}.txt").write_text("kept")
            os.kill(daemon_pid(cipherdir, mnt), signal.SIGKILL)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                try:
                    os.stat(mnt)
                except OSError as exc:
                    if exc.errno == errno.ENOTCONN:  # (a request in flight gets ECONNABORTED)
                        break
                time.sleep(0.05)
            assert is_mounted(mnt) and not os.path.ismount(mnt)
            if recover_with == "umount":
                kmsfs("umount", mnt)
                assert not is_mounted(mnt)
            else:
                proc = kmsfs("mount", cipherdir, mnt, "--credentials", creds)
                assert "recovered" in proc.stderr
                assert (mnt / "umount.txt").read_text() == "kept"
                kmsfs("umount", mnt)
        proc = kmsfs("umount", mnt, check=False)
        assert proc.returncode != 0 and "not mounted" in proc.stderr
    finally:
        force_unmount(mnt)


@pytest.mark.parametrize("pool", ["32", "0"])
def test_outage_bounded_and_reconnects(tmp_path: Path, pool: str) -> None:
    """Service stopped: opens fail with EIO within the timeout, open files keep working, the mount
    reconnects by itself. Creates: without the pool they need the service and fail; with it they
    use a key generated (and audited) before the outage, and the create's claim is delivered —
    with its path — once the service is back."""
    from tests.conftest import start_dev_service, stop_dev_service, wait_healthy

    (tmp_path / "svc").mkdir()
    service = start_dev_service(tmp_path / "svc")
    extra = ["--kms-timeout", "2", "--key-pool", pool]
    try:
        cipherdir, _ = _init(service, tmp_path)
        with mounted(cipherdir, tmp_path / "mnt", service.credentials_file, *extra) as m:
            (m / "a.txt").write_text("open during outage")
            (m / "b.txt").write_text("needs the service")
            if pool != "0":
                wait_pool_full(service, cipherdir, m)
            with open(m / "a.txt", "r+b") as held:
                stop_dev_service(service)
                start = time.monotonic()
                with pytest.raises(OSError) as info:
                    (m / "b.txt").read_text()
                assert info.value.errno == errno.EIO and time.monotonic() - start < 5
                if pool == "0":
                    with pytest.raises(OSError):
                        (m / "c.txt").write_text("no data key")
                else:  # a pooled key: the create does not wait for the service
                    start = time.monotonic()
                    (m / "c.txt").write_text("pooled key")
                    assert time.monotonic() - start < 1
                assert held.read() == b"open during outage"
                held.write(b"!")
                with service.log_file.open("ab") as log:  # same command line, same port
                    service.process = subprocess.Popen(service.process.args, stdout=log,
                                                       stderr=subprocess.STDOUT)
                ca = service.data_dir / "tls" / "ca.pem"
                wait_healthy(service.process, service.endpoint, service.log_file,
                             **({"verify": str(ca)} if ca.exists() else {}))
                assert (m / "b.txt").read_text() == "needs the service"  # reconnected by itself
                if pool != "0":  # the claim was retried until the service answered
                    wait_for_records(service.audit_records, lambda rs: any(
                        is_create(r) and r["caller"]["path"] == "/c.txt" and r["outcome"] == "success"
                        for r in rs), timeout=20)
                    assert (m / "c.txt").read_text() == "pooled key"
                (m / "c.txt").write_text("works again")
            assert (m / "a.txt").read_text() == "open during outage!"
    finally:
        stop_dev_service(service)


def test_frozen_v1_cipherdir_mounts_and_reads(tmp_path: Path) -> None:
    """The v1 fixture (made with the v1 code) with its frozen dev key service data directory."""
    from tests.conftest import start_dev_service, stop_dev_service

    manifest = json.loads((V1_FIXTURE / "manifest.json").read_text())
    base = tmp_path / "svc"
    base.mkdir()
    shutil.copytree(V1_FIXTURE / "keyservice-data", base / "keyservice-data")
    cipherdir = tmp_path / "cipher"
    shutil.copytree(V1_FIXTURE / "cipherdir", cipherdir)
    for rel, entry in manifest["files"].items():  # git keeps no xattrs: restore the headers
        os.setxattr(cipherdir / rel, fmt.HEADER_XATTR, bytes.fromhex(entry["header_hex"]))
    service = start_dev_service(base)  # the frozen data dir: same keys and credentials
    try:
        config = json.loads((cipherdir / ".kmsfs.json").read_text())
        config["endpoint"] = service.endpoint
        (cipherdir / ".kmsfs.json").write_text(json.dumps(config))
        creds = service.credentials_file
        with mounted(cipherdir, tmp_path / "mnt", creds) as m:
            for rel, entry in manifest["files"].items():
                assert (m / rel).read_bytes() == bytes.fromhex(entry["plaintext_hex"]), rel
            with pytest.raises(OSError) as info:  # v1 cannot authenticate its size: read-only
                with open(m / "dir/full.bin", "ab") as f:
                    f.write(b"more")
            assert info.value.errno == errno.EROFS
            (m / "hello.txt").write_bytes(b"rewritten")  # O_TRUNC + write: a fresh v3 key
            (m / "new.txt").write_bytes(b"v3")
            assert (m / "hello.txt").read_bytes() == b"rewritten"
        assert fmt.parse_header(os.getxattr(cipherdir / "dir/full.bin", fmt.HEADER_XATTR)).version == 1
        assert fmt.parse_header(os.getxattr(cipherdir / "hello.txt", fmt.HEADER_XATTR)).version == 3
        assert fmt.parse_header(os.getxattr(cipherdir / "new.txt", fmt.HEADER_XATTR)).version == 3
        out = kmsfs("fsck", cipherdir, "--credentials", creds)
        assert out.returncode == 0
        assert "NOTE /dir/full.bin: format version 1: not protected against truncation" in out.stdout
        out = kmsfs("upgrade", cipherdir, "--credentials", creds, "-q").stdout
        assert "upgrade: 3 file(s) converted to format 3, 2 already current, 0 failed" in out, out
        assert "NOTE" not in kmsfs("fsck", cipherdir, "--credentials", creds, "-q").stdout
        with mounted(cipherdir, tmp_path / "mnt", creds) as m:
            for rel, entry in manifest["files"].items():
                if rel != "hello.txt":
                    assert (m / rel).read_bytes() == bytes.fromhex(entry["plaintext_hex"]), rel
            with open(m / "dir/full.bin", "ab") as f:  # upgraded: writable again
                f.write(b"more")
    finally:
        stop_dev_service(service)


def test_seeded_model_across_handles_and_processes(keyservice_dev: Any, tmp_path: Path) -> None:
    cipherdir, _ = _init(keyservice_dev, tmp_path)
    seed = int(os.environ.get("KMSFS_MODEL_SEED", "20261129"))  # scripts/kmsfs-soak.sh varies these
    steps = int(os.environ.get("KMSFS_MODEL_STEPS", "4000"))
    rng = random.Random(seed)
    names = [f"m{i}.bin" for i in range(4)]
    model: dict[str, bytearray] = {n: bytearray() for n in names}
    with mounted(cipherdir, tmp_path / "mnt", keyservice_dev.credentials_file) as m:
        fds: dict[str, list[int]] = {n: [] for n in names}
        for n in names:
            (m / n).write_bytes(b"")
        try:
            for step in range(steps):
                n = rng.choice(names)
                if not fds[n] or rng.random() < 0.05:
                    fds[n].append(os.open(m / n, os.O_RDWR))
                fd = rng.choice(fds[n])
                ref = model[n]
                op = rng.random()
                if op < 0.45:
                    off = rng.randrange(0, len(ref) + 6 * BS)
                    data = rng.randbytes(rng.choice([1, 17, BS - 1, BS, BS + 1, 3 * BS]))
                    os.pwrite(fd, data, off)
                    if off > len(ref):
                        ref.extend(bytes(off - len(ref)))
                    ref[off:off + len(data)] = data
                elif op < 0.55:
                    size = rng.randrange(0, len(ref) + 40 * BS)
                    os.ftruncate(fd, size) if rng.random() < 0.5 else os.truncate(m / n, size)
                    del ref[size:]
                    ref.extend(bytes(size - len(ref)))
                elif op < 0.58:
                    data = rng.randbytes(rng.randrange(1, 3 * BS))
                    off = rng.randrange(0, len(ref) + BS)
                    subprocess.run([sys.executable, "-c",
                                    "import os,sys; fd=os.open(sys.argv[1], os.O_WRONLY);"
                                    "os.pwrite(fd, bytes.fromhex(sys.argv[2]), int(sys.argv[3]))",
                                    str(m / n), data.hex(), str(off)], check=True)
                    if off > len(ref):
                        ref.extend(bytes(off - len(ref)))
                    ref[off:off + len(data)] = data
                elif op < 0.6 and len(fds[n]) > 1:
                    os.close(fds[n].pop(rng.randrange(len(fds[n]))))
                else:
                    off = rng.randrange(0, len(ref) + 10)
                    length = rng.randrange(0, 4 * BS)
                    assert os.pread(fd, length, off) == bytes(ref[off:off + length]), (step, n)
        finally:
            for lst in fds.values():
                for fd in lst:
                    os.close(fd)
        for n in names:
            assert (m / n).read_bytes() == bytes(model[n]), n
    assert kmsfs("fsck", cipherdir, "--credentials", keyservice_dev.credentials_file).returncode == 0
