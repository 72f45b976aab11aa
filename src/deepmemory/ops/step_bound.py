r"""The stale-step bound's factor as one autograd node with a written-out backward.

:func:`~.coefficients.step_scale` defines the factor (docs/numerics.md): for each weight matrix of
the memory with inputs ``a_i`` and a row's weights ``C(t, i) >= 0``, ``H_t = sum_i C(t, i) a_i a_i^T``
and ``||H_t||_F^2 = sum_ij c_ti c_tj cos^2(a_i, a_j)`` with ``c_ti = C(t, i) ||a_i||^2`` (no square of
an input's norm is formed, and a row's zero weights are selected away before they meet a norm);
``F_t^2`` is the largest over the matrices and the factor ``min(1, tau / F_t)``. Here the same
quantity is :func:`step_norms` (``F_t^2``, one autograd node) and :func:`bound_scale` (the factor
from it): the chunk form calls them once per chunk, where autograd's graph of some thirty small
operations, or their recomputation in the backward, cost more than the arithmetic. The one product
with the inputs is their ``[n, n]`` Gram matrix ``a a^T``, whose diagonal holds the squared norms
and which the norms turn into the cosines. The backward keeps the chunk's ``[n, n]`` cosines and
its norms (besides the inputs and coefficients, which the chunk keeps anyway). Where no row's bound
is active the factor is the constant 1: :func:`active_bound_scale` then returns None on the CPU
(one host check), so that the chunk leaves its learning rates as they are and nothing of the bound
reaches the backward.

The backward, per matrix, with ``K_ij = cos(a_i, a_j)`` (0 for a zero input), ``c`` as above
(selected to 0 where ``C <= 0``), ``P = c K^2`` and ``N_t = sum_j P_tj c_tj`` (``K^2`` elementwise,
symmetric), given ``g_t = dL/dN_t``::

    dL/dc = 2 diag(g) P        dL/dK = 2 K * (c^T diag(g) c)        dL/dC = dL/dc * ||a||^2
    dL/d||a_i||^2 = sum_t dL/dc_ti C_ti - sum_j (dL/dK * K)_ij / ||a_i||^2
    dL/da = M a,   M = 2 diag(1/||a||) (dL/dK) diag(1/||a||) + 2 diag(dL/d||a||^2)

(``K = diag(1/||a||) a a^T diag(1/||a||)``, so ``M a`` is the one product with the inputs in the
backward). Through the maximum over matrices the gradient goes to the matrices that attain it,
split equally between ties (as ``torch.maximum`` splits it between two). ``dL/dC`` is also taken
at a zero weight, which the forward selects away: the token loop differentiates a gate of exactly 0
(an lr or window gate) through the bound too. Rows whose bound is inactive have the factor 1 and no
gradient. Tested against ``H_t`` materialised from the definition, in float64
(``tests/test_step_scale.py``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable


def _norms(coef: Tensor, live: Tensor, a: Tensor, zero: Tensor) -> tuple[Tensor, tuple[Tensor, ...]]:
    """``||H_t||_F^2 [..., r]`` of one matrix with inputs ``a [..., n, cols]``, and what its
    backward keeps: ``(sq [..., n], rs [..., n], K [..., n, n])``."""
    gram = a @ a.transpose(-1, -2)
    sq = gram.diagonal(dim1=-2, dim2=-1).clone()  # ||a_i||^2 (inf for a huge input); a copy: the Gram is not kept
    pos = sq > 0
    rs = torch.where(pos, sq.rsqrt(), zero)  # 1 / ||a_i||; 0 for a zero input and for a huge one
    outer = rs.unsqueeze(-1) * rs.unsqueeze(-2)
    cos = torch.where(outer > 0, gram * outer, zero)  # (selected: a huge input's Gram entries may be inf)
    c = torch.where(live, coef * sq.unsqueeze(-2), zero)  # a row's zero weights selected away (0 * inf)
    prod = c @ cos.square()
    return (prod * c).sum(-1), (sq, rs, cos)


class _StepNorms(torch.autograd.Function):
    """``(unused_below, coef, base, *inputs) -> F^2``; see the module. ``unused_below`` (or None): a
    caller's ``tau^2`` below which it drops the result (:func:`active_bound_scale`): where no row
    exceeds it, and that is checked cheaply, nothing is kept for a backward."""

    @staticmethod
    def forward(ctx: Any, unused_below: float | None, coef: Tensor, base: Tensor | None, *inputs: Tensor) -> Tensor:
        live, zero = coef > 0, coef.new_zeros(())
        norms: list[Tensor] = []
        saved: list[Tensor] = []
        if base is not None:
            norms.append(base)
        for a in inputs:
            norm2, parts = _norms(coef, live, a, zero)
            norms.append(norm2)
            saved.extend(parts)
        f2 = norms[0]
        for norm2 in norms[1:]:
            f2 = torch.maximum(f2, norm2)
        ctx.has_base, ctx.n_inputs = base is not None, len(inputs)
        ctx.dropped = unused_below is not None and _host_checked(f2) and not bool((f2 > unused_below).any())
        if not ctx.dropped:
            ctx.save_for_backward(coef, f2, *norms, *inputs, *saved)
        return f2

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, g_f2: Tensor) -> tuple[Tensor | None, ...]:
        if ctx.dropped:
            raise RuntimeError("the stale-step bound's norms were differentiated where the caller dropped them")
        m, parts = ctx.n_inputs, 3
        coef, f2, *rest = ctx.saved_tensors
        n_norms = m + ctx.has_base
        norms, inputs, saved = rest[:n_norms], rest[n_norms : n_norms + m], rest[n_norms + m :]
        zero = coef.new_zeros(())
        # no active row (the factor's gradient is 0 where it is 1): nothing flows back (a host check,
        # so only on the CPU and not while compiling)
        if _host_checked(g_f2) and not bool(g_f2.any()):
            return (None,) * (3 + m)
        if n_norms > 1:  # the maximum: to the matrices attaining it, split equally between ties
            attain = [norm2 == f2 for norm2 in norms]
            count = sum(hit.to(f2.dtype) for hit in attain[1:]) + attain[0]
            g_f2 = g_f2 / count
            grads = [torch.where(hit, g_f2, zero) for hit in attain]
        else:
            grads = [g_f2]
        g_base = grads.pop(0) if ctx.has_base else None
        live = coef > 0
        g_coef = None
        g_inputs: list[Tensor | None] = []
        for i, (a, g) in enumerate(zip(inputs, grads)):
            sq, rs, cos = saved[parts * i : parts * (i + 1)]
            c = torch.where(live, coef * sq.unsqueeze(-2), zero)  # (recomputed: [r, n] a chunk, kept is [n, n])
            prod = c @ cos.square()
            g_c = (2.0 * g).unsqueeze(-1) * prod  # dN/dc = 2 P
            if ctx.needs_input_grad[1]:
                # dN/dC = dN/dc ||a||^2 at a zero weight too (a gate of exactly 0 still has a gradient),
                # where finite: a huge input's square meets only its own and later rows' weights
                g_co = g_c * sq.unsqueeze(-2)
                g_co = torch.where(live | g_co.isfinite(), g_co, zero)
                g_coef = g_co if g_coef is None else g_coef + g_co
            if not ctx.needs_input_grad[3 + i]:
                g_inputs.append(None)
                continue
            g_sq = torch.where(live, g_c * coef, zero).sum(-2)  # through c
            d_cos = (2.0 * cos) * ((g.unsqueeze(-1) * c).transpose(-1, -2) @ c)  # dN/dK
            # through the norms in K = diag(rs) a a^T diag(rs), rs = ||a||^-1
            g_sq = g_sq - rs.square() * (d_cos * cos).sum(-1)
            mat = 2.0 * (rs.unsqueeze(-1) * rs.unsqueeze(-2)) * d_cos
            mat.diagonal(dim1=-2, dim2=-1).add_(2.0 * g_sq)
            g_inputs.append(mat @ a)  # dL/da = 2 (rs rs^T * dN/dK) a + 2 diag(dL/d||a||^2) a
        if g_coef is not None:
            g_coef = g_coef.sum_to_size(coef.shape)
        g_inputs = [None if g is None else g.sum_to_size(a.shape) for g, a in zip(g_inputs, inputs)]
        return (None, g_coef, g_base, *g_inputs)


def _distinct(inputs: list[Tensor]) -> list[Tensor]:
    """The inputs without repeats of one tensor (``gated_mlp``'s two key matrices): the maximum is the same."""
    seen: dict[int, Tensor] = {}
    for a in inputs:
        seen.setdefault(id(a), a)
    return list(seen.values())


def _host_checked(t: Tensor) -> bool:
    """Whether a check of ``t``'s values is cheap: on the CPU, and not while ``torch.compile`` traces."""
    return t.device.type == "cpu" and not torch.compiler.is_compiling()


def step_norms(inputs: list[Tensor], coef: Tensor, base: Tensor | None = None) -> Tensor:
    """``F_t^2``: the largest ``||H_t||_F^2`` over the matrices with inputs ``inputs`` (each
    ``[..., n, cols]``) and over ``base [..., r]`` if given (the same of other matrices), with
    ``coef [..., r, n]`` (``C(t, i) >= 0``) -> ``[..., r]``; :func:`~.coefficients.step_scale` defines it."""
    return _StepNorms.apply(None, coef, base, *_distinct(inputs))


def bound_scale(bound: float, inputs: list[Tensor], coef: Tensor, base: Tensor | None = None) -> Tensor:
    """``min(1, bound / F_t)`` ``[..., r]`` with ``F_t^2`` as in :func:`step_norms`: the value of
    :func:`~.coefficients.step_scale` (which has no ``base``); where the bound is inactive the
    factor is the constant 1, with no gradient."""
    return _factor(bound, step_norms(inputs, coef, base))


def active_bound_scale(bound: float, inputs: list[Tensor], coef: Tensor, base: Tensor | None = None) -> Tensor | None:
    """:func:`bound_scale`, or None where no row's bound is active and the check is cheap (on the
    CPU, eagerly): the factor is then the constant 1, and the caller can leave its learning rates
    as they are (the papers' rule, bitwise, with nothing of the bound kept for the backward)."""
    f2 = _StepNorms.apply(bound * bound, coef, base, *_distinct(inputs))
    if _host_checked(f2) and not bool((f2 > bound * bound).any()):
        return None
    return _factor(bound, f2)


def _factor(bound: float, f2: Tensor) -> Tensor:
    over = f2 > bound * bound
    return torch.where(over, bound * torch.rsqrt(torch.where(over, f2, 1.0)), 1.0)
