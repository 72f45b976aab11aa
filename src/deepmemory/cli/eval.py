"""``deepmemory eval``: a checkpoint's accuracy on generated tasks (S-NIAH, BABILong-style QA, MQAR,
MAD) over context lengths and needle depths; the logic lives in ``deepmemory.eval``."""

from __future__ import annotations

import argparse
import os
import sys

from . import CLIError, add_debug, add_version

HELP = "score a checkpoint on generated recall tasks over context lengths (results.json, results.md, heatmap.png)"


def _setting(text: str):
    from ..train.command import task_setting

    return task_setting(text)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "eval",
        help=HELP,
        description=(
            "Evaluate a model written by `deepmemory train` (a run directory or one of its checkpoints/step-N) or "
            "`deepmemory export` on generated tasks: each prompt is read through the model's recurrent cache in chunks "
            "(bounded memory for memory models at any length), answered greedily and scored by the task's rule. Writes "
            "results.json (after every batch of samples: a rerun continues an interrupted evaluation), results.md and "
            "heatmap.png into --out."
        ),
    )
    add_version(p)
    p.add_argument(
        "task",
        metavar="TASK",
        help="a task name, or several separated by commas (s-niah-1, s-niah-2, s-niah-3, "
        "babilong-qa1..qa5, mqar, mad-icr, mad-noisy-icr, mad-fuzzy-icr, mad-selective-copy, mad-compression, "
        "mad-memorization)",
    )
    p.add_argument(
        "--checkpoint",
        required=True,
        metavar="DIR",
        help="a run directory, one of its checkpoints/step-N, or a folder written by `deepmemory export`",
    )
    p.add_argument(
        "--lengths",
        required=True,
        metavar="LIST",
        help="prompt lengths in tokens, separated by commas; k = 1024, m = 1024^2 (e.g. 1k,4k,16k,1m)",
    )
    p.add_argument(
        "--depths",
        metavar="LIST",
        help="needle depths in [0, 1] separated by commas (e.g. 0,0.25,0.5,0.75,1), "
        "for the tasks that place a needle (S-NIAH); default: each sample draws its own",
    )
    p.add_argument("--samples", type=int, default=20, help="samples per (task, length, depth); default 20")
    p.add_argument(
        "--first-seed",
        type=int,
        default=0,
        metavar="N",
        help="seed of each cell's first sample (sample i has seed N + i); another N draws samples the default "
        "does not, e.g. held out from an earlier evaluation; default 0",
    )
    p.add_argument("--out", metavar="DIR", help="output folder; default eval/CHECKPOINT-NAME/TASKS")
    p.add_argument(
        "--task-settings",
        nargs="+",
        type=_setting,
        metavar="KEY=VALUE",
        help="task settings, e.g. num_pairs=16; a checkpoint trained with --task on this task starts from "
        "its training settings, any other from the task's defaults",
    )
    p.add_argument("--chunk-size", type=int, default=2048, help="prompt tokens read per forward call; default 2048")
    p.add_argument(
        "--batch-size",
        type=int,
        default=8,
        help="samples read together (one for very long prompts on a small machine); default 8",
    )
    p.add_argument(
        "--device", choices=("auto", "cpu", "cuda"), default="cpu", help="default cpu (auto: CUDA when present)"
    )
    p.add_argument(
        "--threads", type=int, default=None, help="intra-op CPU threads (default: OMP_NUM_THREADS if set, else 1)"
    )
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    add_debug(p)
    p.set_defaults(func=run)


def default_out(checkpoint: str, tasks) -> str:
    """``eval/RUN[-step-N]/TASKS`` in the working directory."""
    path = os.path.normpath(os.path.abspath(checkpoint))
    name = os.path.basename(path)
    if os.path.basename(os.path.dirname(path)) == "checkpoints":  # RUN/checkpoints/step-N
        name = f"{os.path.basename(os.path.dirname(os.path.dirname(path)))}-{name}"
    return os.path.join("eval", name, "+".join(tasks))


def run(args: argparse.Namespace) -> int:
    """Evaluate as ``args`` say and print the accuracy table; a user error raises ``CLIError``
    (one line, exit code 2)."""
    from ..eval import EvalError, Evaluation, parse_depths, parse_lengths
    from .generate import set_threads

    try:
        tasks = [t.strip() for t in args.task.split(",") if t.strip()]
        lengths = parse_lengths(args.lengths)
        depths = parse_depths(args.depths) if args.depths is not None else None
        if args.threads is not None and args.threads < 1:
            raise EvalError(f"--threads must be >= 1; got {args.threads}")
        set_threads(args.threads)
        import torch

        device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
        evaluation = Evaluation(
            tasks,
            args.checkpoint,
            lengths,
            depths,
            samples=args.samples,
            out=args.out or default_out(args.checkpoint, tasks),
            task_settings=dict(args.task_settings or []),
            chunk_size=args.chunk_size,
            batch_size=args.batch_size,
            device=device,
            first_seed=args.first_seed,
        )
        for note in evaluation.notes:
            print(f"deepmemory eval: note: {note}", file=sys.stderr)
        evaluation.run(progress=args.progress)
    except EvalError as err:
        raise CLIError(str(err)) from err
    rows, columns, acc, _ = evaluation.table()
    width = max(len(c) for c in columns + ["length"])
    print("length".ljust(8) + "".join(c.rjust(width + 2) for c in columns))
    for label, a_row in zip(rows, acc):
        print(label.ljust(8) + "".join(("–" if a is None else f"{100 * a:.1f}%").rjust(width + 2) for a in a_row))
    print(f"results: {os.path.join(evaluation.out, 'results.json')}, results.md, heatmap.png")
    return 0
