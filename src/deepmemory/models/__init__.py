"""Causal language models of every family, one class configured by :class:`DeepMemoryConfig`.

``build(name, size="tiny", **overrides)`` makes a preset of either paper; importing this package
registers the ``deepmemory`` model type with ``AutoConfig`` and ``AutoModelForCausalLM``.
"""

from .config import BLOCK_TYPES, DeepMemoryConfig
from .debug import nan_check
from .modeling import DeepMemoryCache, DeepMemoryForCausalLM, DeepMemoryModel
from .presets import build, count_parameters, list_presets, list_sizes, preset_config
from .write_strength import WriteStrength, write_strength

__all__ = [
    "BLOCK_TYPES",
    "DeepMemoryCache",
    "DeepMemoryConfig",
    "DeepMemoryForCausalLM",
    "DeepMemoryModel",
    "WriteStrength",
    "build",
    "count_parameters",
    "list_presets",
    "list_sizes",
    "nan_check",
    "preset_config",
    "write_strength",
]
