"""The ``keyservice`` entry point: ``audit`` commands without loading the server.

Why a module of its own: ``keyservice.cli.main`` imports everything ``serve`` needs (the HTTP
server, the console, the scheduler, the operations): about 0.3 s of CPU per process. A security
officer's question (``keyservice audit list --file F``) is one process per question and has to
answer in well under a second over millions of records, so ``audit`` is parsed here with only
``cli.audit``'s parser; every other command goes to ``cli.main`` unchanged.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] != "audit" or any(a in ("-h", "--help") for a in args[:1]):
        from keyservice.cli.main import main as full_main

        return full_main(argv)
    return _audit(args)


def _audit(argv: list[str]) -> int:
    from keyservice.cli import audit as cli_audit
    from keyservice.cli.common import OneLineParser, run_command

    parser = OneLineParser(prog="keyservice", description="the key service's audit commands")
    cli_audit.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return run_command(lambda: args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
