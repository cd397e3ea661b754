"""The audit record format: fields, encoding, the hash chain's line hash, and reading lines back.

The one module that knows how a line of the audit log (``DATA_DIR/audit/<chain>/*.log``) is built and parsed
(docs/AUDIT.md). Records never hold plaintext, key material, data keys, secrets or ciphertext
blobs: the service builds them only from the fields of ``build_record``.
"""


from __future__ import annotations

import hashlib
import heapq
import json
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from keyservice.audit import segments
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
# Written and made durable before a request changes the store (keyservice/write_ahead.py); the
# request's success or error record, with the same request_id, follows it.
OUTCOME_INTENT = "intent"

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
# (``<node>:w<i>``), each in its own directory under audit/ (docs/AUDIT.md, "On-disk layout").
MAIN_CHAIN = segments.DEFAULT_CHAIN
check_chain_id = segments.check_chain
chains = segments.chains


def audit_path(data_dir: Path, chain: str = MAIN_CHAIN) -> Path:
    """The open segment of ``chain`` (``segments`` knows the layout)."""
    return segments.current_segment(data_dir, chain)


def head_path(data_dir: Path, chain: str = MAIN_CHAIN) -> Path:
    """Where a chain's newest checkpoint is kept, outside the log directory."""
    if chain == MAIN_CHAIN:
        return Path(data_dir) / HEAD_FILE
    return Path(data_dir) / f"audit-head.{segments.check_chain(chain)}.json"


def chain_lines(data_dir: Path, chain: str = MAIN_CHAIN) -> Iterator[bytes]:
    """Every complete line of a chain, through all its segments, in order."""
    for line in segments.read_chain(data_dir, chain):
        yield line.data


# The text of the last second formatted, keyed by its exact fields: every record of one second
# shares it (strftime costs more than the rest of the record's time field).
_last_second: tuple[tuple[int, int, int, int, int, int], str] = ((0, 0, 0, 0, 0, 0), "")


def format_time(when: datetime) -> str:
    """RFC 3339 UTC with milliseconds, e.g. ``2026-01-01T12:00:00.123Z``."""
    global _last_second
    if when.tzinfo is not UTC:
        when = when.astimezone(UTC)
    second = (when.second, when.minute, when.hour, when.day, when.month, when.year)
    cached = _last_second  # one read: another thread may replace it, never half of it
    if cached[0] != second:
        cached = (second, when.strftime("%Y-%m-%dT%H:%M:%S."))
        _last_second = cached
    return f"{cached[1]}{when.microsecond // 1000:03d}Z"


def parse_time(text: object) -> datetime | None:
    """The time ``format_time`` wrote (a record's ``time``), or None if ``text`` is not one."""
    try:
        return datetime.fromisoformat(str(text).replace("Z", "+00:00"))
    except ValueError:
        return None


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
    intent: bool = False,
) -> dict[str, Any]:
    """The audit record of one request (without ``prev_hash``, which ``append`` adds).

    ``claimed_access_key_id`` is the access key id a refused request claimed (unknown key, bad
    signature); it is recorded when there is no authenticated principal. ``intent``: the record
    written before the request changes the store (outcome ``intent``), not its outcome.
    """
    principal = ctx.principal
    if intent:
        outcome = OUTCOME_INTENT
    else:
        outcome = OUTCOME_SUCCESS if error is None else OUTCOME_ERROR
    return {
        "version": RECORD_VERSION,
        "time": format_time(when),
        "request_id": ctx.request_id,
        "operation": operation,
        "outcome": outcome,
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
        # Only on the Unix-socket listener (absent, not null, on TCP: older lines keep their shape).
        **({"peer": dict(ctx.peer)} if ctx.peer is not None else {}),
    }


# What ``json.dumps(body, separators=(",", ":"), ensure_ascii=False, default=str)`` builds on every
# call, built once.
_LINE_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, default=str)


def line_hash(line: bytes) -> str:
    return hashlib.sha256(line).hexdigest()


def encode_line(body: Mapping[str, Any]) -> bytes:
    """One line of UTF-8 JSON. Text that is not valid Unicode (a lone UTF-16 surrogate such as
    ``"\\ud800"``, which a hostile client can send as a JSON escape) cannot be UTF-8 encoded; such
    characters are stored as the six characters of their escape (``\\ud800`` as text), so the
    line stays valid UTF-8 JSON and every reader can print it."""
    text = _LINE_ENCODER.encode(body)
    try:
        return text.encode()
    except UnicodeEncodeError:
        return json.dumps(_escape_surrogates(body), separators=(",", ":"), ensure_ascii=False,
                          default=str).encode()


def escape_surrogates(text: str) -> str:
    """``text`` with each lone surrogate replaced by its escape as text (``\\ud800``)."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _escape_surrogates(value: Any) -> Any:
    if isinstance(value, str):
        return escape_surrogates(value)
    if isinstance(value, Mapping):
        return {_escape_surrogates(k): _escape_surrogates(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_escape_surrogates(v) for v in value]
    return value


def signed_bytes(checkpoint: Mapping[str, Any]) -> bytes:
    """What a checkpoint signature covers: every field but the signature, canonically encoded."""
    body = {k: v for k, v in checkpoint.items() if k != "signature"}
    return b"kmsfs-audit-checkpoint-v1\n" + json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def key_fingerprint(public_key: Ed25519PublicKey) -> str:
    """SHA-256 of the raw public key, hex: what an operator pins and compares."""
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    return hashlib.sha256(public_key.public_bytes(Encoding.Raw, PublicFormat.Raw)).hexdigest()


# kmsfs's reports of accesses made under a directory key (KmsfsReportAccess, one record per
# access, keyservice/ops/kmsfs_reports.py): counted as opens and creates like strict mode's.
REPORTED_OPEN, REPORTED_CREATE, REPORTED_TRUNCATE = (
    "KmsfsReportedOpen", "KmsfsReportedCreate", "KmsfsReportedTruncate")


def _kmsfs_caller(record: Mapping[str, Any]) -> dict[str, Any] | None:
    """The ``caller`` of a record a kmsfs mount made for a path (else None)."""
    caller = record.get("caller")
    return caller if isinstance(caller, dict) and isinstance(caller.get("path"), str) else None


def is_create(record: Mapping[str, Any]) -> bool:
    """A kmsfs create: GenerateDataKey* made for a path, the claim Decrypt (``caller.op ==
    "create"``) a pooled create sends with its path after taking a key generated ahead of time,
    or a create a directory-key mount reported."""
    caller = _kmsfs_caller(record)
    if caller is None:
        return False
    operation = str(record.get("operation", ""))
    if operation == "Decrypt":
        return caller.get("op") == "create"
    return operation.startswith("GenerateDataKey") or operation == REPORTED_CREATE


def is_open(record: Mapping[str, Any]) -> bool:
    """A kmsfs open: a Decrypt for a path that is not a create's claim, or an open (or a truncate
    by name, which opens the file) a directory-key mount reported."""
    caller = _kmsfs_caller(record)
    if caller is None:
        return False
    operation = record.get("operation")
    if operation == "Decrypt":
        return caller.get("op") != "create"
    return operation in (REPORTED_OPEN, REPORTED_TRUNCATE)


def is_checkpoint(record: Mapping[str, Any]) -> bool:
    return record.get("type") == CHECKPOINT_TYPE



# --------------------------------------------------------------------------- reading


def read_signed_file(path: Path) -> dict[str, Any] | None:
    """A signed JSON object file (the head, a prune record), unverified: None if it is missing; if
    it is not a JSON object, one with an empty signature, which no signature check accepts."""
    try:
        found = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except ValueError:
        return {"signature": ""}
    return found if isinstance(found, dict) else {"signature": ""}


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


_decode = json.JSONDecoder().decode
_fast_decode = orjson.loads


def parse_line(line: bytes) -> dict[str, Any] | None:
    """The JSON object of a line, or None if it is not one.

    orjson first (about 3x faster than ``json``: the index, the questions and ``verify`` decode
    millions of lines), ``json`` for whatever orjson refuses (integers past 64 bits, NaN), so the
    result is ``json``'s on every line."""
    try:
        record = _fast_decode(line)
    except ValueError:  # orjson.JSONDecodeError is one
        try:
            record = _decode(line.decode())
        except ValueError:  # also UnicodeDecodeError
            return None
    return record if record.__class__ is dict else None


def is_intent(record: Mapping[str, Any]) -> bool:
    return record.get("outcome") == OUTCOME_INTENT


def chain_records(
    data_dir: Path, chain: str = segments.DEFAULT_CHAIN, unparsable: list[int] | None = None,
    intents: bool = False,
) -> Iterator[dict[str, Any]]:
    """Every well-formed request record of one chain in order: one per request. Checkpoints are
    skipped, and so, unless ``intents``, are the intent records that precede state changes. Lines
    that are not a JSON object are skipped too, and their 1-based line numbers (counted through the
    chain's segments) appended to ``unparsable`` if given."""
    for _line, record in chain_record_lines(data_dir, chain, unparsable, intents):
        yield record


def chain_record_lines(
    data_dir: Path, chain: str = segments.DEFAULT_CHAIN, unparsable: list[int] | None = None,
    intents: bool = False,
) -> Iterator[tuple[bytes, dict[str, Any]]]:
    """``chain_records`` with each record's line, as written (what ``audit list --json`` prints)."""
    for number, line in enumerate(segments.read_chain(data_dir, chain), 1):
        record = parse_line(line.data)
        if record is None:
            if unparsable is not None:
                unparsable.append(number)
            continue
        if not is_checkpoint(record) and (intents or not is_intent(record)):
            yield line.data, record


def read_records(
    data_dir: Path, unparsable: list[int] | None = None, *, intents: bool = False
) -> Iterator[dict[str, Any]]:
    """Every well-formed request record of every chain, merged by time (each chain in its order);
    ``unparsable`` and ``intents`` as in ``chain_records``. (``audit list`` reports the unparsable
    lines; ``audit verify`` says what they break.)"""
    for _line, record in read_record_lines(data_dir, unparsable, intents=intents):
        yield record


def read_record_lines(
    data_dir: Path, unparsable: list[int] | None = None, *, intents: bool = False
) -> Iterator[tuple[bytes, dict[str, Any]]]:
    """``read_records`` with each record's line."""
    chains = segments.chains(data_dir)
    if len(chains) == 1:
        yield from chain_record_lines(data_dir, chains[0], unparsable, intents)
        return
    each = (chain_record_lines(data_dir, c, unparsable, intents) for c in chains)
    yield from heapq.merge(*each, key=lambda pair: str(pair[1].get("time", "")))
