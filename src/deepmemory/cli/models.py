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

from . import add_version

HELP = "list model presets and their parameter counts per size"

SIZES = ('tiny', '170m', '340m', '760m', '1.3b')
# preset -> (its blocks, parameter count per size in SIZES)
PRESETS = {
    'transformer': ('attn', (98624, 169691904, 341099520, 757016064, 1301882880)),
    'swa': ('swa', (98624, 169691904, 341099520, 757016064, 1301882880)),
    'gated-deltanet': ('memory', (111472, 170540736, 340610304, 762180096, 1302919968)),
    'titans-lmm': ('memory', (126328, 170246016, 337858176, 759231360, 1298496432)),
    'titans-mac': ('mac', (176248, 170411904, 338300544, 759894912, 1299159984)),
    'titans-mag': ('mag', (159864, 170411904, 339873408, 759894912, 1296800688)),
    'titans-mal': ('mal', (159608, 170393472, 339824256, 759821184, 1296726960)),
    'omeganet': ('memory', (196496, 169509696, 338254080, 759825408, 1297614144)),
    'atlas': ('memory', (196496, 169509696, 338254080, 759825408, 1297614144)),
    'atlas-pp': ('memory', (274320, 170689344, 341399808, 757466112, 1302332736)),
    'atlas-mag': ('mag', (230032, 169675584, 340269312, 760488960, 1302996288)),
    'atlas-mal': ('mal', (229776, 169657152, 340220160, 760415232, 1302922560)),
    'dla': ('memory', (195456, 170836224, 341398272, 763362048, 1299971136)),
    'swla': ('memory', (111992, 170688384, 341003904, 762770304, 1303215024)),
    'deep-transformer': ('kernel', (117104, 169950912, 340217088, 758051328, 1302625056)),
    'swdt': ('kernel', (117104, 169950912, 340217088, 758051328, 1302625056)),
    'dot': ('kernel', (117104, 169950912, 340217088, 758051328, 1302625056)),
}


def register(subparsers) -> None:
    p = subparsers.add_parser("models", help=HELP)
    add_version(p)
    p.add_argument("names", nargs="*", metavar="PRESET", help="presets to show (default: all)")
    p.add_argument("--sizes", default=None, help="comma-separated sizes to show (default: all)")
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

    return {name: (",".join(dict.fromkeys(preset_config(name, "tiny").layer_pattern)),
                   tuple(count_parameters(preset_config(name, size))[0] for size in list_sizes()))
            for name in list_presets()}


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
