"""The data-key pool: keys are generated for pre-chosen file ids, used once, expire, a refusal
from the service empties the pool (revocation reaches creates), and every pooled create is claimed
(a Decrypt carrying its path) whose refusal or mismatch fails the create's handle."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import pytest

from kmsfs import format as fmt
from kmsfs.config import Config
from kmsfs.core import KmsfsCore
from kmsfs.keyclient import KeyServiceError, KeyServiceUnavailable
from kmsfs.keypool import ClaimMismatch, DataKeyPool

ARN = "arn:aws:kms:us-east-1:111122223333:key/pool"


class FakeService:
    """GenerateDataKey and Decrypt of a toy service that remembers the keys it issued."""

    def __init__(self) -> None:
        self.calls: list[tuple[dict[str, str], Any]] = []
        self.decrypts: list[tuple[dict[str, str], Any]] = []
        self.keys: dict[bytes, bytes] = {}
        self.refuse = False
        self.unavailable = False
        self.lie = False

    def generate(self, key_id: str, ctx: dict[str, str], caller: Any) -> tuple[bytes, bytes, str]:
        self.calls.append((ctx, caller))
        if self.refuse:
            raise KeyServiceError("DisabledException", "disabled")
        if self.unavailable:
            raise KeyServiceUnavailable("down")
        blob = b"wrapped:" + ctx[fmt.ENCRYPTION_CONTEXT_KEY].encode()
        self.keys[blob] = os.urandom(32)
        return self.keys[blob], blob, ARN

    def decrypt(self, blob: bytes, ctx: dict[str, str], caller: Any = None,
                key_id: str | None = None) -> bytes:
        self.decrypts.append((ctx, caller))
        if self.refuse:
            raise KeyServiceError("DisabledException", "disabled")
        if self.unavailable:
            raise KeyServiceUnavailable("down")
        assert blob == b"wrapped:" + ctx[fmt.ENCRYPTION_CONTEXT_KEY].encode()
        return os.urandom(32) if self.lie else self.keys[blob]

    def claims(self) -> list[Any]:
        return [caller for _, caller in self.decrypts if caller and caller.get("op") == "create"]


class FakeClient:
    """The two KeyClient methods the core calls, backed by a FakeService."""

    def __init__(self, service: FakeService) -> None:
        self.service = service

    def generate_data_key(self, key_id: str, ctx: dict[str, str],
                          caller: Any = None) -> tuple[bytes, bytes, str]:
        return self.service.generate(key_id, ctx, caller)

    def decrypt(self, blob: bytes, ctx: dict[str, str], caller: Any = None,
                key_id: str | None = None) -> bytes:
        return self.service.decrypt(blob, ctx, caller, key_id)


def make_pool(svc: FakeService, size: int, max_age: float = 30, **kw: Any) -> DataKeyPool:
    pool = DataKeyPool(svc.generate, svc.decrypt, ARN, size=size, max_age=max_age, **kw)
    pool.start()
    return pool


def wait_for(cond: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_keys_are_bound_to_their_file_id_and_used_once() -> None:
    svc = FakeService()
    pool = make_pool(svc, 4)
    try:
        wait_for(lambda: len(pool) == 4)
        taken = [pool.take() for _ in range(4)]
        assert all(t is not None for t in taken)
        ids = {t.file_id for t in taken if t}
        assert len(ids) == 4
        for t in taken:
            assert t is not None and t.wrapped_key == b"wrapped:" + t.file_id.hex().encode()
            assert t.key.hex() not in repr(t)  # no key material in a repr (logs, tracebacks)
        assert all(caller.get("pool") is True and "path" not in caller for _, caller in svc.calls)
        wait_for(lambda: len(pool) == 4)  # refilled
    finally:
        pool.close()
    assert len(pool) == 0


def test_refusal_empties_the_pool() -> None:
    svc = FakeService()
    pool = make_pool(svc, 3)
    try:
        wait_for(lambda: len(pool) == 3)
        svc.refuse = True
        assert pool.take() is not None  # generated before the refusal; triggers a refill
        wait_for(lambda: len(pool) == 0)  # the refused refill dropped the rest
        assert pool.take() is None
    finally:
        pool.close()


def test_expired_keys_are_discarded() -> None:
    svc = FakeService()
    pool = make_pool(svc, 2, max_age=0.05)
    try:
        wait_for(lambda: len(pool) == 2)
        svc.unavailable = True
        time.sleep(0.1)
        assert pool.take() is None  # both too old, and no fresh ones could be made
    finally:
        pool.close()


def _core(tmp_path: Path, svc: FakeService, pool: DataKeyPool, **kw: Any) -> tuple[KmsfsCore, Path]:
    root = tmp_path / "cipher"
    root.mkdir()
    config = Config(endpoint="http://x", region="us-east-1", key_id="k1", key_arn=ARN)
    config.save(root)
    return KmsfsCore(str(root), config, FakeClient(svc), key_pool=pool, **kw), root  # type: ignore[arg-type]


def test_pooled_create_is_claimed_with_its_path(tmp_path: Path) -> None:
    svc = FakeService()
    pool = make_pool(svc, 2)
    try:
        wait_for(lambda: len(pool) == 2)
        core, root = _core(tmp_path, svc, pool)
        fh = core.create("/a", 0o644, {"path": "/a", "uid": 1000, "user": "u", "pid": 7, "process": "tar"})
        core.write("/a", b"hello", 0, fh)
        assert core.read("/a", 5, 0, fh) == b"hello"
        core.release("/a", fh)
        header = fmt.parse_header(os.getxattr(root / "a", fmt.HEADER_XATTR))
        assert header.wrapped_key == b"wrapped:" + header.file_id.hex().encode()
        assert all("path" not in caller for _, caller in svc.calls)  # the key came from the pool
        wait_for(lambda: len(svc.claims()) == 1 and pool.unclaimed() == 0)
        ctx, caller = next((c, k) for c, k in svc.decrypts if k and k.get("op") == "create")
        assert ctx == header.encryption_context()  # joins the pooled GenerateDataKey by file id
        assert caller == {"path": "/a", "uid": 1000, "user": "u", "pid": 7, "process": "tar", "op": "create"}
        assert len(pool) >= 1  # a confirmed claim leaves the pool alone
    finally:
        pool.close()


def test_refused_claim_fails_the_handle_and_empties_the_pool(tmp_path: Path) -> None:
    svc = FakeService()
    pool = make_pool(svc, 3)
    try:
        wait_for(lambda: len(pool) == 3)
        core, _ = _core(tmp_path, svc, pool)
        svc.refuse = True  # the key is disabled after the pool filled
        fh = core.create("/b", 0o644, {"path": "/b"})  # the create itself does not wait
        wait_for(lambda: len(svc.claims()) == 1 and pool.unclaimed() == 0)
        with pytest.raises(KeyServiceError) as info:
            core.write("/b", b"x", 0, fh)
        assert info.value.is_access_denied
        assert len(pool) == 0 and pool.take() is None
        with pytest.raises(KeyServiceError):  # no pooled key left: the create asks and is refused
            core.create("/c", 0o644, {"path": "/c"})
        svc.refuse = False  # re-enabled: like a refused revalidation, the handle recovers
        time.sleep(1.05)
        core.write("/b", b"x", 0, fh)
        core.release("/b", fh)
    finally:
        pool.close()


def test_mismatched_claim_fails_the_handle_for_good(tmp_path: Path) -> None:
    svc = FakeService()
    pool = make_pool(svc, 2)
    try:
        wait_for(lambda: len(pool) == 2)
        core, _ = _core(tmp_path, svc, pool, revalidate_after=0.0)
        svc.lie = True
        fh = core.create("/d", 0o644, {"path": "/d"})
        wait_for(lambda: len(svc.claims()) == 1 and pool.unclaimed() == 0)
        svc.lie = False
        time.sleep(1.05)  # a refused revalidation would have re-asked by now; a mismatch sticks
        with pytest.raises(ClaimMismatch) as info:
            core.read("/d", 1, 0, fh)
        assert not info.value.is_access_denied  # EIO, not EACCES
        core.release("/d", fh)
    finally:
        pool.close()


def test_unanswered_claims_are_retried_and_throttle_the_pool(tmp_path: Path,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    svc = FakeService()
    pool = make_pool(svc, 2, drain_timeout=1.0)
    try:
        wait_for(lambda: len(pool) == 2)
        core, _ = _core(tmp_path, svc, pool)
        svc.unavailable = True
        handles = [core.create(f"/e{i}", 0o644, {"path": f"/e{i}"}) for i in range(2)]  # not blocked
        for fh in handles:
            core.write("/e", b"still works", 0, fh)  # an outage keeps the handle working (F9)
        wait_for(lambda: len(svc.claims()) >= 2)
        svc.unavailable = False
        time.sleep(0.3)
        assert len(pool) == 0  # 2 claims outstanding = size: the pool does not refill
        wait_for(lambda: pool.unclaimed() == 0, timeout=8)  # retried, delivered, in create order
        paths = [c["path"] for c in svc.claims()]
        assert paths[-2:] == ["/e0", "/e1"] and set(paths) == {"/e0", "/e1"}
        wait_for(lambda: len(pool) == 2)  # refills once the claims are answered
        svc.unavailable = True
        fh = core.create("/f", 0o644, {"path": "/f"})
        for handle in [*handles, fh]:
            core.release(None, handle)
    finally:
        with caplog.at_level(logging.ERROR, logger="kmsfs"):
            start = time.monotonic()
            pool.close()
            assert time.monotonic() - start < 3  # bounded, even with the service down
    assert "create of /f (file id" in caplog.text and "not audited with its path" in caplog.text


def test_a_refused_open_empties_the_pool(tmp_path: Path) -> None:
    """A key disabled after the pool filled: the first refusal any open sees drops the pooled
    keys, so the next create asks the service (and is refused) instead of using one."""
    svc = FakeService()
    pool = make_pool(svc, 3)
    try:
        wait_for(lambda: len(pool) == 3)
        core, _ = _core(tmp_path, svc, pool)
        fh = core.create("/a", 0o644, {"path": "/a"})
        core.write("/a", b"x", 0, fh)
        core.release("/a", fh)
        wait_for(lambda: pool.unclaimed() == 0 and len(pool) == 3)
        svc.refuse = True
        with pytest.raises(KeyServiceError):
            core.open("/a", os.O_RDONLY, {"path": "/a"})
        assert len(pool) == 0
        with pytest.raises(KeyServiceError):
            core.create("/b", 0o644, {"path": "/b"})
    finally:
        pool.close()
