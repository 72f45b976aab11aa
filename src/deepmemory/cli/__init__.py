"""The ``deepmemory`` command line. Each subcommand lives in its own module of this package
with ``HELP`` (its one-line help) and ``register(subparsers)`` (adds its parser and sets
``func``); list it in ``COMMANDS``.

Start-up stays fast: ``main`` builds the full parser of the one subcommand named on the command
line and a stub (name and help) for the others, and no module here imports torch before a
command runs (``deepmemory --help`` and ``deepmemory models`` do not import it at all).

Errors (docs/security.md): a user error (``CLIError``, a malformed option, a file that cannot be
read or written) prints one line ``deepmemory COMMAND: error: ...`` on stderr and exits with
``EXIT_USER_ERROR`` (2); running out of memory exits with ``EXIT_OUT_OF_MEMORY`` (4); a diverged
training run with 3; Ctrl-C prints ``deepmemory COMMAND: interrupted`` and exits with
``EXIT_INTERRUPTED`` (130), keeping what was written (a run resumes from its last checkpoint, an
eval continues from its partial results). Every subcommand has ``--debug``, which prints the
traceback first."""

from __future__ import annotations

import argparse
import importlib
import sys

from ..checks import OneLineParser

COMMANDS: tuple = ("models", "train", "generate", "export", "eval", "bench", "experiment")

EXIT_USER_ERROR = 2  # a user error: a bad option or file, a request that cannot fit
EXIT_OUT_OF_MEMORY = 4  # the machine ran out of memory while the command ran
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT, the shell's convention): one line, no traceback


class CLIError(Exception):
    """A user error: printed as one line, exit code 2 (a diverged training run exits 3 instead)."""


# argparse with one-line errors, int options within int64 and finite float options (deepmemory.checks)
Parser = OneLineParser


def version_text() -> str:
    from .. import __version__

    return f"deepmemory {__version__}"


def add_version(parser: argparse.ArgumentParser) -> None:
    """``--version`` on ``parser`` (every subcommand has it, as the top level does)."""
    parser.add_argument("--version", action="version", version=version_text(), help="print the version and exit")


def add_debug(parser: argparse.ArgumentParser) -> None:
    """``--debug`` on ``parser``: an error prints its traceback before its one-line message (every
    subcommand has it; ``main`` prints it)."""
    parser.add_argument(
        "--debug", action="store_true", help="print the traceback of an error before its one-line message"
    )


def build_parser(only: str | None = "*") -> argparse.ArgumentParser:
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


def _command(argv: list[str]) -> str | None:
    """The subcommand named on the command line (the first word that is not an option)."""
    for word in argv:
        if not word.startswith("-"):
            return word if word in COMMANDS else None
    return None


def error_exit(args: argparse.Namespace, line: str, code: int = EXIT_USER_ERROR) -> int:
    """Print ``deepmemory COMMAND: error: LINE`` (whitespace collapsed to one line) on stderr, after
    the traceback of the error being handled when ``--debug`` was given; return ``code``."""
    if getattr(args, "debug", False):
        import traceback

        traceback.print_exc()
    command = " ".join(str(w) for w in (args.command, getattr(args, "mode", None)) if w)  # "bench op"
    print(f"deepmemory {command}: error: {' '.join(str(line).split())}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``) and return its exit code: 0, or
    ``EXIT_USER_ERROR`` (2) after a ``CLIError`` or an ``OSError`` (one line naming the path),
    ``EXIT_OUT_OF_MEMORY`` (4) when memory ran out, 3 for a diverged training run. A malformed
    option exits through ``SystemExit(2)`` with argparse's one line."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(only=_command(argv))
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:  # Ctrl-C: what was written stays (a run resumes, an eval continues)
        print(f"deepmemory {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except CLIError as err:
        return error_exit(args, str(err))
    except OSError as err:  # a file that cannot be read or written: the user's to fix
        from ..checks import os_error_line

        return error_exit(args, os_error_line(err))
    except (MemoryError, RuntimeError) as err:  # torch.OutOfMemoryError is a RuntimeError
        from ..checks import out_of_memory

        if not out_of_memory(err):
            raise
        first = (str(err).strip().splitlines() or [""])[0]
        return error_exit(
            args,
            f"out of memory ({type(err).__name__}{': ' + first if first else ''}); a smaller "
            "--batch-size, --seq-len or model needs less",
            EXIT_OUT_OF_MEMORY,
        )


if __name__ == "__main__":
    sys.exit(main())
