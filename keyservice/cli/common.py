"""What every ``keyservice`` subcommand module shares: the one-line error, the root key source.

Both ``main`` and the subcommand modules (``audit``, ``principal``) import this module; it
imports none of them.
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys

from keyservice.store import rootkey


class CliError(Exception):
    """A user-facing failure: printed as one line, exit status 1."""


def root_source(args: argparse.Namespace, *, confirm: bool) -> rootkey.RootKeySource:
    """The root key source of a non-dev store: a key file, the passphrase variable, or a prompt."""
    if args.root_key_file:
        return rootkey.RootKeySource.from_key_file(args.root_key_file)
    if os.environ.get(rootkey.PASSPHRASE_ENV):
        return rootkey.RootKeySource.from_env()
    if not sys.stdin.isatty():
        raise CliError(
            f"no root key: pass --root-key-file FILE or set {rootkey.PASSPHRASE_ENV} (or run on a terminal)"
        )
    passphrase = getpass.getpass("Root passphrase: ")
    if confirm and getpass.getpass("Repeat root passphrase: ") != passphrase:
        raise CliError("the passphrases differ")
    return rootkey.RootKeySource.from_passphrase(passphrase)
