"""``deepmemory models``: the presets of both papers with their parameter counts per size."""

from __future__ import annotations

import argparse
import math


def register(subparsers) -> None:
    p = subparsers.add_parser("models", help="list model presets and their parameter counts per size")
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


def run(args: argparse.Namespace) -> int:
    from . import CLIError
    from ..models import count_parameters, list_presets, list_sizes, preset_config

    names = args.names or list(list_presets())
    sizes = list_sizes() if args.sizes is None else [s.strip() for s in args.sizes.split(",") if s.strip()]
    bad = [n for n in names if n not in list_presets()]
    if bad:
        raise CLIError(f"unknown preset(s) {', '.join(bad)}; valid presets: {', '.join(list_presets())}")
    bad = [s for s in sizes if s not in list_sizes()]
    if bad or not sizes:
        raise CLIError(f"unknown size(s) {', '.join(bad) or '(none given)'}; valid sizes: {', '.join(list_sizes())}")

    rows = []
    for name in names:
        config = preset_config(name, sizes[0])
        counts = [_human(count_parameters(preset_config(name, size))[0]) for size in sizes]
        rows.append([name, ",".join(dict.fromkeys(config.layer_pattern)), *counts])
    header = ["preset", "blocks", *sizes]
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    for row in [header] + rows:
        print("  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip())
    return 0
