"""``kmsfs rewrap``: re-wrap every data key under the newest key version or ``--to-key``."""

from __future__ import annotations

import argparse
import sys

from kmsfs import mountlock
from kmsfs.cli.common import CliError, _tool_client, _tool_names
from kmsfs.keyclient import KeyServiceError, KeyServiceUnavailable


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
