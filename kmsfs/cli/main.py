"""``kmsfs`` and ``mount.fuse.kmsfs`` entry points: translate the mount(8) helper form, parse,
run the command and turn its failure into one line and a documented exit code."""

from __future__ import annotations

import sys

from kmsfs import mount_helper
from kmsfs.cli.common import EXIT_USAGE, run_command
from kmsfs.cli.parser import _command_names, build_parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    try:
        argv = mount_helper.translate(argv, _command_names(parser)) or argv
    except mount_helper.HelperError as exc:
        print(f"kmsfs: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: 0 for --help/--version, 2 for a usage error
        return int(exc.code or 0)
    return run_command(args)


def mount_fuse_main() -> int:
    """Entry point of ``mount.fuse.kmsfs`` (mount(8)'s helper for type fuse.kmsfs; install it as
    /usr/sbin/mount.fuse.kmsfs): ``CIPHERDIR MOUNTPOINT [-o OPTIONS]`` only (kmsfs/mount_helper.py)."""
    argv = sys.argv[1:]
    try:
        translated = mount_helper.translate(argv, set()) if argv and not argv[0].startswith("-") else None
    except mount_helper.HelperError as exc:
        print(f"mount.fuse.kmsfs: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if translated is None:
        print("usage: mount.fuse.kmsfs CIPHERDIR MOUNTPOINT [-o OPTIONS]", file=sys.stderr)
        return EXIT_USAGE
    return main(translated)


if __name__ == "__main__":
    sys.exit(main())
