r"""The stale-step bound's factor as one autograd node with a written-out backward.

:func:`~.coefficients.step_scale` defines the factor (docs/numerics.md): for each weight matrix of
the memory with inputs ``a_i`` and a row's weights ``C(t, i) >= 0``, ``H_t = sum_i C(t, i) a_i a_i^T``
and ``||H_t||_F^2 = sum_ij c_ti c_tj cos^2(a_i, a_j)`` with ``c_ti = C(t, i) ||a_i||^2`` (no square of
an input's norm is formed, and a row's zero weights are selected away before they meet a norm);
``F_t^2`` is the largest over the matrices and the factor ``min(1, tau / F_t)``. Here the same
quantity is :func:`step_norms` (``F_t^2``) and :func:`bound_scale` (the factor), each one autograd
node: the chunk form calls it once per chunk, where autograd's graph of some thirty small
operations, or their recomputation in the backward, cost more than the arithmetic. The one product
with the inputs is their ``[n, n]`` Gram matrix ``a a^T``, whose diagonal holds the squared norms
and which the norms turn into the cosines. For the backward a matrix keeps its ``[n, n]`` cosines,
the ``[r, n]`` weights ``c`` and products ``P = c K^2`` below, and the norms (besides the inputs
and coefficients, which the chunk keeps anyway). Where no row's bound is active the factor is the
constant 1: :func:`active_bound_scale` then returns None on the CPU (one host check) and keeps
nothing, so that the chunk leaves its learning rates as they are.

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
    backward keeps: ``(sq [..., n], rs [..., n], K [..., n, n], c [..., r, n], P [..., r, n])``."""
    gram = a @ a.transpose(-1, -2)
    sq = gram.diagonal(dim1=-2, dim2=-1).clone()  # ||a_i||^2 (inf for a huge input); a copy: the Gram is not kept
    pos = sq > 0
    rs = torch.where(pos, sq.rsqrt(), zero)  # 1 / ||a_i||; 0 for a zero input and for a huge one
    outer = rs.unsqueeze(-1) * rs.unsqueeze(-2)
    cos = torch.where(outer > 0, gram * outer, zero)  # (selected: a huge input's Gram entries may be inf)
    c = torch.where(live, coef * sq.unsqueeze(-2), zero)  # a row's zero weights selected away (0 * inf)
    prod = c @ cos.square()
    return (prod * c).sum(-1), (sq, rs, cos, c, prod)


class _StepNorms(torch.autograd.Function):
    """``(bound, drop, coef, base, *inputs)`` -> ``F^2`` (``bound`` None) or the factor; see the
    module. With ``drop``, where no row is over the bound and that is checked cheaply, the result
    is an empty tensor and nothing is kept for a backward (:func:`active_bound_scale`)."""

    @staticmethod
    def forward(
        ctx: Any, bound: float | None, drop: bool, coef: Tensor, base: Tensor | None, *inputs: Tensor
    ) -> Tensor:
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
        ctx.bound, ctx.has_base, ctx.n_inputs = bound, base is not None, len(inputs)
        if bound is None:
            out = f2
        else:
            over = f2 > bound * bound
            if drop and _host_checked(f2) and not bool(over.any()):
                ctx.mark_non_differentiable(empty := f2.new_empty(0))
                return empty
            out = torch.where(over, bound * torch.rsqrt(torch.where(over, f2, 1.0)), 1.0)
        ctx.save_for_backward(coef, out, f2, *norms, *inputs, *saved)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        m, parts = ctx.n_inputs, 5
        coef, out, f2, *rest = ctx.saved_tensors
        n_norms = m + ctx.has_base
        norms, inputs, saved = rest[:n_norms], rest[n_norms : n_norms + m], rest[n_norms + m :]
        zero = coef.new_zeros(())
        if ctx.bound is None:
            g_f2 = grad
        else:  # d(tau / F)/dF^2 = -(tau / F) / 2 F^2 where the bound is active; 0 where the factor is 1
            g_f2 = torch.where(f2 > ctx.bound * ctx.bound, (-0.5 * grad) * out / f2, zero)
        # no active row: nothing flows back (a host check, so only on the CPU and not while compiling)
        if _host_checked(g_f2) and not bool(g_f2.any()):
            return (None,) * (4 + m)
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
            sq, rs, cos, c, prod = saved[parts * i : parts * (i + 1)]
            g2 = (2.0 * g).unsqueeze(-1)
            g_c = g2 * prod  # dN/dc = 2 P
            if ctx.needs_input_grad[2]:
                # dN/dC = dN/dc ||a||^2 at a zero weight too (a gate of exactly 0 still has a gradient),
                # where finite: a huge input's square meets only its own and later rows' weights
                g_co = g_c * sq.unsqueeze(-2)
                g_co = torch.where(live | g_co.isfinite(), g_co, zero)
                g_coef = g_co if g_coef is None else g_coef + g_co
            if not ctx.needs_input_grad[4 + i]:
                g_inputs.append(None)
                continue
            g_sq = torch.where(live, g_c * coef, zero).sum(-2)  # through c
            d_cos = cos * ((g2 * c).transpose(-1, -2) @ c)  # dN/dK = 2 K * (c^T diag(g) c)
            # through the norms in K = diag(rs) a a^T diag(rs), rs = ||a||^-1
            g_sq = g_sq - rs.square() * (d_cos * cos).sum(-1)
            # dL/da = M a, M = 2 (rs rs^T * dN/dK) + 2 diag(dL/d||a||^2)
            mat = (rs.unsqueeze(-1) * (2.0 * rs).unsqueeze(-2)) * d_cos
            mat.diagonal(dim1=-2, dim2=-1).add_(2.0 * g_sq)
            g_inputs.append(mat @ a)
        if g_coef is not None:
            g_coef = g_coef.sum_to_size(coef.shape)
        g_inputs = [None if g is None else g.sum_to_size(a.shape) for g, a in zip(g_inputs, inputs)]
        return (None, None, g_coef, g_base, *g_inputs)


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
    return _StepNorms.apply(None, False, coef, base, *_distinct(inputs))


def bound_scale(bound: float, inputs: list[Tensor], coef: Tensor, base: Tensor | None = None) -> Tensor:
    """``min(1, bound / F_t)`` ``[..., r]`` with ``F_t^2`` as in :func:`step_norms`: the value of
    :func:`~.coefficients.step_scale` (which has no ``base``); where the bound is inactive the
    factor is the constant 1, with no gradient."""
    return _StepNorms.apply(bound, False, coef, base, *_distinct(inputs))


def active_bound_scale(bound: float, inputs: list[Tensor], coef: Tensor, base: Tensor | None = None) -> Tensor | None:
    """:func:`bound_scale`, or None where no row's bound is active and the check is cheap (on the
    CPU, eagerly): the factor is then the constant 1, and the caller can leave its learning rates
    as they are (the papers' rule, bitwise, with nothing of the bound kept for the backward)."""
    scale = _StepNorms.apply(bound, True, coef, base, *_distinct(inputs))
    return None if scale.numel() == 0 else scale  # (empty: dropped, or no rows to scale)
