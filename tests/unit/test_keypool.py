"""The data-key pool: keys are generated for pre-chosen file ids, used once, expire, and a refusal
from the service empties the pool (revocation reaches creates)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from kmsfs import format as fmt
from kmsfs.config import Config
from kmsfs.core import KmsfsCore
from kmsfs.keyclient import KeyServiceError, KeyServiceUnavailable
from kmsfs.keypool import DataKeyPool

ARN = "arn:aws:kms:us-east-1:111122223333:key/pool"


class Generator:
    def __init__(self) -> None:
        self.calls: list[tuple[dict[str, str], Any]] = []
        self.refuse = False
        self.unavailable = False

    def __call__(self, key_id: str, ctx: dict[str, str], caller: Any) -> tuple[bytes, bytes, str]:
        self.calls.append((ctx, caller))
        if self.refuse:
            raise KeyServiceError("DisabledException", "disabled")
        if self.unavailable:
            raise KeyServiceUnavailable("down")
        return os.urandom(32), b"wrapped:" + ctx[fmt.ENCRYPTION_CONTEXT_KEY].encode(), ARN


def wait_for(cond: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_keys_are_bound_to_their_file_id_and_used_once() -> None:
    gen = Generator()
    pool = DataKeyPool(gen, ARN, size=4, max_age=30)
    pool.start()
    try:
        wait_for(lambda: len(pool) == 4)
        taken = [pool.take() for _ in range(4)]
        assert all(t is not None for t in taken)
        ids = {t.file_id for t in taken if t}
        assert len(ids) == 4
        for t in taken:
            assert t is not None and t.wrapped_key == b"wrapped:" + t.file_id.hex().encode()
        assert all(caller.get("pool") is True and "path" not in caller for _, caller in gen.calls)
        wait_for(lambda: len(pool) == 4)  # refilled
    finally:
        pool.close()
    assert len(pool) == 0


def test_refusal_empties_the_pool() -> None:
    gen = Generator()
    pool = DataKeyPool(gen, ARN, size=3, max_age=30)
    pool.start()
    try:
        wait_for(lambda: len(pool) == 3)
        gen.refuse = True
        assert pool.take() is not None  # generated before the refusal; triggers a refill
        wait_for(lambda: len(pool) == 0)  # the refused refill dropped the rest
        assert pool.take() is None
    finally:
        pool.close()


def test_expired_keys_are_discarded() -> None:
    gen = Generator()
    pool = DataKeyPool(gen, ARN, size=2, max_age=0.05)
    pool.start()
    try:
        wait_for(lambda: len(pool) == 2)
        gen.unavailable = True
        time.sleep(0.1)
        assert pool.take() is None  # both too old, and no fresh ones could be made
    finally:
        pool.close()


def test_core_creates_with_pooled_keys(tmp_path: Path) -> None:
    root = tmp_path / "cipher"
    root.mkdir()
    config = Config(endpoint="http://x", region="us-east-1", key_id="k1", key_arn=ARN)
    config.save(root)
    gen = Generator()
    pool = DataKeyPool(gen, ARN, size=2, max_age=30)
    pool.start()
    try:
        wait_for(lambda: len(pool) == 2)
        core = KmsfsCore(str(root), config, None, key_pool=pool)  # type: ignore[arg-type]
        fh = core.create("/a", 0o644, {"path": "/a"})
        core.write("/a", b"hello", 0, fh)
        assert core.read("/a", 5, 0, fh) == b"hello"
        core.release("/a", fh)
        header = fmt.parse_header(os.getxattr(root / "a", fmt.HEADER_XATTR))
        assert header.wrapped_key == b"wrapped:" + header.file_id.hex().encode()
    finally:
        pool.close()
