"""The options of ``deepmemory train``, and the command itself for ``python -m deepmemory.train``
(what ``torchrun -m deepmemory.train`` starts on every rank).

The ``deepmemory`` command line (``deepmemory.cli``) adds these options to its ``train``
subcommand; this module imports nothing from it, so ``train`` stays below ``cli``.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback

from .config import REPORTERS, load_config_file, parse_duration
from .config import TrainConfig as D

PROG = "deepmemory train"
HELP = "train a model; with no arguments, titans-mac (tiny) on the Python standard library"
DESCRIPTION = (
    "Train a model and write a run directory: a Hugging Face model folder (config.json, model.safetensors, "
    "generation_config.json, tokenizer) with run.json, metrics.jsonl, checkpoints/ and loss.png. Under "
    "torchrun the global batch is split across processes."
)
S = argparse.SUPPRESS  # absent flags stay absent: the config file, the resumed run or the defaults decide
NOT_SETTINGS = (
    "func",
    "command",
    "config",
    "resume",
    "overwrite",
    "debug",
    "progress",
)  # the parsed names that are not TrainConfig fields
EXIT_USER_ERROR = 2  # a user error (ConfigError, DataError, CheckpointError, TrainError)
EXIT_DIVERGED = 3  # the run diverged (DivergenceError): nothing of the diverged state was written
EXIT_OUT_OF_MEMORY = 4  # the process ran out of memory (MemoryError, torch.OutOfMemoryError)


def _duration(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds or a duration such as 90s, 45m, 2h; got {text!r}") from None


def task_setting(text: str):
    """``KEY=VALUE`` of ``--task-settings`` as ``(key, value)``: the value read as JSON when it is
    (``8``, ``0.5``, ``true``, ``[1, 2]``), else kept as a string."""
    key, sep, value = text.partition("=")
    key = key.strip().replace("-", "_")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (e.g. num_pairs=8); got {text!r}")
    try:
        return key, json.loads(value)
    except ValueError:
        return key, value


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Add the ``deepmemory train`` options to ``p``; an option not given stays out of the parsed namespace."""

    def add(*names, **kwargs):
        p.add_argument(*names, default=S, **kwargs)

    add(
        "--config",
        help="a .yaml or .json file of the settings below (flags override it); relative paths in it "
        "are relative to the file",
    )
    add("--model", help="preset name (see `deepmemory models`); default titans-mac")
    add("--size", help="preset size; default tiny")
    add(
        "--data",
        nargs="+",
        metavar="PATH",
        help="text files, folders, .jsonl files with a 'text' field, or "
        "hf:NAME (needs `datasets`); default: the Python standard library source",
    )
    add(
        "--task",
        metavar="NAME",
        help="train on a generated task instead of a corpus (mqar, s-niah-1, babilong-qa1, "
        "mad-icr, ...; see docs/training.md): fresh samples every step, loss at the answer tokens only, validation "
        "accuracy",
    )
    add(
        "--task-settings",
        nargs="+",
        type=task_setting,
        metavar="KEY=VALUE",
        help="settings of --task, e.g. num_pairs=8 vocab_size=8192 (the task's defaults otherwise)",
    )
    add("--tokenizer", help="'bytes' (default) or a Hugging Face tokenizer.json")
    add(
        "--packing",
        action=argparse.BooleanOptionalAction,
        help="read each document of a training row as if alone (the memory, convolutions, attention and positions "
        "restart where a document begins; the target that begins a document is not scored); on by default for a "
        "corpus. --no-packing: one continuous stream, the memory running across documents (a --task is never packed)",
    )
    add("--val-fraction", type=float, help="share of documents held out for validation; default 0.02")
    add("--seq-len", type=int, help=f"tokens per training sequence; default {D.seq_len}")
    add(
        "--batch-size",
        type=int,
        help=f"global batch: sequences per optimizer step, over all processes; default {D.batch_size}",
    )
    add("--grad-accum", type=int, help="micro-steps the global batch is split into")
    add("--steps", type=int, help=f"optimizer steps (the total, also when resuming); default {D.steps}")
    add("--lr", type=float, help=f"peak learning rate (AdamW, linear warmup, cosine); default {D.lr:g}")
    add("--warmup-steps", type=int, help="default 10%% of the decay steps, at most 100")
    add(
        "--lr-decay-steps",
        type=int,
        help="length of the cosine; default --steps. Set it to the planned "
        "total when a run is to be extended with --resume",
    )
    add("--weight-decay", type=float, help="AdamW weight decay of matrices; default 0.1")
    add("--grad-clip", type=float, help="clip the global gradient norm (0: off); default 1.0")
    add("--precision", choices=("auto", "fp32", "bf16"), help="auto: bf16 autocast on GPU, fp32 on CPU")
    add("--device", choices=("auto", "cpu", "cuda"), help="default auto (CUDA when present)")
    add("--threads", type=int, help="intra-op threads per process (default: OMP_NUM_THREADS if set, else 1 on CPU)")
    add("--compile", action="store_true", help="torch.compile the model")
    add("--grad-checkpointing", action="store_true", help="recompute each block's activations in backward")
    add("--fsdp", action="store_true", help="under torchrun, shard with FSDP2 (automatic for >= 300M parameters)")
    add("--seed", type=int, help="seed of the model init and data order; default 0")
    add("--out", help="run directory; default runs/MODEL-SIZE-DATE-TIME")
    add("--resume", metavar="DIR", help="continue the run directory DIR from its latest checkpoint")
    add("--overwrite", action="store_true", help="replace an existing run directory at --out")
    add(
        "--eval-every",
        type=int,
        help=f"validate (and redraw loss.png) every N steps and at the end; default {D.eval_every}",
    )
    add("--save-every", type=int, help="checkpoint every N steps and at the end; default --eval-every")
    add(
        "--log-every",
        type=int,
        help=f"print a log line and report the train scalars every N steps; default {D.log_every}",
    )
    add(
        "--time-limit",
        type=_duration,
        metavar="DURATION",
        help="stop (evaluated and checkpointed, resumable) after the "
        "first step past this much time: seconds, or 90s, 45m, 2h; default none",
    )
    add(
        "--report-to",
        nargs="+",
        choices=REPORTERS,
        metavar="LOGGER",
        help="also log to: tensorboard (RUN/tensorboard/, "
        "needs `tensorboard`), wandb (needs `wandb`), jsonl (RUN/log.jsonl), none (default; metrics.jsonl is always "
        "written)",
    )
    add("--eval-tokens", type=int, help=f"validation tokens per evaluation; default {D.eval_tokens}")
    add("--keep-checkpoints", type=int, help="checkpoints kept (the newest); default 2")
    add(
        "--no-progress",
        dest="progress",
        action="store_false",
        help="no progress bar (the log lines stay); without it the bar is drawn only when stderr is a terminal",
    )
    add("--debug", action="store_true", help="print the traceback of an error before its one-line message")
    from .. import __version__

    p.add_argument(
        "--version", action="version", version=f"deepmemory {__version__}", help="print the version and exit"
    )


def settings_from_args(args: argparse.Namespace) -> dict:
    """The ``TrainConfig`` settings of parsed options: the ``--config`` file's, overridden by the
    flags given. Raises ``ConfigError`` for an unreadable config file."""
    given = {k: v for k, v in vars(args).items() if k not in NOT_SETTINGS}
    if "task_settings" in given:
        given["task_settings"] = dict(given["task_settings"])
    file_settings = load_config_file(args.config) if getattr(args, "config", None) else {}
    return {**file_settings, **given}


def run_from_args(args: argparse.Namespace) -> dict:
    """Train (or resume) as the parsed options say; returns the run's summary.

    Raises:
        TrainError: ``--resume`` with ``--overwrite``.
        DivergenceError: the run diverged (a ``TrainError``; exit code 3 on the command line).
        ConfigError, DataError, CheckpointError, TrainError: the user errors of the run
            (``deepmemory.train.USER_ERRORS``, each one line).
    """
    from .trainer import TrainError, train

    resume = getattr(args, "resume", None)
    overwrite = getattr(args, "overwrite", False)
    if resume and overwrite:
        raise TrainError("--resume and --overwrite exclude each other")
    progress = getattr(args, "progress", True)
    return train(settings_from_args(args), resume=resume, overwrite=overwrite, progress=progress)


def error_line(err: BaseException) -> str:
    """The one line ``deepmemory train`` prints for a user error (without the ``PROG: error:`` prefix)."""
    return " ".join(str(err).split())


def exit_code(err: BaseException) -> int:
    """``EXIT_DIVERGED`` (3) for a ``DivergenceError``, ``EXIT_USER_ERROR`` (2) for the other user errors."""
    from .trainer import DivergenceError

    return EXIT_DIVERGED if isinstance(err, DivergenceError) else EXIT_USER_ERROR


def print_traceback(args: argparse.Namespace, err: BaseException | None = None) -> None:
    """With ``--debug``, print the traceback of ``err`` (default: the error being handled) on stderr."""
    if getattr(args, "debug", False):
        if err is None:
            traceback.print_exc()
        else:
            traceback.print_exception(type(err), err, err.__traceback__)


def main(argv: list[str] | None = None) -> int:
    """``deepmemory train`` on its own (``python -m deepmemory.train [options]``): ``0`` when the
    run completes, ``2`` after a user error (an ``OSError`` of a file among them), ``3`` when the
    run diverged and ``4`` when memory ran out, printed as one line ``deepmemory train: error: ...``
    on stderr (after the traceback with ``--debug``); a malformed command line exits with argparse's ``2``."""
    from ..checks import OneLineParser, os_error_line, out_of_memory
    from .trainer import USER_ERRORS

    parser = OneLineParser(prog=PROG, description=DESCRIPTION)
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        run_from_args(args)
    except KeyboardInterrupt:  # Ctrl-C: one line; the run resumes from its last checkpoint
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except USER_ERRORS as err:
        failure, line, code = err, error_line(err), exit_code(err)
    except OSError as err:
        failure, line, code = err, os_error_line(err), EXIT_USER_ERROR
    except (MemoryError, RuntimeError) as err:  # torch.OutOfMemoryError is a RuntimeError
        if not out_of_memory(err):
            raise
        failure = err
        line, code = (
            f"out of memory ({error_line(err)[:200]}); a smaller --batch-size, --seq-len or model needs less",
            EXIT_OUT_OF_MEMORY,
        )
    else:
        return 0
    print_traceback(args, failure)
    print(f"{PROG}: error: {line}", file=sys.stderr)
    return code
