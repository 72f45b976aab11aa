"""Training: ``train(settings)`` runs (or resumes) a run directory, through a :class:`Trainer`
(``restore``, ``train_step``, ``evaluate``, ``save``, ``fit``); see docs/training.md."""

from .checkpoint import CheckpointError, read_run_config
from .config import ConfigError, TrainConfig
from .trainer import USER_ERRORS, DivergenceError, Trainer, TrainError, lr_at, model_from_config, train

__all__ = ["CheckpointError", "ConfigError", "DivergenceError", "TrainConfig", "TrainError", "Trainer", "USER_ERRORS",
           "lr_at", "model_from_config", "read_run_config", "train"]
