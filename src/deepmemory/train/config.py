"""Training settings: defaults, config files, CLI overrides and what a resumed run may change."""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

from ..checks import INT64_MAX, MAX_THREADS
from .checkpoint import CheckpointError

REPORTERS = ("none", "tensorboard", "wandb", "jsonl")  # --report-to (deepmemory.train.loggers)


class ConfigError(ValueError):
    """An invalid training setting; the message is one line for the user."""


@dataclass
class TrainConfig:
    """Everything that defines a training run. ``batch_size`` is the *global* batch in sequences
    per optimizer step: it is split into ``grad_accum`` micro-batches and across ranks, so the
    numbers trained on do not depend on how many processes run them."""

    model: str = "titans-mac"
    size: str = "tiny"
    model_overrides: dict[str, Any] = field(default_factory=dict)
    data: list[str] | None = None  # None: the Python standard library
    task: str | None = None  # a task of deepmemory.data.tasks.TASKS instead of a corpus (deepmemory.train.task_data)
    task_settings: dict[str, Any] = field(default_factory=dict)  # keywords of get_task(task, ...)
    tokenizer: str = "bytes"
    # documents packed with boundaries (position_ids restart at each, the target that begins one
    # unscored); False: one continuous stream. None: True for a corpus, False for a task (resolved)
    packing: bool | None = None
    val_fraction: float = 0.02
    seq_len: int = 128
    batch_size: int = 16
    grad_accum: int = 1
    steps: int = 800
    lr: float = 3e-3
    warmup_steps: int | None = None  # None: 10% of lr_decay_steps, at most 100
    lr_decay_steps: int | None = None  # None: steps (the cosine ends with the run)
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    precision: str = "auto"
    compile: bool = False
    grad_checkpointing: bool = False
    fsdp: bool = False
    device: str = "auto"
    threads: int | None = None  # intra-op threads; None: OMP_NUM_THREADS if set, else 1 on CPU
    seed: int = 0
    out: str | None = None
    eval_every: int = 100
    eval_tokens: int = 32768
    keep_checkpoints: int = 2
    save_every: int | None = None  # None: eval_every
    log_every: int = 50
    time_limit: float | None = None  # seconds of this process; None: no limit
    report_to: list[str] = field(default_factory=list)  # of REPORTERS; [] and ["none"]: metrics.jsonl only

    def resolved(self) -> TrainConfig:
        """Fill the settings whose default depends on others (stored resolved, so a resumed run
        keeps its schedule even when ``steps`` grows)."""
        cfg = dataclasses.replace(self)
        if cfg.lr_decay_steps is None:
            cfg.lr_decay_steps = cfg.steps
        if cfg.warmup_steps is None:
            cfg.warmup_steps = min(100, cfg.lr_decay_steps // 10)
        if cfg.packing is None:  # a task's rows hold one sample each already
            cfg.packing = cfg.task is None
        return cfg

    def validate(self) -> TrainConfig:
        for name in (
            "seq_len",
            "batch_size",
            "grad_accum",
            "steps",
            "eval_every",
            "eval_tokens",
            "keep_checkpoints",
            "log_every",
        ):
            _int(name, getattr(self, name), 1)
        if self.save_every is not None:
            _int("save_every", self.save_every, 1)
        if self.time_limit is not None:
            if (
                isinstance(self.time_limit, bool)
                or not isinstance(self.time_limit, (int, float))
                or not self.time_limit > 0
                or not math.isfinite(self.time_limit)
            ):
                raise ConfigError(f"--time-limit must be a positive duration; got {self.time_limit!r}")
        if isinstance(self.report_to, str):
            self.report_to = [self.report_to]
        if not isinstance(self.report_to, list) or any(r not in REPORTERS for r in self.report_to):
            raise ConfigError(f"--report-to must be among {', '.join(REPORTERS)}; got {self.report_to!r}")
        if "none" in self.report_to and len(self.report_to) > 1:
            raise ConfigError(f"--report-to none excludes the other loggers; got {' '.join(self.report_to)}")
        _int("seed", self.seed, 0)
        for name in ("warmup_steps",):
            if getattr(self, name) is not None:
                _int(name, getattr(self, name), 0)
        if self.threads is not None:
            _int("threads", self.threads, 1, MAX_THREADS)
        if self.lr_decay_steps is not None:
            _int("lr_decay_steps", self.lr_decay_steps, 1)
        for name, low, high in (
            ("lr", 0, None),
            ("weight_decay", 0, None),
            ("grad_clip", 0, None),
            ("val_fraction", 0, 1),
            ("min_lr_ratio", 0, 1),
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"{_flag(name)} must be a number; got {value!r}")
            if not math.isfinite(value):
                raise ConfigError(f"{_flag(name)} must be a finite number; got {value}")
            # open at 0 for lr and val_fraction, and at 1 for val_fraction (nothing would be left to train on)
            open_low, open_high = name in ("lr", "val_fraction"), name == "val_fraction"
            if (
                value < low
                or (high is not None and value > high)
                or (open_low and value == low)
                or (open_high and value == high)
            ):
                raise ConfigError(
                    f"{_flag(name)} must be in {'(' if open_low else '['}{low}, "
                    f"{high if high is not None else 'inf'}{')' if open_high or high is None else ']'}; got {value}"
                )
        for name, options in (("precision", ("auto", "fp32", "bf16")), ("device", ("auto", "cpu", "cuda"))):
            if getattr(self, name) not in options:
                raise ConfigError(f"{_flag(name)} must be one of {', '.join(options)}; got {getattr(self, name)!r}")
        for name in ("compile", "grad_checkpointing", "fsdp"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false; got {getattr(self, name)!r}")
        if self.packing is not None and not isinstance(self.packing, bool):
            raise ConfigError(f"packing must be true or false; got {self.packing!r}")
        for name in ("model", "size", "tokenizer"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ConfigError(f"{_flag(name)} must be a non-empty string; got {getattr(self, name)!r}")
        if not isinstance(self.model_overrides, dict):
            raise ConfigError(f"model_overrides must be a mapping; got {self.model_overrides!r}")
        if self.data is not None and (
            not isinstance(self.data, list) or not all(isinstance(p, str) and p for p in self.data)
        ):
            raise ConfigError(f"--data must be a list of paths; got {self.data!r}")
        if self.data == []:  # (the standard library is what leaving --data out means, not an empty list)
            raise ConfigError(
                "--data must name at least one path; leave it out to train on the Python standard library"
            )
        if self.out is not None and (not isinstance(self.out, str) or not self.out.strip()):
            raise ConfigError(f"--out must be a directory path; got {self.out!r}")
        if self.task is not None:
            if not isinstance(self.task, str) or not self.task:
                raise ConfigError(f"--task must be a task name; got {self.task!r}")
            if self.data is not None:
                raise ConfigError("--task trains on generated samples; it excludes --data")
            if self.packing:
                raise ConfigError(
                    "--packing packs the documents of a corpus; a --task has one sample per row already "
                    "(leave --packing out)"
                )
        if not isinstance(self.task_settings, dict) or not all(isinstance(k, str) for k in self.task_settings):
            raise ConfigError(f"--task-settings must be a mapping of setting names; got {self.task_settings!r}")
        if self.task_settings and self.task is None:
            raise ConfigError("--task-settings needs --task")
        if self.batch_size % self.grad_accum:
            raise ConfigError(f"--batch-size {self.batch_size} is not divisible by --grad-accum {self.grad_accum}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}
# may differ between a run and its resumption: they change how, not what, is computed
RESUMABLE = {
    "steps",
    "grad_accum",
    "precision",
    "compile",
    "grad_checkpointing",
    "fsdp",
    "device",
    "threads",
    "out",
    "eval_every",
    "eval_tokens",
    "keep_checkpoints",
    "save_every",
    "log_every",
    "time_limit",
    "report_to",
}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _int(name: str, value, low: int, high: int = INT64_MAX) -> None:
    """``ConfigError`` unless ``value`` is an int in ``[low, high]`` (by default up to ``INT64_MAX``:
    a larger count, size or seed overflows the tensor or generator it goes into)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{_flag(name)} must be an integer; got {value!r}")
    if value < low:
        raise ConfigError(f"{_flag(name)} must be >= {low}; got {value}")
    if value > high:
        shown = str(value) if len(str(value)) <= 30 else str(value)[:27] + "..."
        raise ConfigError(f"{_flag(name)} must be <= {high}; got {shown}")


def parse_duration(text) -> float:
    """Seconds of ``90``, ``90s``, ``45m``, ``2h``, ``1.5h``; ``ValueError`` otherwise."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return float(text)
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"not a duration: {text!r}")
    text = text.strip().lower()
    scale = {"s": 1, "m": 60, "h": 3600, "d": 86400}.get(text[-1])
    value = float(text[:-1] if scale else text) * (scale or 1)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"not a positive duration: {text!r}")
    return value


def _relative_to(base: str, settings: dict[str, Any]) -> dict[str, Any]:
    """The config file's relative paths (``data``, ``tokenizer``, ``out``) joined to its folder."""

    def join(p):
        if not isinstance(p, str) or not p or os.path.isabs(p) or p.startswith("~"):
            return os.path.expanduser(p) if isinstance(p, str) else p
        if p.startswith("hf:") and not os.path.exists(os.path.join(base, p)):  # a dataset name
            return p
        return os.path.join(base, p)

    out = dict(settings)
    if isinstance(out.get("data"), list):
        out["data"] = [join(p) for p in out["data"]]
    if isinstance(out.get("tokenizer"), str) and out["tokenizer"] != "bytes":
        out["tokenizer"] = join(out["tokenizer"])
    if isinstance(out.get("out"), str):
        out["out"] = join(out["out"])
    return out


def load_config_file(path: str) -> dict[str, Any]:
    """Settings from a ``.yaml``/``.yml``/``.json`` file; keys are the flag names (``-`` or ``_``).
    Relative paths in it (``data``, ``tokenizer``, ``out``) are relative to the file's folder, not
    to the working directory; ``time_limit`` may be a duration such as ``45m``."""
    if not os.path.isfile(path):
        raise ConfigError(f"--config: {path} does not exist")
    try:
        with open(path) as f:
            if path.endswith((".yaml", ".yml")):
                import yaml

                raw = yaml.safe_load(f)
            elif path.endswith(".json"):
                raw = json.load(f)
            else:
                raise ConfigError(f"--config must be a .yaml, .yml or .json file; got {path}")
    except ConfigError:
        raise
    except Exception as err:  # yaml and json raise different types
        raise ConfigError(f"--config: cannot parse {path}: {str(err).splitlines()[0]}") from err
    raw = raw or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"--config: {path} must hold a mapping of settings")
    settings = {str(k).replace("-", "_"): v for k, v in raw.items()}
    unknown = sorted(set(settings) - FIELDS)
    if unknown:
        close = difflib.get_close_matches(unknown[0], sorted(FIELDS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"--config: unknown settings {', '.join(unknown)} in {path}{hint}")
    if isinstance(settings.get("data"), str):
        settings["data"] = [settings["data"]]
    if settings.get("time_limit") is not None:
        try:
            settings["time_limit"] = parse_duration(settings["time_limit"])
        except ValueError as err:
            raise ConfigError(f"--config: time_limit in {path}: {err}") from err
    return _relative_to(os.path.dirname(os.path.abspath(path)), settings)


def _absolute(settings: dict[str, Any]) -> dict[str, Any]:
    """Local paths made absolute, so a run can be resumed from another working directory."""

    def local(p):  # hf: dataset names stay as they are
        return (
            p
            if not isinstance(p, str) or not p or (p.startswith("hf:") and not os.path.exists(p))
            else os.path.abspath(p)
        )

    out = dict(settings)
    if isinstance(out.get("data"), list):
        out["data"] = [local(p) for p in out["data"]]
    if isinstance(out.get("tokenizer"), str) and out["tokenizer"] not in ("", "bytes"):
        out["tokenizer"] = os.path.abspath(out["tokenizer"])
    return out


def new_config(settings: dict[str, Any]) -> TrainConfig:
    return TrainConfig(**_absolute(settings)).validate().resolved()


def resume_config(stored: dict[str, Any], settings: dict[str, Any], run_dir: str) -> TrainConfig:
    """The stored settings of ``run_dir`` with the given ones applied; only ``RESUMABLE`` may differ.
    A run recorded before ``packing`` existed read one continuous stream: it resumes with
    ``packing`` False."""
    unknown = sorted(set(stored) - FIELDS)
    if unknown:
        raise CheckpointError(f"{run_dir}: unknown settings {', '.join(unknown)} in its config.json")
    stored = dict(stored)
    if stored.get("packing") is None:
        stored["packing"] = False
    settings = {k: v for k, v in _absolute(settings).items() if not (k == "packing" and v is None)}  # (None: the run's)
    for name, value in settings.items():
        if name == "packing" and isinstance(value, bool) and stored["packing"] != value:
            raise ConfigError(
                f"--resume {run_dir}: {'--packing' if value else '--no-packing'} differs from the run's "
                f"{'--packing' if stored['packing'] else '--no-packing'}; a run keeps how its documents are packed"
            )
        if name not in RESUMABLE and stored.get(name) != value:
            raise ConfigError(
                f"--resume {run_dir}: {_flag(name)} {value!r} differs from the run's {stored.get(name)!r}; "
                "only " + ", ".join(sorted(_flag(n) for n in RESUMABLE - {"out"})) + " may change"
            )
    if "out" in settings and os.path.abspath(settings["out"]) != os.path.abspath(run_dir):
        raise ConfigError(
            f"--out {settings['out']} differs from --resume {run_dir}; a resumed run stays in its directory"
        )
    return TrainConfig(**{**stored, **settings, "out": run_dir}).validate()
