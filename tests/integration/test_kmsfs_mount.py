"""kmsfs mounted over a real ``keyservice serve --dev`` process, exercised with ordinary tools."""

from __future__ import annotations

import errno
import filecmp
import json
import os
import pwd
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from keyservice.audit.review import is_create
from kmsfs import format as fmt
from tests.conftest import run_keyservice
from tests.integration.kmsfs_mount_helpers import (
    backing_files,
    backing_path,
    data_offset,
    force_unmount,
    kmsfs,
    mounted,
    requires_fuse,
    wait_for_records,
)

pytestmark = [pytest.mark.integration, requires_fuse]

MARKER = b"kmsfs-plaintext-marker-0123456789"


class Mount:
    def __init__(self, cipherdir: Path, path: Path, key_arn: str, creds: Path | None = None) -> None:
        self.cipherdir, self.path, self.key_arn, self.creds = cipherdir, path, key_arn, creds

    def backing(self, plain: str) -> Path:
        """The backing file of ``/plain`` (names are encrypted: found through the name key)."""
        assert self.creds is not None
        return backing_path(self.cipherdir, plain, self.creds)


def _init(service: Any, tmp: Path, description: str) -> tuple[Path, str]:
    key = service.boto3_client().create_key(Description=description)["KeyMetadata"]
    cipherdir = tmp / "cipher"
    kmsfs(
        "init",
        cipherdir,
        "--endpoint",
        service.endpoint,
        "--key",
        key["KeyId"],
        "--credentials",
        service.credentials_file,
    )
    return cipherdir, key["Arn"]


@pytest.fixture(scope="module")
def mnt(keyservice_dev: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mount]:
    tmp = tmp_path_factory.mktemp("kmsfs")
    cipherdir, arn = _init(keyservice_dev, tmp, "kmsfs mount tests")
    with mounted(cipherdir, tmp / "mnt", keyservice_dev.credentials_file) as path:
        yield Mount(cipherdir, path, arn, keyservice_dev.credentials_file)


def test_mount_hides_config_and_log(mnt: Mount) -> None:
    assert (mnt.cipherdir / ".kmsfs.json").exists()
    assert not any(n.startswith(".kmsfs") for n in os.listdir(mnt.path))
    with pytest.raises(FileNotFoundError):
        (mnt.path / ".kmsfs.json").read_text()


def test_cp_roundtrip(mnt: Mount, tmp_path: Path) -> None:
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(1_000_003) + MARKER)
    subprocess.run(["cp", str(src), str(mnt.path / "copy.bin")], check=True)
    subprocess.run(["cp", str(mnt.path / "copy.bin"), str(tmp_path / "back.bin")], check=True)
    assert filecmp.cmp(src, tmp_path / "back.bin", shallow=False)
    assert os.stat(mnt.path / "copy.bin").st_size == src.stat().st_size


def test_posix_basics(mnt: Mount) -> None:
    d = mnt.path / "posix"
    d.mkdir()
    f = d / "f.txt"
    f.write_bytes(b"0123456789")
    with open(f, "r+b") as h:
        h.seek(4096 * 2 + 5)  # write past EOF leaves a zero-filled gap
        h.write(b"END")
    data = f.read_bytes()
    assert data == b"0123456789" + bytes(4096 * 2 + 5 - 10) + b"END"
    os.truncate(f, 3)
    assert f.read_bytes() == b"012"
    os.truncate(f, 5000)
    assert f.read_bytes() == b"012" + bytes(4997)
    with open(f, "ab") as h:
        h.write(b"APPENDED")
    assert f.read_bytes().endswith(b"\x00APPENDED") and f.stat().st_size == 5008
    os.chmod(f, 0o640)
    assert f.stat().st_mode & 0o777 == 0o640
    os.utime(f, ns=(1_000_000_000, 1_500_000_000_123_456_789))
    assert f.stat().st_mtime_ns == 1_500_000_000_123_456_789
    f.rename(d / "g.txt")
    assert not f.exists() and (d / "g.txt").stat().st_size == 5008
    os.symlink("g.txt", d / "link")
    assert os.readlink(d / "link") == "g.txt" and (d / "link").read_bytes()[:3] == b"012"
    os.link(d / "g.txt", d / "hard")
    assert (d / "hard").read_bytes() == (d / "g.txt").read_bytes()
    os.setxattr(d / "g.txt", "user.test", b"value")
    assert os.getxattr(d / "g.txt", "user.test") == b"value"
    assert os.listxattr(d / "g.txt") == ["user.test"]  # the header xattr is hidden
    with pytest.raises(OSError):
        os.getxattr(d / "g.txt", fmt.HEADER_XATTR)
    with open(d / "g.txt", "w") as h:  # O_TRUNC
        h.write("new")
    assert (d / "g.txt").read_text() == "new"
    assert os.statvfs(mnt.path).f_blocks > 0
    for name in ("link", "hard", "g.txt"):
        (d / name).unlink()
    d.rmdir()


def test_tar_create_extract_keeps_mtimes(mnt: Mount, tmp_path: Path) -> None:
    src = tmp_path / "tree"
    for i in range(20):
        p = src / f"d{i % 4}" / f"file{i}.txt"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(os.urandom(i * 997) + MARKER)
        os.utime(p, (1_600_000_000 + i, 1_600_000_000 + i))
    os.symlink("d0/file0.txt", src / "sym")
    archive = tmp_path / "tree.tar"
    subprocess.run(["tar", "cf", str(archive), "-C", str(src), "."], check=True)
    dest = mnt.path / "untar"
    dest.mkdir()
    subprocess.run(["tar", "xf", str(archive), "-C", str(dest)], check=True)
    diff = subprocess.run(["tar", "-d", "-f", str(archive), "-C", str(dest)], capture_output=True, text=True)
    assert diff.returncode == 0, diff.stdout + diff.stderr
    # and tar reading from the mount produces an archive that matches the source
    archive2 = tmp_path / "again.tar"
    subprocess.run(["tar", "cf", str(archive2), "-C", str(dest), "."], check=True)
    diff2 = subprocess.run(["tar", "-d", "-f", str(archive2), "-C", str(src)], capture_output=True, text=True)
    assert diff2.returncode == 0, diff2.stdout + diff2.stderr


def test_sqlite_database(mnt: Mount) -> None:
    db = mnt.path / "db.sqlite"
    con = sqlite3.connect(db)
    try:
        con.execute("create table t (id integer primary key, v text)")
        with con:
            con.executemany("insert into t (v) values (?)", [("x" * (i % 500),) for i in range(5000)])
        with con:
            con.execute("delete from t where id % 3 = 0")
            con.execute("update t set v = 'updated' where id % 7 = 0")
        con.execute("vacuum")
        assert con.execute("pragma integrity_check").fetchone() == ("ok",)
        count = con.execute("select count(*) from t").fetchone()[0]
    finally:
        con.close()
    con = sqlite3.connect(db)
    try:
        assert con.execute("select count(*) from t").fetchone()[0] == count == 5000 - 5000 // 3
    finally:
        con.close()


@pytest.mark.skipif(shutil.which("git") is None, reason="git not installed")
def test_git_inside_mount(mnt: Mount) -> None:
    repo = mnt.path / "repo"
    repo.mkdir()
    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@example.com",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@example.com",
        "HOME": str(repo),
    }

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=repo, env=env, check=True, capture_output=True, text=True
        ).stdout

    git("init", "-q")
    (repo / "a.txt").write_text("first\n")
    git("add", "a.txt")
    git("commit", "-q", "-m", "first")
    (repo / "a.txt").write_text("second\n")
    git("commit", "-q", "-am", "second")
    assert git("log", "--format=%s").split() == ["second", "first"]
    git("fsck", "--strict")
    assert git("show", "HEAD~1:a.txt") == "first\n"


def test_backing_files_are_ciphertext_with_header(mnt: Mount) -> None:
    (mnt.path / "secret.txt").write_bytes(MARKER * 300)
    (mnt.path / "empty").write_bytes(b"")
    backing = mnt.backing("/secret.txt")
    assert backing.stat().st_size == data_offset(backing) + fmt.backing_size(len(MARKER) * 300)
    assert mnt.backing("/empty").stat().st_size == data_offset(backing)  # the prefix alone
    ids = set()
    files = backing_files(mnt.cipherdir)
    assert len(files) >= 2
    for path in files:
        assert MARKER not in path.read_bytes(), path
        header = fmt.parse_header(os.getxattr(path, fmt.HEADER_XATTR))
        assert header.key_arn == mnt.key_arn
        ids.add(header.file_id)
    assert len(ids) == len(files) - _hardlinked(files)  # a fresh file id (and data key) per file


def _hardlinked(files: list[Path]) -> int:
    inodes = [f.stat().st_ino for f in files]
    return len(inodes) - len(set(inodes))


def test_flipped_byte_reads_as_eio(mnt: Mount) -> None:
    data = os.urandom(4 * 4096)
    (mnt.path / "tamper.bin").write_bytes(data)
    backing = mnt.backing("/tamper.bin")
    pos = data_offset(backing) + fmt.block_offset(2) + 40
    with open(backing, "r+b") as f:
        f.seek(pos)
        byte = f.read(1)
        f.seek(pos)
        f.write(bytes([byte[0] ^ 0x01]))
    fd = os.open(mnt.path / "tamper.bin", os.O_RDONLY)
    try:
        assert os.pread(fd, 4096, 0) == data[:4096]  # other blocks still read
        with pytest.raises(OSError) as info:
            os.pread(fd, 4096, 2 * 4096)
        assert info.value.errno == errno.EIO
    finally:
        os.close(fd)
    with pytest.raises(OSError) as info:
        (mnt.path / "tamper.bin").read_bytes()
    assert info.value.errno == errno.EIO
    log = (mnt.cipherdir / ".kmsfs.log").read_text()
    assert "/tamper.bin" in log and "block 2" in log


def test_open_is_audited_with_caller(mnt: Mount, keyservice_dev: Any) -> None:
    name = "/audited-file.txt"
    (mnt.path / name.lstrip("/")).write_text("audit me")
    assert (mnt.path / name.lstrip("/")).read_text() == "audit me"  # this open calls Decrypt
    # The create took a pooled key (the default): it is audited by its claim, sent just after it.
    records = wait_for_records(lambda: _audit(keyservice_dev, name),
                               lambda rs: any(is_create(r) for r in rs))
    opens = [r for r in records if r.get("operation") == "Decrypt" and r.get("outcome") == "success"
             and not is_create(r)]
    assert opens, records
    caller = opens[-1]["caller"]
    assert caller["path"] == name
    assert caller["uid"] == os.getuid()
    assert caller["user"] == pwd.getpwuid(os.getuid()).pw_name
    assert isinstance(caller["pid"], int) and caller["pid"] > 0
    assert caller["process"]
    assert opens[-1]["encryption_context"] == {"kmsfs:file-id": _file_id(mnt, name)}
    creates = [r for r in records if is_create(r)]
    assert len(creates) == 1 and creates[0]["caller"]["path"] == name
    assert creates[0]["caller"]["user"] == caller["user"] and creates[0]["caller"]["process"]
    assert creates[0]["encryption_context"] == opens[-1]["encryption_context"]
    # F10: the review commands find it by file and by local user.
    user = caller["user"]
    listed = run_keyservice(
        "audit",
        "list",
        "--data-dir",
        str(keyservice_dev.data_dir),
        "--file",
        name,
        "--user",
        user,
        "--operation",
        "Decrypt",
        "--json",
    )
    decrypts = [r for r in records if r.get("operation") == "Decrypt"]
    assert listed.returncode == 0 and len(listed.stdout.splitlines()) == len(decrypts)
    files = run_keyservice(
        "audit", "files", "--data-dir", str(keyservice_dev.data_dir), "--file", name, "--json"
    )
    rows = [json.loads(line) for line in files.stdout.splitlines()]
    assert [(r["path"], r["user"], r["opens"], r["created"]) for r in rows] == [
        (name, user, len(opens), 1)
    ]
    assert rows[0]["key_id"] == opens[-1]["key_id"]
    assert creates[0]["caller"]["process"] in rows[0]["processes"]


def _file_id(mnt: Mount, name: str) -> str:
    # Through the mount: kmsfs info finds the backing file by inode number, without the name key
    # (a `kmsfs path encrypt` would add an audited Decrypt for this path).
    return str(json.loads(kmsfs("info", mnt.path / name.lstrip("/")).stdout)["file_id"])


def _audit(service: Any, path: str) -> list[dict[str, Any]]:
    """Records for one file, through the CLI (``keyservice audit list --file``), else the raw log."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "keyservice",
            "audit",
            "list",
            "--data-dir",
            str(service.data_dir),
            "--file",
            path,
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if proc.returncode == 0 and proc.stdout.strip():
        text = proc.stdout.strip()
        try:
            parsed = json.loads(text)
            return parsed if isinstance(parsed, list) else [parsed]
        except ValueError:
            return [json.loads(line) for line in text.splitlines() if line.strip()]
    return [r for r in service.audit_records() if (r.get("caller") or {}).get("path") == path]


def test_concurrent_writers_and_readers(mnt: Mount) -> None:
    path = mnt.path / "concurrent.bin"
    path.write_bytes(bytes(64 * 4096))
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            fd = os.open(path, os.O_RDWR)
            try:
                for j in range(20):
                    off = (i * 8 + j % 8) * 4096 + 100
                    os.pwrite(fd, bytes([i + 1]) * 300, off)
                    assert os.pread(fd, 300, off) == bytes([i + 1]) * 300
            finally:
                os.close(fd)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    data = path.read_bytes()
    for i in range(8):
        assert data[i * 8 * 4096 + 100 : i * 8 * 4096 + 400] == bytes([i + 1]) * 300


def test_disabled_key_refuses_opens_then_enable_restores(keyservice_dev: Any, tmp_path: Path) -> None:
    cipherdir, arn = _init(keyservice_dev, tmp_path, "kmsfs revocation test")
    kms = keyservice_dev.boto3_client()
    with mounted(cipherdir, tmp_path / "mnt", keyservice_dev.credentials_file) as m:
        (m / "doc.txt").write_text("revocable")
        held = open(m / "doc.txt", "rb")  # an already-open handle keeps working (F9/F6 doc)
        try:
            kms.disable_key(KeyId=arn)
            start = time.monotonic()
            with pytest.raises(PermissionError) as info:
                (m / "doc.txt").read_text()
            assert info.value.errno == errno.EACCES
            assert time.monotonic() - start < 15
            with pytest.raises(PermissionError):
                (m / "new.txt").write_text("no data key while disabled")
            assert held.read() == b"revocable"
            kms.enable_key(KeyId=arn)
            assert (m / "doc.txt").read_text() == "revocable"
            (m / "new.txt").write_text("works again")
            assert (m / "new.txt").read_text() == "works again"
        finally:
            held.close()
            kms.enable_key(KeyId=arn)
        log = (cipherdir / ".kmsfs.log").read_text()
        assert "DisabledException" in log and "/doc.txt" in log


def test_mount_fails_clearly_when_service_unreachable(tmp_path: Path, keyservice_dev: Any) -> None:
    cipherdir, _ = _init(keyservice_dev, tmp_path, "kmsfs unreachable test")
    config = json.loads((cipherdir / ".kmsfs.json").read_text())
    config["endpoint"] = "http://127.0.0.1:9"  # discard port: nothing listens
    (cipherdir / ".kmsfs.json").write_text(json.dumps(config))
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    # Credentials that name their endpoint refuse a cipherdir naming another (tested below);
    # these name none, so the mount really tries the unreachable one.
    creds = {k: v for k, v in keyservice_dev.credentials.items() if k != "endpoint"}
    (tmp_path / "creds.json").write_text(json.dumps(creds))
    start = time.monotonic()
    proc = kmsfs("mount", cipherdir, mnt, "--credentials", tmp_path / "creds.json", check=False)
    assert proc.returncode != 0 and "unreachable" in proc.stderr
    assert time.monotonic() - start < 20
    assert not os.path.ismount(mnt)


def test_a_redirected_endpoint_in_the_cipherdir_is_refused(tmp_path: Path, keyservice_dev: Any) -> None:
    """The cipherdir is untrusted storage: editing its config must not send requests elsewhere."""
    cipherdir, _ = _init(keyservice_dev, tmp_path, "kmsfs redirect test")
    config = json.loads((cipherdir / ".kmsfs.json").read_text())
    config["endpoint"] = "https://attacker.example:443"
    (cipherdir / ".kmsfs.json").write_text(json.dumps(config))
    (tmp_path / "mnt").mkdir()
    proc = kmsfs(
        "mount", cipherdir, tmp_path / "mnt", "--credentials", keyservice_dev.credentials_file, check=False
    )
    assert proc.returncode == 1 and "attacker.example" in proc.stderr and "refusing" in proc.stderr
    assert not os.path.ismount(tmp_path / "mnt")


def test_a_planted_log_symlink_is_not_followed(tmp_path: Path, keyservice_dev: Any) -> None:
    """The daemon log defaults to the (untrusted) cipherdir; a symlink planted there must not make
    the root daemon append to the file it points to."""
    cipherdir, _ = _init(keyservice_dev, tmp_path, "kmsfs symlink test")
    victim = tmp_path / "victim"
    victim.write_text("untouched\n")
    (cipherdir / ".kmsfs.log").unlink(missing_ok=True)
    (cipherdir / ".kmsfs.log").symlink_to(victim)
    (tmp_path / "mnt").mkdir()
    try:
        proc = kmsfs(
            "mount",
            cipherdir,
            tmp_path / "mnt",
            "--credentials",
            keyservice_dev.credentials_file,
            check=False,
        )
    finally:
        force_unmount(tmp_path / "mnt")
    assert proc.returncode == 1
    assert victim.read_text() == "untouched\n"


def test_service_outage_fails_new_opens_fast_keeps_open_files(tmp_path: Path) -> None:
    from tests.conftest import start_dev_service, stop_dev_service

    (tmp_path / "svc").mkdir()
    service = start_dev_service(tmp_path / "svc")
    stopped = False
    try:
        cipherdir, _ = _init(service, tmp_path, "kmsfs outage test")
        with mounted(cipherdir, tmp_path / "mnt", service.credentials_file) as m:
            (m / "a.txt").write_text("still here")
            (m / "b.txt").write_text("needs the service")
            with open(m / "a.txt", "r+b") as held:
                stop_dev_service(service)
                stopped = True
                start = time.monotonic()
                with pytest.raises(OSError) as info:
                    (m / "b.txt").read_text()
                assert info.value.errno == errno.EIO
                assert time.monotonic() - start < 15
                assert held.read() == b"still here"
                held.seek(0, 2)
                held.write(b", and writable")
                held.flush()
                os.fsync(held.fileno())
            assert "unavailable" in (cipherdir / ".kmsfs.log").read_text()
    finally:
        if not stopped:
            stop_dev_service(service)


def test_low_level_binding_mounts_and_keeps_tar_metadata(tmp_path: Path, keyservice_dev: Any) -> None:
    """kmsfs runs on its libfuse3 low-level binding (kmsfs/_fuse.py); the mount log names it and
    has no "Ignoring invalid max threads value" line (libfuse's, when the loop configuration is
    passed in the pre-3.12 layout, as mfusepy did)."""
    cipherdir, _ = _init(keyservice_dev, tmp_path, "binding")
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "d" / "f.txt").write_text("x" * 10000)
    os.utime(src / "d" / "f.txt", (1_600_000_000, 1_600_000_000))
    subprocess.run(["tar", "-C", str(src), "-cf", str(tmp_path / "t.tar"), "."], check=True)
    with mounted(cipherdir, tmp_path / "mnt", keyservice_dev.credentials_file) as m:
        subprocess.run(["tar", "-C", str(m), "-xf", str(tmp_path / "t.tar")], check=True)
        diff = subprocess.run(
            ["tar", "-C", str(m), "-df", str(tmp_path / "t.tar")], capture_output=True, text=True
        )
        assert diff.returncode == 0 and diff.stdout == "", diff.stdout
    log = (cipherdir / ".kmsfs.log").read_text()
    assert "FUSE binding kmsfs._fuse (ctypes, libfuse3 low-level)" in log, log[-2000:]
    assert "max threads" not in log.lower(), log[-2000:]
