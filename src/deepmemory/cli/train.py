"""``deepmemory train``: train a preset on a text corpus (by default the Python standard library).

The options and the run live in ``deepmemory.train.command`` (which ``python -m deepmemory.train``
uses too); this module adds them to the command line and turns user errors into ``CLIError``.
"""

from __future__ import annotations

import argparse

from ..train.command import settings_from_args  # noqa: F401 (re-exported: the name this module has always offered)
from . import CLIError


def register(subparsers) -> None:
    from ..train.command import DESCRIPTION, HELP, S, add_arguments

    p = subparsers.add_parser("train", help=HELP, description=DESCRIPTION, argument_default=S)
    add_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..train import USER_ERRORS
    from ..train.command import run_from_args

    try:
        run_from_args(args)
    except USER_ERRORS as err:
        raise CLIError(" ".join(str(err).split())) from err
    return 0
