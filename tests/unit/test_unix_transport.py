"""The Unix-socket transport's small parts: endpoint URLs, socket modes, peer credentials."""

from __future__ import annotations

import os
import socket

import pytest

from keyservice.http import unix_listener
from kmsfs.cli.common import _origin
from kmsfs.keyclient import check_endpoint


def test_unix_endpoints_must_name_an_absolute_socket_path() -> None:
    assert check_endpoint("unix:///run/keyservice.sock") == "unix:///run/keyservice.sock"
    for bad in ("unix://host/run/ks.sock", "unix:relative.sock", "unix://", "unix:///run/ks.sock?x=1"):
        with pytest.raises(ValueError, match="unix:///ABSOLUTE/PATH"):
            check_endpoint(bad)


def test_two_unix_endpoints_differ_by_their_path() -> None:
    assert _origin("unix:///run/a.sock") != _origin("unix:///run/b.sock")
    assert _origin("unix:///run/a.sock") == _origin("unix:/run/a.sock")


def test_socket_modes_are_octal_and_at_most_0777() -> None:
    assert unix_listener.parse_mode("0660") == 0o660
    assert unix_listener.parse_mode("600") == 0o600
    for bad in ("rw", "0888", "1777", "-1"):
        with pytest.raises(ValueError):
            unix_listener.parse_mode(bad)


def test_peer_credentials_name_the_connecting_process() -> None:
    server, client = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with server, client:
        peer = unix_listener.peer_of(server, "/run/ks.sock")
    assert peer is not None
    fields = peer.audit_fields()
    assert fields["pid"] == os.getpid() and fields["uid"] == os.geteuid() and fields["gid"] == os.getegid()
    assert fields["exe"] == os.readlink("/proc/self/exe")
    assert fields["comm"] == open("/proc/self/comm").read().strip()
    assert peer.source_address == "unix:/run/ks.sock"


def test_a_peer_that_is_gone_keeps_its_ids_without_names() -> None:
    peer = unix_listener.Peer("/s", 1, 2, 0)
    assert peer.audit_fields() == {"uid": 1, "gid": 2, "pid": 0}
