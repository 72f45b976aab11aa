"""``deepmemory bench write``: each memory preset's write strength at init and with every gate
saturated (:func:`deepmemory.models.write_strength`; docs/numerics.md#write-strength).

One write of ``(k, v)`` into a freshly initialised memory layer, then a read at ``k``: the table
gives the op's learning rate at init, the fraction of the residual ``v - M(k)`` the write closes
at init and with the gates saturated, and the ratio of the init fraction to Gated DeltaNet's
(whose ``beta`` starts at 0.1 and closes about 10%). A measurement, not a timing: it runs in
float64 on one thread in seconds at ``tiny``."""

from __future__ import annotations

import argparse

REFERENCE = "gated-deltanet"


def memory_presets() -> list[str]:
    """The presets with a memory layer (every one but ``transformer`` and ``swa``)."""
    from ..models import list_presets, preset_config

    return [n for n in list_presets() if preset_config(n).memory or preset_config(n).kernel]


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--models", nargs="+", default=None, help="memory presets to measure; default every one")
    ap.add_argument("--size", default="tiny", help="preset size (see `deepmemory models`); default tiny")
    ap.add_argument("--samples", type=int, default=64, help="random inputs per memory layer; default 64")
    ap.add_argument("--seed", type=int, default=0, help="seed of the weights and the inputs; default 0")
    ap.add_argument("--threads", type=int, default=1, help="intra-op CPU threads; default 1")


def run(models: list[str], size: str, samples: int, seed: int) -> list[dict]:
    """One row per preset of ``models`` (Gated DeltaNet is measured as well, for the ratio)."""
    from ..models import write_strength

    measured = {name: write_strength(name, size, samples=samples, seed=seed) for name in dict.fromkeys(models)}
    reference = measured.get(REFERENCE) or write_strength(REFERENCE, size, samples=samples, seed=seed)
    rows = []
    for name, r in measured.items():
        rows.append(
            {
                "preset": name,
                "family": r.family,
                "step at init": f"{r.step_init:.2e}",
                "write at init": f"{100 * r.init:.3g}%",
                "step saturated": f"{r.step_saturated:.2g}",
                "write saturated": f"{100 * r.saturated:.3g}%",
                f"init / {REFERENCE}": f"{r.init / reference.init:.3g}",
            }
        )
    return rows


def run_cli(args: argparse.Namespace) -> list[dict]:
    import torch

    from ..cli import CLIError
    from ..models import list_sizes
    from .measure import fmt_threads, print_table

    valid = memory_presets()
    for name in args.models or []:
        if name not in valid:
            raise CLIError(f"unknown memory preset {name!r}; valid: {', '.join(valid)}")
    if args.size not in list_sizes():
        raise CLIError(f"unknown size {args.size!r}; valid: {', '.join(list_sizes())}")
    torch.set_num_threads(args.threads)
    rows = run(args.models or valid, args.size, args.samples, args.seed)
    print(
        f"write strength: one write of (k, v), read at k, closes this fraction of v - M(k) (size {args.size}, "
        f"{args.samples} inputs per memory layer, seed {args.seed}, float64, {fmt_threads(args.threads)})"
    )
    columns = list(rows[0])
    print_table(rows, columns, left=("preset", "family"))
    return rows
