"""``kmsfs init``: check everything first (endpoint, credentials, target, key), then create the
cipherdir, its name key and root directory id, so that a failed init leaves nothing behind."""

from __future__ import annotations

import argparse
import base64
import contextlib
import dataclasses
import os
import secrets
from pathlib import Path

from kmsfs.cli.common import CliError, _credentials, _origin, _valid_endpoint
from kmsfs.config import CONFIG_NAME, DIRKEYS_CONFIG_VERSION, NAMES_AES_SIV, NAMES_CONFIG_VERSION, Config
from kmsfs.keyclient import DEFAULT_REGION, Credentials, KeyClient, KeyServiceError, KeyServiceUnavailable
from kmsfs.names import DIRID_FILE, DIRKEY_FILE, NAME_KEY_SIZE, NameCipher


def _new_dirs(path: Path) -> list[Path]:
    """The directories ``mkdir -p path`` would create, outermost first; CliError if it cannot."""
    missing: list[Path] = []
    probe = path.absolute()
    while not probe.exists():
        if probe.is_symlink():
            raise CliError(f"cannot create {path}: {probe} is a dangling symlink")
        missing.append(probe)
        probe = probe.parent
    if not probe.is_dir():
        raise CliError(f"cannot create {path}: {probe} is not a directory")
    return missing[::-1]


def _check_init_target(cipherdir: Path, force: bool) -> list[Path]:
    """Refuse a cipherdir that is in use or not a directory; the directories init must create."""
    if cipherdir.exists() and not cipherdir.is_dir():
        raise CliError(f"{cipherdir} exists and is not a directory")
    if not cipherdir.exists():
        return _new_dirs(cipherdir)
    if (cipherdir / CONFIG_NAME).exists() and not force:
        raise CliError(f"{cipherdir} is already initialised ({CONFIG_NAME} exists; --force replaces it)")
    if any(not p.name.startswith(".kmsfs") for p in cipherdir.iterdir()) and not force:
        raise CliError(f"{cipherdir} is not empty (a cipherdir starts empty)")
    if not os.access(cipherdir, os.W_OK | os.X_OK):
        raise CliError(f"{cipherdir}: not writable")
    return []


def cmd_init(args: argparse.Namespace) -> int:
    """Check everything first (endpoint, credentials, target, key), then create: a failed init
    leaves nothing behind."""
    cipherdir = Path(args.cipherdir)
    creds = _credentials(args)
    endpoint = args.endpoint or creds.endpoint
    if not endpoint:
        raise CliError("no endpoint: pass --endpoint URL (or name one in the credentials)")
    _valid_endpoint(endpoint)
    if args.endpoint and creds.endpoint and _origin(args.endpoint) != _origin(creds.endpoint):
        raise CliError(f"--endpoint {args.endpoint} differs from {creds.endpoint} named by "
                       f"{creds.source or 'the credentials'}: one key service, one endpoint; fix "
                       "the credentials (its \"endpoint\") or drop --endpoint")
    region = args.region or creds.region or DEFAULT_REGION
    if args.directory_keys and args.plaintext_names:
        raise CliError("--directory-keys needs encrypted names (each directory's key is bound to its "
                       "directory id): drop --plaintext-names")
    to_create = _check_init_target(cipherdir, args.force)
    client = KeyClient(endpoint, region, creds)
    try:
        meta = client.describe_key(args.key)
    except KeyServiceError as exc:
        raise CliError(f"key {args.key!r} refused by the key service: {exc}") from None
    except KeyServiceUnavailable as exc:
        raise CliError(str(exc)) from None
    finally:
        client.close()
    if meta.get("Enabled") is False or meta.get("KeyState", "Enabled") != "Enabled":
        raise CliError(f"key {args.key!r} is not enabled (state {meta.get('KeyState')})")
    arn = str(meta.get("Arn") or meta.get("KeyId"))
    config = Config(endpoint=endpoint, region=region, key_id=args.key, key_arn=arn)
    name_key = None
    if not args.plaintext_names:
        config, name_key = _new_name_key(endpoint, region, creds, config)
    if args.directory_keys:
        config = dataclasses.replace(config, version=DIRKEYS_CONFIG_VERSION, directory_keys=True,
                                     open_reports=_probe_reports(endpoint, region, creds, config))
    try:
        for directory in to_create:
            directory.mkdir()
        if name_key is not None:
            _write_root_dir_id(cipherdir, name_key)
        path = config.save(cipherdir)
    except OSError as exc:
        with contextlib.suppress(OSError):
            (cipherdir / DIRID_FILE).unlink()
        for directory in reversed(to_create):
            with contextlib.suppress(OSError):
                directory.rmdir()
        raise CliError(f"cannot initialise {cipherdir}: {exc.strerror or exc}") from None
    names = "plaintext names" if name_key is None else "encrypted names"
    if config.directory_keys:
        names += ", directory keys"
    print(f"initialised {cipherdir} with key {arn}, {names} (config {path})")
    if config.directory_keys and not config.open_reports:
        print("note: the key service does not take open reports (KmsfsReportAccess: AWS KMS, moto and "
              "other KMS services lack this kmsfs extension); with directory keys its audit will then "
              "show one Decrypt per directory-key unwrap only, not every open and create")
    _note_xattr_support(cipherdir)
    return 0


def _new_name_key(endpoint: str, region: str, creds: Credentials, config: Config
                  ) -> tuple[Config, NameCipher]:
    """A name key for a new cipherdir: GenerateDataKey with an encryption context naming its
    purpose and a fresh cipherdir id; only the wrapped key is kept (in the config)."""
    cipherdir_id = secrets.token_hex(16)
    config = dataclasses.replace(config, version=NAMES_CONFIG_VERSION, names=NAMES_AES_SIV,
                                 cipherdir_id=cipherdir_id)
    client = KeyClient(endpoint, region, creds)
    try:
        key, blob, _ = client.generate_data_key(
            config.key_arn, config.name_key_context(),
            {"tool": "kmsfs init", "process": "kmsfs", "op": "names", "pid": os.getpid(),
             "uid": os.getuid(), "path": "/"})
    except KeyServiceError as exc:
        raise CliError(f"the key service refused a name key for {config.key_arn}: {exc} "
                       "(--plaintext-names makes a cipherdir without one)") from None
    except KeyServiceUnavailable as exc:
        raise CliError(str(exc)) from None
    finally:
        client.close()
    if len(key) != NAME_KEY_SIZE:
        raise CliError("the key service returned a name key of the wrong size")
    return (dataclasses.replace(config, name_key=base64.b64encode(blob).decode("ascii")),
            NameCipher(key))


def _probe_reports(endpoint: str, region: str, creds: Credentials, config: Config) -> bool:
    """Does the key service take open reports (an empty KmsfsReportAccess with the key)?"""
    client = KeyClient(endpoint, region, creds)
    try:
        client.report_access(config.key_arn, config.cipherdir_id, [])
    except KeyServiceError as exc:
        if exc.is_access_denied:
            raise CliError(f"the key service refused open reports for {config.key_arn}: {exc} (the "
                           "credentials must be allowed kms:Decrypt on the key)") from None
        return False  # UnknownOperationException and the like: no extension
    except KeyServiceUnavailable:
        return False  # it answered DescribeKey just now: a 5xx or odd reply means no extension
    finally:
        client.close()
    return True


def _write_root_dir_id(cipherdir: Path, cipher: NameCipher) -> None:
    """The root's ``kmsfs.dirid`` (replaced on ``init --force``: old names become unreadable, and
    a directory key of the old id goes too)."""
    target = cipherdir / DIRID_FILE
    for old in (target, cipherdir / DIRKEY_FILE):
        with contextlib.suppress(FileNotFoundError):
            old.unlink()
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o444)
    try:
        os.write(fd, cipher.dirid_file(cipher.new_dir_id()))
    finally:
        os.close(fd)


def _note_xattr_support(cipherdir: Path) -> None:
    """Say so when the cipherdir's filesystem keeps no user xattrs (vfat, exfat, some NFS/FUSE)."""
    from kmsfs.headers import xattrs_supported

    if not xattrs_supported(str(cipherdir)):
        print(f"note: the filesystem of {cipherdir} does not keep user xattrs; kmsfs will use the "
              "header copies inside the files only (format 3 needs nothing else)")
