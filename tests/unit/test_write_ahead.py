"""Write-ahead auditing (issue 12, item 2) in-process: which store methods count as writes, the
order intent -> change -> outcome, a failed change recorded after its intent, and an intent left
without an outcome reported by ``audit verify``."""

from __future__ import annotations

import inspect
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from keyservice import errors, write_ahead
from keyservice.audit import signing as audit_signing
from keyservice.audit import verify as audit_verify
from keyservice.audit.records import audit_path, build_record, encode_line, read_records
from keyservice.context import RequestContext
from keyservice.store.base import Store
from tests.api.test_service import Env, make_env


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    e = make_env(tmp_path)
    yield e
    e.service.close()


READS = ("get_", "list_", "count_", "keys_", "latest_", "identity_policies", "one_read_check", "close")


def test_every_writing_store_method_is_listed() -> None:
    methods = {name for name, _ in inspect.getmembers(Store, inspect.isfunction) if not name.startswith("_")}
    writes = {m for m in methods if not m.startswith(READS)}
    passing = write_ahead.UNAUDITED_WRITES | write_ahead.TRANSACTION_METHODS
    assert writes - passing == write_ahead.MUTATING_METHODS
    assert write_ahead.MUTATING_METHODS <= methods


def _lines(env: Env) -> list[dict]:
    return list(read_records(env.data_dir, intents=True))


def test_intent_precedes_the_change_and_the_outcome_follows(env: Env) -> None:
    key_id = env.key()
    seen: list[str] = []
    inner = env.service.store.inner
    update_key = inner.update_key

    def spy(key: object) -> None:
        # At the moment of the write, the intent is already in the log (and durable: append waited).
        seen.extend(r["outcome"] for r in _lines(env) if r["request_id"] == f"req-{env.n}")
        update_key(key)

    inner.update_key = spy
    env.service.store.__dict__.pop("update_key", None)  # drop the cached wrapper around the original
    env.call("DisableKey", {"KeyId": key_id})
    assert seen == ["intent"]
    [intent, outcome] = [r for r in _lines(env) if r["request_id"] == f"req-{env.n}"]
    assert (intent["operation"], intent["outcome"], outcome["outcome"]) == ("DisableKey", "intent", "success")
    assert intent["key_id"] == outcome["key_id"] and intent["key_id"].endswith(key_id)
    # Reads and refusals write no intent; a refusal before any write has its error record only.
    env.call("DescribeKey", {"KeyId": key_id})
    env.fails(errors.NotFoundException, "DisableKey", {"KeyId": "00000000-0000-4000-8000-000000000000"})
    assert [r["outcome"] for r in _lines(env)[-2:]] == ["success", "error"]
    # Readers that want one record per request never see intents.
    assert all(r["outcome"] != "intent" for r in read_records(env.data_dir))


def test_a_change_that_fails_after_its_intent_is_recorded_as_an_error(env: Env) -> None:
    env.service.max_keys = 1
    env.key()
    env.fails(errors.LimitExceededException, "CreateKey")  # the store refuses inside its transaction
    [intent, outcome] = [r for r in _lines(env) if r["request_id"] == f"req-{env.n}"]
    assert intent["outcome"] == "intent"
    assert (outcome["outcome"], outcome["error_code"]) == ("error", "LimitExceededException")


def test_an_intent_without_outcome_is_reported_by_verify(env: Env, tmp_path: Path) -> None:
    key_id = env.key()
    ctx = RequestContext("crashed-request", "192.0.2.7", env.principal)
    # What a crash between the store commit and the outcome record leaves: the intent alone.
    env.service.audit_log.append(
        build_record(when=env.service.now(), ctx=ctx, operation="ScheduleKeyDeletion",
                     key_arn=f"arn:key/{key_id}", intent=True),
    )  # fmt: skip
    env.service.close()
    public_key = audit_signing.load_public(audit_signing.public_path(env.data_dir))
    report = audit_verify.verify(env.data_dir, public_key)
    assert report.ok, report.problems
    [note] = [n for n in report.notes if "ScheduleKeyDeletion" in n]
    assert "may or may not have been made" in note and key_id in note


def test_lone_surrogates_are_stored_escaped(env: Env) -> None:
    ctx = RequestContext("r-\ud800", "192.0.2.7", None, "agent\udfff", {"path": "/x\ud800", "\udc00": 1})
    env.service.record_refused("Op\ud800", ctx, errors.AccessDeniedException("no \ud800"))
    raw = audit_path(env.data_dir).read_bytes().splitlines()[-1]
    raw.decode("utf-8")  # valid UTF-8
    record = json.loads(raw)
    assert record["caller"] == {"path": "/x\\ud800", "\\udc00": 1}
    assert record["user_agent"] == "agent\\udfff" and record["error_message"] == "no \\ud800"
    assert encode_line({"a": "é"}) == '{"a":"é"}'.encode()  # ordinary text is not escaped


def test_writes_outside_a_scope_pass_straight_through(env: Env) -> None:
    before = len(_lines(env))
    env.service.store.set_meta("hostile-test", "1")
    assert len(_lines(env)) == before
    with pytest.raises(AttributeError):
        env.service.store.no_such_method  # noqa: B018
