"""``kmsfs`` and ``mount.fuse.kmsfs`` entry points: translate the mount(8) helper form, parse,
run the command and turn its failure into one line and a documented exit code."""

from __future__ import annotations

import os
import sys

from kmsfs import mount_helper
from kmsfs.cli.common import CliError
from kmsfs.cli.parser import _command_names, build_parser
from kmsfs.keyclient import CA_BUNDLE_ENV


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


if __name__ == "__main__":
    sys.exit(main())
