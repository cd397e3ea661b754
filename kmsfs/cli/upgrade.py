"""``kmsfs upgrade``: convert format-1/2 files to format 3 (in-file header copy)."""

from __future__ import annotations

import argparse

from kmsfs.cli.common import CliError, _tool_client
from kmsfs.keyclient import KeyServiceUnavailable


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
