"""The ``deepmemory`` command line. Each subcommand lives in its own module of this package
with ``register(subparsers)`` (adds its parser and sets ``func``); list it in ``COMMANDS``."""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import List, Optional

COMMANDS: tuple = ("models", "train", "generate", "bench")


class CLIError(Exception):
    """A user error: printed as one line, exit code 2 (a diverged training run exits 3 instead)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deepmemory", description="Test-time memorization models: Titans and ATLAS.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"{__name__}.{name}").register(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except CLIError as err:
        print(f"deepmemory {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
