"""``kmsfs path encrypt|decrypt``: map one path between the filesystem and the backing
directory through the name key (audited)."""

from __future__ import annotations

import argparse

from kmsfs.cli.common import CliError, _tool_client, _tool_names


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
