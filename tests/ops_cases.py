"""Random inputs for the memory op tests (float64, normalised keys, moderate gates)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from deepmemory.ops import MemorySpec


def make_params(kind: str, nh: int, dk: int, dv: int, hidden: int, depth: int = 2, batch: int | None = None, gen=None):
    spec = MemorySpec(kind, depth)
    lead = (nh,) if batch is None else (batch, nh)
    return {
        n: torch.randn(*lead, r, c, dtype=torch.float64, generator=gen) / c**0.5
        for n, (r, c) in spec.shapes(dk, dv, hidden).items()
    }


def make_inputs(bsz: int, seq: int, nh: int, dk: int, dv: int, *, optimizer: str = "momentum", seed: int = 0, lr_scale: float = 1.0,
                channel: bool = False):
    """q, k, v, lr, momentum, decay and the window gate (``[B, T, H, dv]`` if ``channel``)."""
    g = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(bsz, seq, nh, dk, dtype=torch.float64, generator=g), dim=-1)
    k = F.normalize(torch.randn(bsz, seq, nh, dk, dtype=torch.float64, generator=g), dim=-1)
    v = torch.randn(bsz, seq, nh, dv, dtype=torch.float64, generator=g)
    lr = lr_scale * (0.1 if optimizer == "muon" else 0.5) * torch.rand(bsz, seq, nh, dtype=torch.float64, generator=g)
    momentum = torch.rand(bsz, seq, nh, dtype=torch.float64, generator=g)
    decay = 0.2 * torch.rand(bsz, seq, nh, dtype=torch.float64, generator=g)
    gamma = torch.rand(bsz, seq, nh, *((dv,) if channel else ()), dtype=torch.float64, generator=g)
    return q, k, v, lr, momentum, decay, gamma


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    scale = b.abs().max().item()
    return (a - b).abs().max().item() / (scale if scale > 0 else 1.0)
