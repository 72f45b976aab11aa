"""The runner every experiment shares: cells, the output folder, resuming, statistics and reports.

An experiment is a declarative config per budget (``toy``, ``cpu``, ``gpu``: presets, task, steps,
batch, lengths, seeds) and a function turning it into :class:`Cell` s. A cell is one training run
(``deepmemory.train.train``) and, optionally, one ``deepmemory eval`` of it
(:class:`deepmemory.eval.Evaluation`) or one write-strength measurement
(:func:`deepmemory.models.write_strength`). The runner writes, in the output folder::

    cells/KEY/run/        the cell's run directory (deepmemory train; resumed from its last checkpoint)
    cells/KEY/eval/       its deepmemory eval folder (an interrupted evaluation continues)
    cells/KEY/cell.json   the cell's outcome, written once it is finished: a finished cell is never re-run
    results.json          every finished cell, the config, the commands, seeds, times, machine, versions
    RESULTS.md            the experiment's tables and plots (*.png beside it), redrawn after every cell,
                          and discussion.md (written by a person, optional) appended

Everything is written under a temporary name and renamed into place, so a run killed at any
moment leaves whole files; running the same command again skips the finished cells and resumes
the interrupted one.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import platform
import shlex
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from .. import files
from ..files import atomic_path, write_text_atomic

FORMAT = 1  # of results.json and cell.json
RESULTS_JSON, RESULTS_MD, CELLS = "results.json", "RESULTS.md", "cells"
DISCUSSION = "discussion.md"  # optional, beside RESULTS.md: appended to it under "Discussion"
BUDGETS = ("toy", "cpu", "gpu")


class ExperimentError(ValueError):
    """A user error of an experiment (an unknown name or budget, an output folder holding another
    experiment's results): one line."""


@dataclass(frozen=True)
class Cell:
    """One unit of an experiment: a training run, then (``eval``) a ``deepmemory eval`` of it or
    (``probe``) a measurement of the built model.

    Args:
        key: a file-name-safe identifier, unique in the experiment (``mqar-titans-lmm-s0``).
        labels: what the tables group by (``{"task": "mqar", "preset": "titans-lmm", "seed": 0}``).
        train: ``deepmemory.train`` settings (``TrainConfig`` fields; the runner adds ``out``,
            ``device``, ``threads``), or None for a cell that trains nothing.
        eval: ``{"task", "lengths", "samples", "chunk_size", "batch_size"}`` for a ``deepmemory
            eval`` of the trained run, or None.
        probe: ``{"write_strength": {"preset", "size", "overrides"}}``, or None.
        group: a cell of another cost class (``"atlas"``), run and timed apart when asked.
    """

    key: str
    labels: dict
    train: dict | None = None
    eval: dict | None = None
    probe: dict | None = None
    group: str = "main"

    def spec(self) -> dict:
        return {"labels": self.labels, "train": self.train, "eval": self.eval, "probe": self.probe}


@dataclass
class Experiment:
    """An experiment: its name, what it measures, its config per budget, the cells of a config and
    the report of its results (``report(config, cells) -> (markdown, {file name: figure writer})``)."""

    name: str
    summary: str
    budgets: dict[str, dict]
    make_cells: Callable[[dict], list[Cell]]
    report: Callable[[dict, list[dict]], tuple[str, dict]]
    # the config lists the command line may narrow: option (--presets, --tasks) -> config key
    filters: dict[str, str] = field(default_factory=lambda: {"presets": "presets"})
    notes: str = ""

    def config(self, budget: str, **narrow) -> dict:
        """The budget's config with the lists in ``narrow`` (``presets=[...]``, ``tasks=[...]``,
        ``seeds=[...]``) replacing the budget's; ``ExperimentError`` for an unknown budget or a
        name outside the budget's list."""
        if budget not in self.budgets:
            raise ExperimentError(f"{self.name}: unknown budget {budget!r}; choose one of {', '.join(self.budgets)}")
        config = copy.deepcopy(self.budgets[budget])
        if "presets" in config:  # sizes are matched over the budget's presets, whatever --presets keeps
            config["size_presets"] = list(config["presets"])
        for name, values in narrow.items():
            if values is None:
                continue
            if name == "seeds":
                config["seeds"] = list(values)
                continue
            if name not in self.filters:
                raise ExperimentError(f"{self.name} has no --{name}")
            key = self.filters[name]
            known = list(config[key])
            unknown = [v for v in values if v not in known]
            if unknown:
                raise ExperimentError(
                    f"{self.name} --{name}: {', '.join(map(str, unknown))} not in the {budget} budget's "
                    f"{', '.join(map(str, known))}"
                )
            config[key] = [v for v in known if v in values]
        return config


# ---------------------------------------------------------------- statistics
def mean_std(values: Sequence[float | None]) -> tuple[float | None, float | None, int]:
    """``(mean, sample standard deviation, n)`` of the finite values; the deviation is None below 2."""
    xs = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not xs:
        return None, None, 0
    mean = sum(xs) / len(xs)
    if len(xs) < 2:
        return mean, None, len(xs)
    return mean, math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)), len(xs)


def fmt_mean(values: Sequence[float | None], scale: float = 1.0, digits: int = 1) -> str:
    """``"m ± s"`` (one seed: ``"m"``; none: ``"–"``) of ``values`` times ``scale``."""
    mean, std, n = mean_std(values)
    if mean is None:
        return "–"
    text = f"{scale * mean:.{digits}f}"
    return text + (f" ± {scale * std:.{digits}f}" if std is not None else "")


def within_noise(a: Sequence[float | None], b: Sequence[float | None], floor: float = 0.0) -> bool | None:
    """Whether the means of ``a`` and ``b`` differ by less than twice their combined standard error
    (or by less than ``floor``, the resolution of the measurement, e.g. one sample in an accuracy);
    None when either has fewer than two values (no spread measured)."""
    ma, sa, na = mean_std(a)
    mb, sb, nb = mean_std(b)
    if ma is None or mb is None:
        return None
    if sa is None or sb is None:
        return abs(ma - mb) <= floor if floor else None
    return abs(ma - mb) <= max(2 * math.sqrt(sa**2 / na + sb**2 / nb), floor)


# ---------------------------------------------------------------- files
def write_json_atomic(path: str, obj) -> None:
    """Strict JSON (a value JSON cannot hold written as its ``str``), atomically."""
    files.write_json_atomic(path, obj, default=str)


def _finite(obj):
    """``obj`` with every non-finite float replaced by None (strict JSON)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ---------------------------------------------------------------- the machine
def machine() -> dict:
    """What ran the experiment: the host's CPU, cores, memory, load, Python, torch and deepmemory."""
    import torch

    from .. import __version__

    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "deepmemory": __version__,
        "cpu_count": os.cpu_count(),
        "cpu": _cpu_model(),
    }
    try:
        info["load_average"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name(0)
    try:
        with open("/proc/meminfo") as f:
            total = next(line for line in f if line.startswith("MemTotal:"))
        info["memory_gib"] = round(int(total.split()[1]) / 2**20, 1)
    except (OSError, StopIteration):
        pass
    return info


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git_commit() -> str | None:
    """The commit of the deepmemory source tree when it is a git checkout (no subprocess: read .git)."""
    here = os.path.dirname(os.path.abspath(__file__))
    for _ in range(5):
        here = os.path.dirname(here)
        git = os.path.join(here, ".git")
        try:
            if os.path.isfile(git):  # a worktree: ".git" names its git directory
                with open(git) as f:
                    git = os.path.join(here, f.read().split("gitdir:", 1)[1].strip())
            if not os.path.isfile(os.path.join(git, "HEAD")):
                continue
            with open(os.path.join(git, "HEAD")) as f:
                ref = f.read().strip()
            if not ref.startswith("ref: "):
                return ref
            common = git
            if os.path.isfile(os.path.join(git, "commondir")):
                with open(os.path.join(git, "commondir")) as f:
                    common = os.path.join(git, f.read().strip())
            for folder in (git, common):
                path = os.path.join(folder, ref[5:])
                if os.path.isfile(path):
                    with open(path) as f:
                        return f.read().strip()
            with open(os.path.join(common, "packed-refs")) as f:
                for line in f:
                    if line.strip().endswith(ref[5:]):
                        return line.split()[0]
        except (OSError, IndexError):
            pass
        return None
    return None


def reset_peak_memory(device: str) -> None:
    """Start a new peak-memory measurement: CUDA's allocator peak, or on Linux the process's
    peak resident set (``VmHWM``, reset by writing 5 to ``/proc/self/clear_refs``)."""
    import torch

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return
    try:  # a kernel control file, not a file of the run's: a plain write, no temporary
        fd = os.open("/proc/self/clear_refs", os.O_WRONLY)
        try:
            os.write(fd, b"5")
        finally:
            os.close(fd)
    except OSError:
        pass


def peak_memory_mib(device: str) -> float | None:
    """The peak since :func:`reset_peak_memory`: CUDA's ``max_memory_allocated`` or the process's
    ``VmHWM`` (MiB); None where neither is known."""
    import torch

    if device == "cuda":
        return round(torch.cuda.max_memory_allocated() / 2**20, 1)
    from ..eval.run import peak_rss_mib

    return peak_rss_mib()


# ---------------------------------------------------------------- one cell
def _last_checkpoint(run_dir: str) -> tuple[int, dict] | None:
    """``(step, state.json)`` of the newest complete checkpoint of ``run_dir``, or None."""
    folder = os.path.join(run_dir, "checkpoints")
    if not (os.path.isfile(os.path.join(run_dir, "run.json")) and os.path.isdir(folder)):
        return None
    steps = sorted(int(name[5:]) for name in os.listdir(folder) if name.startswith("step-") and name[5:].isdigit())
    for step in reversed(steps):
        try:
            with open(os.path.join(folder, f"step-{step:08d}", "state.json")) as f:
                return step, json.load(f)
        except (OSError, ValueError):
            continue
    return None


def _read_metrics(run_dir: str) -> list[dict]:
    path = os.path.join(run_dir, "metrics.jsonl")
    rows = []
    if os.path.isfile(path):
        with open(path) as f:
            for line in f:
                line = line.strip()
                if line:
                    try:
                        rows.append(json.loads(line))
                    except ValueError:
                        pass
    return rows


def run_cell(cell: Cell, cell_dir: str, device: str, threads: int | None, progress: bool, verbose: bool) -> dict:
    """Run ``cell`` in ``cell_dir`` (resuming what an interrupted run left there) and return its
    outcome: ``status`` (``"done"`` or ``"diverged"``), ``parameters``, ``train`` (steps, tokens,
    validation loss and accuracy or bits/byte, tokens/s, wall time, peak memory), ``eval`` (accuracy
    per length), ``probe``, ``seconds``."""
    from ..train import DivergenceError, train

    os.makedirs(cell_dir, exist_ok=True)
    _clear_stale(cell_dir, cell.train)
    started = time.time()
    outcome: dict = {"key": cell.key, "labels": cell.labels, "spec": cell.spec(), "group": cell.group}
    if cell.probe:
        outcome["probe"] = _probe(cell.probe)
    run_dir = os.path.join(cell_dir, "run")
    if cell.train is not None:
        settings = dict(cell.train, out=run_dir, device=device, threads=threads)
        last = _last_checkpoint(run_dir)
        resume = run_dir if last else None
        reset_peak_memory(device)
        try:
            if last and last[0] >= settings["steps"]:  # trained to the end before an interruption: nothing to redo
                summary = {"wall_time_s": last[1].get("elapsed"), "train_loss": None}
            else:
                summary = train(settings, resume=resume, overwrite=resume is None, quiet=not verbose, progress=progress)
            outcome["status"] = "done"
        except DivergenceError as err:
            summary = {"stopped": "diverged", "error": " ".join(str(err).split())}
            outcome["status"] = "diverged"
        rows = _read_metrics(run_dir)
        steps = [r for r in rows if "loss" in r and "val_loss" not in r]
        evals = [r for r in rows if "val_loss" in r]
        last_val = evals[-1] if evals else {}
        outcome["train"] = _finite(
            {
                "steps": steps[-1]["step"] if steps else 0,
                "tokens": steps[-1].get("tokens") if steps else 0,
                "train_loss": summary.get("train_loss") or (steps[-1].get("loss") if steps else None),
                "val_loss": last_val.get("val_loss"),
                "val_accuracy": last_val.get("val_accuracy"),
                "val_bpb": last_val.get("val_bpb"),
                "tok_per_s": steps[-1].get("tok_per_s") if steps else None,
                "wall_time_s": summary.get("wall_time_s"),
                "peak_memory_mib": peak_memory_mib(device),
                "curve": [
                    {k: r.get(k) for k in ("step", "val_loss", "val_accuracy", "val_bpb") if k in r} for r in evals
                ],
                "error": summary.get("error"),
            }
        )
        outcome["parameters"] = summary.get("parameters") or _run_parameters(run_dir)
        outcome["model"] = _run_model(run_dir)
    if cell.eval and outcome.get("status") == "done":
        outcome["eval"] = _evaluate(cell.eval, run_dir, os.path.join(cell_dir, "eval"), device, progress)
    outcome.setdefault("status", "done")
    outcome["seconds"] = round(time.time() - started, 1)
    outcome["finished"] = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())
    return outcome


def _run_parameters(run_dir: str) -> int | None:
    try:
        with open(os.path.join(run_dir, "run.json")) as f:
            return json.load(f)["model"]["parameters"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _run_model(run_dir: str) -> dict:
    """What the run's model was: its blocks, widths and the memory / kernel settings the papers leave open."""
    try:
        with open(os.path.join(run_dir, "run.json")) as f:
            config = json.load(f)["model"]["config"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    keep = ("max_lr", "step_bound", "layer_norm", "optimizer", "window", "granularity", "chunk_size", "depth")
    return {
        "layer_pattern": sorted(set(config.get("layer_pattern") or [])),
        "hidden_size": config.get("hidden_size"),
        "intermediate_size": config.get("intermediate_size"),
        "memory": {k: v for k, v in (config.get("memory") or {}).items() if k in keep},
        "kernel": {k: v for k, v in (config.get("kernel") or {}).items() if k in keep},
    }


def _clear_stale(cell_dir: str, train: dict | None) -> None:
    """Remove the training run and evaluation that ``cell_dir`` holds when the run was trained with
    other settings than ``train`` (a cell of the same key narrowed or configured differently), so a
    checkpoint is never continued under settings it was not trained with."""
    record = os.path.join(cell_dir, "run", "run.json")
    if train is None or not os.path.isfile(record):
        return
    try:
        with open(record) as f:
            stored = json.load(f).get("train") or {}
    except (OSError, ValueError, AttributeError):
        stored = None
    wanted = json.loads(json.dumps({k: v for k, v in train.items() if k not in ("out", "device", "threads")}))
    if stored is not None and all(stored.get(k, v) == v for k, v in wanted.items()):
        return
    for name in ("run", "eval"):
        shutil.rmtree(os.path.join(cell_dir, name), ignore_errors=True)


def _evaluate(spec: dict, run_dir: str, eval_dir: str, device: str, progress: bool) -> dict:
    from ..eval import EvalError, Evaluation

    def evaluation():
        return Evaluation(
            [spec["task"]],
            run_dir,
            spec["lengths"],
            samples=spec["samples"],
            out=eval_dir,
            chunk_size=spec.get("chunk_size", 2048),
            batch_size=spec.get("batch_size", 8),
            device=device,
        )

    try:
        ev = evaluation()
    except EvalError:
        if not os.path.isdir(eval_dir):
            raise
        # an evaluation of other settings (the folder moved: its checkpoint path) is derived data: start it anew
        shutil.rmtree(eval_dir)
        ev = evaluation()
    results = ev.run(progress=progress)
    return {
        "accuracy": {str(c["length"]): c["accuracy"] for c in results["cells"]},
        "samples": spec["samples"],
        "seconds": round(sum(c["seconds"] for c in results["cells"]), 1),
    }


def _probe(spec: dict) -> dict:
    out = {}
    if "write_strength" in spec:
        from ..models import write_strength

        ws = spec["write_strength"]
        try:
            r = write_strength(ws["preset"], ws.get("size", "tiny"), **ws.get("overrides", {}))
            out["write_strength"] = _finite(
                {
                    "family": r.family,
                    "step_init": r.step_init,
                    "step_saturated": r.step_saturated,
                    "init": r.init,
                    "saturated": r.saturated,
                }
            )
        except ValueError as err:
            out["write_strength"] = {"error": " ".join(str(err).split())}
    return out


# ---------------------------------------------------------------- the experiment
@dataclass
class Run:
    """An experiment run into ``out`` (see the module docstring).

    Args:
        experiment: the :class:`Experiment`.
        budget: a key of ``experiment.budgets``.
        out: the output folder (created; may hold an earlier run of the same experiment and budget).
        config: the config (``experiment.config(budget, ...)``: the budget's, maybe narrowed).
        device: ``"cpu"`` or ``"cuda"``.
        threads: intra-op CPU threads (None: ``OMP_NUM_THREADS``, else 1).
        groups: the cost classes to run (``["main"]``, ``["atlas"]``, both); cells of the others wait.
        command: the command line recorded in ``results.json`` and ``RESULTS.md``.

    Raises:
        ExperimentError: ``out`` is a file, or holds results of another experiment or budget.
    """

    experiment: Experiment
    budget: str
    out: str
    config: dict
    device: str = "cpu"
    threads: int | None = None
    groups: Sequence[str] | None = None
    command: str = ""
    progress: bool = True
    verbose: bool = False
    cells: list[Cell] = field(default_factory=list)

    def __post_init__(self):
        if os.path.exists(self.out) and not os.path.isdir(self.out):
            raise ExperimentError(f"--out {self.out} is not a folder")
        self.cells = self.experiment.make_cells(self.config)
        self.all_cells = self.experiment.make_cells(self.experiment.budgets[self.budget])
        keys = [c.key for c in self.all_cells]
        if len(set(keys)) != len(keys):
            raise ExperimentError(f"{self.experiment.name}: two cells share a key")
        self.identity = {
            "experiment": self.experiment.name,
            "budget": self.budget,
            "config_sha": digest({k: v for k, v in self.experiment.budgets[self.budget].items()}),
        }
        self.previous = self._read_previous()

    def _read_previous(self) -> dict | None:
        path = os.path.join(self.out, RESULTS_JSON)
        if not os.path.isfile(path):
            return None
        try:
            with open(path) as f:
                previous = json.load(f)
            stored = {k: previous[k] for k in ("experiment", "budget", "config_sha")}
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ExperimentError(
                f"--out {self.out}: cannot read its {RESULTS_JSON} ({err}); use another --out"
            ) from err
        for name, value in self.identity.items():
            if stored[name] != value:
                raise ExperimentError(
                    f"--out {self.out} holds results of another experiment or config ({name} {stored[name]!r}, "
                    f"now {value!r}); use another --out or delete it"
                )
        return previous

    def cell_dir(self, cell: Cell) -> str:
        return os.path.join(self.out, CELLS, cell.key)

    def finished(self, cell: Cell) -> dict | None:
        """The outcome of ``cell`` when it finished (with this spec) in an earlier invocation."""
        path = os.path.join(self.cell_dir(cell), "cell.json")
        if not os.path.isfile(path):
            return None
        try:
            with open(path) as f:
                outcome = json.load(f)
        except (OSError, ValueError):
            return None
        return outcome if outcome.get("spec") == json.loads(json.dumps(cell.spec())) else None

    def pending(self) -> list[Cell]:
        wanted = set(self.groups) if self.groups else None
        return [c for c in self.cells if (wanted is None or c.group in wanted) and self.finished(c) is None]

    def run(self) -> dict:
        """Run the pending cells (a progress bar over them; each training run and evaluation draws
        its own), writing ``cell.json``, ``results.json`` and ``RESULTS.md`` after every cell.
        Returns the results (as in ``results.json``)."""
        import torch
        from tqdm.auto import tqdm

        if self.threads is not None:
            torch.set_num_threads(self.threads)
        elif self.device == "cpu" and "OMP_NUM_THREADS" not in os.environ:
            torch.set_num_threads(1)
        os.makedirs(os.path.join(self.out, CELLS), exist_ok=True)
        started = time.time()
        invocation = {
            "command": self.command,
            "started": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(started)),
            "device": self.device,
            "threads": torch.get_num_threads(),
            "groups": list(self.groups) if self.groups else None,
            "machine": machine(),
            "commit": _git_commit(),
        }
        pending = self.pending()
        wanted = [c for c in self.cells if not self.groups or c.group in self.groups]
        done_before = len(wanted) - len(pending)
        bar = tqdm(
            total=len(wanted),
            initial=done_before,
            unit="cell",
            disable=None if self.progress else True,
            dynamic_ncols=True,
            position=0,
        )
        say = tqdm.write
        say(
            f"{self.experiment.name} ({self.budget}): {len(wanted)} cells, {done_before} finished earlier, "
            f"{len(pending)} to run; output {self.out}"
        )
        if not pending:  # nothing to run: the reports are rewritten (a discussion.md added since), no entry recorded
            bar.close()
            return self.write(None, started, running=False)
        self.write(invocation, started, running=True)
        try:
            for i, cell in enumerate(pending):
                bar.set_description(cell.key)
                say(f"[{done_before + i + 1}/{len(wanted)}] {cell.key}")
                outcome = run_cell(cell, self.cell_dir(cell), self.device, self.threads, self.progress, self.verbose)
                write_json_atomic(os.path.join(self.cell_dir(cell), "cell.json"), _finite(outcome))
                say(f"    {cell.key}: {_cell_line(outcome)}")
                bar.update(1)
                self.write(invocation, started, running=True)
        except BaseException as err:  # Ctrl-C or an error: the entry says so, with the time it ran
            bar.close()
            reason = "interrupted" if isinstance(err, KeyboardInterrupt) else f"stopped by {type(err).__name__}"
            try:
                self.write(dict(invocation, stopped=reason), started, running=False)
            except Exception:  # (what stopped the run may stop the writing too: the first error is the one to see)
                pass
            raise
        finally:
            bar.close()
        return self.write(invocation, started, running=False)

    def outcomes(self) -> list[dict]:
        """The finished cells of the whole budget (those of narrowed or earlier runs too), in config
        order, then those of seeds beyond the budget's (``--seeds``) found in ``cells/``."""
        found = [o for o in (self.finished(c) for c in self.all_cells) if o is not None]
        known = {c.key for c in self.all_cells}
        folder = os.path.join(self.out, CELLS)
        extra = []
        for key in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
            path = os.path.join(folder, key, "cell.json")
            if key in known or not os.path.isfile(path):
                continue
            try:
                with open(path) as f:
                    extra.append(json.load(f))
            except (OSError, ValueError):
                continue
        return found + extra

    def write(self, invocation: dict | None, started: float, running: bool) -> dict:
        """``results.json`` and ``RESULTS.md`` (with the experiment's figures) from the finished cells;
        ``invocation`` None (an invocation with no cell to run) rewrites them without recording one."""
        invocations = list((self.previous or {}).get("invocations", []))
        if invocation is not None:  # this invocation's entry is rewritten after every cell until it ends
            invocation = dict(invocation, wall_time_s=round(time.time() - started, 1), running=running)
            if not running:
                invocation["machine_at_end"] = {"load_average": machine().get("load_average")}
            invocations.append(invocation)
        outcomes = self.outcomes()
        total = len(self.all_cells)
        results = _finite(
            {
                "format": FORMAT,
                **self.identity,
                "summary": self.experiment.summary,
                "config": self.experiment.budgets[self.budget],
                "complete": all(self.finished(c) is not None for c in self.all_cells),
                "cells_finished": sum(self.finished(c) is not None for c in self.all_cells),
                "cells_total": total,
                "cell_seconds": round(sum(o.get("seconds", 0) for o in outcomes), 1),
                "invocations": invocations,
                "cells": outcomes,
            }
        )
        write_json_atomic(os.path.join(self.out, RESULTS_JSON), results)
        if not running:
            self.previous = results
        body, figures = self.experiment.report(self.experiment.budgets[self.budget], outcomes)
        for name, draw in figures.items():
            path = os.path.join(self.out, name)
            draw(path)  # (a figure writer writes atomically, or nothing when it has nothing to draw)
        discussion = os.path.join(self.out, DISCUSSION)
        if os.path.isfile(discussion):  # what a person wrote about the numbers, kept across rewrites
            with open(discussion) as f:
                body += "\n## Discussion\n\n" + f.read().strip() + "\n"
        write_text_atomic(os.path.join(self.out, RESULTS_MD), self.header(results) + body)
        return results

    def header(self, results: dict) -> str:
        """The top of ``RESULTS.md``: what, whether complete, how to reproduce, where it ran, how long."""
        exp = self.experiment
        lines = [f"# Experiment `{exp.name}` ({self.budget} budget)", "", exp.summary, ""]
        done, total = results["cells_finished"], results["cells_total"]
        if results["complete"]:
            lines.append(f"**Complete**: {total} of {total} cells.")
        else:
            missing = [c.key for c in self.all_cells if self.finished(c) is None]
            lines.append(
                f"**Partial**: {done} of {total} cells finished; not run yet: "
                + ", ".join(f"`{k}`" for k in missing[:24])
                + (f" and {len(missing) - 24} more" if len(missing) > 24 else "")
                + ". Running the command again continues."
            )
        lines += ["", "## How this was run", ""]
        for inv in results["invocations"]:
            m = inv.get("machine", {})
            end = (inv.get("machine_at_end") or {}).get("load_average")
            lines.append(
                f"- `{inv['command']}` — started {inv['started']} UTC, {_duration(inv.get('wall_time_s', 0))}"
                + (" (still running when this was written)" if inv.get("running") else "")
                + (f" ({inv['stopped']})" if inv.get("stopped") else "")
                + f"; {inv['device']}, {inv['threads']} thread(s); {m.get('cpu', '?')}, {m.get('cpu_count', '?')} cores"
                + (f", {m['cuda_device']}" if m.get("cuda_device") else "")
                + f"; load average {m.get('load_average', '?')} at the start"
                + (f", {end} at the end" if end else "")
                + f"; deepmemory {m.get('deepmemory', '?')}"
                + (f" (commit {inv['commit'][:10]})" if inv.get("commit") else "")
                + f", torch {m.get('torch', '?')}, Python {m.get('python', '?')}"
            )
        by_group: dict[str, float] = {}
        for o in results["cells"]:
            by_group[o.get("group", "main")] = by_group.get(o.get("group", "main"), 0.0) + o.get("seconds", 0)
        lines += [
            "",
            f"Cells' own time in all: {_duration(results['cell_seconds'])}"
            + (
                " (" + ", ".join(f"group `{g}` {_duration(t)}" for g, t in by_group.items()) + ")"
                if len(by_group) > 1
                else ""
            )
            + ". Seeds: "
            f"{', '.join(map(str, sorted({o['labels'].get('seed', 0) for o in results['cells']}) or ['none yet']))}. "
            f"Per-cell files (training runs, evaluations) are under `{CELLS}/`; all numbers are in `{RESULTS_JSON}`.",
            "",
        ]
        if exp.notes:
            lines += [exp.notes, ""]
        return "\n".join(lines) + "\n"


def _duration(seconds: float) -> str:
    seconds = float(seconds or 0)
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"


def _cell_line(outcome: dict) -> str:
    parts = [outcome.get("status", "?")]
    train = outcome.get("train") or {}
    if train.get("val_accuracy") is not None:
        parts.append(f"validation accuracy {100 * train['val_accuracy']:.1f}%")
    if train.get("val_bpb") is not None:
        parts.append(f"{train['val_bpb']:.3f} bits/byte")
    acc = (outcome.get("eval") or {}).get("accuracy")
    if acc:
        parts.append("eval " + ", ".join(f"{n}: {100 * a:.0f}%" for n, a in acc.items() if a is not None))
    ws = (outcome.get("probe") or {}).get("write_strength") or {}
    if ws.get("init") is not None:
        parts.append(f"write strength {ws['init']:.3g}")
    parts.append(_duration(outcome.get("seconds", 0)))
    return "; ".join(parts)


def command_line(argv: Iterable[str]) -> str:
    return "deepmemory " + " ".join(shlex.quote(a) for a in argv)


def default_command() -> str:
    return command_line(sys.argv[1:])


# ---------------------------------------------------------------- report helpers
def group_by(outcomes: list[dict], *names: str) -> dict[tuple, list[dict]]:
    """The outcomes grouped by the values of ``names`` in their labels (seeds pooled), in order."""
    groups: dict[tuple, list[dict]] = {}
    for o in outcomes:
        groups.setdefault(tuple(o["labels"].get(n) for n in names), []).append(o)
    return groups


def table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def figure_writer(draw: Callable) -> Callable[[str], bool]:
    """A figure writer for :meth:`Run.write`: ``draw(plt) -> fig`` (or None for nothing to draw),
    saved as PNG to the path it is given."""

    def write(path: str) -> bool:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig = draw(plt)
        if fig is None:
            return False
        with atomic_path(path, durable=False) as tmp:
            fig.savefig(tmp, format="png", dpi=110)
        plt.close(fig)
        return True

    return write


# ---------------------------------------------------------------- matched sizes
_COUNTS: dict[str, int] = {}


def parameter_count(preset: str, size: str, vocab_size: int, overrides: dict | None = None) -> int:
    """Parameters of ``build(preset, size, vocab_size=..., **overrides)`` (counted on the meta device)."""
    from ..models import count_parameters, preset_config

    key = json.dumps([preset, size, vocab_size, overrides or {}], sort_keys=True)
    if key not in _COUNTS:
        config = preset_config(preset, size, **dict(copy.deepcopy(overrides or {}), vocab_size=vocab_size))
        _COUNTS[key] = count_parameters(config)[0]
    return _COUNTS[key]


def config_widths(config: dict, vocab_size: int) -> dict[str, dict]:
    """:func:`matched_widths` of an experiment's config (``{}`` without ``match_sizes``), solved over
    the budget's presets (``size_presets``, set by :meth:`Experiment.config`), not the narrowed list,
    so that a cell run alone is the cell of the whole budget."""
    if not config.get("match_sizes"):
        return {}
    return matched_widths(config.get("size_presets", config["presets"]), config["size"], vocab_size)


def matched_widths(presets: Sequence[str], size: str, vocab_size: int, multiple: int = 8) -> dict[str, dict]:
    """Per preset, the ``intermediate_size`` override (the SwiGLU width, a multiple of ``multiple``)
    that brings its parameter count nearest the largest count among ``presets`` at ``size``, as the
    papers compare at equal size; ``{}`` for the largest. The count is affine in the width, so two
    counts solve it. At the tiny sizes the memories' own weights differ more than the SwiGLU can
    absorb downwards, so every model is widened to the largest, not narrowed to the smallest."""
    base = {p: parameter_count(p, size, vocab_size) for p in presets}
    target = max(base.values())
    out: dict[str, dict] = {}
    for preset in presets:
        if base[preset] == target:
            out[preset] = {}
            continue
        low, high = (parameter_count(preset, size, vocab_size, {"intermediate_size": w}) for w in (64, 128))
        per_unit = (high - low) / 64
        width = 64 + (target - low) / per_unit if per_unit > 0 else 0
        out[preset] = {"intermediate_size": max(multiple, int(round(width / multiple)) * multiple)} if width else {}
    return out
