"""``kmsfs`` command line: init, mount, umount, info.

Why mount forks instead of letting libfuse daemonize: libfuse's own daemonizing happens after
fusepy has started nothing, but it cannot tell the parent "the mount is ready" or "it failed and
why". Here the parent forks before any thread or connection exists, the child mounts in the
foreground of its own session and writes one byte to a pipe from FUSE's ``init`` callback; the
parent returns 0 only after that byte (and ``os.path.ismount``), or prints the log tail and exits
non-zero.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from kmsfs.config import CONFIG_NAME, Config, ConfigError
from kmsfs.core import DEFAULT_REVALIDATE_AFTER
from kmsfs.format import RESIZE_XATTR, CorruptHeader
from kmsfs.keyclient import (
    CA_BUNDLE_ENV,
    DEFAULT_REGION,
    Credentials,
    KeyClient,
    KeyServiceError,
    KeyServiceUnavailable,
    load_credentials,
)
from kmsfs.keypool import DEFAULT_SIZE as DEFAULT_KEY_POOL

if TYPE_CHECKING:
    from kmsfs.fsck import FsckReport

MOUNT_TIMEOUT = 30.0
# Bound on one key service request (connect and read): new opens fail with EIO after at most this.
DEFAULT_KMS_TIMEOUT = 5.0
LOG_NAME = ".kmsfs.log"


class CliError(Exception):
    """A user-facing failure: printed as one line, exit status 1."""


def _credentials(path: str | None) -> Credentials:
    try:
        return load_credentials(path)
    except ValueError as exc:
        raise CliError(str(exc)) from None


def cmd_init(args: argparse.Namespace) -> int:
    cipherdir = Path(args.cipherdir)
    creds = _credentials(args.credentials)
    endpoint = args.endpoint or creds.endpoint
    if not endpoint:
        raise CliError("no endpoint: pass --endpoint URL")
    region = args.region or creds.region or DEFAULT_REGION
    cipherdir.mkdir(parents=True, exist_ok=True)
    if (cipherdir / CONFIG_NAME).exists() and not args.force:
        raise CliError(f"{cipherdir} is already initialised ({CONFIG_NAME} exists)")
    if any(not p.name.startswith(".kmsfs") for p in cipherdir.iterdir()) and not args.force:
        raise CliError(f"{cipherdir} is not empty")
    client = KeyClient(endpoint, region, creds)
    try:
        meta = client.describe_key(args.key)
    except KeyServiceError as exc:
        raise CliError(f"key {args.key!r} refused by the key service: {exc}") from None
    except KeyServiceUnavailable as exc:
        raise CliError(str(exc)) from None
    if meta.get("Enabled") is False or meta.get("KeyState", "Enabled") != "Enabled":
        raise CliError(f"key {args.key!r} is not enabled (state {meta.get('KeyState')})")
    arn = str(meta.get("Arn") or meta.get("KeyId"))
    path = Config(endpoint=endpoint, region=region, key_id=args.key, key_arn=arn).save(cipherdir)
    print(f"initialised {cipherdir} with key {arn} (config {path})")
    _note_xattr_support(cipherdir)
    return 0


def _note_xattr_support(cipherdir: Path) -> None:
    """Say so when the cipherdir's filesystem keeps no user xattrs (vfat, exfat, some NFS/FUSE)."""
    from kmsfs.headers import xattrs_supported

    if not xattrs_supported(str(cipherdir)):
        print(f"note: the filesystem of {cipherdir} does not keep user xattrs; kmsfs will use the "
              "header copies inside the files only (format 3 needs nothing else)")


def _build(cipherdir: str, credentials: str | None,
           timeout: float = DEFAULT_KMS_TIMEOUT) -> tuple[Config, KeyClient]:
    try:
        config = Config.load(cipherdir)
    except ConfigError as exc:
        raise CliError(str(exc)) from None
    creds = _credentials(credentials)
    if creds.endpoint and _origin(creds.endpoint) != _origin(config.endpoint):
        # The config lies in the cipherdir, which is untrusted storage: an edited endpoint must not
        # redirect signed requests (and the data keys they return) to another server.
        raise CliError(
            f"the cipherdir names the key service {config.endpoint} but the credentials are for "
            f"{creds.endpoint}; refusing to use either (re-run 'kmsfs init --force' if it moved)"
        )
    return config, KeyClient(config.endpoint, config.region, creds, connect_timeout=timeout,
                             read_timeout=timeout)


def _origin(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    return parts.scheme.lower(), parts.netloc.lower()


def _check_service(client: KeyClient, config: Config) -> None:
    """Fail fast on a wrong endpoint or bad credentials; a usage-only principal may not describe."""
    try:
        client.describe_key(config.key_arn)
    except KeyServiceUnavailable as exc:
        raise CliError(f"cannot mount: {exc}") from None
    except KeyServiceError as exc:
        if exc.code != "AccessDeniedException":
            raise CliError(f"cannot mount: key service refused: {exc}") from None
    finally:
        client.close()


def _serve(cipherdir: str, mountpoint: str, credentials: str | None, allow_other: bool,
           ready_fd: int | None, debug: bool, args: argparse.Namespace) -> None:
    """Run the FUSE loop in this process (foreground)."""
    from kmsfs._fuse import BINDING, FUSE, IO_OPTIONS, LIBFUSE
    from kmsfs.core import KmsfsCore
    from kmsfs.operations import KmsfsOperations

    config, client = _build(cipherdir, credentials, args.kms_timeout)
    pool = None
    if args.key_pool:
        from kmsfs.keypool import DataKeyPool

        # Keys older than the revalidation interval are discarded: revocation reaches creates
        # within the same bound as it reaches open handles. Each pooled create is claimed (a
        # Decrypt with its path) so the audit records it like a direct one.
        pool = DataKeyPool(client.generate_data_key, client.decrypt, config.key_arn, args.key_pool,
                           max(1.0, args.revalidate_after))
        pool.start()
    core = KmsfsCore(cipherdir, config, client, revalidate_after=args.revalidate_after, key_pool=pool)
    logging.getLogger("kmsfs").info("FUSE binding %s on libfuse %s", BINDING, LIBFUSE)
    logging.getLogger("kmsfs").info("revalidate open keys after %.1f s; key service timeout %.1f s; "
                                    "sparse files %s", args.revalidate_after, args.kms_timeout,
                                    "on" if core.sparse else "off (backing fs reports no holes)")

    def ready() -> None:
        if ready_fd is not None:
            os.write(ready_fd, b"R")
            os.close(ready_fd)

    ops = KmsfsOperations(core, on_ready=ready)
    options: dict[str, object] = {
        "foreground": True, "nothreads": False, "raw_fi": True,
        "fsname": os.path.realpath(cipherdir).replace("\\", "\\\\").replace(",", "\\,"),
        "subtype": "kmsfs", "use_ino": True, "default_permissions": True, "debug": debug,
        **IO_OPTIONS,  # request sizes: binding- and libfuse-specific (kmsfs/_fuse.py)
    }
    if allow_other:
        options["allow_other"] = True
    try:
        FUSE(ops, mountpoint, **options)
    finally:
        if pool is not None:
            pool.close()


def _setup_logging(log_file: str | None, verbose: bool) -> None:
    level = logging.DEBUG if verbose else logging.INFO
    fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    if log_file:
        logging.basicConfig(filename=log_file, level=level, format=fmt, force=True)
    else:
        logging.basicConfig(stream=sys.stderr, level=level, format=fmt, force=True)
    logging.getLogger("fuse").setLevel(logging.WARNING)
    logging.getLogger("urllib3").setLevel(logging.WARNING)


def cmd_mount(args: argparse.Namespace) -> int:
    cipherdir = os.path.abspath(args.cipherdir)
    mountpoint = os.path.abspath(args.mountpoint)
    if not os.path.isdir(mountpoint):
        raise CliError(f"mount point {mountpoint} is not a directory")
    if os.path.ismount(mountpoint):
        raise CliError(f"{mountpoint} is already a mount point")
    credentials = os.path.abspath(args.credentials) if args.credentials else None
    config, client = _build(cipherdir, credentials)
    _check_service(client, config)
    log_file = os.path.abspath(args.log) if args.log else os.path.join(cipherdir, LOG_NAME)
    if args.foreground:
        _setup_logging(args.log, args.verbose)
        _serve(cipherdir, mountpoint, credentials, args.allow_other, None, args.verbose, args)
        return 0
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: become the daemon
        os.close(read_fd)
        code = 0
        try:
            os.setsid()
            os.chdir("/")  # do not keep the caller's working directory busy
            devnull = os.open(os.devnull, os.O_RDWR)
            # O_NOFOLLOW: the default log lives in the cipherdir, which is untrusted storage; a
            # planted symlink must not make a root daemon append to some other file.
            logfd = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o600)
            os.dup2(devnull, 0)
            os.dup2(logfd, 1)
            os.dup2(logfd, 2)
            _setup_logging(None, args.verbose)  # stderr is the log file now
            _serve(cipherdir, mountpoint, credentials, args.allow_other, write_fd, args.verbose, args)
        except BaseException as exc:  # noqa: BLE001 - the daemon must report, never re-enter main
            logging.getLogger("kmsfs").error("mount failed: %s", exc, exc_info=True)
            code = 1
        finally:
            os._exit(code)
    os.close(write_fd)
    return _await_ready(pid, read_fd, mountpoint, log_file)


def _log_tail(log_file: str, lines: int = 10) -> str:
    """The last lines of the daemon log, never through a symlink planted in the cipherdir."""
    try:
        fd = os.open(log_file, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as exc:
        return f"(log unreadable: {exc.strerror})\n"
    with os.fdopen(fd, encoding="utf-8", errors="replace") as f:
        return "".join(f.read().splitlines(True)[-lines:])


def _await_ready(pid: int, read_fd: int, mountpoint: str, log_file: str) -> int:
    import select

    deadline = time.monotonic() + MOUNT_TIMEOUT
    got = b""
    while time.monotonic() < deadline:
        r, _, _ = select.select([read_fd], [], [], 0.2)
        if r:
            got = os.read(read_fd, 1)
            break
    os.close(read_fd)
    if got == b"R":
        while time.monotonic() < deadline and not os.path.ismount(mountpoint):
            time.sleep(0.05)
        if os.path.ismount(mountpoint):
            print(f"mounted at {mountpoint} (pid {pid}, log {log_file})")
            return 0
    done, status = os.waitpid(pid, os.WNOHANG)
    if done == 0:  # still running but not ready: give up on it
        os.kill(pid, 15)
    tail = ""
    try:
        tail = _log_tail(log_file)
    except OSError:
        pass
    raise CliError(f"mount of {mountpoint} failed (see {log_file})\n{tail}".rstrip())


def cmd_umount(args: argparse.Namespace) -> int:
    mountpoint = os.path.abspath(args.mountpoint)
    if not os.path.ismount(mountpoint):
        raise CliError(f"{mountpoint} is not mounted")
    attempts = [[t, "-u", mountpoint] for t in ("fusermount", "fusermount3") if shutil.which(t)]
    attempts.append(["umount", mountpoint])
    errors = []
    for cmd in attempts:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode == 0:
            return 0
        errors.append(f"{cmd[0]}: {proc.stderr.strip()}")
    raise CliError("unmount failed: " + "; ".join(errors))


def _tool_client(cipherdir: str, credentials: str | None) -> tuple[Config, KeyClient]:
    config, client = _build(cipherdir, credentials)
    return config, client


def cmd_fsck(args: argparse.Namespace) -> int:
    """Verify every header and block; exit 1 if anything is damaged."""
    from kmsfs.fsck import fsck

    _, client = _tool_client(args.cipherdir, args.credentials)
    try:
        report = fsck(args.cipherdir, client, progress=not args.quiet, repair=getattr(args, "repair", False))
    except KeyServiceUnavailable as exc:
        raise CliError(f"fsck stopped: {exc}") from None
    finally:
        client.close()
    for rel, problems in sorted(report.damaged.items()):
        for problem in problems:
            print(f"DAMAGED {rel}: {problem}")
    for rel in report.pending:
        print(f"PENDING {rel}: interrupted size change, completed at its next open")
    for rel in report.temporaries:
        print(f"LEFTOVER {rel}: temporary file of an interrupted create (safe to delete)")
    _print_backup_notes(report)
    state = "clean" if report.clean else f"{len(report.damaged)} damaged file(s)"
    print(f"fsck: {report.files} files, {report.blocks} blocks checked: {state}")
    return 0 if report.clean else 1


def _print_backup_notes(report: FsckReport) -> None:
    """fsck's findings that do not make a file unreadable: missing xattrs, old formats, repairs."""
    for rel, notes in sorted(report.notes.items()):
        for note in notes:
            print(f"NOTE {rel}: {note}")
    for rel in report.repaired:
        print(f"REPAIRED {rel}: header xattr restored from the in-file copy")


def cmd_upgrade(args: argparse.Namespace) -> int:
    """Convert format-1/2 files to format 3 (in-file header copy); exit 1 if any file failed."""
    from kmsfs.upgrade import UpgradeRefused, upgrade

    _, client = _tool_client(args.cipherdir, args.credentials)
    try:
        report = upgrade(args.cipherdir, client, progress=not args.quiet)
    except UpgradeRefused as exc:
        raise CliError(str(exc)) from None
    except KeyServiceUnavailable as exc:
        raise CliError(f"upgrade stopped (rerun to continue): {exc}") from None
    finally:
        client.close()
    for rel, reason in sorted(report.failed.items()):
        print(f"FAILED {rel}: {reason}")
    print(f"upgrade: {report.upgraded} file(s) converted to format 3, {report.current} already current, "
          f"{len(report.failed)} failed")
    return 1 if report.failed else 0


def _add_backup_commands(sub: Any) -> None:
    """``kmsfs upgrade`` and ``kmsfs fsck --repair`` (issue 13: backups that work)."""
    sub.choices["fsck"].add_argument(
        "--repair", action="store_true",
        help="restore missing header xattrs from the in-file copies (after verifying each file)")
    s = sub.add_parser("upgrade", help="convert old-format (1, 2) files to format 3 (unmounted)")
    s.add_argument("cipherdir")
    s.add_argument("--credentials")
    s.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    s.add_argument(
        "--ca-bundle", metavar="PEM",
        help="CA certificates to verify the key service's TLS certificate with (as for fsck)")
    s.set_defaults(func=cmd_upgrade)


def cmd_rewrap(args: argparse.Namespace) -> int:
    """Re-wrap every data key (ReEncrypt) under the newest key version or ``--to-key``."""
    from kmsfs.rewrap import rewrap

    _, client = _tool_client(args.cipherdir, args.credentials)
    destination = args.to_key
    if destination:
        try:
            destination = str(client.describe_key(destination).get("Arn") or destination)
        except KeyServiceError as exc:
            if exc.code != "AccessDeniedException":
                raise CliError(f"key {args.to_key!r} refused: {exc}") from None
        except KeyServiceUnavailable as exc:
            raise CliError(str(exc)) from None
    try:
        report = rewrap(args.cipherdir, client, destination, progress=not args.quiet)
    except KeyServiceUnavailable as exc:
        raise CliError(f"rewrap interrupted (rerun to resume): {exc}") from None
    finally:
        client.close()
    for rel, reason in sorted(report.failed.items()):
        print(f"FAILED {rel}: {reason}")
    keys = ", ".join(f"{n} under {arn}" for arn, n in sorted(report.keys.items())) or "none"
    print(f"rewrap: {report.rewrapped} re-wrapped ({keys}), {report.skipped} already done, "
          f"{len(report.failed)} failed")
    return 1 if report.failed else 0


def cmd_info(args: argparse.Namespace) -> int:
    """Show the header of a backing file, or of the file behind a mount path (no secrets)."""
    from kmsfs.backing import backing_path_of
    from kmsfs.headers import plain_size_at, read_header

    path = backing_path_of(args.path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            header = read_header(fd, restore=False)
        finally:
            os.close(fd)
    except OSError as exc:
        raise CliError(f"{path}: no kmsfs header ({exc.strerror})") from None
    except CorruptHeader as exc:
        raise CliError(f"{path}: corrupt header: {exc}") from None
    info = {
        "path": path, "format_version": header.version, "block_size": header.block_size,
        "file_id": header.file_id.hex(), "key_arn": header.key_arn,
        "wrapped_key_bytes": len(header.wrapped_key),
        "wrapped_key_sha256": hashlib.sha256(header.wrapped_key).hexdigest(),
        "key_version": _blob_key_version(header.wrapped_key),
        "encryption_context": header.encryption_context(),
        "backing_size": os.path.getsize(path),
        "plaintext_size": plain_size_at(path, os.stat(path)),
    }
    try:
        info["size_change_pending"] = bool(os.getxattr(path, RESIZE_XATTR))
    except OSError:
        info["size_change_pending"] = False
    print(json.dumps(info, indent=2))
    return 0


def _blob_key_version(blob: bytes) -> str | None:
    """The key version our key service names in its blob, if the blob says (None for others)."""
    try:
        from keyservice.envelope import parse_blob
    except ImportError:
        return None
    try:
        return str(parse_blob(blob).key_version)
    except Exception:  # noqa: BLE001 - informational only: another service's blob
        return None


def _seconds(low: float, high: float) -> Callable[[str], float]:
    def parse(text: str) -> float:
        value = float(text)
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be between {low:g} and {high:g} seconds")
        return value
    return parse


def _count(low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be between {low} and {high}")
        return value
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kmsfs", description="Encrypted FUSE filesystem over a KMS.")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("init", help="initialise a cipherdir")
    s.add_argument("cipherdir")
    s.add_argument("--endpoint", help="key service URL (default: from credentials/env)")
    s.add_argument("--key", default="alias/aws/kmsfs",
                   help="key id, ARN, alias/name or alias ARN (default: the service-managed alias/aws/kmsfs)")
    s.add_argument("--credentials", help="JSON credentials file (default: AWS env vars)")
    s.add_argument("--region")
    s.add_argument("--force", action="store_true", help="overwrite an existing configuration")
    s.set_defaults(func=cmd_init)

    s = sub.add_parser("mount", help="mount a cipherdir")
    s.add_argument("cipherdir")
    s.add_argument("mountpoint")
    s.add_argument("--credentials")
    s.add_argument("--foreground", "-f", action="store_true")
    s.add_argument("--allow-other", action="store_true")
    s.add_argument("--log", help=f"daemon log file (default CIPHERDIR/{LOG_NAME})")
    s.add_argument("--verbose", "-v", action="store_true")
    s.add_argument("--revalidate-after", type=_seconds(0.0, 60.0), default=DEFAULT_REVALIDATE_AFTER,
                   metavar="SECONDS",
                   help="open handles re-unwrap their key after this long, so revocation reaches "
                        f"them (default {DEFAULT_REVALIDATE_AFTER:g}, at most 60)")
    s.add_argument("--kms-timeout", type=_seconds(0.1, 120.0), default=DEFAULT_KMS_TIMEOUT,
                   metavar="SECONDS",
                   help=f"bound on each key service request (default {DEFAULT_KMS_TIMEOUT:g})")
    s.add_argument("--key-pool", type=_count(0, 1024), default=DEFAULT_KEY_POOL, metavar="N",
                   help=f"keep N pre-generated data keys for creates (default {DEFAULT_KEY_POOL}: off, "
                        "every create asks the service for its key itself; 32 suits a distant key "
                        "service). Each pooled create is audited with its path by a claim Decrypt "
                        "sent just after it (kmsfs/keypool.py)")
    s.set_defaults(func=cmd_mount)

    s = sub.add_parser("umount", help="unmount")
    s.add_argument("mountpoint")
    s.set_defaults(func=cmd_umount)

    s = sub.add_parser("fsck", help="verify every header and block through the key service")
    s.add_argument("cipherdir")
    s.add_argument("--credentials")
    s.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_fsck)

    s = sub.add_parser("rewrap", help="re-wrap every data key (newest key version or --to-key)")
    s.add_argument("cipherdir")
    s.add_argument("--to-key", help="key id, ARN or alias to move the data keys to")
    s.add_argument("--credentials")
    s.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_rewrap)

    s = sub.add_parser("info", help="show the header of a backing file (or a mount path)")
    s.add_argument("path")
    s.set_defaults(func=cmd_info)

    _add_backup_commands(sub)
    for name in ("init", "mount", "fsck", "rewrap", "info"):
        sub.choices[name].add_argument(
            "--ca-bundle", metavar="PEM",
            help="CA certificates to verify the key service's TLS certificate with (default: the "
                 "credentials file's ca_bundle, else AWS_CA_BUNDLE, else the system CAs); "
                 "verification is never turned off",
        )  # fmt: skip
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "ca_bundle", None):
        if not os.path.isfile(args.ca_bundle):
            print(f"kmsfs: --ca-bundle {args.ca_bundle}: no such file", file=sys.stderr)
            return 1
        os.environ[CA_BUNDLE_ENV] = os.path.abspath(args.ca_bundle)
    try:
        return args.func(args)
    except CliError as exc:
        print(f"kmsfs: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
