"""``deepmemory models``: the presets of both papers with their parameter counts per size.

The table is stored here (``SIZES``, ``PRESETS``) so that the command prints at once: counting
builds every model of every size, and importing torch and transformers alone takes seconds.
``tests/test_cli_fast.py`` checks it against ``deepmemory.models.count_parameters``; after a
change to a preset, ``python -m deepmemory.cli.models --recount`` prints the new table.
``--ratio`` adds each count's ratio to the transformer's at its size (the paper sizes are matched
within 10%); ``--layout`` builds the configs instead and prints each preset's blocks and SwiGLU width.
"""

from __future__ import annotations

import argparse
import math
import sys

from . import add_debug, add_version

HELP = "list model presets and their parameter counts per size"

SIZES = ("tiny", "tiny-w16", "170m", "340m", "760m", "1.3b")
# preset -> (its blocks, parameter count per size in SIZES)
PRESETS = {
    "transformer": ("attn", (98624, 98624, 169691904, 341099520, 757016064, 1301882880)),
    "swa": ("swa", (98624, 98624, 169691904, 341099520, 757016064, 1301882880)),
    "gated-deltanet": ("memory", (119944, 119944, 170288712, 339981528, 759536928, 1298058564)),
    "titans-lmm": ("memory", (126840, 126840, 170393472, 338251392, 759821184, 1299086256)),
    "titans-mac": ("mac", (176248, 176248, 173766240, 344640144, 758787696, 1293751584)),
    "titans-mag": ("mag", (159864, 159864, 163149408, 331877120, 773189520, 1287050808)),
    "titans-mal": ("mal", (159608, 159608, 163135584, 331844352, 773137296, 1286997560)),
    "omeganet": ("memory", (197016, 197016, 169546848, 338353152, 759974016, 1297762752)),
    "atlas": ("memory", (197016, 197016, 169546848, 338353152, 759974016, 1297762752)),
    "atlas-pp": ("memory", (275352, 275352, 170763360, 341597184, 757762176, 1302628800)),
    "atlas-mag": ("mag", (230552, 230552, 177223176, 342983424, 773561600, 1301856352)),
    "atlas-mal": ("mal", (230296, 230296, 177209352, 342952704, 773512448, 1301803104)),
    "dla": ("memory", (195976, 195976, 170873376, 341497344, 763510656, 1300119744)),
    "swla": ("memory", (111992, 111992, 170688384, 341003904, 762770304, 1303215024)),
    "deep-transformer": ("kernel", (117104, 117104, 169950912, 340217088, 758051328, 1302625056)),
    "swdt": ("kernel", (117104, 117104, 169950912, 340217088, 758051328, 1302625056)),
    "dot": ("kernel", (117104, 117104, 169950912, 340217088, 758051328, 1302625056)),
}


def register(subparsers) -> None:
    p = subparsers.add_parser("models", help=HELP)
    add_version(p)
    p.add_argument("names", nargs="*", metavar="PRESET", help="presets to show (default: all)")
    p.add_argument("--sizes", default=None, help="comma-separated sizes to show (default: all)")
    p.add_argument("--ratio", action="store_true", help="add each count's ratio to the transformer's at its size")
    p.add_argument(
        "--layout",
        action="store_true",
        help="print blocks x SwiGLU width instead of the counts (builds the configs: seconds)",
    )
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

    if args.layout:
        from ..models import preset_config

    rows = []
    for name in names:
        blocks, counts = PRESETS[name]
        cells = []
        for size in sizes:
            count = counts[SIZES.index(size)]
            if args.layout:
                config = preset_config(name, size)
                cell = f"{config.num_hidden_layers}x{config.intermediate_size}"
            else:
                cell = _human(count)
            if args.ratio:
                cell += f" ({count / PRESETS['transformer'][1][SIZES.index(size)]:.2f})"
            cells.append(cell)
        rows.append([name, blocks, *cells])
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
