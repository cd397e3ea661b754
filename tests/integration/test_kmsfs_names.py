"""Encrypted names through real mounts and a real key service (issue 16).

The backing store learns no name or symlink target; a bit flipped in a backing name, an entry
moved into another backing directory and long-name side entries swapped between two entries are
each detected (hidden, not openable, logged, reported by fsck); hard links and renames across
directories keep names right (re-encrypted under the new parent); a kill -9 in the middle of
long-name renames leaves every name readable; a disabled key stops listings and lookups within
the revalidation bound; the operator's path tools map both ways and are audited."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.kmsfs_mount_helpers import daemon_pid, force_unmount, kmsfs, mounted, requires_fuse

pytestmark = [pytest.mark.integration, requires_fuse]

NAMES = [
    "hello.txt", "Ελληνικά-όνομα", "日本語のファイル名", "emoji-🦊🔑", "with\nnewline", "  spaces  ",
    "-dash", ".hidden-file", ".kmsfs.json", "kmsfs.dirid", "x" * 175, "y" * 176, "z" * 255,
    "é" * 127,
]
BYTES_NAME = b"latin1-\xe9\xff-bytes"  # not UTF-8


class M:
    def __init__(self, cipherdir: Path, path: Path, log: Path, key_id: str) -> None:
        self.cipherdir, self.path, self.log, self.key_id = cipherdir, path, log, key_id


def _init(service: Any, cipherdir: Path, key_id: str, *extra: str) -> None:
    kmsfs("init", cipherdir, "--endpoint", service.endpoint, "--key", key_id,
          "--credentials", service.credentials_file, *extra)


@pytest.fixture(scope="module")
def m(keyservice_dev: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[M]:
    tmp = tmp_path_factory.mktemp("names")
    key_id = keyservice_dev.boto3_client().create_key(Description="names")["KeyMetadata"]["KeyId"]
    _init(keyservice_dev, tmp / "cipher", key_id)
    log = tmp / "mount.log"
    with mounted(tmp / "cipher", tmp / "mnt", keyservice_dev.credentials_file, "--log", str(log)) as path:
        yield M(tmp / "cipher", path, log, key_id)


def _backing_strings(cipherdir: Path) -> list[bytes]:
    """Every name, symlink target and small-file content under the cipherdir, as bytes."""
    found = []
    for dirpath, dirnames, filenames in os.walk(os.fsencode(cipherdir)):
        for name in dirnames + filenames:
            found.append(name)
            path = os.path.join(dirpath, name)
            if os.path.islink(path):
                found.append(os.readlink(path))
            elif os.path.isfile(path) and os.path.getsize(path) < 8192 and not name.startswith(b".kmsfs.log"):
                found.append(Path(os.fsdecode(path)).read_bytes())
    return found


def test_config_and_layout(m: M) -> None:
    config = json.loads((m.cipherdir / ".kmsfs.json").read_text())
    assert config["version"] == 2 and config["names"] == "aes-siv" and len(config["cipherdir_id"]) == 32
    assert len(config["name_key"]) > 40
    assert (m.cipherdir / "kmsfs.dirid").stat().st_size == 33


def test_no_plaintext_name_or_target_in_backing(m: M) -> None:
    top = m.path / "plain-check"
    top.mkdir()
    sub = top / "sous-répertoire"
    sub.mkdir()
    targets = {"short-link": "hello.txt", "long-link": "/" + "t" * 4000, "mid-link": "../" + "u" * 3100}
    for name in NAMES:
        (top / name).write_bytes(b"contents of a file")
        (sub / name).mkdir()
    with open(os.fsencode(top) + b"/" + BYTES_NAME, "wb") as f:  # audited as \xNN escapes
        f.write(b"bytes")
    for name, target in targets.items():
        os.symlink(target, top / name)
    os.link(top / "hello.txt", sub / "hard-link-name")
    # Through the mount: exactly these names, these targets, these sizes.
    assert sorted(os.listdir(os.fsencode(top))) == sorted(
        [os.fsencode(n) for n in [*NAMES, *targets, "sous-répertoire"]] + [BYTES_NAME])
    assert sorted(os.listdir(sub)) == sorted([*NAMES, "hard-link-name"])
    for name, target in targets.items():
        assert os.readlink(top / name) == target
        assert os.lstat(top / name).st_size == len(target)
    assert (sub / "hard-link-name").read_bytes() == b"contents of a file"
    # In the backing store: none of them, anywhere.
    backing = b"\0".join(_backing_strings(m.cipherdir))
    bookkeeping = (".kmsfs.json", "kmsfs.dirid")  # the cipherdir's own files have these names
    secrets = [os.fsencode(n) for n in NAMES if len(os.fsencode(n)) >= 6 and n not in bookkeeping] + [
        BYTES_NAME, b"sous-r", b"hard-link-name", b"hello.txt", b"tttttttt", b"uuuuuuuu", b"plain-check"]
    for secret in secrets:
        assert secret not in backing, secret
    assert any(n.startswith(b"kmsfs.longname.") for n in _backing_strings(m.cipherdir))


def _only_entry(backing_dir: Path) -> Path:
    entries = [p for p in backing_dir.iterdir() if p.name != "kmsfs.dirid"]
    assert len(entries) == 1, entries
    return entries[0]


@pytest.fixture
def creds(keyservice_dev: Any) -> str:
    return str(keyservice_dev.credentials_file)


def _fsck(m: M, creds: str) -> subprocess.CompletedProcess[str]:
    return kmsfs("fsck", m.cipherdir, "--credentials", creds, "-q", check=False)


def _wait_log(m: M, needle: str, timeout: float = 5) -> str:
    deadline = time.monotonic() + timeout
    while True:
        text = m.log.read_text(errors="replace")
        if needle in text or time.monotonic() > deadline:
            return text
        time.sleep(0.05)


def test_flipped_bit_in_a_backing_name_is_detected(m: M, creds: str) -> None:
    d = m.path / "flip"
    d.mkdir()
    (d / "victim").write_text("secret")
    backing_dir = Path(kmsfs("path", "encrypt", m.cipherdir, "/flip", "--credentials", creds).stdout.strip())
    entry = _only_entry(backing_dir)
    middle = len(entry.name) // 2
    flipped = entry.name[:middle] + ("A" if entry.name[middle] != "A" else "B") + entry.name[middle + 1:]
    entry.rename(backing_dir / flipped)
    time.sleep(1.2)  # the kernel's entry cache (ENTRY_TIMEOUT, 1 s) forgets the old entry
    try:
        assert os.listdir(d) == []  # the directory listing re-reads the backing directory
        with pytest.raises(FileNotFoundError):
            (d / "victim").read_text()
        assert flipped in _wait_log(m, flipped)
        proc = _fsck(m, creds)
        assert proc.returncode == 1 and f"BADNAME {backing_dir / flipped}" in proc.stdout, proc.stdout
    finally:
        (backing_dir / flipped).rename(entry)
    assert (d / "victim").read_text() == "secret"
    assert _fsck(m, creds).returncode == 0


def test_entry_moved_into_another_backing_directory_is_detected(m: M, creds: str) -> None:
    for name in ("from", "to"):
        (m.path / name).mkdir()
    (m.path / "from" / "moved").write_text("payload")
    (m.path / "to" / "moved").write_text("other")
    src = Path(kmsfs("path", "encrypt", m.cipherdir, "/from/moved", "--credentials", creds).stdout.strip())
    dst_dir = Path(kmsfs("path", "encrypt", m.cipherdir, "/to", "--credentials", creds).stdout.strip())
    os.unlink(_only_entry(dst_dir))
    src.rename(dst_dir / src.name)
    time.sleep(1.2)  # the kernel's entry cache (ENTRY_TIMEOUT, 1 s)
    assert os.listdir(m.path / "to") == [] and os.listdir(m.path / "from") == []
    with pytest.raises(FileNotFoundError):
        (m.path / "to" / "moved").read_text()
    assert src.name in _wait_log(m, src.name)
    proc = _fsck(m, creds)
    assert proc.returncode == 1 and f"BADNAME {dst_dir / src.name}" in proc.stdout, proc.stdout
    os.unlink(dst_dir / src.name)
    assert _fsck(m, creds).returncode == 0


def test_swapped_long_name_side_entries_are_detected(m: M, creds: str) -> None:
    d = m.path / "swap"
    d.mkdir()
    a, b = "a" * 200, "b" * 200
    (d / a).write_text("A")
    (d / b).write_text("B")
    backing_dir = Path(kmsfs("path", "encrypt", m.cipherdir, "/swap", "--credentials", creds).stdout.strip())
    sides = sorted(backing_dir.glob("kmsfs.longname.*.name"))
    assert len(sides) == 2
    first, second = sides[0].read_bytes(), sides[1].read_bytes()
    sides[0].chmod(0o644)
    sides[1].chmod(0o644)
    sides[0].write_bytes(second)
    sides[1].write_bytes(first)
    time.sleep(1.2)  # the kernel's entry cache (ENTRY_TIMEOUT, 1 s)
    try:
        assert os.listdir(d) == []
        for name in (a, b):
            with pytest.raises(OSError) as err:
                (d / name).read_text()
            assert err.value.errno == errno.EIO
        assert "side entry does not match" in _wait_log(m, "side entry does not match")
        proc = _fsck(m, creds)
        assert proc.returncode == 1 and proc.stdout.count("BADNAME") == 2, proc.stdout
    finally:
        sides[0].write_bytes(first)
        sides[1].write_bytes(second)
    time.sleep(1.2)
    assert sorted(os.listdir(d)) == [a, b] and (d / a).read_text() == "A"
    assert _fsck(m, creds).returncode == 0


def test_hard_links_and_renames_across_directories(m: M, creds: str) -> None:
    one, two = m.path / "one", m.path / "two"
    one.mkdir()
    two.mkdir()
    long = "L" * 230
    (one / long).write_text("long one")
    (one / "short").write_text("short one")
    os.link(one / long, two / "link-of-long")
    os.link(one / "short", two / long)
    assert (two / long).read_text() == "short one" and os.stat(one / "short").st_nlink == 2
    before = _backing_of_cli(m, creds, f"/one/{long}")
    os.rename(one / long, two / "renamed-long")
    os.rename(two / long, one / ("M" * 240))
    os.rename(one, two / "nested")
    assert sorted(os.listdir(two)) == sorted(["link-of-long", "renamed-long", "nested"])
    assert sorted(os.listdir(two / "nested")) == sorted(["short", "M" * 240])
    assert (two / "renamed-long").read_text() == "long one" == (two / "link-of-long").read_text()
    after = _backing_of_cli(m, creds, "/two/renamed-long")
    assert after.parent != before.parent and after.name != before.name  # re-encrypted under "two"
    # no side entry left behind, every side entry has its entry
    proc = _fsck(m, creds)
    assert proc.returncode == 0 and "ORPHAN" not in proc.stdout and "BADNAME" not in proc.stdout, proc.stdout
    os.unlink(two / "nested" / ("M" * 240))
    assert not list((after.parent / _backing_of_cli(m, creds, "/two/nested").name).glob("*.name"))


def _backing_of_cli(m: M, creds: str, plain: str) -> Path:
    return Path(kmsfs("path", "encrypt", m.cipherdir, plain, "--credentials", creds).stdout.strip())


def test_path_tools_round_trip_and_are_audited(m: M, creds: str, keyservice_dev: Any) -> None:
    (m.path / "tools").mkdir()
    (m.path / "tools" / ("n" * 200)).write_text("x")
    plain = "/tools/" + "n" * 200
    backing = _backing_of_cli(m, creds, plain)
    assert backing.exists() and backing.name.startswith("kmsfs.longname.")
    rel = os.path.relpath(backing, m.cipherdir)
    assert kmsfs("path", "decrypt", m.cipherdir, rel, "--credentials", creds).stdout.strip() == plain
    info = json.loads(kmsfs("info", backing, "--credentials", creds).stdout)
    assert info["plaintext_path"] == plain
    through = json.loads(kmsfs("info", m.path / "tools" / ("n" * 200), "--credentials", creds).stdout)
    assert through["path"] == str(backing) and through["plaintext_path"] == plain
    records = [r for r in keyservice_dev.audit_records()
               if (r.get("caller") or {}).get("tool") == "kmsfs path"]
    assert any(r["caller"].get("path") == plain and r["outcome"] == "success" for r in records)
    bad = kmsfs("path", "decrypt", m.cipherdir, "not-a-name", "--credentials", creds, check=False)
    assert bad.returncode == 1 and "Traceback" not in bad.stderr and bad.stderr.count("\n") == 1


def test_audit_records_plaintext_paths(m: M, keyservice_dev: Any) -> None:
    (m.path / "audited-dir").mkdir()
    (m.path / "audited-dir" / "audited-file").write_text("x")
    (m.path / "audited-dir" / "audited-file").read_text()
    with open(os.fsencode(m.path) + b"/audited-dir/" + BYTES_NAME, "wb") as f:
        f.write(b"not UTF-8")
    paths = [(r.get("caller") or {}).get("path") for r in keyservice_dev.audit_records()]
    assert "/audited-dir/audited-file" in paths
    assert "/audited-dir/latin1-\\xe9\\xff-bytes" in paths  # bytes that are not UTF-8: escaped


def test_plaintext_names_option_keeps_the_old_layout(keyservice_dev: Any, tmp_path: Path, kms: Any) -> None:
    key_id = kms.create_key(Description="plain")["KeyMetadata"]["KeyId"]
    _init(keyservice_dev, tmp_path / "cipher", key_id, "--plaintext-names")
    assert json.loads((tmp_path / "cipher" / ".kmsfs.json").read_text())["version"] == 1
    with mounted(tmp_path / "cipher", tmp_path / "mnt", keyservice_dev.credentials_file) as path:
        (path / "visible-name").write_text("x")
        os.symlink("visible-target", path / "lnk")
    assert (tmp_path / "cipher" / "visible-name").exists()
    assert os.readlink(tmp_path / "cipher" / "lnk") == "visible-target"
    assert not (tmp_path / "cipher" / "kmsfs.dirid").exists()


def test_crash_during_long_name_renames_keeps_names_consistent(keyservice_dev: Any, tmp_path: Path,
                                                               kms: Any) -> None:
    key_id = kms.create_key(Description="crash")["KeyMetadata"]["KeyId"]
    cipher, mnt = tmp_path / "cipher", tmp_path / "mnt"
    _init(keyservice_dev, cipher, key_id)
    creds = str(keyservice_dev.credentials_file)
    script = (
        "import os, sys\n"
        "d = sys.argv[1]\n"
        "i = 0\n"
        "while True:\n"
        "    a = os.path.join(d, 'A' * 200 + str(i % 7)); b = os.path.join(d, 'B' * 210 + str(i % 5))\n"
        "    try:\n"
        "        open(a, 'w').close(); os.rename(a, b); os.link(b, a); os.unlink(b)\n"
        "        os.mkdir(b) if i % 3 == 0 else None; os.rmdir(b) if i % 3 == 0 else None\n"
        "    except OSError:\n"
        "        pass\n"
        "    i += 1\n"
    )
    for round_ in range(3):
        with mounted(cipher, mnt, creds) as path:
            (path / "work").mkdir(exist_ok=True)
            worker = subprocess.Popen([sys.executable, "-c", script, str(path / "work")],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                time.sleep(0.6 + 0.3 * round_)
                os.kill(daemon_pid(cipher, mnt), signal.SIGKILL)
            finally:
                worker.kill()
                worker.wait()
                force_unmount(mnt)
        proc = kmsfs("fsck", cipher, "--credentials", creds, "-q", check=False)
        assert "BADNAME" not in proc.stdout, proc.stdout  # orphan side entries are allowed
        with mounted(cipher, mnt, creds) as path:
            listed = os.listdir(path / "work")
            for name in listed:
                os.lstat(path / "work" / name)  # every listed name can be looked up
            backing_work = _backing_of_cli_at(cipher, creds, "/work")
            entries = [p for p in backing_work.iterdir() if p.name != "kmsfs.dirid"
                       and not p.name.endswith(".name")]
            assert len(entries) == len(listed)


def _backing_of_cli_at(cipher: Path, creds: str, plain: str) -> Path:
    return Path(kmsfs("path", "encrypt", cipher, plain, "--credentials", creds).stdout.strip())


def test_disabled_key_stops_listings_and_lookups(keyservice_dev: Any, tmp_path: Path, kms: Any) -> None:
    key_id = kms.create_key(Description="names-revoke")["KeyMetadata"]["KeyId"]
    cipher = tmp_path / "cipher"
    _init(keyservice_dev, cipher, key_id)
    creds = keyservice_dev.credentials_file
    with mounted(cipher, tmp_path / "mnt", creds, "--revalidate-after", "1") as path:
        (path / "present").mkdir()
        assert os.listdir(path) == ["present"]
        kms.disable_key(KeyId=key_id)
        try:
            deadline = time.monotonic() + 1 + 1 + 2  # bound + kernel entry timeout + slack
            refused = None
            while time.monotonic() < deadline:
                try:
                    os.listdir(path / "present")
                except PermissionError as exc:
                    refused = exc
                    break
                time.sleep(0.1)
            assert refused is not None, "listing still worked after the revalidation bound"
            with pytest.raises(PermissionError):
                os.lstat(path / "never-looked-up")
            with pytest.raises(PermissionError):
                os.listdir(path)
        finally:
            kms.enable_key(KeyId=key_id)
        deadline = time.monotonic() + 5
        while True:
            try:
                assert os.listdir(path) == ["present"]
                break
            except PermissionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
