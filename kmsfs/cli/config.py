"""``kmsfs config set-endpoint``: record a moved key service, after checking that the
cipherdir's key answers there."""

from __future__ import annotations

import argparse
import dataclasses
import secrets
import sys

from kmsfs.cli.common import CliError, _credentials, _origin, _valid_endpoint
from kmsfs.config import Config, ConfigError
from kmsfs.format import FILE_ID_SIZE, encryption_context
from kmsfs.keyclient import KeyClient, KeyServiceError, KeyServiceUnavailable


def cmd_config_set_endpoint(args: argparse.Namespace) -> int:
    """Record a moved key service in the cipherdir, after checking the cipherdir's key is there."""
    cipherdir = args.cipherdir
    try:
        config = Config.load(cipherdir)
    except ConfigError as exc:
        raise CliError(str(exc)) from None
    url = _valid_endpoint(args.url)
    creds = _credentials(args)
    client = KeyClient(url, config.region, creds)
    try:
        arn = _key_arn_at(client, config)
    except KeyServiceUnavailable as exc:
        raise CliError(str(exc)) from None
    finally:
        client.close()
    if arn != config.key_arn:
        raise CliError(f"the key service at {url} answers for {arn}, not the cipherdir's key "
                       f"{config.key_arn}: not the same service; nothing changed")
    path = dataclasses.replace(config, endpoint=url).save(cipherdir)
    print(f"{path}: endpoint {config.endpoint} -> {url}")
    if creds.endpoint and _origin(creds.endpoint) != _origin(url):
        print(f"kmsfs: note: {creds.source or 'the credentials'} still name {creds.endpoint}: update "
              "it, or mounts with it will refuse the mismatch", file=sys.stderr)
    return 0


def _key_arn_at(client: KeyClient, config: Config) -> str:
    """The ARN the service at ``client`` gives the cipherdir's key (DescribeKey, else a probe
    GenerateDataKey for a usage-only principal)."""
    try:
        return str(client.describe_key(config.key_arn).get("Arn"))
    except KeyServiceError as exc:
        if exc.code != "AccessDeniedException":
            raise CliError(f"the key service at {client.url} refused the key {config.key_arn}: "
                           f"{exc}") from None
    try:
        _, _, arn = client.generate_data_key(
            config.key_arn, encryption_context(secrets.token_bytes(FILE_ID_SIZE)),
            {"tool": "kmsfs config", "process": "kmsfs", "op": "probe"})
    except KeyServiceError as exc:
        raise CliError(f"cannot check the key {config.key_arn} at {client.url}: {exc}") from None
    return arn
