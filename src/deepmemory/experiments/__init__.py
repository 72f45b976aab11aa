"""Experiments: ``deepmemory experiment NAME`` trains and evaluates a set of presets at equal
tokens and steps and writes ``RESULTS.md`` (tables and plots) and ``results.json``
(docs/experiments.md).

Each experiment is a module with a declarative config per budget (``toy``: seconds, for the tests;
``cpu``: the real run on a small CPU machine, under an hour; ``gpu``: the larger scale) and the
report of its results; :mod:`.runner` runs the cells, resumes an interrupted run and writes the
files. ``run_experiment(name, budget, out)`` is the command's function.
"""

from __future__ import annotations

import importlib

from .runner import BUDGETS, Experiment, ExperimentError, Run

# name -> module of this package holding EXPERIMENT
MODULES = {
    "length-generalization": "length_generalization",
    "language-modeling": "language_modeling",
    "ablations": "ablations",
    "calibration": "calibration",
}
NAMES = tuple(MODULES)

__all__ = ["BUDGETS", "NAMES", "Experiment", "ExperimentError", "Run", "get_experiment", "run_experiment"]


def get_experiment(name: str) -> Experiment:
    """The :class:`Experiment` called ``name``; ``ExperimentError`` (one line) for another name."""
    if name not in MODULES:
        raise ExperimentError(f"unknown experiment {name!r}; choose one of {', '.join(NAMES)}")
    return importlib.import_module(f"{__name__}.{MODULES[name]}").EXPERIMENT


def run_experiment(
    name: str,
    budget: str = "toy",
    out: str | None = None,
    *,
    device: str = "cpu",
    threads: int | None = None,
    presets: list[str] | None = None,
    tasks: list[str] | None = None,
    seeds: list[int] | None = None,
    groups: list[str] | None = None,
    command: str = "",
    progress: bool = True,
    verbose: bool = False,
) -> dict:
    """Run experiment ``name`` at ``budget`` into ``out`` (default ``experiments/results/NAME-BUDGET``),
    skipping the cells finished there already; returns the results (as in ``results.json``).
    ``presets`` / ``tasks`` / ``seeds`` narrow the budget's lists (a narrowed run adds its cells to
    the same results); ``groups`` picks the cost classes to run (``"main"``, ``"atlas"``).

    Raises:
        ExperimentError: an unknown name, budget, preset or task; ``out`` holding another
            experiment's results; ``device="cuda"`` without CUDA.
    """
    experiment = get_experiment(name)
    config = experiment.config(budget, presets=presets, tasks=tasks, seeds=seeds)
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ExperimentError("--device cuda: no CUDA device is available (use --device cpu)")
    known_groups = {c.group for c in experiment.make_cells(config)}
    for g in groups or []:
        if g not in known_groups:
            raise ExperimentError(f"{name} --group: {g!r} is not among {', '.join(sorted(known_groups))}")
    run = Run(
        experiment,
        budget,
        out or f"experiments/results/{name}-{budget}",
        config,
        device=device,
        threads=threads,
        groups=groups,
        command=command,
        progress=progress,
        verbose=verbose,
    )
    return run.run()
