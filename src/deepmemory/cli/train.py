"""``deepmemory train``: train a preset on a text corpus (by default the Python standard library).

The options and the run live in ``deepmemory.train.command`` (which ``python -m deepmemory.train``
uses too); this module adds them to the command line and turns user errors into ``CLIError``
(exit code 2). A diverged run (``DivergenceError``) prints its one line here and exits with 3.
"""

from __future__ import annotations

import argparse
import sys

from ..train.command import (
    HELP,  # noqa: F401 (the stub's help line)
    settings_from_args,  # noqa: F401 (re-exported: the name this module has always offered)
)
from . import CLIError


def register(subparsers) -> None:
    from ..train.command import DESCRIPTION, S, add_arguments

    p = subparsers.add_parser("train", help=HELP, description=DESCRIPTION, argument_default=S)
    add_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Train as ``args`` say: ``0`` when the run completes, ``3`` when it diverged (one line on
    stderr); other user errors raise ``CLIError`` (exit code 2; ``main`` prints the line, after the
    traceback with ``--debug``)."""
    from ..train import USER_ERRORS
    from ..train.command import EXIT_DIVERGED, error_line, exit_code, print_traceback, run_from_args

    try:
        run_from_args(args)
    except USER_ERRORS as err:
        if exit_code(err) == EXIT_DIVERGED:
            print_traceback(args)
            print(f"deepmemory {args.command}: error: {error_line(err)}", file=sys.stderr)
            return EXIT_DIVERGED
        raise CLIError(error_line(err)) from err
    return 0
