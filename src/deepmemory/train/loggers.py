"""``--report-to``: where the training scalars go besides ``metrics.jsonl`` (always written).

``tensorboard`` (event files in ``RUN/tensorboard/``; needs the ``tensorboard`` package, the
``deepmemory[tensorboard]`` extra), ``wandb`` (Weights & Biases; needs ``wandb``, the
``deepmemory[wandb]`` extra, and a login or ``WANDB_MODE=offline``), ``jsonl`` (``RUN/log.jsonl``:
the same rows the other loggers get) and ``none``. As Hugging Face's Trainer does, a logger's
package is imported only when asked for, and a missing one is a one-line error before the run
starts. Rank 0 alone reports. Train scalars (``train/loss`` is the mean over the interval) come
every ``--log-every`` steps, ``eval/loss`` and ``eval/bpb`` at every evaluation; the step is the
optimizer step.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from collections.abc import Sequence

from .config import REPORTERS, ConfigError

LOG = "log.jsonl"
TENSORBOARD_DIR = "tensorboard"
PACKAGES = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb")}  # name -> (module, extra)


def check_reporters(names: Sequence[str] | None) -> None:
    """Raise ``ConfigError`` (one line) for a logger whose package is not installed."""
    for name in names or ():
        if name in PACKAGES:
            module, extra = PACKAGES[name]
            if importlib.util.find_spec(module) is None:
                raise ConfigError(
                    f"--report-to {name} needs the `{module}` package: "
                    f"pip install {module} (or the deepmemory[{extra}] extra)"
                )


class JsonlReporter:
    """``RUN/log.jsonl``: one ``{"step": N, name: value, ...}`` object per report."""

    def __init__(self, run_dir: str):
        self.file = open(os.path.join(run_dir, LOG), "a")

    def log(self, scalars: dict[str, float], step: int) -> None:
        from .checkpoint import finite_or_none, strict_json

        self.file.write(strict_json(finite_or_none(dict(step=step, **scalars))) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


class TensorBoardReporter:
    """Event files in ``RUN/tensorboard/``; a resumed run drops the events past its checkpoint."""

    def __init__(self, run_dir: str, step: int):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(os.path.join(run_dir, TENSORBOARD_DIR), purge_step=step or None)

    def log(self, scalars: dict[str, float], step: int) -> None:
        for name, value in scalars.items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbReporter:
    """A Weights & Biases run named after the run directory; a resumed run continues it (its id
    comes from the run directory's path and creation time). ``WANDB_PROJECT`` picks the project
    (default ``deepmemory``)."""

    def __init__(self, run_dir: str, record: dict, settings: dict):
        import wandb

        path = os.path.abspath(run_dir)
        run_id = hashlib.sha256(f"{path}|{record.get('created', '')}".encode()).hexdigest()[:16]
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "deepmemory"),
            name=os.path.basename(path),
            id=run_id,
            resume="allow",
            dir=path,
            config=settings,
        )

    def log(self, scalars: dict[str, float], step: int) -> None:
        self.run.log(dict(scalars), step=step)

    def close(self) -> None:
        self.run.finish()


def make_reporters(names: Sequence[str] | None, run_dir: str, record: dict, settings: dict, step: int) -> list:
    """The loggers ``names`` for ``run_dir`` (rank 0), continuing at ``step``."""
    check_reporters(names)
    if not record:  # a fresh run: the record was just written
        from .checkpoint import read_run_config

        record = read_run_config(run_dir)
    out = []
    for name in names or ():
        if name == "jsonl":
            out.append(JsonlReporter(run_dir))
        elif name == "tensorboard":
            out.append(TensorBoardReporter(run_dir, step))
        elif name == "wandb":
            out.append(WandbReporter(run_dir, record, settings))
        elif name not in REPORTERS:
            raise ConfigError(f"--report-to must be among {', '.join(REPORTERS)}; got {name!r}")
    return out


def cut_log(run_dir: str, step: int) -> None:
    """Drop the ``log.jsonl`` rows past ``step`` (what a resumed run will report again)."""
    from .checkpoint import write_text

    path = os.path.join(run_dir, LOG)
    if not os.path.isfile(path):
        return
    keep = []
    with open(path) as f:
        for line in f:
            try:
                row = json.loads(line)
            except ValueError:  # a line cut short by a crash
                break
            if row.get("step", 0) <= step:
                keep.append(line if line.endswith("\n") else line + "\n")
    write_text(path, "".join(keep))
