"""The cipherdir configuration, ``CIPHERDIR/.kmsfs.json``: where the key service is and which key.

Nothing here is secret (no credentials, no key material: the name key is stored *wrapped* by
the key service), so it can live beside the ciphertext. Names starting with ``.kmsfs`` in the
cipherdir root are reserved and hidden from the mount.

Versions: 3 = version 2 plus ``directory_keys`` (true) and ``open_reports`` (whether the key
service took KmsfsReportAccess at init), docs/FORMAT.md "Version 4".
1 = plaintext names (the original layout; ``init --plaintext-names`` still writes it, so
older kmsfs releases keep mounting such cipherdirs). 2 = encrypted names: adds ``names``
("aes-siv"), ``cipherdir_id`` (32 hex digits, part of the name key's encryption context) and
``name_key`` (the wrapped name key, base64). A release that only knows version 1 refuses a
version 2 cipherdir instead of showing its encrypted names as garbage.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

CONFIG_NAME = ".kmsfs.json"
RESERVED_PREFIX = ".kmsfs"
CONFIG_VERSION = 1  # plaintext names
NAMES_CONFIG_VERSION = 2  # encrypted names
DIRKEYS_CONFIG_VERSION = 3  # encrypted names and directory keys
NAMES_PLAINTEXT = "plaintext"
NAMES_AES_SIV = "aes-siv"


class ConfigError(Exception):
    """The cipherdir has no usable configuration."""


@dataclass(frozen=True)
class Config:
    endpoint: str
    region: str
    key_id: str
    key_arn: str
    version: int = CONFIG_VERSION
    names: str = NAMES_PLAINTEXT
    cipherdir_id: str = ""
    name_key: str = ""  # base64 of the wrapped name key (CiphertextBlob)
    # Version 3: files' data keys are wrapped under directory keys (kmsfs/dirkeys.py), and whether
    # the key service took open reports (KmsfsReportAccess) when the cipherdir was made.
    directory_keys: bool = False
    open_reports: bool = False

    @property
    def encrypted_names(self) -> bool:
        return self.names == NAMES_AES_SIV

    @property
    def wrapped_name_key(self) -> bytes:
        return base64.b64decode(self.name_key)

    def name_key_context(self) -> dict[str, str]:
        """The encryption context the name key is wrapped under (docs/FORMAT.md)."""
        return {"kmsfs:purpose": "names", "kmsfs:cipherdir": self.cipherdir_id}

    def save(self, cipherdir: str | os.PathLike[str]) -> Path:
        path = Path(cipherdir) / CONFIG_NAME
        tmp = path.with_suffix(".tmp")
        data = asdict(self)
        if not self.encrypted_names:  # version 1: exactly the original layout
            for key in ("names", "cipherdir_id", "name_key"):
                del data[key]
        if not self.directory_keys:  # versions 1 and 2: exactly their layouts
            for key in ("directory_keys", "open_reports"):
                del data[key]
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, cipherdir: str | os.PathLike[str]) -> Config:
        path = Path(cipherdir) / CONFIG_NAME
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{cipherdir} is not a kmsfs cipherdir (no {CONFIG_NAME}); "
                              "run 'kmsfs init' first") from None
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read {path}: {exc}") from exc
        version = data.get("version") if isinstance(data, dict) else None
        if version not in (CONFIG_VERSION, NAMES_CONFIG_VERSION, DIRKEYS_CONFIG_VERSION):
            raise ConfigError(f"{path}: unsupported configuration version")
        try:
            config = cls(endpoint=str(data["endpoint"]), region=str(data["region"]),
                         key_id=str(data["key_id"]), key_arn=str(data["key_arn"]), version=version)
            if version >= NAMES_CONFIG_VERSION:
                config = cls(**{**asdict(config), "names": str(data["names"]),
                                "cipherdir_id": str(data["cipherdir_id"]),
                                "name_key": str(data["name_key"])})
            if version == DIRKEYS_CONFIG_VERSION:
                if data["directory_keys"] is not True or not isinstance(data["open_reports"], bool):
                    raise ConfigError(f"{path}: bad directory_keys / open_reports")
                config = cls(**{**asdict(config), "directory_keys": True,
                                "open_reports": data["open_reports"]})
        except KeyError as exc:
            raise ConfigError(f"{path}: missing field {exc}") from None
        if version >= NAMES_CONFIG_VERSION:
            if config.names != NAMES_AES_SIV:
                raise ConfigError(f"{path}: unknown name encryption {config.names!r}")
            try:
                bytes.fromhex(config.cipherdir_id)
                config.wrapped_name_key  # noqa: B018 - validates the base64
            except (ValueError, binascii.Error):
                raise ConfigError(f"{path}: damaged name key or cipherdir id") from None
        return config
