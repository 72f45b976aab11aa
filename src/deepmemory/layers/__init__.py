"""Token mixers and blocks built on the memory op (one signature: see docs/architecture.md)."""

from .common import RMSNorm, ShortConv, SwiGLU

__all__ = ["RMSNorm", "ShortConv", "SwiGLU"]
