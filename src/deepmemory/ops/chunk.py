r"""The update rule in chunk-parallel form: exact, with only chunk-end states materialised.

Why it is exact. Inside a chunk all gradients are taken at the chunk-start weights ``W_s``,
and each token's gradient of a matrix is an outer product ``delta_i a_i^T`` (one forward and
hand-written backward of the *keys* at ``W_s``). Momentum, decay and the Omega window are
linear in those outer products, so with chunk-local indices ``t = 1..n``,
``A_t = prod_{j<=t} (1 - decay_j)`` and ``E_t = prod_{j<=t} momentum_j``:

    S_t = E_t S_s - sum_i P(t, i) delta_i a_i^T,          P = D_E diag(lr) Gamma
    W_t = A_t W_s + m_t S_s - sum_i C(t, i) delta_i a_i^T, C = D_A P,  m_t = sum_{r<=t} D_A[t, r] E_r

with ``D_A[t, r] = prod_{j=r+1}^{t} (1 - decay_j)``, ``D_E[r, s] = prod_{j=s+1}^{r} momentum_j``
(lower-triangular, built by a masked ``cumprod`` rather than ratios of cumulative products,
so a gate of exactly 0 is harmless) and ``Gamma[s, i] = gamma_i`` for the ``window`` tokens
``i`` ending at ``s`` (``window - 1`` of them may lie in earlier chunks; their gradients are
still taken at ``W_s``). Plain gradient descent is ``D_E = I`` with no ``S_s`` term.

A query never needs ``W_t``: layer by layer,
``W_t x = A_t W_s x + m_t S_s x - sum_i C(t, i) delta_i (a_i . x)``, i.e. ``(C * X A^T) Delta``,
an attention-like ``b x b`` product per chunk (the dual form). Muon orthogonalises every
``S_t``, which is not linear, so at token granularity it materialises the chunk's ``S_t`` and
``W_t`` (``b`` matrices); at chunk granularity it is one Newton-Schulz per chunk.

The gate products and the coefficient matrices do not depend on the memory, so they are
built for all chunks at once; only the gradients and the reads walk the chunks in order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .memory import dense_apply, memory_forward, newton_schulz, token_gradients
from .problem import Problem, Result


def _segprod(x: Tensor) -> Tensor:
    """``D[..., t, r] = prod_{j=r+1}^{t} x[..., j]`` for ``r <= t``, 0 above the diagonal."""
    n = x.shape[-1]
    strictly_lower = torch.ones(n, n, dtype=torch.bool, device=x.device).tril(-1)
    factors = torch.where(strictly_lower, x.unsqueeze(-1), torch.ones((), dtype=x.dtype, device=x.device))
    return torch.cumprod(factors, dim=-2).tril()


def _outer_sum(coef: Tensor, d: Tensor, a: Tensor) -> Tensor:
    """``sum_i coef_i delta_i a_i^T``: ``coef [B, H, n]``, ``d [B, H, n, rows]``, ``a [B, H, n, cols]``."""
    return torch.einsum("bhi,bhir,bhic->bhrc", coef, d, a)


def chunk(p: Problem) -> Result:
    bsz, nh, n, _ = p.q.shape
    b, c = p.chunk_size, p.window
    n_chunks = -(-n // b)
    pad = n_chunks * b - n
    last_len = n - (n_chunks - 1) * b
    n_ext = c - 1 + b

    # every chunk sees exactly c - 1 tokens before it: missing history is a zero token with gamma 0
    lead = c - 1 - p.n_hist
    kx = F.pad(p.k, (0, 0, lead, pad)).unfold(2, n_ext, b).transpose(-1, -2)  # [B, H, nc, n_ext, dk]
    vx = F.pad(p.v, (0, 0, lead, pad)).unfold(2, n_ext, b).transpose(-1, -2)
    gx = F.pad(p.gamma, (lead, pad)).unfold(2, n_ext, b)  # [B, H, nc, n_ext]
    q = F.pad(p.q, (0, 0, 0, pad)).unflatten(2, (n_chunks, b))
    lr = F.pad(p.lr, (0, pad)).unflatten(2, (n_chunks, b))
    mom = F.pad(p.momentum, (0, pad)).unflatten(2, (n_chunks, b))
    ret = 1.0 - F.pad(p.decay, (0, pad)).unflatten(2, (n_chunks, b))

    t_idx = torch.arange(b, device=q.device)[:, None]
    i_idx = torch.arange(n_ext, device=q.device)[None, :]
    band = (i_idx >= t_idx) & (i_idx <= t_idx + c - 1)  # token t (ext index t + c - 1) sees i in [t, t + c - 1]
    gamma = band * gx.unsqueeze(-2)  # [B, H, nc, b, n_ext]

    # per-chunk views via unbind: indexing one chunk out of the whole tensor would make every
    # backward step materialise a gradient of the whole sequence (quadratic in T)
    kx, vx, q = kx.unbind(2), vx.unbind(2), q.unbind(2)
    outs = []
    w, s = dict(p.w0), dict(p.s0)
    w_chunk, s_chunk = w, s
    if p.granularity == "chunk":
        coef = gamma.sum(-2) if p.optimizer == "muon" else (lr.unsqueeze(-1) * gamma).sum(-2)  # [B, H, nc, n_ext]
        coef, keep_s, keep_w, mean_lr = (x.unbind(2) for x in (coef, mom.mean(-1), ret.mean(-1), lr.mean(-1)))
        for j in range(n_chunks):
            outs.append(memory_forward(p.spec, dense_apply(w), q[j]))
            if j == n_chunks - 1 and last_len < b:
                w_chunk, s_chunk = w, s
                break
            grads = token_gradients(p.spec, w, kx[j], vx[j], p.loss)
            step = {m: _outer_sum(coef[j], *grads[m]) for m in w}
            ks, kw = keep_s[j][..., None, None], keep_w[j][..., None, None]
            if p.optimizer == "muon":
                s = {m: ks * s[m] + step[m] for m in w}
                w = {m: kw * w[m] - mean_lr[j][..., None, None] * newton_schulz(s[m], p.ns_steps) for m in w}
            else:
                s = {m: -step[m] for m in w} if p.optimizer == "gd" else {m: ks * s[m] - step[m] for m in w}
                w = {m: kw * w[m] + s[m] for m in w}
        if last_len == b:
            w_chunk, s_chunk = w, s
        return Result(torch.cat(outs, 2)[:, :, :n], w, s, w_chunk, s_chunk)

    d_a = _segprod(ret)  # [B, H, nc, b, b]
    a_cum = torch.cumprod(ret, dim=-1)  # [B, H, nc, b]
    if p.optimizer == "gd":
        s_coef = lr.unsqueeze(-1) * gamma  # S_t = -sum_i s_coef[t, i] delta_i a_i^T
        c_coef = d_a @ s_coef
        m_coef = e_cum = None
    else:
        d_e = _segprod(mom)
        e_cum = torch.cumprod(mom, dim=-1)
        if p.optimizer == "momentum":
            s_coef = (d_e * lr.unsqueeze(-2)) @ gamma
            c_coef = d_a @ s_coef
            m_coef = (d_a @ e_cum.unsqueeze(-1)).squeeze(-1)
        else:
            s_coef = d_e @ gamma  # muon: S_t = E_t S_s + sum_i s_coef[t, i] delta_i a_i^T
            c_coef = d_a * lr.unsqueeze(-2)  # W_t = A_t W_s - sum_r c_coef[t, r] NS(S_r)
            m_coef = None
    a_cum, s_coef, c_coef = a_cum.unbind(2), s_coef.unbind(2), c_coef.unbind(2)
    e_cum = None if e_cum is None else e_cum.unbind(2)
    m_coef = None if m_coef is None else m_coef.unbind(2)

    for j in range(n_chunks):
        e = (b if j < n_chunks - 1 else last_len) - 1
        if e < b - 1:
            w_chunk, s_chunk = w, s
        grads = token_gradients(p.spec, w, kx[j], vx[j], p.loss)
        a_j, c_j = a_cum[j], c_coef[j]
        if p.optimizer == "muon":
            e_j = e_cum[j][..., None, None]
            s_all = {m: e_j * s[m].unsqueeze(2) + torch.einsum("bhti,bhir,bhic->bhtrc", s_coef[j], *grads[m]) for m in w}
            w_all = {
                m: a_j[..., None, None] * w[m].unsqueeze(2)
                - torch.einsum("bhtr,bhrpc->bhtpc", c_j, newton_schulz(s_all[m], p.ns_steps))
                for m in w
            }
            outs.append(memory_forward(p.spec, dense_apply(w_all), q[j]))
            w = {m: w_all[m][:, :, e] for m in w}
            s = {m: s_all[m][:, :, e] for m in w}
            continue

        m_j = None if m_coef is None else m_coef[j]

        def dual_apply(name: str, x: Tensor) -> Tensor:
            d, a = grads[name]
            out = a_j.unsqueeze(-1) * (x @ w[name].transpose(-1, -2)) - (c_j * (x @ a.transpose(-1, -2))) @ d
            if m_j is not None:
                out = out + m_j.unsqueeze(-1) * (x @ s[name].transpose(-1, -2))
            return out

        outs.append(memory_forward(p.spec, dual_apply, q[j]))
        a_e = a_j[:, :, e, None, None]
        if m_j is None:
            w_new = {m: a_e * w[m] - _outer_sum(c_j[:, :, e], *grads[m]) for m in w}
            s = {m: -_outer_sum(s_coef[j][:, :, e], *grads[m]) for m in w}
        else:
            m_e = m_j[:, :, e, None, None]
            e_e = e_cum[j][:, :, e, None, None]
            w_new = {m: a_e * w[m] + m_e * s[m] - _outer_sum(c_j[:, :, e], *grads[m]) for m in w}
            s = {m: e_e * s[m] - _outer_sum(s_coef[j][:, :, e], *grads[m]) for m in w}
        w = w_new
    if last_len == b:
        w_chunk, s_chunk = w, s
    return Result(torch.cat(outs, 2)[:, :, :n], w, s, w_chunk, s_chunk)
