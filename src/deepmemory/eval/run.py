"""``deepmemory eval``: accuracy of a checkpoint on generated tasks over context lengths and depths.

For every cell (task, length, depth) the evaluator draws ``samples`` samples (``Task.sample(length,
seed=i, depth)`` for ``i = first_seed .. first_seed + samples - 1``, ``first_seed`` 0 by default),
reads each prompt through the model's recurrent cache in chunks (:mod:`deepmemory.eval.decode`),
decodes greedily — ``len(answer_ids)`` tokens, or for the BABILong tasks up to the end of the first
sentence (``MAX_SENTENCE_TOKENS`` at most) — and scores the output by the task's rule
(``Task.score``). Writes into the output folder:

- ``results.json``: the settings, the model and one entry per cell with each sample's outcome,
  rewritten atomically after every batch of samples, so an interrupted evaluation continues where
  it stopped (a rerun with the same settings skips what is done; other settings are refused);
- ``results.md``: a Markdown table, accuracy per length and depth (one task) or per length and task;
- ``heatmap.png``: the same table as a heatmap.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from ..files import atomic_path, write_json_atomic, write_text_atomic

FORMAT = 1  # of results.json
RESULTS, TABLE, HEATMAP = "results.json", "results.md", "heatmap.png"
MAX_SENTENCE_TOKENS = 48  # the longest BABILong answer decoded (tokens), when no sentence end comes first
SENTENCE_ENDS = (".", "!", "?", "\n")
SUFFIXES = {"k": 1024, "m": 1024**2}


class EvalError(ValueError):
    """A user error of an evaluation: one line."""


def parse_lengths(text: str) -> list[int]:
    """``"1k,2k,64k,1m,100"`` as token counts (``k`` = 1024, ``m`` = 1024²), in the given order,
    repeats dropped.

    Raises:
        EvalError: an entry that is not a positive whole number of tokens.
    """
    lengths: list[int] = []
    for word in str(text).split(","):
        word = word.strip().lower()
        scale = SUFFIXES.get(word[-1:], 1)
        number = word[:-1] if word[-1:] in SUFFIXES else word
        try:
            value = float(number) * scale
        except ValueError:
            raise EvalError(f"--lengths: {word!r} is not a length (tokens, or with k/m: 4k, 1m)") from None
        if not (math.isfinite(value) and value >= 1 and value == int(value)):
            raise EvalError(f"--lengths: {word!r} is not a positive whole number of tokens")
        if int(value) not in lengths:
            lengths.append(int(value))
    return lengths


def parse_depths(text: str) -> list[float]:
    """``"0,0.25,0.5"`` as depths in ``[0, 1]``, in the given order, repeats dropped.

    Raises:
        EvalError: an entry that is not a number in ``[0, 1]``.
    """
    depths: list[float] = []
    for word in str(text).split(","):
        try:
            value = float(word)
        except ValueError:
            raise EvalError(f"--depths: {word.strip()!r} is not a number in [0, 1]") from None
        if not 0.0 <= value <= 1.0:
            raise EvalError(f"--depths: {value:g} is outside [0, 1]")
        if value not in depths:
            depths.append(value)
    return depths


@dataclass
class Cell:
    """One (task, length, depth) of an evaluation and the outcome of its samples so far."""

    task: str
    length: int
    depth: float | None
    correct: list[bool] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)  # the decoded answers, for reading failures
    seconds: float = 0.0
    peak_rss_mib: float | None = None

    @property
    def key(self) -> tuple[str, int, float | None]:
        return (self.task, self.length, self.depth)

    def to_dict(self, samples: int) -> dict:
        done = len(self.correct)
        return {
            "task": self.task,
            "length": self.length,
            "depth": self.depth,
            "samples": done,
            "complete": done >= samples,
            "accuracy": sum(self.correct) / done if done else None,
            "correct": self.correct,
            "outputs": self.outputs,
            "seconds": round(self.seconds, 3),
            "peak_rss_mib": self.peak_rss_mib,
        }

    @classmethod
    def from_dict(cls, d: dict) -> Cell:
        return cls(
            task=d["task"],
            length=int(d["length"]),
            depth=d.get("depth"),
            correct=[bool(c) for c in d.get("correct", [])],
            outputs=list(d.get("outputs", [])),
            seconds=float(d.get("seconds", 0.0)),
            peak_rss_mib=d.get("peak_rss_mib"),
        )


def peak_rss_mib() -> float | None:
    """The process's peak resident set size (MiB, ``VmHWM`` of ``/proc/self/status``), or None without /proc."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


def weights_digest(path: str) -> str | None:
    """SHA-256 of the ``model.safetensors`` in ``path`` (a run directory, checkpoint or exported
    folder), or None when there is none: identifies the weights a result belongs to."""
    weights = os.path.join(path, "model.safetensors")
    if not os.path.isfile(weights):
        return None
    digest = hashlib.sha256()
    with open(weights, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_tasks(names: Sequence[str], tokenizer, settings: dict[str, dict], vocab_size: int) -> list:
    """The tasks ``names`` (with ``settings[name]``) for a model of ``vocab_size`` ids with ``tokenizer``.

    Raises:
        EvalError: an unknown task or bad settings; a token task whose ids the model cannot read;
            a text task the tokenizer cannot express (its error, or ids past the model's vocabulary).
    """
    from ..data.tasks import get_task

    tasks = []
    for name in names:
        try:
            task = get_task(name, tokenizer=tokenizer, **settings[name])
        except (ValueError, TypeError) as err:
            raise EvalError(" ".join(str(err).split())) from err
        except Exception as err:  # a tokenizer's own error (the Rust library raises plain Exceptions)
            raise EvalError(
                f"the checkpoint's tokenizer cannot express task {name}: {' '.join(str(err).split())}"
            ) from err
        if task.vocab_size is not None and task.vocab_size > vocab_size:
            raise EvalError(
                f"task {name} uses {task.vocab_size} token ids; the checkpoint's model reads only {vocab_size}"
            )
        tasks.append(task)
    return tasks


def check_sample(task, sample, vocab_size: int) -> None:
    """Raise ``EvalError`` when ``sample`` holds ids the model cannot read."""
    ids = list(sample.prompt_ids) + list(sample.answer_ids)
    if ids and (min(ids) < 0 or max(ids) >= vocab_size):
        raise EvalError(
            f"the checkpoint's tokenizer cannot express task {task.name}: its samples hold token id "
            f"{max(ids)}, past the model's vocabulary of {vocab_size}"
        )


def stop_rule(task, tokenizer):
    """``(max_new_tokens of a sample, stop)``: BABILong answers end at the first sentence end; the
    others are ``len(answer_ids)`` tokens."""
    if task.name.startswith("babilong"):

        def stop(ids: list[int]) -> bool:
            return any(mark in tokenizer.decode(ids[-1:]) for mark in SENTENCE_ENDS)

        return (lambda sample: MAX_SENTENCE_TOKENS), stop
    return (lambda sample: max(1, len(sample.answer_ids))), None


class Evaluation:
    """An evaluation of one checkpoint: the model, the tasks, the cells and the output folder.

    ``Evaluation(...)`` checks everything up front (the checkpoint, the tasks, the lengths and
    depths, the limits of growing caches, what ``out`` holds already); :meth:`run` evaluates the
    cells not yet complete, writing ``results.json`` after every batch of samples, then
    ``results.md`` and ``heatmap.png``.

    Args:
        tasks: task names (``deepmemory.data.tasks.TASKS``).
        checkpoint: a run directory, one of its ``checkpoints/step-N``, or an exported folder.
        lengths: prompt lengths in tokens (each >= every task's ``min_length``).
        depths: needle depths in ``[0, 1]`` (tasks with ``has_depth`` only), or None (the task
            draws a depth per sample).
        samples: samples per cell (int >= 1).
        first_seed: the seed of a cell's first sample (int >= 0); sample ``i`` is drawn with seed
            ``first_seed + i``, so another ``first_seed`` gives samples the default never draws
            (held-out samples of a task a model was trained on draw from the same distribution).
        out: the output folder (created; may hold a previous run of the same settings).
        task_settings: keywords of ``get_task`` for every task; a checkpoint trained on a task
            (``deepmemory train --task``) evaluates that task with its training settings, which
            these override. The tasks' defaults otherwise.
        chunk_size: prompt tokens per forward call (int >= 1).
        batch_size: samples read together (int >= 1; one sample of a long context may be all
            that fits).
        device: ``"cpu"`` or ``"cuda"``.

    Raises:
        EvalError: (one line) any of the above is wrong: an unknown task, a length below a task's
            minimum, a depth outside ``[0, 1]`` or given for a task without depth, a checkpoint that
            cannot be read or whose tokenizer cannot express a task, a model whose cache grows with
            the context (full attention, the DeepTransformer family's kernel memories) asked for
            more than ``MAX_GROWING_CONTEXT`` tokens, an ``out`` holding results of other settings.
    """

    def __init__(
        self,
        tasks: Sequence[str],
        checkpoint: str,
        lengths: Sequence[int],
        depths: Sequence[float] | None = None,
        samples: int = 20,
        out: str = "eval",
        task_settings: dict | None = None,
        chunk_size: int = 2048,
        batch_size: int = 8,
        device: str = "cpu",
        first_seed: int = 0,
    ):
        import torch

        from ..data import DataError
        from ..train.export import load_run
        from .decode import MAX_GROWING_CONTEXT, growing_blocks

        for name, value in (("samples", samples), ("chunk_size", chunk_size), ("batch_size", batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise EvalError(f"--{name.replace('_', '-')} must be an integer >= 1; got {value!r}")
        if isinstance(first_seed, bool) or not isinstance(first_seed, int) or first_seed < 0:
            raise EvalError(f"--first-seed must be an integer >= 0; got {first_seed!r}")
        if not tasks:
            raise EvalError("name a task")
        if not lengths:
            raise EvalError("--lengths names no length")
        if depths is not None:
            depths = parse_depths(",".join(str(d) for d in depths))
        try:
            model, tokenizer, info = load_run(checkpoint)
        except (ValueError, DataError) as err:  # CheckpointError, ConfigError, DataError
            raise EvalError(f"--checkpoint {checkpoint}: {' '.join(str(err).split())}") from err
        trained = (info.get("record") or {}).get("train") or {}  # the task a run was trained on keeps its settings
        self.task_settings = {
            name: {
                **((trained.get("task_settings") or {}) if trained.get("task") == name else {}),
                **(task_settings or {}),
            }
            for name in tasks
        }
        vocab = model.config.vocab_size
        self.tasks = load_tasks(tasks, tokenizer, self.task_settings, vocab)
        # what is worth a reader's notice but not an error: a token task whose ids span another range
        # than the one the model was trained on (a test of transfer, or a slip of --task-settings)
        self.notes: list[str] = []
        data = (info.get("record") or {}).get("data") or {}
        for task in self.tasks:
            was = data.get("task_vocab_size")
            if data.get("task") and was is not None and task.vocab_size is not None and task.vocab_size != was:
                self.notes.append(
                    f"task {task.name} uses token ids 0..{task.vocab_size - 1}; the model was trained on task "
                    f"{data['task']} with ids 0..{was - 1}"
                )
        for task in self.tasks:
            for length in lengths:
                if length < task.min_length:
                    raise EvalError(
                        f"task {task.name}: length {length} is below its minimum of {task.min_length} tokens"
                    )
            if depths is not None and not task.has_depth:
                raise EvalError(f"task {task.name} places nothing at a depth; drop --depths")
            try:
                check_sample(task, task.sample(min(lengths), seed=0, depth=depths[0] if depths else None), vocab)
            except EvalError:
                raise
            except (ValueError, TypeError) as err:  # the task's settings do not fit a length
                raise EvalError(f"task {task.name} at length {min(lengths)}: {' '.join(str(err).split())}") from err
            except Exception as err:  # the tokenizer's own error (the Rust library raises plain Exceptions)
                raise EvalError(
                    f"the checkpoint's tokenizer cannot express task {task.name}: {' '.join(str(err).split())}"
                ) from err
        growing = growing_blocks(model.config)
        if growing and max(lengths) > MAX_GROWING_CONTEXT:
            raise EvalError(
                f"the checkpoint's model keeps every token it reads ({growing[0]} blocks: its cache grows with the "
                f"context), so lengths above {MAX_GROWING_CONTEXT:,} tokens are refused; got {max(lengths):,}"
            )
        if device == "cuda" and not torch.cuda.is_available():
            raise EvalError("--device cuda: no CUDA device is available (use --device cpu)")
        self.model, self.tokenizer, self.device = model.to(device), tokenizer, torch.device(device)
        self.lengths, self.depths, self.samples, self.first_seed = list(lengths), depths, samples, first_seed
        self.chunk_size, self.batch_size, self.out = chunk_size, batch_size, out
        self.settings = {
            "checkpoint": os.path.abspath(checkpoint),
            "weights_sha256": weights_digest(checkpoint),
            "samples": samples,
            "task_settings": self.task_settings,
        }
        if first_seed:  # (absent at 0: folders written before the option stay readable)
            self.settings["first_seed"] = first_seed
        self.model_info = {
            "parameters": sum(p.numel() for p in model.parameters()),
            "vocab_size": vocab,
            "layer_pattern": list(model.config.layer_pattern),
            "tokenizer": tokenizer.info(),
            "preset": ((info.get("record") or {}).get("model") or {}).get("preset"),
            "step": (info.get("state") or {}).get("step"),
        }
        self.cells: dict[tuple, Cell] = {}
        self._load_previous()
        for task in self.tasks:
            for length in self.lengths:
                for depth in self.depths or [None]:
                    self.cells.setdefault((task.name, length, depth), Cell(task.name, length, depth))

    # ------------------------------------------------------------ results on disk
    def _load_previous(self) -> None:
        path = os.path.join(self.out, RESULTS)
        if os.path.exists(self.out) and not os.path.isdir(self.out):
            raise EvalError(f"--out {self.out} is not a folder")
        if not os.path.isfile(path):
            return
        try:
            with open(path) as f:
                previous = json.load(f)
            stored = previous["settings"]
            cells = [Cell.from_dict(c) for c in previous["cells"]]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise EvalError(
                f"--out {self.out}: cannot read its {RESULTS} ({err}); use another --out or delete it"
            ) from err
        for name, value in {"first_seed": 0, **self.settings}.items():
            if stored.get(name, 0 if name == "first_seed" else None) != value:
                raise EvalError(
                    f"--out {self.out} holds results of other settings ({name} {stored.get(name)!r}, now {value!r}); "
                    "use another --out or delete it"
                )
        for cell in cells:
            self.cells[cell.key] = cell

    def results(self) -> dict:
        """What ``results.json`` holds: format, settings, model, and every cell (done or not)."""
        return {
            "format": FORMAT,
            "settings": self.settings,
            "model": self.model_info,
            "cells": [c.to_dict(self.samples) for c in self.cells.values()],
        }

    def save(self) -> None:
        """Write ``results.json`` atomically."""
        os.makedirs(self.out, exist_ok=True)
        write_json_atomic(os.path.join(self.out, RESULTS), self.results())

    def pending(self) -> list[Cell]:
        """The cells of this evaluation not yet complete, in the order they run."""
        wanted = {(t.name, n, d) for t in self.tasks for n in self.lengths for d in (self.depths or [None])}
        return [c for k, c in self.cells.items() if k in wanted and len(c.correct) < self.samples]

    # ------------------------------------------------------------ the run
    def run(self, progress: bool = True) -> dict:
        """Evaluate the pending cells (a progress bar over the prompt tokens to read, drawn when
        ``progress`` and stderr is a terminal), then write ``results.md`` and ``heatmap.png``.
        Returns the results (as in ``results.json``)."""
        import torch
        from tqdm.auto import tqdm

        from .decode import answer_batch

        pending = self.pending()
        total = sum((self.samples - len(c.correct)) * c.length for c in pending)
        by_name = {t.name: t for t in self.tasks}
        self.save()
        # disable=None: tqdm draws the bar only on a terminal, so a piped log has no carriage returns
        bar = tqdm(total=total, unit="tok", unit_scale=True, disable=None if progress else True, dynamic_ncols=True)
        try:
            for cell in pending:
                task = by_name[cell.task]
                budget, stop = stop_rule(task, self.tokenizer)
                bar.set_description(
                    f"{cell.task} {cell.length:,}" + (f" @ {cell.depth:g}" if cell.depth is not None else "")
                )
                while len(cell.correct) < self.samples:
                    started = time.time()
                    first = len(cell.correct)
                    seeds = range(self.first_seed + first, self.first_seed + min(self.samples, first + self.batch_size))
                    batch = [task.sample(cell.length, seed=s, depth=cell.depth) for s in seeds]
                    with torch.no_grad():
                        outputs = answer_batch(
                            self.model,
                            [s.prompt_ids for s in batch],
                            max(budget(s) for s in batch),
                            self.chunk_size,
                            self.device,
                            stop=stop,
                            eos_id=self.tokenizer.eos_id,
                            progress=lambda n, rows=len(batch): bar.update(n * rows),  # noqa: B008 (binds this batch)
                        )
                    for sample, output in zip(batch, outputs):
                        output = output[: budget(sample)]
                        cell.correct.append(bool(task.score(sample, output)))
                        cell.outputs.append(self._shown(task, output))
                    cell.seconds += time.time() - started
                    cell.peak_rss_mib = peak_rss_mib()
                    self.save()
                bar.set_postfix_str(
                    f"{cell.task} {cell.length:,}: {sum(cell.correct)}/{len(cell.correct)}", refresh=False
                )
        finally:
            bar.close()
        self.write_reports()
        return self.results()

    def _shown(self, task, output: list[int]) -> str:
        if task.kind == "tokens":
            return " ".join(map(str, output))
        return self.tokenizer.decode(output)

    # ------------------------------------------------------------ reports
    def table(self) -> tuple[list[str], list[str], list[list[float | None]], list[list[int]]]:
        """``(row labels, column labels, accuracy, samples)``: lengths × depths for one task with
        depths, lengths × tasks otherwise (a task's accuracy over its depths pooled)."""
        by_depth = len(self.tasks) == 1 and self.depths is not None
        columns = [f"{d:g}" for d in self.depths] if by_depth else [t.name for t in self.tasks]
        acc, count = [], []
        for length in self.lengths:
            acc_row, count_row = [], []
            for j in range(len(columns)):
                if by_depth:
                    cells = [self.cells[(self.tasks[0].name, length, self.depths[j])]]
                else:
                    cells = [self.cells[(self.tasks[j].name, length, d)] for d in (self.depths or [None])]
                right = sum(sum(c.correct) for c in cells)
                done = sum(len(c.correct) for c in cells)
                acc_row.append(right / done if done else None)
                count_row.append(done)
            acc.append(acc_row)
            count.append(count_row)
        return [_length_label(n) for n in self.lengths], columns, acc, count

    def write_reports(self) -> None:
        """``results.md`` and ``heatmap.png`` from the cells."""
        rows, columns, acc, count = self.table()
        by_depth = len(self.tasks) == 1 and self.depths is not None
        corner = f"length \\ depth ({self.tasks[0].name})" if by_depth else "length \\ task"
        lines = [
            f"# deepmemory eval: {', '.join(t.name for t in self.tasks)}",
            "",
            f"Checkpoint `{os.path.basename(os.path.normpath(self.settings['checkpoint']))}`"
            + (f" ({self.model_info['preset']}, step {self.model_info['step']})" if self.model_info["preset"] else "")
            + f"; exact-match accuracy in %, {self.samples} samples per cell"
            + (
                ""
                if by_depth or self.depths is None
                else f", pooled over depths {', '.join(f'{d:g}' for d in self.depths)}"
            )
            + ".",
            "",
            "| " + corner + " | " + " | ".join(columns) + " |",
            "|---" * (len(columns) + 1) + "|",
        ]
        for label, a_row, n_row in zip(rows, acc, count):
            shown = [
                ("–" if a is None else f"{100 * a:.1f}")
                + ("" if n in (0, self.samples * (1 if by_depth else len(self.depths or [None]))) else f" ({n})")
                for a, n in zip(a_row, n_row)
            ]
            lines.append(f"| {label} | " + " | ".join(shown) + " |")
        write_text_atomic(os.path.join(self.out, TABLE), "\n".join(lines) + "\n")
        plot_heatmap(
            os.path.join(self.out, HEATMAP),
            rows,
            columns,
            acc,
            "depth" if by_depth else "task",
            f"{', '.join(t.name for t in self.tasks)}: exact-match accuracy",
        )


def _length_label(n: int) -> str:
    """``1,048,576`` as ``1M``, ``65,536`` as ``64K``, other counts as they are."""
    if n % SUFFIXES["m"] == 0:
        return f"{n // SUFFIXES['m']}M"
    if n % SUFFIXES["k"] == 0:
        return f"{n // SUFFIXES['k']}K"
    return str(n)


def plot_heatmap(
    path: str, rows: list[str], columns: list[str], acc: list[list[float | None]], xlabel: str, title: str
) -> None:
    """A heatmap PNG of ``acc`` (lengths down, ``columns`` across; None left blank), with each
    cell's accuracy written in it, written atomically to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    values = np.array([[np.nan if a is None else 100 * a for a in row] for row in acc], dtype=float)
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * max(2, len(columns)), 1.2 + 0.5 * max(2, len(rows))))
    image = ax.imshow(values, cmap="RdYlGn", vmin=0, vmax=100, aspect="auto")
    ax.set_xticks(
        range(len(columns)),
        columns,
        rotation=30 if xlabel == "task" else 0,
        ha="right" if xlabel == "task" else "center",
    )
    ax.set_yticks(range(len(rows)), rows)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("context length (tokens)")
    for i in range(len(rows)):
        for j in range(len(columns)):
            if not np.isnan(values[i, j]):
                ax.text(j, i, f"{values[i, j]:.0f}", ha="center", va="center", fontsize=9)
    fig.colorbar(image, ax=ax, label="accuracy (%)")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    with atomic_path(path, durable=False) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
