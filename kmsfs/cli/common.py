"""What the ``kmsfs`` commands share: the one-line error (``CliError``), exit codes and their
printing, credentials, the endpoint a command may talk to, and the key client built from them.

Why the endpoint check lives here: every command that reaches the key service goes through
``_build``, so a cipherdir whose recorded endpoint was edited (it lies in untrusted storage) cannot
redirect any of them.
"""

from __future__ import annotations

import argparse
import os
import sys
from urllib.parse import urlsplit

from kmsfs.config import Config, ConfigError
from kmsfs.keyclient import CA_BUNDLE_ENV, Credentials, KeyClient, check_endpoint, load_credentials
from kmsfs.names import NameCipher

# Exit statuses (docs/CLI.md, "Exit codes"): a command returns 0 or 1 itself; a CliError or an
# operator's OSError is 1, a usage error 2, Ctrl-C 130.
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
# Bound on one key service request (connect and read): new opens fail with EIO after at most this.
DEFAULT_KMS_TIMEOUT = 5.0


class CliError(Exception):
    """A user-facing failure: printed as one line, exit status 1."""


def run_command(args: argparse.Namespace) -> int:
    """Run the parsed command; every failure an operator can cause is one line on stderr and a
    documented exit status, never a traceback."""
    if getattr(args, "ca_bundle", None):
        if not os.path.isfile(args.ca_bundle):
            print(f"kmsfs: --ca-bundle {args.ca_bundle}: no such file", file=sys.stderr)
            return EXIT_FAILED
        os.environ[CA_BUNDLE_ENV] = os.path.abspath(args.ca_bundle)
    try:
        return args.func(args)
    except CliError as exc:
        print(f"kmsfs: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except OSError as exc:  # an operator's path that is not what it should be: one line, never a traceback
        where = f": {exc.filename}" if exc.filename else ""
        print(f"kmsfs: {exc.strerror or exc}{where}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


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


def _tool_client(cipherdir: str, args: argparse.Namespace) -> tuple[Config, KeyClient]:
    config, client = _build(cipherdir, args)
    return config, client


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
