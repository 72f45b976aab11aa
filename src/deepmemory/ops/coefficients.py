r"""The chunk layout and gate coefficients shared by the chunk-parallel implementations.

Both ``impl="chunk"`` (PyTorch) and ``impl="triton"`` cut a :class:`Problem` into chunks the same
way and build the same coefficient matrices; they differ only in how they apply them. With
chunk-local indices ``t = 1..b``, ``A_t = prod_{j<=t} (1 - decay_j)``, ``E_t = prod_{j<=t}
momentum_j`` and the Omega band ``Gamma[s, i] = gamma_i`` for the ``window`` tokens ``i`` ending at
``s`` (the momentum/forgetting update of Titans eq. 13–14 with the window of the ATLAS Omega rule)::

    S_t = E_t S_s - sum_i P(t, i) delta_i a_i^T          P = D_E diag(lr) Gamma
    W_t = A_t W_s + m_t S_s - sum_i C(t, i) delta_i a_i^T   C = D_A P,   m_t = sum_r D_A[t, r] E_r

with ``D_A[t, r] = prod_{j=r+1}^{t} (1 - decay_j)`` and ``D_E`` likewise of the momenta (see
docs/ops.md for the derivation).

Causality for any input. Every coefficient of a token ``i`` in a row ``t < i`` is an exact zero,
but a product ``0 * NaN`` (or ``0 * inf``) is NaN, so one non-finite value at token ``i`` would
reach every earlier row of its chunk through the masked products and the matrix products over
the chunk. The layout therefore *selects* rather than multiplies: ``chunk_layout(p,
sanitize=True)`` replaces the gates (with ``keys_values=True`` also the keys and values) of every
token holding a non-finite value by zeros and marks it in ``ChunkLayout.bad``; the implementations
then set what depends on a marked token to NaN by selection (``torch.where``), so that its rows
and every later state read NaN, as the token-by-token reference does, while earlier rows are
bitwise those of the clean input. The cost is a few passes over the inputs, once per call.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor

from .problem import Problem


def segprod(x: Tensor) -> Tensor:
    """``D[..., t, r] = prod_{j=r+1}^{t} x[..., j]`` for ``r <= t``, 0 above the diagonal.

    Built by a masked ``cumprod`` rather than ratios of cumulative products, so a gate of exactly
    0 is harmless. ``x [..., n]`` -> ``[..., n, n]``."""
    n = x.shape[-1]
    strictly_lower = torch.ones(n, n, dtype=torch.bool, device=x.device).tril(-1)
    factors = torch.where(strictly_lower, x.unsqueeze(-1), torch.ones((), dtype=x.dtype, device=x.device))
    return torch.cumprod(factors, dim=-2).tril()


def nonfinite(x: Tensor, event_dims: int = 0) -> Tensor:
    """True where ``x`` holds a NaN or an infinity, reduced over its last ``event_dims`` dims: for
    ``x [B, H, N, d]`` and ``event_dims=1``, whether each token's vector is not all finite.

    Over a vector it tests the sum (one reading pass, some 25 times cheaper on a CPU than
    ``isfinite(x).all(-1)``): NaN and infinities always make it non-finite, and so does a finite
    vector whose sum overflows the dtype, whose products would overflow as well. ``s - s`` is NaN
    exactly where ``s`` is NaN or infinite."""
    s = x.sum(tuple(range(-event_dims, 0))) if event_dims else x
    return torch.isnan(s - s)


def zero_rows(bad: Tensor, x: Tensor) -> Tensor:
    """``x`` with the entries (``bad`` of ``x``'s leading shape: the rows) that ``bad`` marks
    replaced by zeros: a selection, so NaN and infinities there do not survive."""
    return torch.where(bad.reshape(*bad.shape, *(1,) * (x.dim() - bad.dim())), 0.0, x)


def poison_rows(bad: Tensor, x: Tensor) -> Tensor:
    """``x`` with the rows ``bad`` marks set to NaN (by selection): what depends on a token whose
    inputs were replaced by :func:`zero_rows` reads NaN, as it would have without the replacement."""
    return torch.where(bad.reshape(*bad.shape, *(1,) * (x.dim() - bad.dim())), torch.nan, x)


@dataclass
class ChunkLayout:
    """One problem cut into ``n_chunks`` chunks of ``b`` tokens (the last has ``last_len``).

    Every chunk sees exactly ``window - 1`` tokens before it (missing history is a zero token
    with gamma 0), so its keys and values span ``n_ext = window - 1 + b`` tokens. Shapes:
    ``q [B, H, nc, b, dk]``, ``kx [B, H, nc, n_ext, dk]``, ``vx [B, H, nc, n_ext, dv]``; ``lr``,
    ``momentum``, ``retention`` (``1 - decay``) ``[B, H, nc, b]``; ``gamma [B, H, nc, b, n_ext]``
    (the Omega band times the window gates); ``cx [B, H, nc, n_ext, dv]`` the channel-wise loss
    weights laid out as ``vx`` (None without them).

    ``bad [B, H, nc, n_ext]`` (bool, only when the layout was made with ``sanitize=True``, else
    None): the tokens of each chunk's span whose gates (and keys or values, with
    ``keys_values=True``) held a non-finite value and were replaced by zeros; a row ``t`` of a
    chunk depends on such a token when it is marked at an extended index ``<= t + window - 1``
    (:meth:`rows_after_bad`).
    """

    n_chunks: int
    b: int
    last_len: int
    n_ext: int
    q: Tensor
    kx: Tensor
    vx: Tensor
    lr: Tensor
    momentum: Tensor
    retention: Tensor
    gamma: Tensor
    bad: Tensor | None = None
    cx: Tensor | None = None

    def rows_after_bad(self, bad: Tensor) -> Tensor:
        """``bad [..., n_ext]`` (the marked tokens of a chunk's span) -> ``[..., b]``: the rows of
        the chunk at or after a marked token (the window reaches ``window - 1`` tokens back)."""
        return torch.cummax(bad, dim=-1).values[..., self.n_ext - self.b :]

    def ends(self, x: Tensor) -> Tensor:
        """The rows of ``x [B, H, nc, b, ...]`` at each chunk's last token -> ``[B, H, nc, ...]``."""
        ends = torch.full((self.n_chunks,), self.b - 1, device=x.device)
        ends[-1] = self.last_len - 1
        return x[:, :, torch.arange(self.n_chunks, device=x.device), ends]


def chunk_layout(p: Problem, sanitize: bool = False, keys_values: bool = False) -> ChunkLayout:
    """Pad and cut ``p`` into chunks (the inputs are not copied more than padding needs).

    ``sanitize``: replace the gates of each token that holds a non-finite gate (``keys_values``:
    or key or value) by zeros, and mark it in ``bad`` (see the module docstring). Queries are left
    alone: a query reaches only its own row."""
    n, b, c = p.q.shape[2], p.rule.chunk_size, p.rule.window
    bad = None
    if sanitize:
        # one number per token (extended index) that is NaN or infinite when any of its values is
        # (or, harmlessly, when their sum overflows): a few reading passes, no isfinite per tensor
        total = p.gamma + F.pad(p.lr + p.momentum + p.decay, (p.n_hist, 0))  # [B, H, n_hist + N]
        if keys_values:
            total = total + p.k.sum(-1) + p.v.sum(-1)
        if p.channel is not None:
            total = total + p.channel.sum(-1)
        bad = nonfinite(total)
        if keys_values:
            p = replace(p, k=zero_rows(bad, p.k), v=zero_rows(bad, p.v))
        if p.channel is not None:
            p = replace(p, channel=zero_rows(bad, p.channel))
        tok = bad[:, :, p.n_hist :]
        p = replace(
            p,
            gamma=zero_rows(bad, p.gamma),
            lr=zero_rows(tok, p.lr),
            momentum=zero_rows(tok, p.momentum),
            decay=zero_rows(tok, p.decay),
        )
    n_chunks = -(-n // b)
    pad = n_chunks * b - n
    n_ext = c - 1 + b
    lead = c - 1 - p.n_hist
    chunks = lambda x: F.pad(x, (0, pad)).unflatten(2, (n_chunks, b))  # noqa: E731
    spans = lambda x: F.pad(x, (0, 0, lead, pad)).unfold(2, n_ext, b).transpose(-1, -2)  # noqa: E731  [B, H, nc, n_ext, d]
    gx = F.pad(p.gamma, (lead, pad)).unfold(2, n_ext, b)  # [B, H, nc, n_ext]
    t_idx = torch.arange(b, device=p.q.device)[:, None]
    i_idx = torch.arange(n_ext, device=p.q.device)[None, :]
    band = (i_idx >= t_idx) & (i_idx <= t_idx + c - 1)  # token t (ext index t + c - 1) sees i in [t, t + c - 1]
    return ChunkLayout(
        n_chunks=n_chunks,
        b=b,
        last_len=n - (n_chunks - 1) * b,
        n_ext=n_ext,
        q=F.pad(p.q, (0, 0, 0, pad)).unflatten(2, (n_chunks, b)),
        kx=spans(p.k),
        vx=spans(p.v),
        cx=None if p.channel is None else spans(p.channel),
        lr=chunks(p.lr),
        momentum=chunks(p.momentum),
        retention=1.0 - chunks(p.decay),
        # (sanitized, the gates are finite and the band's zeros exact; else a NaN gate stays in its own
        # chunk's update, which one update per chunk applies after all of its tokens)
        gamma=band * gx.unsqueeze(-2),
        bad=None if bad is None else F.pad(bad, (lead, pad)).unfold(2, n_ext, b),
    )


@dataclass
class GateCoefficients:
    """The coefficient matrices of one layout, all ``[B, H, nc, ...]``: ``d_a [b, b]``; ``a_cum``,
    ``e_cum``, ``m_coef [b]`` (``A_t``, ``E_t``, ``m_t``); ``s_coef`` (``P``) and ``c_coef``
    (``C``) ``[b, n_ext]``. Under plain gradient descent ``E = m = 0`` and ``P = diag(lr) Gamma``."""

    d_a: Tensor
    a_cum: Tensor
    e_cum: Tensor
    m_coef: Tensor
    s_coef: Tensor
    c_coef: Tensor


def retention_products(layout: ChunkLayout) -> tuple[Tensor, Tensor]:
    """``D_A [B, H, nc, b, b]`` and ``A [B, H, nc, b]``: the products of ``1 - decay`` inside each
    chunk, which every optimizer needs."""
    return segprod(layout.retention), torch.cumprod(layout.retention, dim=-1)


def gate_coefficients(layout: ChunkLayout, optimizer: str) -> GateCoefficients:
    """The coefficients of the gd/momentum update for every chunk at once (they do not depend on
    the memory). Muon at token granularity needs only :func:`retention_products`."""
    lr, mom, gamma = layout.lr, layout.momentum, layout.gamma
    d_a, a_cum = retention_products(layout)
    if optimizer == "gd":
        s_coef = lr.unsqueeze(-1) * gamma
        e_cum = m_coef = torch.zeros_like(a_cum)
    else:
        s_coef = (segprod(mom) * lr.unsqueeze(-2)) @ gamma
        e_cum = torch.cumprod(mom, dim=-1)
        m_coef = (d_a @ e_cum.unsqueeze(-1)).squeeze(-1)
    return GateCoefficients(d_a=d_a, a_cum=a_cum, e_cum=e_cum, m_coef=m_coef, s_coef=s_coef, c_coef=d_a @ s_coef)


def step_scale(inputs, coef: Tensor, bound: float) -> Tensor:
    """The factor the rule's ``step_bound`` puts on each row's learning rates (docs/numerics.md).

    ``inputs``: for each weight matrix of the memory, the inputs ``a_i [..., n_ext, cols]`` it
    multiplies for the tokens of a span (the ``a`` of its gradients ``delta_i a_i^T``; for the
    linear memory the keys); ``coef [..., r, n_ext]`` (``C(t, i) >= 0``: the weight of token
    ``i``'s gradient in row ``t``'s step) -> ``[..., r]`` in (0, 1]: ``min(1, bound / F_t)`` with
    ``F_t = max over the matrices of ||H_t||_F``, ``H_t = sum_i C(t, i) a_i a_i^T`` (the row's
    summed step along the directions of the matrix's inputs), computed as
    ``||H_t||_F^2 = sum_ij c_i c_j cos^2(a_i, a_j)`` with ``c_i = C(t, i) ||a_i||^2``.

    Causal for any input: a row's zero weights are *selected* away before they meet an input's
    norm (``0 * inf`` would be NaN), so a huge input later in the chunk cannot reach earlier rows;
    a zero input counts as nothing. Differentiable, with finite gradients where the bound is
    inactive (the factor is then the constant 1)."""
    return gram_step_scale([input_gram(a) for a in inputs], coef, bound)


def input_gram(a: Tensor) -> tuple[Tensor, Tensor]:
    """``(||a_i||^2 [..., n], cos^2(a_i, a_j) [..., n, n])`` of inputs ``a [..., n, cols]``, what
    :func:`gram_step_scale` needs of a matrix (a zero input has cosines 0)."""
    sq = a.pow(2).sum(-1)  # [..., n_ext]: ||a_i||^2 (inf for a huge input)
    pos = sq > 0
    unit = torch.where(pos.unsqueeze(-1), a * torch.rsqrt(torch.where(pos, sq, 1.0)).unsqueeze(-1), 0.0)
    return sq, (unit @ unit.transpose(-1, -2)).pow(2)


def gram_step_scale(grams, coef: Tensor, bound: float) -> Tensor:
    """:func:`step_scale` from each matrix's ``(||a_i||^2, cos^2(a_i, a_j))`` (:func:`input_gram`,
    or a kernel's: the implicit inputs ``φ*(k_i)`` of ``deepmemory.ops.kernel_memory``)."""
    f2 = None
    for sq, cos2 in grams:
        c = torch.where(coef > 0, coef * sq.unsqueeze(-2), 0.0)
        norm2 = ((c @ cos2) * c).sum(-1)
        f2 = norm2 if f2 is None else torch.maximum(f2, norm2)
    assert f2 is not None  # a memory has at least one matrix
    over = f2 > bound * bound
    return torch.where(over, bound * torch.rsqrt(torch.where(over, f2, 1.0)), 1.0)
