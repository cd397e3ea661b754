"""The signed digest over every audit chain's head (docs/AUDIT.md, "Several writers").

Each chain seals itself with signed checkpoints and mirrors its newest one in its head file, so
cutting a chain's tail past a checkpoint is detected. But with several chains (one per worker)
a whole chain — its directory and its head file — could be deleted or rolled back together,
and nothing in the other chains would notice. So, like CloudTrail's hourly digest files that
chain the log files, a *digest* line is appended every ``DEFAULT_CHECKPOINT_SECONDS`` (and at
clean shutdown) to ``DATA_DIR/audit-digests.log`` (outside ``audit/``) by one writer per data
directory (the serving process, or the parent of ``--workers``): it names every chain's newest
checkpoint (seq and line hash), chains to the previous digest and is signed with the audit key.

``verify_digests`` checks the digest chain and its signatures, then that every chain a digest
ever named still exists and still holds the checkpoint the newest digest recorded for it.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from keyservice.audit.records import (
    DEFAULT_CHECKPOINT_SECONDS,
    audit_path,
    chains,
    encode_line,
    format_time,
    head_path,
    is_checkpoint,
    line_hash,
    read_lines,
)

log = logging.getLogger(__name__)

DIGEST_FILE = "audit-digests.log"
DIGEST_TYPE = "digest"
_DOMAIN = b"kmsfs-audit-digest-v1\n"


def digest_path(data_dir: Path) -> Path:
    return Path(data_dir) / DIGEST_FILE


def _signed_bytes(digest: dict[str, Any]) -> bytes:
    body = {k: v for k, v in digest.items() if k != "signature"}
    return _DOMAIN + json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def _heads(data_dir: Path) -> dict[str, dict[str, Any]]:
    heads: dict[str, dict[str, Any]] = {}
    for chain in chains(data_dir):
        try:
            line = head_path(data_dir, chain).read_bytes().rstrip(b"\n")
            head = json.loads(line)
        except (OSError, ValueError):
            continue  # no checkpoint yet: nothing to vouch for
        heads[chain] = {"seq": head.get("seq"), "hash": line_hash(line), "records": head.get("records")}
    return heads


def _last(data_dir: Path) -> tuple[dict[str, Any] | None, str | None]:
    last, last_hash = None, None
    for line in read_lines(digest_path(data_dir)):
        try:
            last, last_hash = json.loads(line), line_hash(line)
        except ValueError:
            continue
    return last, last_hash


def write_digest(data_dir: Path, signer: Ed25519PrivateKey, now: datetime | None = None) -> dict[str, Any]:
    """Append one signed digest of every chain's head; returns it."""
    previous, previous_hash = _last(data_dir)
    digest: dict[str, Any] = {
        "type": DIGEST_TYPE,
        "version": 1,
        "seq": (previous or {}).get("seq", 0) + 1,
        "time": format_time(now or datetime.now(UTC)),
        "chains": _heads(data_dir),
        "previous_digest": previous_hash,
    }
    digest["signature"] = base64.b64encode(signer.sign(_signed_bytes(digest))).decode()
    fd = os.open(digest_path(data_dir), os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, encode_line(digest) + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    return digest


def _has_checkpoint(data_dir: Path, chain: str, seq: int, wanted: str) -> bool:
    for line in read_lines(audit_path(data_dir, chain)):
        if b'"checkpoint"' not in line:
            continue
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if is_checkpoint(record) and record.get("seq") == seq:
            return line_hash(line) == wanted
    return False


def verify_digests(data_dir: Path, public_key: Ed25519PublicKey) -> tuple[int, list[str]]:
    """(digests read, problems): the digest chain, its signatures, and every chain it named."""
    problems: list[str] = []
    previous_hash = None
    count = 0
    named: set[str] = set()
    last: dict[str, Any] | None = None
    for number, line in enumerate(read_lines(digest_path(data_dir)), start=1):
        try:
            digest = json.loads(line)
            public_key.verify(base64.b64decode(str(digest.get("signature", ""))), _signed_bytes(digest))
        except (ValueError, InvalidSignature, AttributeError):
            return count, [
                f"{DIGEST_FILE} line {number}: bad digest (damaged, forged or signed by another key)"
            ]
        if digest.get("previous_digest") != previous_hash:
            return count, [
                f"{DIGEST_FILE} line {number}: digest chain broken (a digest removed or reordered)"
            ]
        previous_hash, last, count = line_hash(line), digest, count + 1
        named |= set(digest.get("chains") or {})
    if last is None:
        return 0, []
    heads = last.get("chains") or {}
    present = set(chains(data_dir))
    for chain in sorted(named):
        if chain not in heads:
            problems.append(f"chain {chain}: named by an earlier digest, missing from the newest")
        elif chain not in present:
            problems.append(f"chain {chain}: removed (digest #{last.get('seq')} recorded it)")
        elif not _has_checkpoint(data_dir, chain, heads[chain].get("seq"), heads[chain].get("hash")):
            problems.append(
                f"chain {chain}: cut or rolled back (checkpoint #{heads[chain].get('seq')} recorded by "
                f"digest #{last.get('seq')} is missing)"
            )
    return count, problems


class DigestWriter:
    """Writes a digest every ``interval`` seconds on a daemon thread, and one more at ``stop``."""

    def __init__(
        self,
        data_dir: Path,
        signer: Ed25519PrivateKey,
        *,
        interval: float = DEFAULT_CHECKPOINT_SECONDS,
        now: Callable[[], datetime] | None = None,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.signer = signer
        self.interval = interval
        self._now = now
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="audit-digest", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _write(self) -> None:
        try:
            write_digest(self.data_dir, self.signer, self._now() if self._now else None)
        except OSError as error:
            log.error("cannot write the audit digest: %s", error)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._write()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5.0)
        self._write()
