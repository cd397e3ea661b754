"""``kmsfs info``: the header of a backing file, or of the file behind a mount path (no
secrets), with its plaintext path when the names are encrypted."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from collections.abc import Callable

from kmsfs.cli.common import CliError, _build, _tool_names
from kmsfs.config import CONFIG_NAME, Config, ConfigError
from kmsfs.format import FORMAT_V4, RESIZE_XATTR, CorruptHeader, directory_context


def cmd_info(args: argparse.Namespace) -> int:
    """Show the header of a backing file, or of the file behind a mount path (no secrets)."""
    from kmsfs.backing import backing_path_of
    from kmsfs.headers import plain_size_at, read_header

    path, plaintext = _info_paths(args, backing_path_of)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            header = read_header(fd, restore=False)
        finally:
            os.close(fd)
    except OSError as exc:
        raise CliError(f"{path}: no kmsfs header ({exc.strerror})") from None
    except CorruptHeader as exc:
        raise CliError(f"{path}: corrupt header: {exc}") from None
    info = {
        "path": path, **({"plaintext_path": plaintext} if plaintext else {}),
        "format_version": header.version, "block_size": header.block_size,
        "file_id": header.file_id.hex(), "key_arn": header.key_arn,
        "wrapped_key_bytes": len(header.wrapped_key),
        "wrapped_key_sha256": hashlib.sha256(header.wrapped_key).hexdigest(),
        "key_version": _blob_key_version(header.wrapped_key),
        "encryption_context": header.encryption_context(),
    }
    if header.version == FORMAT_V4:  # the data key is wrapped locally, under a directory key
        inner = header.directory_wrapped
        cipherdir = _cipherdir_of(path)
        info["key_version"] = _blob_key_version(inner.wrapped_dir_key)
        info["directory_id"] = inner.dir_id.hex()
        info["encryption_context"] = directory_context(
            Config.load(cipherdir).cipherdir_id if cipherdir else "?", inner.dir_id)
    info |= {
        "backing_size": os.path.getsize(path),
        "plaintext_size": plain_size_at(path, os.stat(path)),
    }
    try:
        info["size_change_pending"] = bool(os.getxattr(path, RESIZE_XATTR))
    except OSError:
        info["size_change_pending"] = False
    print(json.dumps(info, indent=2))
    return 0


def _cipherdir_of(path: str) -> str | None:
    """The cipherdir holding the backing path ``path`` (the nearest parent with a config)."""
    probe = os.path.dirname(os.path.abspath(path))
    while True:
        if os.path.isfile(os.path.join(probe, CONFIG_NAME)):
            return probe
        if probe == os.path.dirname(probe):
            return None
        probe = os.path.dirname(probe)


def _info_paths(args: argparse.Namespace, backing_path_of: Callable[[str], str]) -> tuple[str, str | None]:
    """(backing path, plaintext path or None) for ``kmsfs info PATH`` in a name-encrypting
    cipherdir. A mount path: the backing file is the one with the same inode number (the mount
    shows backing inode numbers; no key needed). A backing path: its name is decrypted through
    the key service (audited), when credentials are at hand; otherwise it is left out."""
    from kmsfs.names import BadName
    from kmsfs.namewalk import decrypt_path, find_inode

    mapped = backing_path_of(args.path)
    cipherdir = _cipherdir_of(mapped)
    if cipherdir is None:
        return mapped, None
    try:
        config = Config.load(cipherdir)
    except ConfigError:
        return mapped, None
    if not config.encrypted_names:
        return mapped, None
    root = os.path.realpath(cipherdir)
    if os.path.realpath(mapped) != os.path.realpath(args.path):  # a path inside a mount
        plain = "/" + os.path.relpath(os.path.realpath(mapped), root)
        found = find_inode(root, os.lstat(args.path).st_ino)
        if found is None:
            raise CliError(f"{args.path}: no backing file with its inode number in {cipherdir}")
        return found, "/" if plain == "/." else plain
    try:
        config, client = _build(cipherdir, args, quiet=True)
        try:
            cipher = _tool_names(config, client, "info", "/")
        finally:
            client.close()
    except CliError as exc:
        print(f"kmsfs: note: no plaintext path ({exc})", file=sys.stderr)
        return mapped, None
    assert cipher is not None
    try:
        return mapped, decrypt_path(cipherdir, cipher, os.path.realpath(mapped))
    except BadName:
        return mapped, "(name fails authentication)"


def _blob_key_version(blob: bytes) -> str | None:
    """The key version our key service names in its blob, if the blob says (None for others)."""
    try:
        from keyservice.envelope import parse_blob
    except ImportError:
        return None
    try:
        return str(parse_blob(blob).key_version)
    except Exception:  # noqa: BLE001 - informational only: another service's blob
        return None
