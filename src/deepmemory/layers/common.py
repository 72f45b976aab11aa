"""Small building blocks shared by the mixers and blocks."""

from __future__ import annotations

import math
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class RMSNorm(nn.Module):
    """``y = x / sqrt(mean(x^2) + eps) * weight`` over the last dim."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        x = x.float() if dtype in (torch.float16, torch.bfloat16) else x
        y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.to(y.dtype)).to(dtype)


def default_intermediate_size(hidden_size: int, mlp_ratio: float = 4.0) -> int:
    """The SwiGLU width when none is given: ``2/3 * mlp_ratio * hidden_size`` rounded up to a
    multiple of 32, the parameter count of a GELU MLP of width ``mlp_ratio * hidden_size``
    (Transformer++'s 8/3 expansion at the default ratio 4)."""
    return 32 * math.ceil(2 * mlp_ratio * hidden_size / 3 / 32)


class SwiGLU(nn.Module):
    """``y = W_down (silu(W_gate x) * W_up x)``."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_up = nn.Linear(hidden_size, 2 * intermediate_size, bias=False)
        self.down = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class ShortConv(nn.Module):
    """Causal depthwise conv over time (kernel ``k``) followed by SiLU; ``x [B, T, C]``.

    The state is the last ``k - 1`` inputs ``[B, k - 1, C]`` so that a sequence fed in pieces
    gives the same outputs as one call.
    """

    def __init__(self, channels: int, kernel_size: int = 4):
        super().__init__()
        if kernel_size < 1:
            raise ValueError(f"kernel_size must be >= 1; got {kernel_size}")
        self.kernel_size = kernel_size
        self.conv = nn.Conv1d(channels, channels, kernel_size, groups=channels, bias=False)

    def forward(
        self, x: Tensor, state: Tensor | None = None, return_state: bool = False
    ) -> Tensor | tuple[Tensor, Tensor]:
        k = self.kernel_size
        if state is None:
            state = x.new_zeros(x.shape[0], k - 1, x.shape[2])
        full = torch.cat([state.to(x.dtype), x], dim=1)  # [B, k - 1 + T, C]
        # a sum over the k taps: for short kernels and few tokens (decoding) this is much cheaper
        # on CPU than a depthwise convolution call, and it needs no layout change
        w = self.conv.weight[:, 0].to(x.dtype)  # [C, k]
        t = x.shape[1]
        if t == 1:  # one token (decoding): the k taps in one product and one sum
            y = (full * w.t()).sum(1, keepdim=True)
        else:  # k >= 1 taps: the sum is a tensor, never sum()'s empty 0
            y = cast(Tensor, sum(full[:, j : j + t] * w[:, j] for j in range(k)))
        y = F.silu(y)
        if not return_state:
            return y
        return y, full[:, full.shape[1] - (k - 1) :]
