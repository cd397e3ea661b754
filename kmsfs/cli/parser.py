"""The ``kmsfs`` argument parser: every command, its options and their defaults.

Why one-line usage errors: an operator mistake is one line and exit status 2 (docs/CLI.md), never
argparse's usage block. Options several commands share (the key service's credentials, endpoint
and CA bundle) are declared once, in ``_add_key_service_options``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import NoReturn

from kmsfs import mount_helper
from kmsfs.cli.common import DEFAULT_KMS_TIMEOUT, EXIT_USAGE
from kmsfs.cli.config import cmd_config_set_endpoint
from kmsfs.cli.fsck import cmd_fsck
from kmsfs.cli.info import cmd_info
from kmsfs.cli.init import cmd_init
from kmsfs.cli.mount import LOG_NAME, cmd_mount
from kmsfs.cli.path import cmd_path
from kmsfs.cli.rewrap import cmd_rewrap
from kmsfs.cli.serve import DEFAULT_DIRECTORY_KEY_TTL, DEFAULT_REPORT_DEADLINE
from kmsfs.cli.umount import cmd_umount
from kmsfs.cli.upgrade import cmd_upgrade
from kmsfs.core import DEFAULT_REVALIDATE_AFTER
from kmsfs.keyclient import DEFAULT_REGION
from kmsfs.keypool import DEFAULT_SIZE as DEFAULT_KEY_POOL


class OneLineParser(argparse.ArgumentParser):
    """A usage error is one line naming the problem (and where the help is), exit status 2,
    instead of argparse's usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: {message} (see {self.prog} --help)\n")


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
    _add_key_service_options(s, endpoint=False)
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
    _add_key_service_options(s)
    s.set_defaults(func=cmd_mount)

    s = sub.add_parser("umount", help="unmount")
    s.add_argument("mountpoint")
    s.add_argument("--lazy", "-z", action="store_true",
                   help="detach now even if busy; the mount ends when the last user closes (default off)")
    s.set_defaults(func=cmd_umount)

    s = sub.add_parser("fsck", help="verify every header and block through the key service")
    s.add_argument("cipherdir")
    _add_quiet(s)
    s.add_argument(
        "--repair", action="store_true",
        help="restore missing header xattrs from the in-file copies, after verifying each file "
             "(default off: report only)")
    _add_key_service_options(s)
    s.set_defaults(func=cmd_fsck)

    s = sub.add_parser("rewrap", help="re-wrap every data key (newest key version or --to-key)")
    s.add_argument("cipherdir")
    s.add_argument("--to-key", help="key id, ARN or alias to move the data keys to (default: the "
                   "newest version of each file's key)")
    _add_quiet(s)
    _add_key_service_options(s)
    s.set_defaults(func=cmd_rewrap)

    s = sub.add_parser("info", help="show the header of a backing file (or a mount path)")
    s.add_argument("path")
    _add_key_service_options(s, endpoint=False)
    s.set_defaults(func=cmd_info)

    s = sub.add_parser("upgrade", help="convert old-format (1, 2) files to format 3 (unmounted)")
    s.add_argument("cipherdir")
    _add_quiet(s)
    _add_key_service_options(s)
    s.set_defaults(func=cmd_upgrade)

    path_parser = sub.add_parser("path", help="map a path inside the filesystem to its backing path "
                                 "and back (name-encrypting cipherdirs; through the key service)")
    path_sub = path_parser.add_subparsers(dest="path_command", required=True)
    for verb, what in (("encrypt", "/plain/path inside the filesystem"),
                       ("decrypt", "backing path (absolute, or relative to CIPHERDIR)")):
        s = path_sub.add_parser(verb, help=f"print the {'backing' if verb == 'encrypt' else 'plaintext'}"
                                " path of a " + what)
        s.add_argument("cipherdir")
        s.add_argument("path", help=what)
        _add_key_service_options(s, ca_bundle=False)
        s.set_defaults(func=cmd_path)

    config = sub.add_parser("config", help="change a cipherdir's configuration")
    config_sub = config.add_subparsers(dest="config_command", required=True)
    s = config_sub.add_parser("set-endpoint", help="record that the key service moved (checks that "
                              "the cipherdir's key answers there first)")
    s.add_argument("cipherdir")
    s.add_argument("url", help="the new key service URL")
    _add_key_service_options(s, endpoint=False, ca_bundle=False)
    s.set_defaults(func=cmd_config_set_endpoint)
    return p


def _add_quiet(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress bar (default: shown)")


def _add_key_service_options(parser: argparse.ArgumentParser, *, endpoint: bool = True,
                             ca_bundle: bool = True) -> None:
    """How a command reaches the key service: credentials (a file or an AWS profile), then
    ``--endpoint`` for this run (init has its own: it records one) and ``--ca-bundle``."""
    parser.add_argument(
        "--credentials", metavar="FILE",
        help="JSON credentials file: access_key_id, secret_access_key, optional session_token, "
             "endpoint, region, ca_bundle (docs/CLI.md) (default: the AWS default chain)")
    parser.add_argument(
        "--aws-profile", metavar="NAME",
        help="AWS profile from ~/.aws/config and ~/.aws/credentials: static keys, "
             "credential_process, SSO, assumed roles, refreshed before expiry (default: "
             "AWS_PROFILE, else the AWS default chain: environment, files, instance role)")
    if endpoint:
        parser.add_argument(
            "--endpoint", metavar="URL",
            help="key service URL for this run, overriding the cipherdir's record (default: the "
                 "record; https://, http:// only to loopback)")
    if ca_bundle:
        parser.add_argument(
            "--ca-bundle", metavar="PEM",
            help="CA certificates to verify the key service's TLS certificate with (default: the "
                 "credentials file's ca_bundle, else AWS_CA_BUNDLE, else the system CAs); "
                 "verification is never turned off")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("kmsfs")
    except PackageNotFoundError:
        return "unknown"


def _command_names(parser: argparse.ArgumentParser) -> set[str]:
    for action in parser._actions:  # noqa: SLF001 - argparse has no public accessor
        if isinstance(action, argparse._SubParsersAction):
            return set(action.choices)
    return set()
