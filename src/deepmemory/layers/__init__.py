"""Token mixers and blocks built on the memory op (one signature: see docs/architecture.md)."""

from .attention import Attention, AttentionState
from .blocks import HybridState, MACBlock, MACState, MAGBlock, MALBlock, MemoryBlock, TransformerBlock
from .common import RMSNorm, ShortConv, SwiGLU
from .feature_maps import IdentityFeatureMap, PolynomialFeatureMap
from .kernel_memory import KernelMemory, KernelMemoryState
from .memory_layer import NeuralMemory, NeuralMemoryState

__all__ = [
    "RMSNorm",
    "ShortConv",
    "SwiGLU",
    "NeuralMemory",
    "NeuralMemoryState",
    "KernelMemory",
    "KernelMemoryState",
    "IdentityFeatureMap",
    "PolynomialFeatureMap",
]
__all__ += ["Attention", "AttentionState", "TransformerBlock", "MemoryBlock", "MAGBlock", "MALBlock", "MACBlock"]
__all__ += ["HybridState", "MACState"]
