"""``deepmemory experiment NAME``: train and evaluate a set of presets at equal tokens and steps and
write ``RESULTS.md`` and ``results.json``; the logic lives in ``deepmemory.experiments``
(docs/experiments.md)."""

from __future__ import annotations

import argparse

from . import CLIError, add_debug, add_version

HELP = "run an experiment (length-generalization, language-modeling, ablations, calibration): RESULTS.md"
NAMES = ("length-generalization", "language-modeling", "ablations", "calibration")  # deepmemory.experiments.NAMES


def _names(text: str) -> list[str]:
    names = [w.strip() for w in text.split(",") if w.strip()]
    if not names:
        raise argparse.ArgumentTypeError("name at least one, separated by commas")
    return names


def _seeds(text: str) -> list[int]:
    try:
        seeds = [int(w) for w in text.split(",") if w.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of seeds (e.g. 0,1,2)") from None
    if not seeds or any(s < 0 or s >= 2**63 for s in seeds):
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of seeds in [0, 2^63) (e.g. 0,1,2)")
    if len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"{text!r} names a seed twice")
    return seeds


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "experiment",
        help=HELP,
        description=(
            "Train and evaluate a set of presets at equal tokens and steps (matched sizes where the experiment "
            "says so) and write RESULTS.md (tables and plots) and results.json into --out, with the command, "
            "seeds, times, machine and versions. A finished cell is never re-run: the same command continues an "
            "interrupted experiment. Budgets: toy (seconds, a smoke test), cpu (the real run on a small CPU "
            "machine), gpu (the larger scale, with --device cuda)."
        ),
    )
    add_version(p)
    p.add_argument("name", metavar="NAME", choices=NAMES, help=", ".join(NAMES))
    p.add_argument("--budget", choices=("toy", "cpu", "gpu"), default="toy", help="the scale; default toy")
    p.add_argument(
        "--out",
        metavar="DIR",
        help="output folder; default experiments/results/NAME-BUDGET (under the current directory)",
    )
    p.add_argument(
        "--device", choices=("auto", "cpu", "cuda"), default="cpu", help="default cpu (auto: CUDA when present)"
    )
    p.add_argument(
        "--threads", type=int, default=None, metavar="N", help="intra-op CPU threads (default: OMP_NUM_THREADS, else 1)"
    )
    p.add_argument(
        "--presets",
        type=_names,
        metavar="LIST",
        help="run only these of the budget's presets, separated by commas (ablations: the base presets titans-lmm, "
        "atlas); the sizes stay matched over all of the budget's presets",
    )
    p.add_argument(
        "--tasks",
        type=_names,
        metavar="LIST",
        help="run only these of the budget's tasks, separated by commas (length-generalization: mqar, s-niah-1; "
        "ablations: the measures mqar, text; the other experiments have no tasks)",
    )
    p.add_argument("--seeds", type=_seeds, metavar="LIST", help="seeds instead of the budget's (e.g. 0,1,2)")
    p.add_argument(
        "--group",
        type=_names,
        metavar="LIST",
        help="cost classes to run, separated by commas: main, atlas (Muon per token, about 80 tokens/s at tiny on a "
        "CPU core); default all",
    )
    p.add_argument("--verbose", action="store_true", help="print the training runs' log lines")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    add_debug(p)
    p.set_defaults(func=run)


def _argv(args: argparse.Namespace) -> list[str]:
    """The command line that reproduces ``args`` (options in a fixed order, defaults left out but the budget)."""
    argv = ["experiment", args.name, "--budget", args.budget]
    for name in ("out", "device", "threads", "presets", "tasks", "seeds", "group"):
        value = getattr(args, name)
        if value is None or (name == "device" and value == "cpu"):
            continue
        argv += [f"--{name}", ",".join(map(str, value)) if isinstance(value, list) else str(value)]
    return argv


def run(args: argparse.Namespace) -> int:
    """Run the experiment ``args`` name; a user error raises ``CLIError`` (one line, exit code 2)."""
    from ..eval import EvalError
    from ..experiments import ExperimentError, run_experiment
    from ..experiments.runner import command_line
    from ..train import USER_ERRORS
    from .generate import set_threads

    if args.threads is not None and args.threads < 1:
        raise CLIError(f"--threads must be >= 1; got {args.threads}")
    if args.out is not None and not args.out.strip():
        raise CLIError("--out is empty; name a folder")
    set_threads(args.threads)
    device = args.device
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        results = run_experiment(
            args.name,
            args.budget,
            args.out,
            device=device,
            threads=args.threads,
            presets=args.presets,
            tasks=args.tasks,
            seeds=args.seeds,
            groups=args.group,
            command=command_line(_argv(args)),
            progress=args.progress,
            verbose=args.verbose,
        )
    except (ExperimentError, EvalError, *USER_ERRORS) as err:
        raise CLIError(" ".join(str(err).split())) from err
    out = args.out or f"experiments/results/{args.name}-{args.budget}"
    state = (
        "complete" if results["complete"] else f"partial: {results['cells_finished']} of {results['cells_total']} cells"
    )
    print(f"{args.name} ({args.budget}): {state}; {out}/RESULTS.md, results.json")
    return 0
