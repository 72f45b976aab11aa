r"""Feature maps applied to queries and keys before the memory (ATLAS §3.1, eq. 5; docs/layers.md).

``identity`` leaves the keys alone. ``polynomial`` of degree ``p`` is the truncated Taylor feature
map of ``exp`` (ATLAS eq. 22's ``phi*`` cut at degree ``p``)::

    phi(x) = concat_{i=1..p} a_i x^{(i)},      <phi(x), phi(y)> = sum_i a_i^2 <x, y>^i

with learnable per-head coefficients ``a_i`` initialised to ``1 / sqrt(i!)`` (so that at
initialisation the kernel is the degree-``p`` Taylor polynomial of ``exp(<x, y>) - 1``: ATLAS eq. 5
with its coefficients at their initial ``1 / i!``, less the constant term). With ``constant=True``
the degree-0 term of ATLAS eq. 5 is there too: one more feature ``a_0`` (per head, initialised to
1), so ``<phi(x), phi(y)> = a_0^2 + sum_i a_i^2 <x, y>^i``, the whole Taylor polynomial of
``exp(<x, y>)`` at initialisation. For a memory it is a bias input: ``W_0 phi(x)`` gains a learned
per-token-independent column.

``x^{(i)}`` is the *symmetric* form of the tensor power ``x^{⊗i}``: one feature per multiset
``j_1 <= ... <= j_i`` of coordinates, ``sqrt(i! / prod_r m_r!) * x_{j_1} ... x_{j_i}`` (``m_r`` the
multiplicities). The ``sqrt`` of the multinomial coefficient counts the ordered tuples that
collapse onto each multiset, so ``<x^{(i)}, y^{(i)}> = <x, y>^i`` exactly as for the full tensor
power, at width ``C(d + i - 1, i)`` instead of ``d^i`` (d = 64, i = 2: 2080 instead of 4096).
"""

from __future__ import annotations

import itertools
import math
from collections import Counter

import torch
from torch import Tensor, nn

from ..checks import check_bool, check_int

FEATURE_MAPS = ("identity", "polynomial")


def symmetric_monomials(dim: int, degree: int) -> tuple[Tensor, Tensor]:
    """Index tensor ``[n, degree]`` of the multisets of ``range(dim)`` and their weights
    ``sqrt(degree! / prod m_r!)`` ``[n]``, with ``n = C(dim + degree - 1, degree)``."""
    combos = list(itertools.combinations_with_replacement(range(dim), degree))
    idx = torch.tensor(combos, dtype=torch.long).reshape(len(combos), degree)
    fact = math.factorial(degree)
    weights = [math.sqrt(fact / math.prod(math.factorial(m) for m in Counter(c).values())) for c in combos]
    return idx, torch.tensor(weights, dtype=torch.float64)


class IdentityFeatureMap(nn.Module):
    """``phi(x) = x``; ``x [..., H, d]``."""

    def __init__(self, head_dim: int):
        super().__init__()
        check_int("head_dim", head_dim)
        self.out_dim = head_dim

    def forward(self, x: Tensor) -> Tensor:
        return x


class PolynomialFeatureMap(nn.Module):
    """``phi(x) = concat_{i=i0..degree} a_{h,i} x^{(i)}`` per head ``h`` (ATLAS eq. 5, symmetric
    monomials, see the module docstring), ``i0 = 0`` with ``constant`` (the degree-0 feature
    ``a_{h,0}``), else 1: ``x [..., H, head_dim]`` -> ``[..., H, out_dim]`` in x's dtype (also under
    autocast) with ``out_dim = constant + sum_{i>=1} C(head_dim + i - 1, i)``. Raises a one-line
    ``TypeError``/``ValueError`` for a bad argument or input shape."""

    def __init__(self, head_dim: int, degree: int, num_heads: int, constant: bool = False):
        super().__init__()
        check_int("head_dim", head_dim)
        check_int("degree", degree)
        check_int("num_heads", num_heads)
        check_bool("constant", constant)
        self.head_dim, self.degree, self.num_heads, self.constant = head_dim, degree, num_heads, constant
        init = torch.tensor([1.0 / math.sqrt(math.factorial(i)) for i in range(1, degree + 1)])
        self.coef = nn.Parameter(init.repeat(num_heads, 1))  # [H, degree]
        # a_0 [H], initialised to 1 / sqrt(0!) = 1
        self.coef0 = nn.Parameter(torch.ones(num_heads)) if constant else None
        widths = [1] if constant else []
        for i in range(1, degree + 1):
            idx, w = symmetric_monomials(head_dim, i)
            # buffers are derived from the constructor arguments, so they stay out of checkpoints
            self.register_buffer(f"idx{i}", idx, persistent=False)
            self.register_buffer(f"mult{i}", w, persistent=False)
            widths.append(idx.shape[0])
        self.widths = tuple(widths)
        self.out_dim = sum(widths)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() < 2 or x.shape[-2:] != (self.num_heads, self.head_dim):
            raise ValueError(f"x must be [..., {self.num_heads}, {self.head_dim}]; got {list(x.shape)}")
        parts = []
        if self.coef0 is not None:
            parts.append(self.coef0.to(x.dtype)[:, None].expand(x.shape[:-1] + (1,)))
        for i in range(1, self.degree + 1):
            idx = getattr(self, f"idx{i}")
            # [..., H, C(d+i-1, i)]; autocast runs prod in float32: the features keep x's dtype
            mono = x[..., idx].prod(-1).to(x.dtype) if i > 1 else x
            scale = self.coef[:, i - 1, None].to(x.dtype) * getattr(self, f"mult{i}").to(x.dtype)
            parts.append(mono * scale)
        return torch.cat(parts, dim=-1)

    def kernel(self, x: Tensor, y: Tensor) -> Tensor:
        """``<phi(x), phi(y)> = sum_i a_{h,i}^2 <x, y>^i`` without the features: ``[..., H]``."""
        dot = (x * y).sum(-1)
        powers = torch.stack([dot**i for i in range(1, self.degree + 1)], dim=-1)
        # in the inputs' dtype, also where autocast runs the sums and powers in float32
        out = (powers * self.coef.to(dot.dtype) ** 2).sum(-1)
        if self.coef0 is not None:
            out = out + self.coef0.to(dot.dtype) ** 2
        return out.to(torch.promote_types(x.dtype, y.dtype))

    def extra_repr(self) -> str:
        return (
            f"head_dim={self.head_dim}, degree={self.degree}, num_heads={self.num_heads}, constant={self.constant}, "
            f"out_dim={self.out_dim}"
        )


def make_feature_map(name: str, head_dim: int, num_heads: int, degree: int, constant: bool = False) -> nn.Module:
    """The feature map ``name`` (one of ``FEATURE_MAPS``); its width is ``.out_dim``. ``degree`` and
    ``constant`` (the degree-0 feature) shape the polynomial map only."""
    if name == "identity":
        return IdentityFeatureMap(head_dim)
    if name == "polynomial":
        return PolynomialFeatureMap(head_dim, degree, num_heads, constant)
    raise ValueError(f"feature_map must be one of {', '.join(map(repr, FEATURE_MAPS))}; got {name!r}")
