"""``keyservice principal``: create, list, delete, rotate-access-key, attach-policy, detach-policy.

Offline on the data directory, server running or not (see ``principals.py``). Every command but
``list`` needs the root key, obtained as ``serve`` does: ``--root-key-file``, or
KEYSERVICE_ROOT_PASSPHRASE (or a prompt); a dev data directory uses its own dev root key.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from keyservice import bootstrap, principals
from keyservice.cli.common import root_source
from keyservice.store import rootkey


def _root_key(args: argparse.Namespace) -> bytes:
    data_dir = Path(args.data_dir)
    if rootkey.root_source_kind(data_dir) == "dev":
        return rootkey.load_root_key(data_dir, rootkey.RootKeySource.dev())
    return rootkey.load_root_key(data_dir, root_source(args, confirm=False))


def _print_credentials(args: argparse.Namespace, creds: bootstrap.Credentials) -> None:
    if args.json:
        print(json.dumps(creds.as_dict(), sort_keys=True))
        return
    print(f"Principal {creds.principal_arn}")
    print("Access key (the secret is shown once; keep it safe):")
    print(f"  access_key_id:     {creds.access_key_id}")
    print(f"  secret_access_key: {creds.secret_access_key}")


def cmd_create(args: argparse.Namespace) -> int:
    _print_credentials(args, principals.create(Path(args.data_dir), _root_key(args), args.name))
    return 0


def cmd_rotate(args: argparse.Namespace) -> int:
    _print_credentials(args, principals.rotate_access_key(Path(args.data_dir), _root_key(args), args.name))
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    rows = principals.list_all(Path(args.data_dir))
    if args.json:
        for row in rows:
            print(json.dumps({
                "name": row.name, "arn": row.arn, "access_key_ids": list(row.access_key_ids),
                "policies": list(row.policies), "creation_date": row.creation_date,
            }, sort_keys=True))  # fmt: skip
        return 0
    for row in rows:
        keys = ",".join(row.access_key_ids) or "-"
        print(f"{row.name}\t{row.arn}\tkeys={keys}\tpolicies={','.join(row.policies) or '-'}")
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    principals.delete(Path(args.data_dir), _root_key(args), args.name)
    print(f"deleted principal {args.name}")
    return 0


def cmd_attach(args: argparse.Namespace) -> int:
    path = Path(args.policy_file)
    try:
        document = path.read_text()
    except OSError as error:
        raise principals.PrincipalError(f"cannot read {path}: {error.strerror}") from None
    name = args.policy_name or path.stem
    principals.attach_policy(Path(args.data_dir), _root_key(args), args.name, name, document)
    print(f"attached policy {name} to {args.name}")
    return 0


def cmd_detach(args: argparse.Namespace) -> int:
    principals.detach_policy(Path(args.data_dir), _root_key(args), args.name, args.policy_name)
    print(f"detached policy {args.policy_name} from {args.name}")
    return 0


def _guarded(func):  # noqa: ANN001, ANN202 - wraps a command
    """Report principal errors as one line with exit status 1, like the rest of the CLI."""

    def run(args: argparse.Namespace) -> int:
        try:
            return int(func(args))
        except (principals.PrincipalError, bootstrap.NotInitializedError) as error:
            print(f"keyservice: {error}", file=sys.stderr)
            return 1

    return run


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the ``principal`` command group to the top-level parser."""
    parser = sub.add_parser(
        "principal", help="manage principals, access keys and identity policies (offline)"
    )
    commands = parser.add_subparsers(dest="principal_command", required=True)

    def command(name: str, func, text: str, *, root: bool = True) -> argparse.ArgumentParser:  # noqa: ANN001
        p = commands.add_parser(name, help=text)
        p.add_argument("--data-dir", required=True, help="the key service's data directory (required)")
        if root:
            p.add_argument("--root-key-file", metavar="FILE",
                           help="root key file, for non-dev data dirs (default: a dev data dir's own "
                                f"key, else {rootkey.PASSPHRASE_ENV} or a prompt)")
        p.set_defaults(func=_guarded(func))
        return p

    p = command("create", cmd_create, "create a principal and print its access key (once)")
    p.add_argument("name")
    p.add_argument("--json", action="store_true", help="print the credentials as JSON (default: text)")
    p = command("list", cmd_list, "list principals, their access key ids and policies", root=False)
    p.add_argument("--json", action="store_true", help="one JSON object per line (default: a table)")
    p = command("delete", cmd_delete, "delete a principal with its access keys and policies")
    p.add_argument("name")
    p = command("rotate-access-key", cmd_rotate, "new access key; the old ones stop working")
    p.add_argument("name")
    p.add_argument("--json", action="store_true", help="print the credentials as JSON (default: text)")
    p = command("attach-policy", cmd_attach, "attach (or replace) an identity policy")
    p.add_argument("name")
    p.add_argument("--policy-file", required=True, metavar="FILE",
                   help="IAM policy JSON (no Principal) (required)")
    p.add_argument("--name", dest="policy_name", help="policy name (default: the file name without suffix)")
    p = command("detach-policy", cmd_detach, "detach an identity policy")
    p.add_argument("name")
    p.add_argument("--name", dest="policy_name", required=True, help="policy name (required)")
