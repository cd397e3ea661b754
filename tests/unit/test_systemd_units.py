"""The shipped systemd units call the real command lines: every ExecStart/ExecStop parses with
the ``keyservice`` / ``kmsfs`` parsers (systemd itself does not run in the tests)."""

from __future__ import annotations

import configparser
import shlex
from pathlib import Path

import pytest

from keyservice.cli.main import build_parser as keyservice_parser
from kmsfs.cli.parser import build_parser as kmsfs_parser

UNITS = Path(__file__).resolve().parents[2] / "systemd"
# What systemd would substitute: specifiers and the EnvironmentFile's variables.
SUBSTITUTIONS = {
    "%d": "/run/credentials/keyservice.service", "%f": "/mnt/plain", "%i": "mnt-plain",
    "${CIPHERDIR}": "/srv/cipher", "$CIPHERDIR": "/srv/cipher",
    "${KMSFS_ARGS}": "--credentials /etc/kmsfs/credentials.json --strict",
    "$KMSFS_ARGS": "--credentials /etc/kmsfs/credentials.json --strict",
}
PARSERS = {"keyservice": keyservice_parser, "kmsfs": kmsfs_parser}


def _unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, strict=False)
    parser.optionxform = str  # type: ignore[assignment, method-assign]
    parser.read_string((UNITS / name).read_text())
    return parser


@pytest.mark.parametrize("name", ["keyservice.service", "kmsfs@.service"])
def test_unit_commands_parse(name: str) -> None:
    service = _unit(name)["Service"]
    commands = [service[key] for key in ("ExecStart", "ExecStop") if key in service]
    assert commands
    for command in commands:
        for old, new in SUBSTITUTIONS.items():
            command = command.replace(old, new)
        assert "%" not in command and "$" not in command, command
        argv = shlex.split(command)
        program = Path(argv[0]).name
        args = PARSERS[program]().parse_args(argv[1:])
        if program == "keyservice" and args.command == "serve":
            # Type=forking needs a parent that returns once ready, and the PIDFile it writes.
            assert service["Type"] == "forking" and args.background
            assert args.pid_file == service["PIDFile"]
            assert args.root_key_file.startswith(SUBSTITUTIONS["%d"])
        if program == "kmsfs" and args.command == "mount":
            assert service["Type"] == "forking" and not args.foreground


def test_mount_unit_is_ordered_after_the_key_service() -> None:
    unit = _unit("kmsfs@.service")["Unit"]
    assert "keyservice.service" in unit["After"].split()
