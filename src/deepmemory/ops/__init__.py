"""The functional memory op: ``neural_memory`` (reference token loop and chunk-parallel form)."""

from .api import GRANULARITIES, IMPLS, OPTIMIZERS, memory_read, neural_memory
from .memory import ACTIVATIONS, LOSSES, MEMORY_KINDS, MemorySpec, newton_schulz
from .state import MemoryState

__all__ = [
    "neural_memory",
    "memory_read",
    "MemoryState",
    "MemorySpec",
    "newton_schulz",
    "MEMORY_KINDS",
    "LOSSES",
    "ACTIVATIONS",
    "OPTIMIZERS",
    "GRANULARITIES",
    "IMPLS",
]
