"""``inspector``: one thin command line: train, evaluate, register products, serve a line, demo.

Each command parses, builds, calls and prints; the logic lives in ``inspector`` and ``trainer``.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from deploy.cli import add_install_parser, cmd_install

from ..tools.reconcile import add_reconcile_parser, cmd_reconcile
from .archive import add_archive_parser, cmd_archive
from .bank import add_bank_parser, cmd_bank
from .compile import add_compile_parser, cmd_compile
from .demo import add_demo_parser, cmd_demo
from .run import add_run_parser, cmd_run
from .stream import STREAM_COMMANDS, add_stream_parsers
from .train import TRAINER_COMMANDS, add_trainer_parsers


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="inspector", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    add_trainer_parsers(sub)
    add_demo_parser(sub)
    add_bank_parser(sub)
    add_run_parser(sub)
    add_stream_parsers(sub)
    add_compile_parser(sub)
    add_install_parser(sub)
    add_reconcile_parser(sub)
    add_archive_parser(sub)
    return parser


COMMANDS = {**TRAINER_COMMANDS, "demo": cmd_demo, "bank": cmd_bank,
            "run": cmd_run, "compile": cmd_compile, "install": cmd_install,
            "reconcile": cmd_reconcile, "archive": cmd_archive, **STREAM_COMMANDS}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
