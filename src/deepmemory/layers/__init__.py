"""Token mixers and blocks built on the memory op (one signature: see docs/architecture.md)."""

from .common import RMSNorm, ShortConv, SwiGLU
from .feature_maps import IdentityFeatureMap, PolynomialFeatureMap
from .memory_layer import NeuralMemory, NeuralMemoryState

__all__ = ["RMSNorm", "ShortConv", "SwiGLU", "NeuralMemory", "NeuralMemoryState", "IdentityFeatureMap", "PolynomialFeatureMap"]
