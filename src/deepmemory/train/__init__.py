"""Training: ``train(settings)`` runs (or resumes) a run directory, through a :class:`Trainer`
(``restore``, ``train_step``, ``evaluate``, ``save``, ``fit``); see docs/training.md.

The names below are loaded on first use, so that ``deepmemory.train.command`` (the options of
``deepmemory train``) does not import torch."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_NAMES = {
    "CheckpointError": "checkpoint",
    "read_run_config": "checkpoint",
    "ConfigError": "config",
    "TrainConfig": "config",
    "USER_ERRORS": "trainer",
    "DivergenceError": "trainer",
    "Trainer": "trainer",
    "TrainError": "trainer",
    "lr_at": "trainer",
    "model_from_config": "trainer",
    "train": "trainer",
    "export_run": "export",
    "load_run": "export",
}

__all__ = sorted(_NAMES)

if TYPE_CHECKING:
    from .checkpoint import CheckpointError, read_run_config
    from .config import ConfigError, TrainConfig
    from .export import export_run, load_run
    from .trainer import USER_ERRORS, DivergenceError, Trainer, TrainError, lr_at, model_from_config, train


def __getattr__(name: str):
    if name in _NAMES:
        value = getattr(importlib.import_module(f"{__name__}.{_NAMES[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
