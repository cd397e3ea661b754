"""What every ``keyservice`` subcommand module shares: the one-line error, the root key source.

Both ``main`` and the subcommand modules (``audit``, ``principal``) import this module; it
imports none of them.
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys
from collections.abc import Callable
from typing import NoReturn

from keyservice.store import rootkey


class CliError(Exception):
    """A user-facing failure: printed as one line, exit status 1."""


class OneLineParser(argparse.ArgumentParser):
    """A usage error is one line naming the problem (and where the help is), exit status 2,
    instead of argparse's usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def root_source(args: argparse.Namespace, *, confirm: bool) -> rootkey.RootKeySource:
    """The root key source of a non-dev store: a key file, the passphrase variable, or a prompt."""
    if args.root_key_file:
        return rootkey.RootKeySource.from_key_file(args.root_key_file)
    passphrase_file = getattr(args, "root_passphrase_file", None)
    if passphrase_file:
        try:
            passphrase = open(passphrase_file, encoding="utf-8").read().rstrip("\r\n")
        except OSError as exc:
            raise CliError(f"cannot read the root passphrase file {passphrase_file}: "
                           f"{exc.strerror}") from None
        if not passphrase:
            raise CliError(f"the root passphrase file {passphrase_file} is empty")
        return rootkey.RootKeySource.from_passphrase(passphrase)
    if os.environ.get(rootkey.PASSPHRASE_ENV):
        return rootkey.RootKeySource.from_env()
    if not sys.stdin.isatty():
        raise CliError(
            f"no root key: pass --root-key-file FILE or --root-passphrase-file FILE, or set "
            f"{rootkey.PASSPHRASE_ENV} (or run on a terminal)"
        )
    passphrase = getpass.getpass("Root passphrase: ")
    if confirm and getpass.getpass("Repeat root passphrase: ") != passphrase:
        raise CliError("the passphrases differ")
    return rootkey.RootKeySource.from_passphrase(passphrase)


def run_command(func: Callable[[], int], errors: tuple[type[BaseException], ...] = ()) -> int:
    """Run a command: an operator's mistake (a ``CliError``, a bad root key, a bad value, one of
    ``errors``, an OS error) is one line on stderr and exit 1, never a traceback."""
    try:
        return int(func())
    except (CliError, rootkey.RootKeyError, ValueError, *errors) as error:
        print(f"keyservice: {error}", file=sys.stderr)
    except OSError as error:
        if isinstance(error, BrokenPipeError):
            return 0
        where = f": {error.filename}" if error.filename else ""
        print(f"keyservice: {error.strerror or error}{where}", file=sys.stderr)
    except KeyboardInterrupt:
        return 130
    return 1
