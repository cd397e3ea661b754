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
import base64
import contextlib
import dataclasses
import errno
import hashlib
import json
import logging
import os
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn
from urllib.parse import urlsplit

from kmsfs import mount_helper, mountlock
from kmsfs.config import (
    CONFIG_NAME,
    DIRKEYS_CONFIG_VERSION,
    NAMES_AES_SIV,
    NAMES_CONFIG_VERSION,
    Config,
    ConfigError,
)
from kmsfs.core import DEFAULT_REVALIDATE_AFTER
from kmsfs.format import (
    FILE_ID_SIZE,
    FORMAT_V4,
    RESIZE_XATTR,
    CorruptHeader,
    directory_context,
    encryption_context,
)
from kmsfs.keyclient import (
    CA_BUNDLE_ENV,
    DEFAULT_REGION,
    Credentials,
    KeyClient,
    KeyServiceError,
    KeyServiceUnavailable,
    check_endpoint,
    load_credentials,
)
from kmsfs.keypool import DEFAULT_SIZE as DEFAULT_KEY_POOL
from kmsfs.names import DIRID_FILE, DIRKEY_FILE, NAME_KEY_SIZE, NameCipher

if TYPE_CHECKING:
    from kmsfs.fsck import FsckReport

MOUNT_TIMEOUT = 30.0
# Bound on one key service request (connect and read): new opens fail with EIO after at most this.
DEFAULT_KMS_TIMEOUT = 5.0
DEFAULT_DIRECTORY_KEY_TTL = 300.0
DEFAULT_REPORT_DEADLINE = 10.0
LOG_NAME = ".kmsfs.log"


class CliError(Exception):
    """A user-facing failure: printed as one line, exit status 1."""


class OneLineParser(argparse.ArgumentParser):
    """A usage error is one line naming the problem (and where the help is), exit status 2,
    instead of argparse's usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def _credentials(args: argparse.Namespace) -> Credentials:
    """``--credentials FILE`` (static keys), else botocore's chain (``--aws-profile`` or default)."""
    path, profile = getattr(args, "credentials", None), getattr(args, "aws_profile", None)
    if path and profile:
        raise CliError("--credentials and --aws-profile exclude each other")
    try:
        if path:
            return load_credentials(path)
        from kmsfs.awscreds import resolve

        return resolve(profile)
    except ValueError as exc:
        raise CliError(str(exc)) from None


def _valid_endpoint(url: str) -> str:
    try:
        return check_endpoint(url)
    except ValueError as exc:
        raise CliError(str(exc)) from None


def _new_dirs(path: Path) -> list[Path]:
    """The directories ``mkdir -p path`` would create, outermost first; CliError if it cannot."""
    missing: list[Path] = []
    probe = path.absolute()
    while not probe.exists():
        if probe.is_symlink():
            raise CliError(f"cannot create {path}: {probe} is a dangling symlink")
        missing.append(probe)
        probe = probe.parent
    if not probe.is_dir():
        raise CliError(f"cannot create {path}: {probe} is not a directory")
    return missing[::-1]


def _check_init_target(cipherdir: Path, force: bool) -> list[Path]:
    """Refuse a cipherdir that is in use or not a directory; the directories init must create."""
    if cipherdir.exists() and not cipherdir.is_dir():
        raise CliError(f"{cipherdir} exists and is not a directory")
    if not cipherdir.exists():
        return _new_dirs(cipherdir)
    if (cipherdir / CONFIG_NAME).exists() and not force:
        raise CliError(f"{cipherdir} is already initialised ({CONFIG_NAME} exists; --force replaces it)")
    if any(not p.name.startswith(".kmsfs") for p in cipherdir.iterdir()) and not force:
        raise CliError(f"{cipherdir} is not empty (a cipherdir starts empty)")
    if not os.access(cipherdir, os.W_OK | os.X_OK):
        raise CliError(f"{cipherdir}: not writable")
    return []


def cmd_init(args: argparse.Namespace) -> int:
    """Check everything first (endpoint, credentials, target, key), then create: a failed init
    leaves nothing behind."""
    cipherdir = Path(args.cipherdir)
    creds = _credentials(args)
    endpoint = args.endpoint or creds.endpoint
    if not endpoint:
        raise CliError("no endpoint: pass --endpoint URL (or name one in the credentials)")
    _valid_endpoint(endpoint)
    if args.endpoint and creds.endpoint and _origin(args.endpoint) != _origin(creds.endpoint):
        raise CliError(f"--endpoint {args.endpoint} differs from {creds.endpoint} named by "
                       f"{creds.source or 'the credentials'}: one key service, one endpoint; fix "
                       "the credentials (its \"endpoint\") or drop --endpoint")
    region = args.region or creds.region or DEFAULT_REGION
    if args.directory_keys and args.plaintext_names:
        raise CliError("--directory-keys needs encrypted names (each directory's key is bound to its "
                       "directory id): drop --plaintext-names")
    to_create = _check_init_target(cipherdir, args.force)
    client = KeyClient(endpoint, region, creds)
    try:
        meta = client.describe_key(args.key)
    except KeyServiceError as exc:
        raise CliError(f"key {args.key!r} refused by the key service: {exc}") from None
    except KeyServiceUnavailable as exc:
        raise CliError(str(exc)) from None
    finally:
        client.close()
    if meta.get("Enabled") is False or meta.get("KeyState", "Enabled") != "Enabled":
        raise CliError(f"key {args.key!r} is not enabled (state {meta.get('KeyState')})")
    arn = str(meta.get("Arn") or meta.get("KeyId"))
    config = Config(endpoint=endpoint, region=region, key_id=args.key, key_arn=arn)
    name_key = None
    if not args.plaintext_names:
        config, name_key = _new_name_key(endpoint, region, creds, config)
    if args.directory_keys:
        config = dataclasses.replace(config, version=DIRKEYS_CONFIG_VERSION, directory_keys=True,
                                     open_reports=_probe_reports(endpoint, region, creds, config))
    try:
        for directory in to_create:
            directory.mkdir()
        if name_key is not None:
            _write_root_dir_id(cipherdir, name_key)
        path = config.save(cipherdir)
    except OSError as exc:
        with contextlib.suppress(OSError):
            (cipherdir / DIRID_FILE).unlink()
        for directory in reversed(to_create):
            with contextlib.suppress(OSError):
                directory.rmdir()
        raise CliError(f"cannot initialise {cipherdir}: {exc.strerror or exc}") from None
    names = "plaintext names" if name_key is None else "encrypted names"
    if config.directory_keys:
        names += ", directory keys"
    print(f"initialised {cipherdir} with key {arn}, {names} (config {path})")
    if config.directory_keys and not config.open_reports:
        print("note: the key service does not take open reports (KmsfsReportAccess: AWS KMS, moto and "
              "other KMS services lack this kmsfs extension); with directory keys its audit will then "
              "show one Decrypt per directory-key unwrap only, not every open and create")
    _note_xattr_support(cipherdir)
    return 0


def _new_name_key(endpoint: str, region: str, creds: Credentials, config: Config
                  ) -> tuple[Config, NameCipher]:
    """A name key for a new cipherdir: GenerateDataKey with an encryption context naming its
    purpose and a fresh cipherdir id; only the wrapped key is kept (in the config)."""
    cipherdir_id = secrets.token_hex(16)
    config = dataclasses.replace(config, version=NAMES_CONFIG_VERSION, names=NAMES_AES_SIV,
                                 cipherdir_id=cipherdir_id)
    client = KeyClient(endpoint, region, creds)
    try:
        key, blob, _ = client.generate_data_key(
            config.key_arn, config.name_key_context(),
            {"tool": "kmsfs init", "process": "kmsfs", "op": "names", "pid": os.getpid(),
             "uid": os.getuid(), "path": "/"})
    except KeyServiceError as exc:
        raise CliError(f"the key service refused a name key for {config.key_arn}: {exc} "
                       "(--plaintext-names makes a cipherdir without one)") from None
    except KeyServiceUnavailable as exc:
        raise CliError(str(exc)) from None
    finally:
        client.close()
    if len(key) != NAME_KEY_SIZE:
        raise CliError("the key service returned a name key of the wrong size")
    return (dataclasses.replace(config, name_key=base64.b64encode(blob).decode("ascii")),
            NameCipher(key))


def _probe_reports(endpoint: str, region: str, creds: Credentials, config: Config) -> bool:
    """Does the key service take open reports (an empty KmsfsReportAccess with the key)?"""
    client = KeyClient(endpoint, region, creds)
    try:
        client.report_access(config.key_arn, config.cipherdir_id, [])
    except KeyServiceError as exc:
        if exc.is_access_denied:
            raise CliError(f"the key service refused open reports for {config.key_arn}: {exc} (the "
                           "credentials must be allowed kms:Decrypt on the key)") from None
        return False  # UnknownOperationException and the like: no extension
    except KeyServiceUnavailable:
        return False  # it answered DescribeKey just now: a 5xx or odd reply means no extension
    finally:
        client.close()
    return True


def _write_root_dir_id(cipherdir: Path, cipher: NameCipher) -> None:
    """The root's ``kmsfs.dirid`` (replaced on ``init --force``: old names become unreadable, and
    a directory key of the old id goes too)."""
    target = cipherdir / DIRID_FILE
    for old in (target, cipherdir / DIRKEY_FILE):
        with contextlib.suppress(FileNotFoundError):
            old.unlink()
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o444)
    try:
        os.write(fd, cipher.dirid_file(cipher.new_dir_id()))
    finally:
        os.close(fd)


def _note_xattr_support(cipherdir: Path) -> None:
    """Say so when the cipherdir's filesystem keeps no user xattrs (vfat, exfat, some NFS/FUSE)."""
    from kmsfs.headers import xattrs_supported

    if not xattrs_supported(str(cipherdir)):
        print(f"note: the filesystem of {cipherdir} does not keep user xattrs; kmsfs will use the "
              "header copies inside the files only (format 3 needs nothing else)")


def _endpoint_for(cipherdir: str, config: Config, creds: Credentials, override: str | None,
                  quiet: bool = False) -> str:
    """The one endpoint a command talks to.

    The cipherdir's config records it (``init``, ``config set-endpoint``), but it lies in untrusted
    storage: an edited endpoint must not redirect signed requests (and the data keys they return)
    to another server. So it is used only when the operator's side agrees or names none:
    ``--endpoint`` on the command line wins (and is reported when it differs), and an endpoint named
    by the credentials (one of them, when they list several) must match the record.
    """
    if override:
        _valid_endpoint(override)
        if _origin(override) != _origin(config.endpoint) and not quiet:
            print(f"kmsfs: note: using --endpoint {override}; {cipherdir} records {config.endpoint} "
                  f"(kmsfs config set-endpoint {cipherdir} {override} records the move)", file=sys.stderr)
        return override
    named = creds.endpoints or ((creds.endpoint,) if creds.endpoint else ())
    if named and _origin(config.endpoint) not in {_origin(e) for e in named}:
        raise CliError(
            f"{cipherdir} records the key service {config.endpoint} but {creds.source or 'the credentials'} "
            f"name {creds.endpoint}; refusing to guess (the record lies in untrusted storage): if the "
            f"service moved, run 'kmsfs config set-endpoint {cipherdir} {creds.endpoint}'; for one run, "
            "pass --endpoint URL")
    return _valid_endpoint(config.endpoint)


def _build(cipherdir: str, args: argparse.Namespace, timeout: float = DEFAULT_KMS_TIMEOUT,
           quiet: bool = False) -> tuple[Config, KeyClient]:
    try:
        config = Config.load(cipherdir)
    except ConfigError as exc:
        raise CliError(str(exc)) from None
    creds = _credentials(args)
    endpoint = _endpoint_for(cipherdir, config, creds, getattr(args, "endpoint", None), quiet)
    # The other endpoints the credentials list (nodes of the same key service) are tried in order
    # when this one cannot answer (docs/OPERATIONS.md, failover).
    fallbacks = tuple(e for e in creds.endpoints if _origin(e) != _origin(endpoint))
    return config, KeyClient(endpoint, config.region, creds, connect_timeout=timeout,
                             read_timeout=timeout, fallbacks=fallbacks)


def _origin(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    if parts.scheme.lower() == "unix":  # unix:///path: the socket file is the whole address
        return "unix", parts.path
    return parts.scheme.lower(), parts.netloc.lower()


def _check_service(client: KeyClient, config: Config) -> list[str]:
    """Fail fast on a wrong endpoint or bad credentials (a usage-only principal may not describe);
    return warnings when the key cannot be used now (every open would fail with EACCES)."""
    try:
        try:
            meta = client.describe_key(config.key_arn)
        except KeyServiceError as exc:
            if exc.code != "AccessDeniedException":
                raise CliError(f"cannot mount: key service refused: {exc}") from None
            meta = {}
        if meta and (meta.get("Enabled") is False or meta.get("KeyState", "Enabled") != "Enabled"):
            return [f"key {config.key_arn} is {meta.get('KeyState') or 'disabled'}: every open "
                    "and create will fail with EACCES"]
        return _probe_key(client, config)
    except KeyServiceUnavailable as exc:
        raise CliError(f"cannot mount: {exc}") from None
    finally:
        client.close()


def _probe_key(client: KeyClient, config: Config) -> list[str]:
    """Try the two operations a mount needs, the way it uses them (a file-id encryption context,
    so context-conditioned policies answer as they will for files). Audited as ``op: probe``."""
    context = encryption_context(secrets.token_bytes(FILE_ID_SIZE))
    caller = {"tool": "kmsfs mount", "process": "kmsfs", "op": "probe", "pid": os.getpid(),
              "uid": os.getuid()}
    try:
        _, blob, _ = client.generate_data_key(config.key_arn, context, caller)
    except KeyServiceError as exc:
        return [f"these credentials may not GenerateDataKey with {config.key_arn} ({exc}): "
                "creating files will fail with EACCES"]
    try:
        client.decrypt(blob, context, caller, key_id=config.key_arn)
    except KeyServiceError as exc:
        return [f"these credentials may not Decrypt with {config.key_arn} ({exc}): "
                "opening files will fail with EACCES"]
    return []


def _serve(cipherdir: str, mountpoint: str, credentials: str | None, allow_other: bool,
           ready_fd: int | None, debug: bool, args: argparse.Namespace) -> None:
    """Run the FUSE loop in this process (foreground)."""
    from kmsfs._fuse import BINDING, Session
    from kmsfs.core import KmsfsCore
    from kmsfs.inodes import InodeFs
    from kmsfs.operations import KmsfsOperations

    config, client = _build(cipherdir, args, args.kms_timeout, quiet=True)
    pool = None
    dirkeys, reporter = _directory_keys(config, client, args)
    if args.key_pool and dirkeys is None:
        from kmsfs.keypool import DataKeyPool

        # Keys older than the revalidation interval are discarded: revocation reaches creates
        # within the same bound as it reaches open handles. Each pooled create is claimed (a
        # Decrypt with its path) so the audit records it like a direct one.
        pool = DataKeyPool(client.generate_data_key, client.decrypt, config.key_arn, args.key_pool,
                           max(1.0, args.revalidate_after))
        pool.start()
    core = KmsfsCore(cipherdir, config, client, revalidate_after=args.revalidate_after, key_pool=pool,
                     dirkeys=dirkeys, reporter=reporter)
    logging.getLogger("kmsfs").info("FUSE binding %s", BINDING)
    logging.getLogger("kmsfs").info("revalidate open keys after %.1f s; key service timeout %.1f s; "
                                    "sparse files %s", args.revalidate_after, args.kms_timeout,
                                    "on" if core.sparse else "off (backing fs reports no holes)")

    def ready() -> None:
        if ready_fd is not None:
            os.write(ready_fd, b"R")
            os.close(ready_fd)

    ops = KmsfsOperations(InodeFs(core, _name_strategy(config, client, core, args)), mountpoint,
                          on_ready=ready)
    fsname = os.path.realpath(cipherdir).replace("\\", "\\\\").replace(",", "\\,")
    options = [f"fsname={fsname}", "subtype=kmsfs", "default_permissions"]
    if allow_other:
        options.append("allow_other")
    options.extend(getattr(args, "fs_options", None) or ())  # nosuid, ro, ... (mount -t fuse.kmsfs)
    try:
        Session(ops.handlers(), mountpoint, options, debug=debug).run()
    finally:
        if pool is not None:
            pool.close()
        if reporter is not None:
            reporter.close()


def _directory_keys(config: Config, client: KeyClient, args: argparse.Namespace) -> tuple[Any, Any]:
    """Directory-key mode's key cache and open reporter (None, None for other cipherdirs)."""
    if not config.directory_keys:
        return None, None
    from kmsfs.dirkeys import DirectoryKeys
    from kmsfs.reports import OpenReporter

    ttl = getattr(args, "directory_key_ttl", DEFAULT_DIRECTORY_KEY_TTL)
    deadline = getattr(args, "report_deadline", DEFAULT_REPORT_DEADLINE)
    dirkeys = DirectoryKeys(client, config.key_arn, config.cipherdir_id, ttl)
    reporter = None
    if config.open_reports:
        reporter = OpenReporter(lambda arn, batch: client.report_access(arn, config.cipherdir_id, batch),
                                deadline=deadline, on_refused=dirkeys.drop)
        reporter.start()
    logging.getLogger("kmsfs").info(
        "directory keys: cached for at most %g s; open reports %s", ttl,
        f"on (fail closed after {deadline:g} s)" if reporter else "off (the service lacks them: "
        "audit is per directory-key unwrap only)")
    return dirkeys, reporter


def _name_strategy(config: Config, client: KeyClient, core: Any, args: argparse.Namespace) -> Any:
    """Plaintext names, or the name key unwrapped now (audited as the mount, ``op: names``)."""
    from kmsfs.namekey import NameKey, NameKeyError
    from kmsfs.namespace import EncryptedNames, PlainNames

    if not config.encrypted_names:
        return PlainNames()
    try:
        key = NameKey(client, config, args.revalidate_after)
    except NameKeyError as exc:
        raise CliError(f"cannot mount: {exc}") from None
    logging.getLogger("kmsfs").info("encrypted names (cipherdir id %s)", config.cipherdir_id)
    return EncryptedNames(key, core.root_fd)


def _setup_logging(log_file: str | None, verbose: bool) -> None:
    level = logging.DEBUG if verbose else logging.INFO
    fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    if log_file:
        logging.basicConfig(filename=log_file, level=level, format=fmt, force=True)
    else:
        logging.basicConfig(stream=sys.stderr, level=level, format=fmt, force=True)
    logging.getLogger("fuse").setLevel(logging.WARNING)
    logging.getLogger("urllib3").setLevel(logging.WARNING)


def _check_mountpoint_empty(mountpoint: str, nonempty: bool) -> None:
    """Refuse to hide files under a mount, as gocryptfs does, unless ``--nonempty``."""
    try:
        entries = os.listdir(mountpoint)
    except OSError as exc:
        raise CliError(f"mount point {mountpoint}: {exc.strerror}") from None
    if entries and not nonempty:
        raise CliError(f"mount point {mountpoint} is not empty ({len(entries)} entries would be hidden "
                       "under the mount); empty it, or pass --nonempty")


def _lock_cipherdir(cipherdir: str) -> int:
    try:
        return mountlock.acquire(cipherdir)
    except mountlock.AlreadyMounted as exc:
        raise CliError(str(exc)) from None


def _warn_unusable_key(warnings: list[str], strict: bool) -> None:
    for warning in warnings:
        if strict:
            raise CliError(f"refusing to mount (--strict): {warning}")
        print(f"kmsfs: warning: {warning}", file=sys.stderr)


def cmd_mount(args: argparse.Namespace) -> int:
    cipherdir = os.path.abspath(args.cipherdir)
    mountpoint = os.path.abspath(args.mountpoint)
    if _is_dead_mount(mountpoint):
        _unmount(mountpoint)  # a daemon killed with -9 left it: recover, then mount afresh
        print(f"recovered {mountpoint} from a dead kmsfs mount", file=sys.stderr)
    if not os.path.isdir(mountpoint):
        raise CliError(f"mount point {mountpoint} is not a directory")
    if os.path.ismount(mountpoint):
        raise CliError(f"{mountpoint} is already a mount point")
    _check_mountpoint_empty(mountpoint, args.nonempty)
    credentials = os.path.abspath(args.credentials) if args.credentials else None
    args.credentials = credentials  # the daemon runs in /
    config, client = _build(cipherdir, args)
    _warn_unusable_key(_check_service(client, config), args.strict)
    lock_fd = _lock_cipherdir(cipherdir)  # held by the mount (inherited by the daemon) for its life
    log_file = os.path.abspath(args.log) if args.log else os.path.join(cipherdir, LOG_NAME)
    if args.foreground:
        _setup_logging(args.log, args.verbose)
        _serve(cipherdir, mountpoint, credentials, args.allow_other, None, args.verbose, args)
        return 0
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid != 0:
        os.close(lock_fd)  # the daemon's copy keeps the lock
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
    if not os.path.ismount(mountpoint) and not _is_dead_mount(mountpoint):
        raise CliError(f"{mountpoint} is not mounted")
    _unmount(mountpoint, lazy=getattr(args, "lazy", False))
    return 0


def _is_dead_mount(mountpoint: str) -> bool:
    """A FUSE mount whose daemon died (kill -9): every access answers ENOTCONN, so ``ismount``
    and ``isdir`` see neither a mount nor a directory; only unmounting recovers it."""
    try:
        os.stat(mountpoint)
    except OSError as exc:
        return exc.errno in (errno.ENOTCONN, errno.ECONNABORTED)
    return False


def _unmount(mountpoint: str, *, lazy: bool = False) -> None:
    attempts = [[t, "-uz" if lazy else "-u", mountpoint] for t in ("fusermount", "fusermount3")
                if shutil.which(t)]
    attempts.append(["umount", "-l", mountpoint] if lazy else ["umount", mountpoint])
    errors = []
    for cmd in attempts:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode == 0:
            return
        errors.append(f"{cmd[0]}: {proc.stderr.strip()}")
    raise _unmount_failure(mountpoint, errors)


def _unmount_failure(mountpoint: str, errors: list[str]) -> CliError:
    """One line: a busy mount (the usual case) says what to do; anything else lists the errors."""
    if any("busy" in error.lower() for error in errors):
        return CliError(f"{mountpoint} is busy: a process has a file open there or its working "
                        f"directory inside (fuser -vm {mountpoint} lists them); close them and retry, "
                        "or detach it now and let it finish when they close: "
                        f"kmsfs umount --lazy {mountpoint}")
    return CliError("unmount failed: " + "; ".join(" ".join(e.split()) for e in errors))


def _tool_client(cipherdir: str, args: argparse.Namespace) -> tuple[Config, KeyClient]:
    config, client = _build(cipherdir, args)
    return config, client


def cmd_fsck(args: argparse.Namespace) -> int:
    """Verify every header and block; exit 1 if anything is damaged."""
    from kmsfs.fsck import fsck

    config, client = _tool_client(args.cipherdir, args)
    try:
        names = _tool_names(config, client, "fsck", "/")
        report = fsck(args.cipherdir, client, progress=not args.quiet, names=names,
                      repair=getattr(args, "repair", False))
    except KeyServiceUnavailable as exc:
        raise CliError(f"fsck stopped: {exc}") from None
    finally:
        client.close()
    _print_name_problems(report)
    for rel, problems in sorted(report.damaged.items()):
        for problem in problems:
            print(f"DAMAGED {rel}: {problem}")
    for rel in report.pending:
        print(f"PENDING {rel}: interrupted size change, completed at its next open")
    for rel in report.temporaries:
        print(f"LEFTOVER {rel}: temporary file of an interrupted create (safe to delete)")
    _print_backup_notes(report)
    state = "clean" if report.clean else f"{len(report.damaged)} damaged file(s)"
    if report.bad_names:
        state += f", {len(report.bad_names)} undecryptable name(s)"
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

    _, client = _tool_client(args.cipherdir, args)
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
        help="restore missing header xattrs from the in-file copies, after verifying each file "
             "(default off: report only)")
    s = sub.add_parser("upgrade", help="convert old-format (1, 2) files to format 3 (unmounted)")
    s.add_argument("cipherdir")
    s.add_argument("--quiet", "-q", action="store_true", help="no progress bar (default off)")
    s.add_argument(
        "--ca-bundle", metavar="PEM",
        help="CA certificates to verify the key service's TLS certificate with, as for fsck "
             "(default: the credentials' ca_bundle, else the system store)")
    s.set_defaults(func=cmd_upgrade)


def _tool_names(config: Config, client: KeyClient, tool: str, path: str) -> NameCipher | None:
    """The name cipher of a name-encrypting cipherdir, unwrapped for ``kmsfs <tool>`` (audited
    with ``path``, a path inside the filesystem); None for plaintext names."""
    from kmsfs.namekey import NameKeyError, unwrap_name_key
    from kmsfs.toolcaller import tool_caller

    if not config.encrypted_names:
        return None
    try:
        return unwrap_name_key(client, config, {**tool_caller(tool, path), "op": "names"})
    except NameKeyError as exc:
        raise CliError(str(exc)) from None


def _print_name_problems(report: Any) -> None:
    for path, why in report.bad_names:
        print(f"BADNAME {path}: {why}")
    for path in report.orphan_names:
        print(f"ORPHAN {path}: long-name side entry without its entry (left by a crash; safe to delete)")


def cmd_path(args: argparse.Namespace) -> int:
    """``kmsfs path encrypt|decrypt CIPHERDIR PATH``: one path through the name key (audited)."""
    from kmsfs.names import BadName
    from kmsfs.namewalk import decrypt_path, encrypt_path

    config, client = _tool_client(args.cipherdir, args)
    try:
        if not config.encrypted_names:
            raise CliError(f"{args.cipherdir} keeps plaintext names: the backing path is the path")
        audited = args.path if args.path_command == "encrypt" else "/"
        cipher = _tool_names(config, client, "path", audited)
    finally:
        client.close()
    assert cipher is not None
    try:
        if args.path_command == "encrypt":
            print(encrypt_path(args.cipherdir, cipher, args.path))
        else:
            print(decrypt_path(args.cipherdir, cipher, args.path))
    except BadName:
        raise CliError(f"{args.path}: a name on the way fails authentication (edited, moved, or "
                       "not of this cipherdir)") from None
    except ValueError as exc:
        raise CliError(str(exc)) from None
    return 0


def cmd_rewrap(args: argparse.Namespace) -> int:
    """Re-wrap every data key (ReEncrypt) under the newest key version or ``--to-key``."""
    from kmsfs.rewrap import rewrap

    config, client = _tool_client(args.cipherdir, args)
    _note_mounted(args.cipherdir)
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
        names = _tool_names(config, client, "rewrap", "/")
        report = rewrap(args.cipherdir, client, destination, progress=not args.quiet, names=names)
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


def _note_mounted(cipherdir: str) -> None:
    """rewrap is safe on a mounted cipherdir (each header is replaced under the flock the mount
    takes too); say so, so that an operator who expected to have to unmount first is not left
    guessing."""
    if mountlock.held_by_mount(cipherdir):
        where = ", ".join(mountlock.mounted_at(cipherdir)) or "a mount in another namespace"
        print(f"kmsfs: note: {cipherdir} is mounted ({where}); rewrap coordinates with it through "
              "per-file locks, and open files keep their unwrapped keys", file=sys.stderr)


def cmd_config_set_endpoint(args: argparse.Namespace) -> int:
    """Record a moved key service in the cipherdir, after checking the cipherdir's key is there."""
    cipherdir = args.cipherdir
    try:
        config = Config.load(cipherdir)
    except ConfigError as exc:
        raise CliError(str(exc)) from None
    url = _valid_endpoint(args.url)
    creds = _credentials(args)
    client = KeyClient(url, config.region, creds)
    try:
        arn = _key_arn_at(client, config)
    except KeyServiceUnavailable as exc:
        raise CliError(str(exc)) from None
    finally:
        client.close()
    if arn != config.key_arn:
        raise CliError(f"the key service at {url} answers for {arn}, not the cipherdir's key "
                       f"{config.key_arn}: not the same service; nothing changed")
    path = dataclasses.replace(config, endpoint=url).save(cipherdir)
    print(f"{path}: endpoint {config.endpoint} -> {url}")
    if creds.endpoint and _origin(creds.endpoint) != _origin(url):
        print(f"kmsfs: note: {creds.source or 'the credentials'} still name {creds.endpoint}: update "
              "it, or mounts with it will refuse the mismatch", file=sys.stderr)
    return 0


def _key_arn_at(client: KeyClient, config: Config) -> str:
    """The ARN the service at ``client`` gives the cipherdir's key (DescribeKey, else a probe
    GenerateDataKey for a usage-only principal)."""
    try:
        return str(client.describe_key(config.key_arn).get("Arn"))
    except KeyServiceError as exc:
        if exc.code != "AccessDeniedException":
            raise CliError(f"the key service at {client.url} refused the key {config.key_arn}: "
                           f"{exc}") from None
    try:
        _, _, arn = client.generate_data_key(
            config.key_arn, encryption_context(secrets.token_bytes(FILE_ID_SIZE)),
            {"tool": "kmsfs config", "process": "kmsfs", "op": "probe"})
    except KeyServiceError as exc:
        raise CliError(f"cannot check the key {config.key_arn} at {client.url}: {exc}") from None
    return arn


def cmd_info(args: argparse.Namespace) -> int:
    """Show the header of a backing file, or of the file behind a mount path (no secrets)."""
    from kmsfs.backing import backing_path_of
    from kmsfs.headers import plain_size_at, read_header

    path, plaintext = _info_paths(args, backing_path_of)
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
        "path": path, **({"plaintext_path": plaintext} if plaintext else {}),
        "format_version": header.version, "block_size": header.block_size,
        "file_id": header.file_id.hex(), "key_arn": header.key_arn,
        "wrapped_key_bytes": len(header.wrapped_key),
        "wrapped_key_sha256": hashlib.sha256(header.wrapped_key).hexdigest(),
        "key_version": _blob_key_version(header.wrapped_key),
        "encryption_context": header.encryption_context(),
    }
    if header.version == FORMAT_V4:  # the data key is wrapped locally, under a directory key
        inner = header.directory_wrapped
        cipherdir = _cipherdir_of(path)
        info["key_version"] = _blob_key_version(inner.wrapped_dir_key)
        info["directory_id"] = inner.dir_id.hex()
        info["encryption_context"] = directory_context(
            Config.load(cipherdir).cipherdir_id if cipherdir else "?", inner.dir_id)
    info |= {
        "backing_size": os.path.getsize(path),
        "plaintext_size": plain_size_at(path, os.stat(path)),
    }
    try:
        info["size_change_pending"] = bool(os.getxattr(path, RESIZE_XATTR))
    except OSError:
        info["size_change_pending"] = False
    print(json.dumps(info, indent=2))
    return 0


def _cipherdir_of(path: str) -> str | None:
    """The cipherdir holding the backing path ``path`` (the nearest parent with a config)."""
    probe = os.path.dirname(os.path.abspath(path))
    while True:
        if os.path.isfile(os.path.join(probe, CONFIG_NAME)):
            return probe
        if probe == os.path.dirname(probe):
            return None
        probe = os.path.dirname(probe)


def _info_paths(args: argparse.Namespace, backing_path_of: Callable[[str], str]) -> tuple[str, str | None]:
    """(backing path, plaintext path or None) for ``kmsfs info PATH`` in a name-encrypting
    cipherdir. A mount path: the backing file is the one with the same inode number (the mount
    shows backing inode numbers; no key needed). A backing path: its name is decrypted through
    the key service (audited), when credentials are at hand; otherwise it is left out."""
    from kmsfs.names import BadName
    from kmsfs.namewalk import decrypt_path, find_inode

    mapped = backing_path_of(args.path)
    cipherdir = _cipherdir_of(mapped)
    if cipherdir is None:
        return mapped, None
    try:
        config = Config.load(cipherdir)
    except ConfigError:
        return mapped, None
    if not config.encrypted_names:
        return mapped, None
    root = os.path.realpath(cipherdir)
    if os.path.realpath(mapped) != os.path.realpath(args.path):  # a path inside a mount
        plain = "/" + os.path.relpath(os.path.realpath(mapped), root)
        found = find_inode(root, os.lstat(args.path).st_ino)
        if found is None:
            raise CliError(f"{args.path}: no backing file with its inode number in {cipherdir}")
        return found, "/" if plain == "/." else plain
    try:
        config, client = _build(cipherdir, args, quiet=True)
        try:
            cipher = _tool_names(config, client, "info", "/")
        finally:
            client.close()
    except CliError as exc:
        print(f"kmsfs: note: no plaintext path ({exc})", file=sys.stderr)
        return mapped, None
    assert cipher is not None
    try:
        return mapped, decrypt_path(cipherdir, cipher, os.path.realpath(mapped))
    except BadName:
        return mapped, "(name fails authentication)"


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
    p = OneLineParser(
        prog="kmsfs", description="Encrypted FUSE filesystem over a KMS.",
        epilog="Exit codes: 0 ok, 1 operational error, 2 usage error (docs/CLI.md). mount.fuse form: "
               "kmsfs CIPHERDIR MOUNTPOINT -o credentials=FILE,... (fstab type fuse.kmsfs).")
    p.add_argument("--version", action="version", version=f"kmsfs {_version()}")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("init", help="initialise a cipherdir")
    s.add_argument("cipherdir", help="directory for the encrypted files (created if missing; must be empty)")
    s.add_argument("--endpoint", help="key service URL, https:// (http:// only to loopback) "
                   "(default: the credentials' endpoint)")
    s.add_argument("--key", default="alias/aws/kmsfs",
                   help="key id, ARN, alias/name or alias ARN (default: the service-managed alias/aws/kmsfs)")
    s.add_argument("--region", help="region to sign for (default: the credentials' region, else "
                   f"{DEFAULT_REGION})")
    s.add_argument("--force", action="store_true",
                   help="replace an existing configuration / accept a non-empty directory (default off)")
    s.add_argument("--plaintext-names", action="store_true",
                   help="keep file names and symlink targets in clear in the backing directory "
                        "(the layout before encrypted names; default: names encrypted under a name "
                        "key from the key service)")
    s.add_argument("--directory-keys", action="store_true",
                   help="wrap each file's data key locally under a per-directory key from the key "
                        "service, cached by the mount (no round trip per open or create; opens are "
                        "reported to the service in batches; docs/SECURITY.md says what is weaker). "
                        "Default off: every open and create asks the service")
    s.set_defaults(func=cmd_init)

    s = sub.add_parser("mount", help="mount a cipherdir")
    s.add_argument("cipherdir", help="the initialised cipherdir")
    s.add_argument("mountpoint", help="an existing, empty directory")
    s.add_argument("--foreground", "-f", action="store_true",
                   help="stay in the foreground, log to stderr (default: daemon, returns once mounted)")
    s.add_argument("--allow-other", action="store_true",
                   help="let other users use the mount (default off; non-root users need "
                        "user_allow_other in /etc/fuse.conf)")
    s.add_argument("--nonempty", action="store_true",
                   help="mount over a non-empty directory, hiding its files (default: refuse)")
    s.add_argument("--strict", action="store_true",
                   help="refuse to mount (exit 1) when the credentials cannot use the key "
                        "(default: warn and mount)")
    s.add_argument("--fs-options", type=mount_helper.fs_options, metavar="LIST", default=[],
                   help="kernel mount flags, comma-separated: " + ",".join(sorted(mount_helper.FS_FLAGS))
                        + " (default: none)")
    s.add_argument("--log", help=f"daemon log file (default CIPHERDIR/{LOG_NAME})")
    s.add_argument("--verbose", "-v", action="store_true", help="debug logging (default off)")
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
    s.add_argument("--directory-key-ttl", type=_seconds(1.0, 3600.0), default=DEFAULT_DIRECTORY_KEY_TTL,
                   metavar="SECONDS",
                   help="directory-key cipherdirs: use an unwrapped directory key for at most this "
                        f"long, then unwrap it again (default {DEFAULT_DIRECTORY_KEY_TTL:g}, at most "
                        "3600): the bound on revocation in that mode")
    s.add_argument("--report-deadline", type=_seconds(1.0, 600.0), default=DEFAULT_REPORT_DEADLINE,
                   metavar="SECONDS",
                   help="directory-key cipherdirs: refuse new opens and creates (EACCES) while an "
                        f"open report is undelivered for longer than this (default "
                        f"{DEFAULT_REPORT_DEADLINE:g}, at most 600)")
    s.set_defaults(func=cmd_mount)

    s = sub.add_parser("umount", help="unmount")
    s.add_argument("mountpoint")
    s.add_argument("--lazy", "-z", action="store_true",
                   help="detach now even if busy; the mount ends when the last user closes (default off)")
    s.set_defaults(func=cmd_umount)

    s = sub.add_parser("fsck", help="verify every header and block through the key service")
    s.add_argument("cipherdir")
    s.add_argument("--quiet", "-q", action="store_true", help="no progress bar (default: shown)")
    s.set_defaults(func=cmd_fsck)

    s = sub.add_parser("rewrap", help="re-wrap every data key (newest key version or --to-key)")
    s.add_argument("cipherdir")
    s.add_argument("--to-key", help="key id, ARN or alias to move the data keys to (default: the "
                   "newest version of each file's key)")
    s.add_argument("--quiet", "-q", action="store_true", help="no progress bar (default: shown)")
    s.set_defaults(func=cmd_rewrap)

    s = sub.add_parser("info", help="show the header of a backing file (or a mount path)")
    s.add_argument("path")
    s.set_defaults(func=cmd_info)

    _add_backup_commands(sub)
    path_parser = sub.add_parser("path", help="map a path inside the filesystem to its backing path "
                                 "and back (name-encrypting cipherdirs; through the key service)")
    path_sub = path_parser.add_subparsers(dest="path_command", required=True)
    path_parsers = []
    for verb, what in (("encrypt", "/plain/path inside the filesystem"),
                       ("decrypt", "backing path (absolute, or relative to CIPHERDIR)")):
        sp = path_sub.add_parser(verb, help=f"print the {'backing' if verb == 'encrypt' else 'plaintext'}"
                                 " path of a " + what)
        sp.add_argument("cipherdir")
        sp.add_argument("path", help=what)
        sp.add_argument("--endpoint", metavar="URL", help="key service URL for this run (default: "
                        "the cipherdir's record)")
        sp.set_defaults(func=cmd_path)
        path_parsers.append(sp)

    config = sub.add_parser("config", help="change a cipherdir's configuration")
    config_sub = config.add_subparsers(dest="config_command", required=True)
    s = config_sub.add_parser("set-endpoint", help="record that the key service moved (checks that "
                              "the cipherdir's key answers there first)")
    s.add_argument("cipherdir")
    s.add_argument("url", help="the new key service URL")
    s.set_defaults(func=cmd_config_set_endpoint)

    _add_credential_options(sub.choices["init"], sub.choices["mount"], sub.choices["fsck"],
                            sub.choices["rewrap"], sub.choices["upgrade"], s, sub.choices["info"],
                            *path_parsers)
    for name in ("mount", "fsck", "rewrap", "upgrade"):
        sub.choices[name].add_argument(
            "--endpoint", metavar="URL",
            help="key service URL for this run, overriding the cipherdir's record (default: the "
                 "record; https://, http:// only to loopback)")

    for name in ("init", "mount", "fsck", "rewrap", "info"):
        sub.choices[name].add_argument(
            "--ca-bundle", metavar="PEM",
            help="CA certificates to verify the key service's TLS certificate with (default: the "
                 "credentials file's ca_bundle, else AWS_CA_BUNDLE, else the system CAs); "
                 "verification is never turned off",
        )  # fmt: skip
    return p


def _add_credential_options(*parsers: argparse.ArgumentParser) -> None:
    for parser in parsers:
        parser.add_argument(
            "--credentials", metavar="FILE",
            help="JSON credentials file: access_key_id, secret_access_key, optional session_token, "
                 "endpoint, region, ca_bundle (docs/CLI.md) (default: the AWS default chain)")
        parser.add_argument(
            "--aws-profile", metavar="NAME",
            help="AWS profile from ~/.aws/config and ~/.aws/credentials: static keys, "
                 "credential_process, SSO, assumed roles, refreshed before expiry (default: "
                 "AWS_PROFILE, else the AWS default chain: environment, files, instance role)")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("kmsfs")
    except PackageNotFoundError:
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    try:
        argv = mount_helper.translate(argv, _command_names(parser)) or argv
    except mount_helper.HelperError as exc:
        print(f"kmsfs: {exc}", file=sys.stderr)
        return 2
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: 0 for --help/--version, 2 for a usage error
        return int(exc.code or 0)
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
    except OSError as exc:  # an operator's path that is not what it should be: one line, never a traceback
        where = f": {exc.filename}" if exc.filename else ""
        print(f"kmsfs: {exc.strerror or exc}{where}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def mount_fuse_main() -> int:
    """Entry point of ``mount.fuse.kmsfs`` (mount(8)'s helper for type fuse.kmsfs; install it as
    /usr/sbin/mount.fuse.kmsfs): ``CIPHERDIR MOUNTPOINT [-o OPTIONS]`` only (kmsfs/mount_helper.py)."""
    argv = sys.argv[1:]
    try:
        translated = mount_helper.translate(argv, set()) if argv and not argv[0].startswith("-") else None
    except mount_helper.HelperError as exc:
        print(f"mount.fuse.kmsfs: {exc}", file=sys.stderr)
        return 2
    if translated is None:
        print("usage: mount.fuse.kmsfs CIPHERDIR MOUNTPOINT [-o OPTIONS]", file=sys.stderr)
        return 2
    return main(translated)


def _command_names(parser: argparse.ArgumentParser) -> set[str]:
    for action in parser._actions:  # noqa: SLF001 - argparse has no public accessor
        if isinstance(action, argparse._SubParsersAction):
            return set(action.choices)
    return set()


if __name__ == "__main__":
    sys.exit(main())
