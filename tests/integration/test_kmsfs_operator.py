"""The operator's view of kmsfs (issue 14): one-line errors with documented exit codes, one mount
per cipherdir, one endpoint, warnings for a key the mount cannot use, audit paths of the offline
tools, busy unmounts, and the mount.fuse / ``mount -t fuse.kmsfs`` path. Real key service, real
FUSE mounts; every mount is unmounted in teardown."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import DevKeyService, run_keyservice
from tests.integration.kmsfs_mount_helpers import (
    force_unmount,
    is_mounted,
    kmsfs,
    kmsfs_init,
    mounted,
    requires_fuse,
)

pytestmark = [pytest.mark.integration]


def one_line_error(proc: subprocess.CompletedProcess[str], code: int) -> str:
    """Assert the documented exit code and no traceback; for operational errors (1) exactly one
    line on stderr. Returns stderr."""
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    if code == 1:
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert proc.stderr.startswith("kmsfs: "), proc.stderr
    return proc.stderr


@pytest.fixture(scope="module")
def key_arn(keyservice_dev: DevKeyService) -> str:
    return keyservice_dev.boto3_client().create_key(Description="operator")["KeyMetadata"]["Arn"]


def bad_invocations(tmp: Path, service: DevKeyService) -> list[tuple[list[str], int, str, Path | None]]:
    """(arguments, exit code, phrase on stderr, path that must not exist afterwards)."""
    creds = str(service.credentials_file)
    regular = tmp / "regular-file"
    regular.write_text("x")
    missing = tmp / "no-such-cipherdir"
    empty = tmp / "empty-mountpoint"
    empty.mkdir()
    return [
        (["init", "/etc/hostname/sub", "--credentials", creds], 1, "not a directory", None),
        (["init", f"{regular}/sub/deeper", "--credentials", creds], 1, "not a directory", None),
        (["init", str(tmp / "c1"), "--endpoint", "ftp://x", "--credentials", creds], 1,
         "not an http(s)", tmp / "c1"),
        (["init", str(tmp / "c2"), "--endpoint", "http://192.0.2.1:8600", "--credentials", creds], 1,
         "loopback", tmp / "c2"),
        (["init", str(tmp / "c3"), "--endpoint", "https://127.0.0.1:99999", "--credentials", creds], 1,
         "invalid port", tmp / "c3"),
        (["init", str(tmp / "c4" / "sub"), "--endpoint", "https://127.0.0.1:1", "--credentials", creds],
         1, "differs from", tmp / "c4"),
        (["init", str(tmp / "c5" / "sub"), "--credentials", creds, "--key", "alias/no-such-key"], 1,
         "NotFoundException", tmp / "c5"),
        (["init", str(tmp / "c6"), "--credentials", str(tmp / "no-creds.json")], 1,
         "cannot read credentials", tmp / "c6"),
        (["init", str(tmp / "c7"), "--credentials", creds, "--aws-profile", "p"], 1, "exclude", tmp / "c7"),
        (["init", str(tmp / "c8"), "--aws-profile", "no-such-profile-kmsfs"], 1, "not found", tmp / "c8"),
        (["mount", str(missing), str(empty)], 1, "not a kmsfs cipherdir", None),
        (["mount", str(missing), str(tmp)], 1, "not empty", None),
        (["mount", str(missing), str(empty), "--fs-options", "nosuid,bogus"], 2, "unknown mount flag", None),
        (["mount", str(tmp), str(tmp / "no-mountpoint")], 1, "not a directory", None),
        (["fsck", str(missing), "--credentials", creds], 1, "not a kmsfs cipherdir", None),
        (["rewrap", str(missing), "--credentials", creds], 1, "not a kmsfs cipherdir", None),
        (["info", str(missing)], 1, "no kmsfs header", None),
        (["umount", str(tmp)], 1, "not mounted", None),
        (["config", "set-endpoint", str(missing), "https://127.0.0.1:1"], 1, "not a kmsfs cipherdir", None),
        ([], 2, "required", None),
        (["mount"], 2, "required", None),
        (["mount", "a", "b", "--kms-timeout", "0"], 2, "between", None),
        ([str(missing)], 2, "usage", None),
        ([str(missing), str(empty), "-o", "ro,bogus"], 2, "'bogus' is not supported", None),
    ]


def test_bad_invocations_one_line_documented_exit_nothing_left(keyservice_dev: DevKeyService,
                                                                tmp_path: Path) -> None:
    for args, code, phrase, leftover in bad_invocations(tmp_path, keyservice_dev):
        proc = kmsfs(*args, check=False)
        stderr = one_line_error(proc, code)
        assert phrase in stderr, (args, stderr)
        if leftover is not None:
            assert not leftover.exists(), f"kmsfs {args} left {leftover} behind"


def test_version_and_help_defaults() -> None:
    proc = kmsfs("--version")
    assert proc.stdout.startswith("kmsfs ") and proc.stdout.split()[1][0].isdigit()
    mount_help = " ".join(kmsfs("mount", "--help").stdout.split())
    assert "user_allow_other in /etc/fuse.conf" in mount_help
    from kmsfs.cli.parser import build_parser

    for command, options in _options(build_parser()).items():
        for option, text in options:
            assert text and "default" in text.lower(), f"kmsfs {command} {option}: help names no default"


def _options(parser: argparse.ArgumentParser, prefix: str = "") -> dict[str, list[tuple[str, str]]]:
    """Every subcommand's options (but --help) with their help texts, recursively."""
    found: dict[str, list[tuple[str, str]]] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found.update(_options(sub, f"{prefix} {name}".strip()))
        elif action.option_strings and prefix and not isinstance(action, argparse._HelpAction):
            found.setdefault(prefix, []).append((action.option_strings[-1], action.help or ""))
    return found


def _principal_credentials(service: DevKeyService, name: str, path: Path) -> Path:
    proc = run_keyservice("principal", "create", name, "--data-dir", str(service.data_dir), "--json")
    assert proc.returncode == 0, proc.stderr
    made = json.loads(proc.stdout)
    base = service.credentials
    path.write_text(json.dumps({**{k: base[k] for k in ("endpoint", "region", "ca_bundle")},
                                "access_key_id": made["access_key_id"],
                                "secret_access_key": made["secret_access_key"]}))
    return path


@requires_fuse
def test_mount_warns_when_it_cannot_use_its_key(keyservice_dev: DevKeyService, key_arn: str,
                                                tmp_path: Path) -> None:
    cipher, mnt = tmp_path / "cipher", tmp_path / "mnt"
    kmsfs_init(cipher, keyservice_dev.endpoint, key_arn, keyservice_dev.credentials_file)
    nobody = _principal_credentials(keyservice_dev, f"nobody-{os.getpid()}", tmp_path / "nobody.json")
    mnt.mkdir()
    try:
        strict = kmsfs("mount", cipher, mnt, "--credentials", nobody, "--strict", check=False)
        assert "refusing to mount (--strict)" in one_line_error(strict, 1)
        assert "GenerateDataKey" in strict.stderr and not is_mounted(mnt)
        warned = kmsfs("mount", cipher, mnt, "--credentials", nobody, check=False)
        assert warned.returncode == 0 and is_mounted(mnt), warned.stderr
        assert "kmsfs: warning: these credentials may not GenerateDataKey" in warned.stderr
    finally:
        force_unmount(mnt)
    assert not is_mounted(mnt)
    # with credentials that can use the key: no warning
    with mounted(cipher, mnt, keyservice_dev.credentials_file, "--strict"):
        pass


@requires_fuse
def test_one_mount_per_cipherdir_and_empty_mountpoints(keyservice_dev: DevKeyService, key_arn: str,
                                                       tmp_path: Path) -> None:
    cipher, mnt, other = tmp_path / "cipher", tmp_path / "mnt", tmp_path / "other"
    creds = keyservice_dev.credentials_file
    kmsfs_init(cipher, keyservice_dev.endpoint, key_arn, creds)
    other.mkdir()
    with mounted(cipher, mnt, creds):
        second = kmsfs("mount", cipher, other, "--credentials", creds, check=False)
        assert f"is already mounted at {mnt}" in one_line_error(second, 1)
        assert not is_mounted(other)
    (other / "precious.txt").write_text("keep me visible")
    refused = kmsfs("mount", cipher, other, "--credentials", creds, check=False)
    assert "is not empty" in one_line_error(refused, 1) and "--nonempty" in refused.stderr
    assert not is_mounted(other)
    with mounted(cipher, other, creds, "--nonempty"):
        assert not (other / "precious.txt").exists()  # hidden under the mount
    assert (other / "precious.txt").read_text() == "keep me visible"


@requires_fuse
def test_offline_tools_audit_the_path_inside_the_filesystem(keyservice_dev: DevKeyService, key_arn: str,
                                                            tmp_path: Path) -> None:
    cipher, mnt = tmp_path / "cipher", tmp_path / "mnt"
    creds = keyservice_dev.credentials_file
    kmsfs_init(cipher, keyservice_dev.endpoint, key_arn, creds)
    name = f"/many-{os.getpid()}/f7"
    with mounted(cipher, mnt, creds):
        (mnt / name.lstrip("/")).parent.mkdir()
        (mnt / name.lstrip("/")).write_text("seven")
        rewrap = kmsfs("rewrap", cipher, "--credentials", creds, "--quiet")
        assert "is mounted" in rewrap.stderr and "coordinates" in rewrap.stderr
    kmsfs("fsck", cipher, "--credentials", creds, "--quiet")
    listed = run_keyservice("audit", "list", "--data-dir", str(keyservice_dev.data_dir), "--file", name,
                            "--json")
    records = [json.loads(line) for line in listed.stdout.splitlines()]
    tools = {(r["operation"], (r.get("caller") or {}).get("tool")) for r in records}
    assert ("ReEncrypt", "kmsfs rewrap") in tools and ("Decrypt", "kmsfs fsck") in tools, tools
    fsck = next(r for r in records if (r.get("caller") or {}).get("tool") == "kmsfs fsck")
    assert fsck["caller"]["path"] == name and fsck["caller"]["uid"] == os.getuid()


@requires_fuse
def test_busy_umount_says_so_in_one_line_and_lazy_detaches(keyservice_dev: DevKeyService, key_arn: str,
                                                           tmp_path: Path) -> None:
    cipher, mnt = tmp_path / "cipher", tmp_path / "mnt"
    creds = keyservice_dev.credentials_file
    kmsfs_init(cipher, keyservice_dev.endpoint, key_arn, creds)
    with mounted(cipher, mnt, creds):
        holder = open(mnt / "held.txt", "w")  # noqa: SIM115 - held open across the unmount
        try:
            busy = kmsfs("umount", mnt, check=False)
            stderr = one_line_error(busy, 1)
            assert "is busy" in stderr and f"kmsfs umount --lazy {mnt}" in stderr
            kmsfs("umount", "--lazy", mnt)
            assert not is_mounted(mnt)  # detached at once
        finally:
            holder.close()


@requires_fuse
def test_one_endpoint_mount_override_and_set_endpoint(keyservice_dev: DevKeyService, key_arn: str,
                                                      tmp_path: Path) -> None:
    cipher, mnt = tmp_path / "cipher", tmp_path / "mnt"
    creds = keyservice_dev.credentials_file
    kmsfs_init(cipher, keyservice_dev.endpoint, key_arn, creds)
    # The service "moved" to another name for the same address (the certificate covers both).
    moved = keyservice_dev.endpoint.replace("127.0.0.1", "localhost")
    moved_creds = tmp_path / "moved.json"
    moved_creds.write_text(json.dumps({**keyservice_dev.credentials, "endpoint": moved}))
    mnt.mkdir()
    refused = kmsfs("mount", cipher, mnt, "--credentials", moved_creds, check=False)
    stderr = one_line_error(refused, 1)
    assert f"kmsfs config set-endpoint {cipher} {moved}" in stderr and "--endpoint" in stderr
    with mounted(cipher, mnt, moved_creds, "--endpoint", moved):
        (mnt / "a.txt").write_text("via the moved endpoint")
    bad = kmsfs("config", "set-endpoint", cipher, "http://10.0.0.1:80", "--credentials", moved_creds,
                check=False)
    assert "loopback" in one_line_error(bad, 1)
    unreachable = kmsfs("config", "set-endpoint", cipher, "https://127.0.0.1:1", "--credentials", moved_creds,
                        check=False)
    assert "unreachable" in one_line_error(unreachable, 1)
    assert json.loads((cipher / ".kmsfs.json").read_text())["endpoint"] == keyservice_dev.endpoint
    kmsfs("config", "set-endpoint", cipher, moved, "--credentials", moved_creds)
    assert json.loads((cipher / ".kmsfs.json").read_text())["endpoint"] == moved
    with mounted(cipher, mnt, moved_creds):
        assert (mnt / "a.txt").read_text() == "via the moved endpoint"


def test_untrusted_certificate_names_endpoint_and_ca(keyservice_dev: DevKeyService, key_arn: str,
                                                     tmp_path: Path) -> None:
    from keyservice.http import tls

    other = tls.generate(tmp_path / "other-ca", ["127.0.0.1"])
    proc = kmsfs("init", tmp_path / "cipher", "--credentials", keyservice_dev.credentials_file,
                 "--key", key_arn, "--ca-bundle", other.ca, check=False)
    stderr = one_line_error(proc, 1)
    assert f"{keyservice_dev.endpoint}/" in stderr and str(other.ca) in stderr and "not trusted" in stderr
    assert not (tmp_path / "cipher").exists()


def _mount_options(mountpoint: Path) -> list[str]:
    target = os.path.abspath(mountpoint)
    with open("/proc/mounts", encoding="utf-8") as mounts:
        fields = next(line.split() for line in mounts if line.split()[1] == target)
    return fields[3].split(",")


@requires_fuse
@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("mount"), reason="mount(8) as root")
@pytest.mark.skipif(not any(os.path.exists(p) for p in ("/sbin/mount.fuse", "/usr/sbin/mount.fuse")),
                    reason="needs mount.fuse (fuse3)")
def test_mount_t_fuse_kmsfs_and_fstab(keyservice_dev: DevKeyService, key_arn: str, tmp_path: Path) -> None:
    """mount(8) runs ``mount.fuse`` for a ``fuse.TYPE`` it has no helper for, which runs ``TYPE
    SOURCE TARGET -o OPTS`` through /bin/sh with mount's own (empty) PATH: in production that is
    ``kmsfs`` in /usr/local/bin. Here a uniquely named wrapper there stands for it (type
    ``fuse.kmsfs_tPID``), so parallel test runs never share it; the filesystem still mounts as
    ``fuse.kmsfs``. Then the installed ``mount.fuse.kmsfs`` is run as mount(8) would run it."""
    cipher, mnt = tmp_path / "cipher", tmp_path / "mnt"
    creds = keyservice_dev.credentials_file
    kmsfs_init(cipher, keyservice_dev.endpoint, key_arn, creds)
    mnt.mkdir()
    fstype = f"kmsfs_t{os.getpid()}"
    wrapper = Path("/usr/local/bin") / fstype
    wrapper.write_text(f"#!/bin/sh\nexec {sys.executable} -m kmsfs \"$@\"\n")
    wrapper.chmod(0o755)
    fstab = tmp_path / "fstab"
    fstab.write_text(f"# kmsfs test\n{cipher} {mnt} fuse.{fstype} noauto,nofail,_netdev,nodev,"
                     f"credentials={creds},x-systemd.after=keyservice.service 0 0\n")
    try:
        proc = subprocess.run(["mount", "-t", f"fuse.{fstype}", str(cipher), str(mnt), "-o",
                               f"credentials={creds}"], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0 and is_mounted(mnt), proc.stderr
        (mnt / "via-mount-t.txt").write_text("mounted by mount(8)")
        proc = subprocess.run(["umount", str(mnt)], capture_output=True, text=True, timeout=30)
        assert proc.returncode == 0 and not is_mounted(mnt), proc.stderr
        # the same from an fstab line (an alternative fstab: the system's is never touched)
        proc = subprocess.run(["mount", "--fstab", str(fstab), str(mnt)], capture_output=True, text=True,
                              timeout=60)
        assert proc.returncode == 0 and is_mounted(mnt), proc.stderr
        assert (mnt / "via-mount-t.txt").read_text() == "mounted by mount(8)"
        assert "nodev" in _mount_options(mnt)
        proc = subprocess.run(["umount", str(mnt)], capture_output=True, text=True, timeout=30)
        assert proc.returncode == 0 and not is_mounted(mnt), proc.stderr
        # the installed helper itself, as mount(8) runs /sbin/mount.fuse.kmsfs
        helper = Path(sys.executable).with_name("mount.fuse.kmsfs")
        bad = subprocess.run([str(helper), str(cipher), str(mnt), "-o", "bogus"], capture_output=True,
                             text=True, timeout=60)
        assert bad.returncode == 2 and "'bogus' is not supported" in bad.stderr
        assert "Traceback" not in bad.stderr
        proc = subprocess.run([str(helper), str(cipher), str(mnt), "-o", f"rw,nosuid,credentials={creds}"],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0 and is_mounted(mnt), proc.stderr
        assert "nosuid" in _mount_options(mnt)
        assert (mnt / "via-mount-t.txt").read_text() == "mounted by mount(8)"
    finally:
        force_unmount(mnt)
        wrapper.unlink()
    assert not is_mounted(mnt)
