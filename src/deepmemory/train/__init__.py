"""Training: ``train(settings)`` runs (or resumes) a run directory; see docs/training.md."""

from .checkpoint import CheckpointError, read_run_config
from .config import ConfigError, TrainConfig
from .trainer import USER_ERRORS, TrainError, lr_at, model_from_config, train

__all__ = ["CheckpointError", "ConfigError", "TrainConfig", "TrainError", "USER_ERRORS", "lr_at", "model_from_config",
           "read_run_config", "train"]
