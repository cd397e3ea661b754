"""The audit record format: fields, encoding, the hash chain's line hash, and reading lines back.

The one module that knows how a line of ``DATA_DIR/audit/audit.log`` is built and parsed
(docs/AUDIT.md). Records never hold plaintext, key material, data keys, secrets or ciphertext
blobs: the service builds them only from the fields of ``build_record``.
"""


from __future__ import annotations

import hashlib
import heapq
import json
import re
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from keyservice.context import RequestContext
from keyservice.errors import KMSError

RECORD_VERSION = 1
AUDIT_DIR = "audit"
AUDIT_FILE = "audit.log"
HEAD_FILE = "audit-head.json"
CHECKPOINT_TYPE = "checkpoint"
CHECKPOINT_VERSION = 1
DEFAULT_CHECKPOINT_EVERY = 100
DEFAULT_CHECKPOINT_SECONDS = 60.0
GENESIS_HASH = "0" * 64

OUTCOME_SUCCESS = "success"
OUTCOME_ERROR = "error"

FIELDS = (
    "version",
    "time",
    "request_id",
    "operation",
    "outcome",
    "error_code",
    "error_message",
    "principal",
    "access_key_id",
    "key_id",
    "key_version",
    "requested_key_id",
    "alias_name",
    "encryption_context",
    "source_address",
    "user_agent",
    "caller",
    "prev_hash",
)


# The chain of a single-process service; ``serve --workers N`` writes one chain per worker
# (``<node>:w<i>``), each in its own directory under audit/ (docs/AUDIT.md, "Several writers").
MAIN_CHAIN = "main"
_CHAIN_ID = re.compile(r"^[A-Za-z0-9._:-]{1,100}$")
_CHAIN_SEGMENT = "0000000001.log"


def check_chain_id(chain: str) -> str:
    if not _CHAIN_ID.match(chain) or chain in (".", ".."):
        raise ValueError(f"invalid audit chain id {chain[:100]!r} (1-100 of A-Z a-z 0-9 . _ : -)")
    return chain


def audit_path(data_dir: Path, chain: str = MAIN_CHAIN) -> Path:
    if chain == MAIN_CHAIN:
        return Path(data_dir) / AUDIT_DIR / AUDIT_FILE
    return Path(data_dir) / AUDIT_DIR / check_chain_id(chain) / _CHAIN_SEGMENT


def head_path(data_dir: Path, chain: str = MAIN_CHAIN) -> Path:
    """Where the newest checkpoint of ``chain`` is kept, outside the log directory."""
    if chain == MAIN_CHAIN:
        return Path(data_dir) / HEAD_FILE
    return Path(data_dir) / f"audit-head.{check_chain_id(chain)}.json"


def chains(data_dir: Path) -> list[str]:
    """Every chain with a log in ``data_dir``: ``main`` (if its log exists), then the others by name."""
    audit_dir = Path(data_dir) / AUDIT_DIR
    found = [MAIN_CHAIN] if (audit_dir / AUDIT_FILE).exists() else []
    if audit_dir.is_dir():
        found += sorted(
            p.name
            for p in audit_dir.iterdir()
            if p.is_dir() and _CHAIN_ID.match(p.name) and p.name != MAIN_CHAIN
        )
    return found


def format_time(when: datetime) -> str:
    """RFC 3339 UTC with milliseconds, e.g. ``2026-01-01T12:00:00.123Z``."""
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{when.microsecond // 1000:03d}Z"


def build_record(
    *,
    when: datetime,
    ctx: RequestContext,
    operation: str,
    error: KMSError | None = None,
    key_arn: str | None = None,
    key_version: int | None = None,
    requested_key_id: str | None = None,
    alias_name: str | None = None,
    encryption_context: Mapping[str, str] | None = None,
    claimed_access_key_id: str | None = None,
) -> dict[str, Any]:
    """The audit record of one request (without ``prev_hash``, which ``append`` adds).

    ``claimed_access_key_id`` is the access key id a refused request claimed (unknown key, bad
    signature); it is recorded when there is no authenticated principal.
    """
    principal = ctx.principal
    return {
        "version": RECORD_VERSION,
        "time": format_time(when),
        "request_id": ctx.request_id,
        "operation": operation,
        "outcome": OUTCOME_SUCCESS if error is None else OUTCOME_ERROR,
        "error_code": None if error is None else error.aws_type,
        "error_message": None if error is None else error.message,
        "principal": principal.arn if principal else None,
        "access_key_id": principal.access_key_id if principal else claimed_access_key_id,
        "key_id": key_arn,
        "key_version": key_version,
        "requested_key_id": requested_key_id,
        "alias_name": alias_name,
        "encryption_context": dict(encryption_context) if encryption_context is not None else None,
        "source_address": ctx.source_address,
        "user_agent": ctx.user_agent,
        "caller": dict(ctx.caller) if ctx.caller else None,
    }


def line_hash(line: bytes) -> str:
    return hashlib.sha256(line).hexdigest()


def encode_line(body: Mapping[str, Any]) -> bytes:
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False, default=str).encode()


def signed_bytes(checkpoint: Mapping[str, Any]) -> bytes:
    """What a checkpoint signature covers: every field but the signature, canonically encoded."""
    body = {k: v for k, v in checkpoint.items() if k != "signature"}
    return b"kmsfs-audit-checkpoint-v1\n" + json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def key_fingerprint(public_key: Ed25519PublicKey) -> str:
    """SHA-256 of the raw public key, hex: what an operator pins and compares."""
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    return hashlib.sha256(public_key.public_bytes(Encoding.Raw, PublicFormat.Raw)).hexdigest()


def is_checkpoint(record: Mapping[str, Any]) -> bool:
    return record.get("type") == CHECKPOINT_TYPE



# --------------------------------------------------------------------------- reading


def read_lines(path: Path) -> Iterator[bytes]:
    """Complete lines only; a final line without its newline is still being written (or torn)."""
    try:
        f = path.open("rb")
    except FileNotFoundError:
        return
    with f:
        for raw in f:
            if raw.endswith(b"\n"):
                yield raw[:-1]


def read_records(data_dir: Path, unparsable: list[int] | None = None) -> Iterator[dict[str, Any]]:
    """Every well-formed request record of every chain, merged by time (each chain is in time
    order already; checkpoints skipped). Lines that are not a JSON object are skipped too, and
    their 1-based line numbers (in their chain's log) appended to ``unparsable`` if given
    (``audit list`` reports them; ``audit verify`` says what they break)."""
    streams = [_chain_records(data_dir, chain, unparsable) for chain in chains(data_dir)]
    if len(streams) == 1:
        yield from streams[0]
        return
    yield from heapq.merge(*streams, key=lambda record: str(record.get("time", "")))


def _chain_records(data_dir: Path, chain: str, unparsable: list[int] | None) -> Iterator[dict[str, Any]]:
    for number, line in enumerate(read_lines(audit_path(data_dir, chain)), 1):
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if not isinstance(record, dict):
            if unparsable is not None:
                unparsable.append(number)
            continue
        if not is_checkpoint(record):
            yield record
