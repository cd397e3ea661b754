"""Format version 4 (directory keys): the directory-wrapped key field, the local wrap of a data key,
the ``kmsfs.dirkey`` file, pinned by exact bytes; and the open reporter's queue (fail closed)."""

from __future__ import annotations

import errno
import hashlib
import os
import threading
import time
from typing import Any

import pytest

from kmsfs import format as fmt
from kmsfs.cipher import BlockCipher
from kmsfs.dirformat import (
    DirKeyFile,
    open_file_key,
    pack_dirkey_file,
    parse_dirkey_file,
    seal_file_key,
)
from kmsfs.keyclient import KeyServiceError, KeyServiceUnavailable
from kmsfs.reports import OpenReporter, report_of

FILE_ID = bytes(range(16))
DIR_ID = bytes(range(16, 32))
DIR_KEY = bytes(range(32))
DATA_KEY = bytes(range(32, 64))
ARN = "arn:aws:kms:us-east-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab"
BLOB = b"\x01" * 150


def test_file_key_aad_bytes() -> None:
    assert fmt.file_key_aad(FILE_ID, DIR_ID) == b"KMSFS\x00filekey" + b"\x00\x04" + FILE_ID + DIR_ID
    assert len(fmt.file_key_aad(FILE_ID, DIR_ID)) == 47


def test_known_answer_local_wrap() -> None:
    """AES-256-GCM, directory key 00..1f, nonce zero, data key 20..3f, that AAD (docs/FORMAT.md)."""
    sealed = BlockCipher(DIR_KEY).seal(DATA_KEY, fmt.file_key_aad(FILE_ID, DIR_ID), nonce=bytes(12))
    assert len(sealed) == 60
    assert sealed.hex() == KAT


KAT = ("000000000000000000000000"
       "2e9d97fd9109a59a2081831e3401bfb6e27264601cb45618b8a789b8f9c26369"
       "0a88c646fc6426394db52601b843348a")


def _header() -> fmt.Header:
    sealed = seal_file_key(BlockCipher(DIR_KEY), DATA_KEY, FILE_ID, DIR_ID)
    return fmt.Header(FILE_ID, ARN, fmt.pack_dir_wrapped(DIR_ID, BLOB, sealed), version=fmt.FORMAT_V4)


def test_header_v4_round_trip_and_sizes() -> None:
    header = _header()
    raw = fmt.pack_header(header)
    assert raw[6:8] == b"\x00\x04"
    assert len(header.wrapped_key) == 78 + len(BLOB)  # dir id, C, blob, nonce, key, tag
    assert len(raw) == 32 + len(ARN) + 78 + len(BLOB)
    parsed = fmt.parse_header(raw)
    assert parsed == header
    inner = parsed.directory_wrapped
    assert (inner.dir_id, inner.wrapped_dir_key) == (DIR_ID, BLOB)
    assert open_file_key(BlockCipher(DIR_KEY), parsed) == DATA_KEY


@pytest.mark.parametrize("cut", [1, 17, 40])
def test_header_v4_field_is_parsed_strictly(cut: int) -> None:
    raw = fmt.pack_header(_header())
    with pytest.raises(fmt.CorruptHeader):
        fmt.parse_header(raw[:-cut][:30] + (len(_header().wrapped_key) - cut).to_bytes(2, "big")
                         + raw[32:-cut])
    bad_len = bytearray(raw)
    bad_len[32 + len(ARN) + 16:32 + len(ARN) + 18] = (len(BLOB) + cut).to_bytes(2, "big")
    with pytest.raises(fmt.CorruptHeader):
        fmt.parse_header(bytes(bad_len))


def test_local_wrap_is_bound_to_file_id_directory_and_key() -> None:
    header = _header()
    sealed = header.directory_wrapped.sealed_key
    for other in (
        fmt.Header(bytes(16), ARN, header.wrapped_key, version=fmt.FORMAT_V4),  # another file id
        fmt.Header(FILE_ID, ARN, fmt.pack_dir_wrapped(bytes(16), BLOB, sealed), version=fmt.FORMAT_V4),
    ):
        with pytest.raises(fmt.CorruptHeader):
            open_file_key(BlockCipher(DIR_KEY), other)
    with pytest.raises(fmt.CorruptHeader):
        open_file_key(BlockCipher(bytes(32)), header)  # another directory's key


def test_dirkey_file_bytes_and_strictness() -> None:
    entry = DirKeyFile(DIR_ID, ARN, BLOB)
    raw = pack_dirkey_file(entry)
    assert raw[:9] == b"KMSFSDK\x00\x01" and raw[9:25] == DIR_ID
    assert len(raw) == 29 + len(ARN) + len(BLOB)
    assert parse_dirkey_file(raw) == entry
    for bad in (raw[:-1], raw + b"x", b"KMSFSDK\x00\x02" + raw[9:], raw[:27] + b"\x00\x00" + raw[29:]):
        with pytest.raises(fmt.CorruptHeader):
            parse_dirkey_file(bad)


def test_directory_context() -> None:
    assert fmt.directory_context("ab" * 16, DIR_ID) == {
        "kmsfs:purpose": "directory", "kmsfs:cipherdir": "ab" * 16, "kmsfs:directory-id": DIR_ID.hex()}


# -- the open reporter (its delivery function is a plain recorder here; the service side is
# tested in tests/api/test_kmsfs_reports.py and end to end in test_kmsfs_dirkeys.py) ---------------
class Service:
    def __init__(self) -> None:
        self.batches: list[tuple[str, list[dict[str, Any]]]] = []
        self.failure: Exception | None = None
        self.lock = threading.Lock()

    def send(self, arn: str, batch: list[dict[str, Any]]) -> None:
        with self.lock:
            if self.failure is not None:
                raise self.failure
            self.batches.append((arn, list(batch)))

    def count(self) -> int:
        with self.lock:
            return sum(len(b) for _, b in self.batches)


def _wait(cond: Any, timeout: float = 5.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end
        time.sleep(0.01)


def test_reports_are_batched_and_delivered() -> None:
    service = Service()
    reporter = OpenReporter(service.send, deadline=2.0, interval=0.2)
    reporter.start()
    try:
        for i in range(1200):
            arn = ARN if i % 2 else "arn:other"
            reporter.add(arn, report_of("open", {"uid": 1}, f"/f{i}", FILE_ID, DIR_ID))
        _wait(lambda: service.count() == 1200)
        assert all(len(b) <= 500 for _, b in service.batches)
        assert len(service.batches) <= 6
        assert {a for a, _ in service.batches} == {ARN, "arn:other"}
        paths = sorted(r["Path"] for _, b in service.batches for r in b)
        assert paths == sorted(f"/f{i}" for i in range(1200))  # each once
        reporter.check()
    finally:
        reporter.close()


def test_fail_closed_after_the_deadline_and_nothing_lost() -> None:
    service = Service()
    refused: list[str] = []
    service.failure = KeyServiceUnavailable("down")
    reporter = OpenReporter(service.send, deadline=0.5, interval=0.1, on_refused=refused.append)
    reporter.start()
    try:
        reporter.add(ARN, report_of("create", None, "/a", FILE_ID, DIR_ID))
        reporter.check()  # within the deadline
        time.sleep(0.6)
        with pytest.raises(PermissionError) as info:
            reporter.check()
        assert info.value.errno == errno.EACCES
        service.failure = KeyServiceError("DisabledException", "disabled")
        _wait(lambda: refused == [ARN] or len(refused) > 1)
        service.failure = None
        _wait(lambda: service.count() == 1)
        reporter.check()
        report = service.batches[0][1][0]
        assert (report["Path"], report["Operation"]) == ("/a", "create")
    finally:
        reporter.close()


# -- kmsfs.dirkey on disk (the key service's part is a stand-in that hands out keys like it does;
# the real one is used in test_kmsfs_dirkeys.py) -------------------------------------------------
class KeyIssuer:
    def __init__(self) -> None:
        self.generated = 0

    def generate_data_key(self, arn: str, context: dict[str, str], caller: Any) -> tuple[bytes, bytes, str]:
        self.generated += 1
        blob = b"blob-%d" % self.generated
        return self.decrypt(blob, context, caller), blob, arn

    @staticmethod
    def decrypt(blob: bytes, context: dict[str, str], caller: Any, key_id: str | None = None) -> bytes:
        return hashlib.sha256(blob).digest()  # each blob its own key


def test_a_directory_key_file_is_written_once_and_an_empty_one_replaced(tmp_path: Any) -> None:
    from kmsfs.dirkeys import DirectoryKeys
    from kmsfs.names import DIRKEY_FILE

    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        issuer = KeyIssuer()
        keys = DirectoryKeys(issuer, ARN, "ab" * 16)  # type: ignore[arg-type]
        header, key = keys.new_file_key(fd, DIR_ID)
        assert parse_dirkey_file((tmp_path / DIRKEY_FILE).read_bytes()) == DirKeyFile(DIR_ID, ARN, b"blob-1")
        assert keys.file_key(header) == key and issuer.generated == 1
        keys.new_file_key(fd, DIR_ID)  # cached: no request
        assert issuer.generated == 1
        (tmp_path / DIRKEY_FILE).write_bytes(b"")  # power lost before its data reached the disk
        keys.drop()
        keys.new_file_key(fd, DIR_ID)
        assert issuer.generated == 2
        assert parse_dirkey_file((tmp_path / DIRKEY_FILE).read_bytes()).wrapped == b"blob-2"
        assert keys.file_key(header) == key  # the old file carries its own directory key
        (tmp_path / DIRKEY_FILE).write_bytes(pack_dirkey_file(DirKeyFile(bytes(16), ARN, b"x")))
        keys.drop()
        with pytest.raises(fmt.CorruptHeader):  # another directory's key file
            keys.new_file_key(fd, DIR_ID)
        assert sorted(p.name for p in tmp_path.iterdir()) == [DIRKEY_FILE]  # no temporaries left
    finally:
        os.close(fd)
