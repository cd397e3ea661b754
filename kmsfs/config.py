"""The cipherdir configuration, ``CIPHERDIR/.kmsfs.json``: where the key service is and which key.

Nothing here is secret (no credentials, no key material), so it can live beside the ciphertext.
Names starting with ``.kmsfs`` in the cipherdir root are reserved and hidden from the mount.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

CONFIG_NAME = ".kmsfs.json"
RESERVED_PREFIX = ".kmsfs"
CONFIG_VERSION = 1


class ConfigError(Exception):
    """The cipherdir has no usable configuration."""


@dataclass(frozen=True)
class Config:
    endpoint: str
    region: str
    key_id: str
    key_arn: str
    version: int = CONFIG_VERSION

    def save(self, cipherdir: str | os.PathLike[str]) -> Path:
        path = Path(cipherdir) / CONFIG_NAME
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2, sort_keys=True) + "\n")
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
        if not isinstance(data, dict) or data.get("version") != CONFIG_VERSION:
            raise ConfigError(f"{path}: unsupported configuration version")
        try:
            return cls(endpoint=str(data["endpoint"]), region=str(data["region"]),
                       key_id=str(data["key_id"]), key_arn=str(data["key_arn"]))
        except KeyError as exc:
            raise ConfigError(f"{path}: missing field {exc}") from None
