"""``deepmemory models``: the presets of both papers with their parameter counts per size.

The table is stored here (``SIZES``, ``PRESETS``) so that the command prints at once: counting
builds every model of every size, and importing torch and transformers alone takes seconds.
``tests/test_cli_fast.py`` checks it against ``deepmemory.models.count_parameters``; after a
change to a preset, ``python -m deepmemory.cli.models --recount`` prints the new table.
"""

from __future__ import annotations

import argparse
import math
import sys

from . import add_debug, add_version

HELP = "list model presets and their parameter counts per size"

SIZES = ("tiny", "170m", "340m", "760m", "1.3b")
# preset -> (its blocks, parameter count per size in SIZES)
PRESETS = {
    "transformer": ("attn", (98624, 169691904, 341099520, 757016064, 1301882880)),
    "swa": ("swa", (98624, 169691904, 341099520, 757016064, 1301882880)),
    "gated-deltanet": ("memory", (111480, 177618816, 368922240, 818803584, 1387854768)),
    "titans-lmm": ("memory", (126840, 181010304, 380718720, 844755840, 1454799792)),
    "titans-mac": ("mac", (176248, 223496064, 531762816, 1184568192, 1907858352)),
    "titans-mag": ("mag", (159864, 209340288, 481431168, 1071321984, 1756863408)),
    "titans-mal": ("mal", (159608, 209321856, 481382016, 1071248256, 1756789680)),
    "omeganet": ("memory", (197016, 199627872, 428006400, 908609664, 1474709952)),
    "atlas": ("memory", (197016, 199627872, 428006400, 908609664, 1474709952)),
    "atlas-pp": ("memory", (275352, 220308576, 483154944, 991332480, 1557432768)),
    "atlas-mag": ("mag", (230552, 228105312, 529112064, 1135765632, 1777363392)),
    "atlas-mal": ("mal", (230296, 228086880, 529062912, 1135691904, 1777289664)),
    "dla": ("memory", (195976, 199184928, 426432000, 905068416, 1469989056)),
    "swla": ("memory", (111992, 177766272, 369315456, 819393408, 1388149680)),
    "deep-transformer": ("kernel", (117104, 178798272, 373247232, 828830208, 1415871264)),
    "swdt": ("kernel", (117104, 178798272, 373247232, 828830208, 1415871264)),
    "dot": ("kernel", (117104, 178798272, 373247232, 828830208, 1415871264)),
}


def register(subparsers) -> None:
    p = subparsers.add_parser("models", help=HELP)
    add_version(p)
    p.add_argument("names", nargs="*", metavar="PRESET", help="presets to show (default: all)")
    p.add_argument("--sizes", default=None, help="comma-separated sizes to show (default: all)")
    add_debug(p)
    p.set_defaults(func=run)


def _human(n: int) -> str:
    """Three significant digits: 98.6K, 338M, 1.30B."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            v = n / scale
            return f"{v:.{max(0, 2 - int(math.log10(v)))}f}{unit}"
    return str(n)


def recount() -> dict:
    """The table, counted from the presets (builds every model on the meta device)."""
    from ..models import count_parameters, list_presets, list_sizes, preset_config

    return {
        name: (
            ",".join(dict.fromkeys(preset_config(name, "tiny").layer_pattern)),
            tuple(count_parameters(preset_config(name, size))[0] for size in list_sizes()),
        )
        for name in list_presets()
    }


def run(args: argparse.Namespace) -> int:
    from . import CLIError

    names = args.names or list(PRESETS)
    sizes = list(SIZES) if args.sizes is None else [s.strip() for s in args.sizes.split(",") if s.strip()]
    bad = [n for n in names if n not in PRESETS]
    if bad:
        raise CLIError(f"unknown preset(s) {', '.join(bad)}; valid presets: {', '.join(PRESETS)}")
    bad = [s for s in sizes if s not in SIZES]
    if bad or not sizes:
        raise CLIError(f"unknown size(s) {', '.join(bad) or '(none given)'}; valid sizes: {', '.join(SIZES)}")

    rows = []
    for name in names:
        blocks, counts = PRESETS[name]
        rows.append([name, blocks, *(_human(counts[SIZES.index(size)]) for size in sizes)])
    header = ["preset", "blocks", *sizes]
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    for row in [header] + rows:
        print("  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip())
    return 0


if __name__ == "__main__":
    if sys.argv[1:] == ["--recount"]:
        print("PRESETS = {")
        for name, row in recount().items():
            print(f"    {name!r}: {row!r},")
        print("}")
