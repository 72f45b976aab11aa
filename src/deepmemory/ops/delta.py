r"""The delta rule exactly online at every token, in chunk-parallel form (the WY representation).

The rule of docs/ops.md with the linear memory, the l2 loss, plain gradient descent, window 1 and
``chunk_size=1`` is the delta rule. Per sequence and head, with ``S = W [dv, dk]``,
``alpha_t = 1 - decay_t`` and ``beta_t = lr_t gamma_t`` (``gamma``: the window gate)::

    S_t = alpha_t S_{t-1} + e_t k_t^T,      e_t = beta_t v_t - b_t S_{t-1} k_t,      o_t = S_t q_t
    b_t = alpha_t beta_t   decay_first: the gated delta rule of Gated DeltaNet (arXiv 2412.06464 §3.1),
                           S_t = alpha_t S_{t-1} (I - beta_t k_t k_t^T) + beta_t v_t k_t^T
    b_t = beta_t           otherwise: the gradient at S_{t-1}, the decay applied after it (Titans eq. 13-14)

Only ``b_t``, the step on what the memory reads back, tells the two orders apart.

The WY form. Cut the sequence into blocks of ``b`` tokens (``BLOCK``, an implementation detail:
the result is the token-by-token rule at any block size). In a block starting from ``S_0``, with
block-local ``g_t = prod_{j<=t} alpha_j`` and ``D[t, i] = g_t / g_i = prod_{j=i+1}^{t} alpha_j``,
unrolling gives ``S_t = g_t S_0 + sum_{i<=t} D[t, i] e_i k_i^T``, so the update vectors solve a
unit lower-triangular system (rows ``e_t``, ``E = U - W S_0^T``)::

    T = (I + L)^-1,   U = T diag(beta) V,   W = T diag(b g_{t-1}) K,   L[t, i] = b_t D[t-1, i] (k_t . k_i) for i < t

the UT transform of DeltaNet (arXiv 2406.06484 eq. 10-11) with the decay ratios of Gated DeltaNet.
``U`` and ``W`` do not depend on ``S_0``: one batched triangular solve (``T``, against the identity)
and two products give them for every block at once. Then, block by block (eq. 8-9 of the same
paper, with the ratios)::

    E    = U - W S_0^T
    O    = diag(g) Q S_0^T + ((Q K^T) * D) E                    (D lower-triangular, diagonal included)
    S_b  = g_b S_0 + E^T diag(D[b, :]) K

Every ratio is a masked product (``segprod``), never a quotient of cumulative products nor a
difference of their logarithms, so ``decay = 1`` (``alpha = 0``, ``log 0``) is exact. Per block the
work is ``O(b^2 (dk + dv) + b dk dv)`` and only the block-end states ``S_b`` are kept: training
memory is linear in ``T``, as in the general chunked form.

What does not reuse it: momentum (Titans' linear memory, ``S_t = eta_t S_{t-1} - theta_t grad``,
``W_t = alpha_t W_{t-1} + S_t``). Its error at token ``t`` reads ``W_{t-1}``, which sums all earlier
momenta, so the step of the pair ``(W, S)`` is not the identity plus one rank-one term per token and
the UT transform does not apply; nor does the dot loss need it (its gradient does not read the
memory), nor a window ``c > 1`` (a gradient of ``c`` keys per step). Those rules run in
:mod:`.chunk` (gradients at each chunk's start) or, at ``chunk_size=1``, its one-token chunks.

Causality for any input, as in :mod:`.chunk`: the gates, keys and values of a token holding a
non-finite value are replaced by zeros (a selection), and the output rows at and after it, and the
final state, are set to NaN by selection (the blocks after it run on, their rows are replaced). A
finite key can still overflow inside the solve (its Gram entries multiply each other in the later
rows of ``T``), and a non-finite row of ``U`` or ``W`` would reach the earlier rows as ``0 * inf``
in ``((Q K^T) * D) E``: so those rows are replaced by zeros too, and read NaN from there on (one
reading pass over ``U`` and ``W``). Not guarded, as elsewhere: a finite input so large that one
product with the state overflows (about ``3e38 / |S|`` in float32).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .coefficients import nonfinite, poison_rows, segprod, zero_rows
from .problem import Problem, Result
from .rule import UpdateRule

# tokens per block of the WY form: an implementation detail (the result is the same at any size);
# 32 was the fastest of 16..128 forward+backward on one CPU thread (docs/benchmarks.md)
BLOCK = 32


def is_delta_rule(rule: UpdateRule) -> bool:
    """Whether ``rule`` is the exactly online delta rule that :func:`delta_rule` computes: the
    linear memory without layer norm, the l2 loss, ``gd``, window 1, ``chunk_size=1`` and token
    granularity (``decay_first`` either way)."""
    return (
        rule.architecture == "linear"
        and not rule.layer_norm
        and rule.loss == "l2"
        and rule.optimizer == "gd"
        and rule.window == 1
        and rule.chunk_size == 1
        and rule.granularity == "token"
    )


def _blocks(x: Tensor, n_blocks: int, b: int, value: float = 0.0) -> Tensor:
    """``x [B, H, N, ...]`` padded with ``value`` to ``n_blocks * b`` tokens -> ``[B, H, n_blocks, b, ...]``."""
    pad = n_blocks * b - x.shape[2]
    if pad:
        x = F.pad(x, (0, 0) * (x.dim() - 3) + (0, pad), value=value)
    return x.unflatten(2, (n_blocks, b))


def delta_rule(p: Problem) -> Result:
    """The delta rule of ``p.rule`` (see :func:`is_delta_rule`) in the WY form, exact at every token.

    ``p``: a :class:`Problem` of that rule, heads first, in the compute dtype (float32, or float64):
    ``q, k [B, H, N, dk]``, ``v [B, H, N, dv]``, gates ``[B, H, N]`` (``lr >= 0``, ``decay`` in
    [0, 1], ``gamma``: the window gate), ``w0 {"w0": [B, H, dv, dk]}``. Window 1 and chunk size 1
    carry no history nor pending tokens. Returns the outputs ``[B, H, N, dv]``, the memory after the
    last token and, as the op's ``momentum`` of ``gd``, the last step ``e_N k_N^T`` (each also as the
    unfinished chunk's: a chunk of one token is never unfinished). Raises nothing of its own: the
    op validated the inputs.
    """
    n = p.q.shape[2]
    b = min(BLOCK, n)
    n_blocks = -(-n // b)
    # a token holding a non-finite gate, key or value: its inputs become zeros, its rows NaN below
    bad = nonfinite(p.lr + p.gamma + p.decay + p.k.sum(-1) + p.v.sum(-1))
    k, v = zero_rows(bad, p.k), zero_rows(bad, p.v)
    beta = torch.where(bad, 0.0, p.lr * p.gamma)
    alpha = torch.where(bad, 1.0, 1.0 - p.decay)
    # padding tokens write nothing and forget nothing (beta 0, alpha 1): the last block's end state
    # is the state after the last real token
    q, k, v = (_blocks(x, n_blocks, b) for x in (p.q, k, v))
    beta, bad = _blocks(beta, n_blocks, b), _blocks(bad, n_blocks, b, value=False)
    alpha = _blocks(alpha, n_blocks, b, value=1.0)

    g = torch.cumprod(alpha, dim=-1)  # g_t, block-local
    d = segprod(alpha)  # D[t, i] = g_t / g_i for i <= t, 0 above the diagonal
    g_prev = F.pad(g[..., :-1], (1, 0), value=1.0)  # g_{t-1}
    d_prev = F.pad(d[..., :-1, :], (0, 0, 1, 0))  # D[t-1, i]
    step = alpha * beta if p.rule.decay_first else beta  # b_t
    idx = torch.arange(b, device=q.device)
    below = idx[:, None] > idx[None, :]
    causal = idx[:, None] >= idx[None, :]
    lower = torch.where(below, step[..., None] * d_prev * (k @ k.transpose(-1, -2)), 0.0)
    # T = (I + L)^-1 by one solve against the identity, then products: on a CPU several times
    # faster than solving for the wide right-hand sides directly
    eye = torch.eye(b, dtype=q.dtype, device=q.device).expand_as(lower)
    t_inv = torch.linalg.solve_triangular(lower, eye, upper=False, unitriangular=True)
    u = t_inv @ (beta[..., None] * v)
    w = t_inv @ ((step * g_prev)[..., None] * k)
    # a huge but finite key can overflow in the solve (its Gram entries multiply each other in the
    # later rows): those rows become zeros here, and NaN below
    over = nonfinite(u.sum(-1) + w.sum(-1))
    u, w = zero_rows(over, u), zero_rows(over, w)
    gq = g[..., None] * q  # what the block's queries read of its start state, decayed
    scores = torch.where(causal, q @ k.transpose(-1, -2), 0.0) * d  # (q_t . k_i) D[t, i]
    k_end = (d[..., -1, :, None] * k).transpose(-1, -2)  # [B, H, nb, dk, b]: D[b, i] k_i
    g_end = g[..., -1, None, None]

    # per-block views via unbind (indexing one block out of the whole would make the backward
    # materialise a gradient of the whole sequence per block)
    u_b, w_b, gq_b, scores_b, k_end_b, g_end_b = (x.unbind(2) for x in (u, w, gq, scores, k_end, g_end))
    st = p.w0["w0"].transpose(-1, -2)  # S^T [B, H, dk, dv]
    outs = []
    for j in range(n_blocks):
        e = u_b[j] - w_b[j] @ st
        outs.append(gq_b[j] @ st + scores_b[j] @ e)
        st = g_end_b[j] * st + k_end_b[j] @ e
    # every row at or after a marked token reads NaN, and so does what the state holds after it
    rows = torch.cummax((bad | over).flatten(2, 3), dim=-1).values[..., :n]  # [B, H, N]
    o = poison_rows(rows, torch.cat(outs, 2)[:, :, :n])
    s_end = poison_rows(rows[..., -1], st.transpose(-1, -2))
    # the last step e_N k_N^T (what gd's momentum holds)
    last = n - (n_blocks - 1) * b - 1
    s_last = poison_rows(rows[..., -1], e[..., last, :, None] * k[:, :, -1, last, None, :])
    return Result(o, {"w0": s_end}, {"w0": s_last}, {"w0": s_end}, {"w0": s_last})
