"""``inspector install --line N``: set up this PC (or a staging root) to serve a line under systemd."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .install import DEFAULT_PREFIX, REPO_ROOT, VENV_CREATE, VENV_SKIP, InstallError, install

EXIT_OK = 0
EXIT_FAILED = 1  # the input was fine but the machine refused (permissions, a full disk, pip)
EXIT_BAD_INPUT = 2


def add_install_parser(sub: argparse._SubParsersAction) -> None:
    """Add the ``install`` command to the ``inspector`` command line."""
    p = sub.add_parser("install", help="set up a line PC: systemd unit, line config, account; never runs systemctl")
    p.add_argument("--root", default="/", help="destination root, absolute (default /: this machine)")
    p.add_argument("--line", required=True, help="line name; the service is inspector@<line>")
    p.add_argument("--prefix", default=DEFAULT_PREFIX, help=f"install prefix holding venv/ (default {DEFAULT_PREFIX})")
    p.add_argument("--artifact", help="model artifact directory for the line config [engine.artifact]")
    p.add_argument("--store", help="bank store URL for the line config, without a password [banks.store]")
    p.add_argument("--venv", default=VENV_CREATE, metavar="create|skip|PATH",
                   help="create <prefix>/venv with pip (default), skip it, or link it to an existing environment")
    p.add_argument("--redis-password-file", type=Path,
                   help="file holding the Redis password; installed as a systemd credential, never in the config")
    p.add_argument("--force", action="store_true", help="replace an existing line config (the old one is kept as .bak)")
    p.add_argument("--source", type=Path, default=REPO_ROOT,
                   help="Inspector source tree with systemd/ and pyproject.toml (default: this checkout)")


def cmd_install(args: argparse.Namespace) -> int:
    """Run ``install`` from parsed flags; print the report. Returns the exit status."""
    root = Path(args.root)
    if not root.is_absolute():
        print(f"error: --root {args.root}: must be an absolute path (/ for this machine)", file=sys.stderr)
        return EXIT_BAD_INPUT
    venv = args.venv if args.venv in (VENV_CREATE, VENV_SKIP) else Path(args.venv)
    try:
        report = install(
            root, args.line, prefix=args.prefix, artifact=args.artifact, store=args.store, source=args.source,
            venv=venv, redis_password_file=args.redis_password_file, force=args.force, progress=_progress,
        )
    except InstallError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except PermissionError as err:
        print(f"error: {err} (run as root, or pass --root DIR to stage the files elsewhere)", file=sys.stderr)
        return EXIT_FAILED
    except OSError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_FAILED
    print(report.format())
    return EXIT_OK


def _progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)
