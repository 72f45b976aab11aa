"""The ``deepmemory`` command line. Each subcommand lives in its own module of this package
with ``HELP`` (its one-line help) and ``register(subparsers)`` (adds its parser and sets
``func``); list it in ``COMMANDS``.

Start-up stays fast: ``main`` builds the full parser of the one subcommand named on the command
line and a stub (name and help) for the others, and no module here imports torch before a
command runs (``deepmemory --help`` and ``deepmemory models`` do not import it at all)."""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import List, Optional

COMMANDS: tuple = ("models", "train", "generate", "export", "bench")


class CLIError(Exception):
    """A user error: printed as one line, exit code 2 (a diverged training run exits 3 instead)."""


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error: ``deepmemory train: error: ... (see --help)``, exit 2,
    instead of the usage block first."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def version_text() -> str:
    from .. import __version__

    return f"deepmemory {__version__}"


def add_version(parser: argparse.ArgumentParser) -> None:
    """``--version`` on ``parser`` (every subcommand has it, as the top level does)."""
    parser.add_argument("--version", action="version", version=version_text(), help="print the version and exit")


def build_parser(only: Optional[str] = "*") -> argparse.ArgumentParser:
    """The parser; ``only`` names the subcommand whose options are built (``"*"``: all; ``None``:
    none, every subcommand a stub with its help line)."""
    parser = Parser(prog="deepmemory", description="Test-time memorization models: Titans and ATLAS.")
    add_version(parser)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for name in COMMANDS:
        module = importlib.import_module(f"{__name__}.{name}")
        if only in ("*", name):
            module.register(sub)
        else:
            sub.add_parser(name, help=module.HELP)
    return parser


def _command(argv: List[str]) -> Optional[str]:
    """The subcommand named on the command line (the first word that is not an option)."""
    for word in argv:
        if not word.startswith("-"):
            return word if word in COMMANDS else None
    return None


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(only=_command(argv))
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
