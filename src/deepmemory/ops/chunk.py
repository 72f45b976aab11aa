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

Causality for any input (token granularity; one update per chunk is causal as it stands, its reads
never meet the chunk's own tokens). A NaN or infinity at token ``i`` must not reach the rows
``t < i`` of its chunk, where its coefficients are exact zeros, yet ``0 * NaN`` is NaN inside the
products over the chunk. So nothing non-finite enters them: the gates, keys and values of a token
holding a non-finite value are replaced by zeros when the chunks are laid out
(:func:`~.coefficients.chunk_layout`), and the rows at or after such a token read NaN through
their coefficients of the chunk-start state, as does the state after its chunk (what the
token-by-token reference gives there). All of it is done once for all chunks, by selection
(``torch.where``), with no host synchronisation; rows before the token are bitwise those of the
clean input. A finite key can still overflow inside its own gradient factors where they hold a
product of two of its projections (``gated_mlp``) or a square (``layer_norm``), and so can Muon's
outer products: those memories also replace, chunk by chunk, the factors of a token that are not
finite (one reading pass and one selection per factor). Elsewhere an overflow needs a finite input
so large that one matrix product with it overflows the compute dtype (about ``3e38 / |W|`` in
float32), which is not guarded.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .coefficients import chunk_layout, gate_coefficients, nonfinite, poison_rows, retention_products, segprod, zero_rows
from .memory import dense_apply, memory_forward, newton_schulz, token_gradients
from .problem import Problem, Result


def _outer_sums(coef: Tensor, d: Tensor, a: Tensor) -> Tensor:
    """``sum_i coef[k, i] delta_i a_i^T`` for each ``k``: ``coef [B, H, K, n]``, ``d [B, H, n, rows]``,
    ``a [B, H, n, cols]`` -> ``[B, H, K, rows, cols]``.

    The coefficients scale the narrower of ``delta`` and ``a``, and ``k`` rides along with its
    columns, so one product does it and autograd keeps only that small scaled copy besides
    ``delta`` and ``a`` (which the token-granularity reads keep anyway)."""
    rows, cols, k = d.shape[-1], a.shape[-1], coef.shape[-2]
    coef = coef.transpose(-1, -2).unsqueeze(-1)  # [B, H, n, K, 1]
    if cols <= rows:
        scaled = (coef * a.unsqueeze(-2)).flatten(-2)  # [B, H, n, K * cols]
        return (d.transpose(-1, -2) @ scaled).unflatten(-1, (k, cols)).transpose(-2, -3)
    scaled = (coef * d.unsqueeze(-2)).flatten(-2)  # [B, H, n, K * rows]
    return (scaled.transpose(-1, -2) @ a).unflatten(-2, (k, rows))


def _read_start(ws: Tensor, x: Tensor, coef: Tensor) -> Tensor:
    """``coef[t, 0] W x_t + coef[t, 1] S x_t`` with ``ws = [W; S]`` ``[B, H, 2, rows, cols]``,
    ``x [B, H, n, cols]``, ``coef [B, H, n, 2, 1]``.

    Where the inputs are narrower than the outputs the coefficients scale the inputs (two
    products), otherwise the outputs (one product of the stacked state): either way the tensor
    autograd keeps besides ``x`` and the state is the narrower one."""
    rows, cols = ws.shape[-2:]
    if cols < rows:
        return (coef[..., 0, :] * x) @ ws[:, :, 0].transpose(-1, -2) + (coef[..., 1, :] * x) @ ws[:, :, 1].transpose(-1, -2)
    both = x @ ws.flatten(2, 3).transpose(-1, -2)  # [B, H, n, 2 * rows]: W x and S x
    return (both.unflatten(-1, (2, -1)) * coef).sum(-2)


def chunk(p: Problem) -> Result:
    """The chunk-parallel form of the rule (``impl="chunk"``): exact against :func:`reference`."""
    token = p.rule.granularity == "token"
    lay = chunk_layout(p, sanitize=token, keys_values=token)
    n, b, n_chunks, last_len = p.q.shape[2], lay.b, lay.n_chunks, lay.last_len
    # per-chunk views via unbind: indexing one chunk out of the whole tensor would make every
    # backward step materialise a gradient of the whole sequence (quadratic in T)
    kx, vx, q = lay.kx.unbind(2), lay.vx.unbind(2), lay.q.unbind(2)
    if not token:
        return _chunk_granularity(p, q, kx, vx, lay.lr, lay.momentum, lay.retention, lay.gamma, n, b, last_len)
    if p.rule.optimizer == "muon":
        d_a, a_cum = retention_products(lay)
        return _muon_token(p, lay, q, kx, vx, d_a, a_cum, n, b, last_len)

    g = gate_coefficients(lay, p.rule.optimizer)
    # chunk-end rows (the last chunk may be short): the 2x2 map [[A, m], [0, E]] that carries
    # (W_s, S_s) to the chunk end, and the coefficients of the outer products that follow
    a_end, m_end, e_end = lay.ends(g.a_cum), lay.ends(g.m_coef), lay.ends(g.e_cum)
    mix = torch.stack([torch.stack([a_end, m_end], -1), torch.stack([torch.zeros_like(e_end), e_end], -1)], -2)
    out_coef = torch.stack([lay.ends(g.c_coef), lay.ends(g.s_coef)], -2)  # [B, H, nc, 2, n_ext]
    read_coef = torch.stack([g.a_cum, g.m_coef], -1)  # [B, H, nc, b, 2]
    # a token whose inputs were replaced by zeros: the rows from it on read NaN (through their
    # coefficients of the chunk-start state), and so does the state after its chunk
    read_coef = poison_rows(lay.rows_after_bad(lay.bad), read_coef)
    mix = poison_rows(lay.bad.any(-1), mix)
    c_coef = g.c_coef
    mix, out_coef, read_coef, c_coef = (x.unbind(2) for x in (mix, out_coef, read_coef, c_coef))
    # a memory whose gradient factors are products of two projections of the key (gated_mlp) or
    # hold its square (layer norm) can overflow on a finite key: guard those chunk by chunk
    guard = p.spec.architecture == "gated_mlp" or p.spec.layer_norm
    outs = []

    # W and S travel stacked, [B, H, 2, rows, cols]: one product reads both and one 2x2 map moves
    # both, where separate tensors would cost several state-sized elementwise ops per chunk
    ws = {m: torch.stack([p.w0[m], p.s0[m]], 2) for m in p.w0}
    ws_chunk = ws
    for j in range(n_chunks):
        if j == n_chunks - 1 and last_len < b:
            ws_chunk = ws
        grads = token_gradients(p.spec, {m: t[:, :, 0] for m, t in ws.items()}, kx[j], vx[j], p.rule.loss)
        c_j, r_j, mix_j = c_coef[j], read_coef[j].unsqueeze(-1), mix[j]
        if guard:
            grads, rows = _guard(grads, lay)
            r_j = poison_rows(rows, r_j)
            mix_j = poison_rows(rows[..., -1], mix_j)

        def dual_apply(name: str, x: Tensor) -> Tensor:
            d, a = grads[name]
            return _read_start(ws[name], x, r_j) - (c_j * (x @ a.transpose(-1, -2))) @ d

        outs.append(memory_forward(p.spec, dual_apply, q[j]))
        ws = {m: torch.einsum("bhkl,bhlrc->bhkrc", mix_j, t) - _outer_sums(out_coef[j], *grads[m]) for m, t in ws.items()}
    if last_len == b:
        ws_chunk = ws
    unstack = lambda st, i: {m: t[:, :, i] for m, t in st.items()}  # noqa: E731
    return Result(torch.cat(outs, 2)[:, :, :n], unstack(ws, 0), unstack(ws, 1), unstack(ws_chunk, 0), unstack(ws_chunk, 1))


def _guard(grads, lay):
    """The chunk's gradient factors with those of every token holding a non-finite one (an
    overflow) replaced by zeros, and the rows at or after such a token ``[B, H, b]``."""
    total = sum(d.sum(-1) + a.sum(-1) for d, a in grads.values())  # one reading pass per factor
    bad = nonfinite(total)
    return {m: (zero_rows(bad, d), zero_rows(bad, a)) for m, (d, a) in grads.items()}, lay.rows_after_bad(bad)


def _muon_token(p: Problem, lay, q, kx, vx, d_a, a_cum, n: int, b: int, last_len: int) -> Result:
    """Muon at token granularity: ``S_t = E_t S_s + sum_i K(t, i) delta_i a_i^T`` with ``K = D_E Gamma``,
    ``W_t = A_t W_s - sum_r D_A[t, r] lr_r NS(S_r)``; the chunk's ``S_t`` and ``W_t`` are materialised.

    Both products run over the chunk's tokens with zero coefficients above the diagonal, so the
    factors ``delta_i, a_i`` of a token with a non-finite one and the orthogonalised ``NS(S_r)``
    of a row that is not finite are zeroed before them, and the rows from such a token on are NaN."""
    n_chunks = len(q)
    lr, mom, gamma = lay.lr, lay.momentum, lay.gamma
    s_coef = (segprod(mom) @ gamma).unbind(2)
    w_coef = (d_a * lr.unsqueeze(-2)).unbind(2)
    e_cum = torch.cumprod(mom, dim=-1).unbind(2)
    a_cum, bad = a_cum.unbind(2), lay.bad.unbind(2)
    lead = lay.n_ext - b  # the window's tokens before the chunk
    w, s = dict(p.w0), dict(p.s0)
    w_chunk, s_chunk = w, s
    outs = []
    for j in range(n_chunks):
        e = (b if j < n_chunks - 1 else last_len) - 1
        if e < b - 1:
            w_chunk, s_chunk = w, s
        grads, rows = _guard(token_gradients(p.spec, w, kx[j], vx[j], p.rule.loss), lay)
        e_j = e_cum[j][..., None, None]
        s_all = {m: e_j * s[m].unsqueeze(2) + torch.einsum("bhti,bhir,bhic->bhtrc", s_coef[j], *grads[m]) for m in w}
        ortho = {m: newton_schulz(s_all[m], p.rule.ns_steps) for m in w}
        for o in ortho.values():  # S_r of huge but finite factors may overflow
            rows = rows | lay.rows_after_bad(F.pad(nonfinite(o, 2), (lead, 0)))
        rows = rows | lay.rows_after_bad(bad[j])
        w_all = {
            m: a_cum[j][..., None, None] * w[m].unsqueeze(2)
            - torch.einsum("bhtr,bhrpc->bhtpc", w_coef[j], zero_rows(rows, ortho[m]))
            for m in w
        }
        outs.append(poison_rows(rows, memory_forward(p.spec, dense_apply(w_all), q[j])))
        end_bad = rows[..., e]  # a marked token up to the state's row leaves a NaN state
        w = {m: poison_rows(end_bad, w_all[m][:, :, e]) for m in w}
        s = {m: poison_rows(end_bad, s_all[m][:, :, e]) for m in w}
    if last_len == b:
        w_chunk, s_chunk = w, s
    return Result(torch.cat(outs, 2)[:, :, :n], w, s, w_chunk, s_chunk)


def _chunk_granularity(p: Problem, q, kx, vx, lr, mom, ret, gamma, n: int, b: int, last_len: int) -> Result:
    """One update per chunk with its gates averaged; the chunk's tokens read the previous chunk's memory.
    A short last chunk is not applied: it stays pending in the state until the chunk completes."""
    n_chunks = len(q)
    coef = gamma.sum(-2) if p.rule.optimizer == "muon" else (lr.unsqueeze(-1) * gamma).sum(-2)  # [B, H, nc, n_ext]
    coef, keep_s, keep_w, mean_lr = (x.unbind(2) for x in (coef, mom.mean(-1), ret.mean(-1), lr.mean(-1)))
    w, s = dict(p.w0), dict(p.s0)
    outs = []
    for j in range(n_chunks):
        outs.append(memory_forward(p.spec, dense_apply(w), q[j]))
        if j == n_chunks - 1 and last_len < b:
            break
        grads = token_gradients(p.spec, w, kx[j], vx[j], p.rule.loss)
        step = {m: _outer_sums(coef[j].unsqueeze(-2), *grads[m])[:, :, 0] for m in w}
        ks, kw = keep_s[j][..., None, None], keep_w[j][..., None, None]
        if p.rule.optimizer == "muon":
            s = {m: ks * s[m] + step[m] for m in w}
            w = {m: kw * w[m] - mean_lr[j][..., None, None] * newton_schulz(s[m], p.rule.ns_steps) for m in w}
        else:
            s = {m: -step[m] for m in w} if p.rule.optimizer == "gd" else {m: ks * s[m] - step[m] for m in w}
            w = {m: kw * w[m] + s[m] for m in w}
    # the chunk-start state equals the current one: chunk granularity only moves at chunk ends
    return Result(torch.cat(outs, 2)[:, :, :n], w, s, w, s)
