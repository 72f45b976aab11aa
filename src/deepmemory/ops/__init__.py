"""The functional memory op: ``neural_memory`` under an :class:`UpdateRule` (reference token loop,
chunk-parallel form, Triton kernels)."""

from .api import IMPLS, memory_read, neural_memory
from .kernel import KERNEL_IMPLS, KernelRule, KernelState, kernel_memory
from .memory import ACTIVATIONS, ARCHITECTURES, LOSSES, MemorySpec, newton_schulz
from .rule import GRANULARITIES, OPTIMIZERS, UpdateRule
from .state import MemoryState

__all__ = [
    "neural_memory",
    "UpdateRule",
    "memory_read",
    "MemoryState",
    "MemorySpec",
    "newton_schulz",
    "ARCHITECTURES",
    "LOSSES",
    "ACTIVATIONS",
    "OPTIMIZERS",
    "GRANULARITIES",
    "IMPLS",
    "kernel_memory",
    "KernelRule",
    "KernelState",
    "KERNEL_IMPLS",
]
