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
``S_t``, which is not linear: at token granularity a chunk materialises its ``b`` momenta (one
product of the outer products), orthogonalises them in one batched Newton-Schulz run and reads
``W_t x = A_t W_s x - sum_r D_A[t, r] lr_r NS(S_r) x`` without forming ``W_t``; each chunk is
recomputed in the backward (activation checkpointing), so only chunk-start states are kept
across chunks (:func:`_muon_token`). At chunk granularity it is one Newton-Schulz per chunk.

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

from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint

from .coefficients import (
    chunk_layout,
    gate_coefficients,
    nonfinite,
    poison_rows,
    retention_products,
    segprod,
    zero_rows,
)
from .delta import delta_rule, is_delta_rule
from .memory import NS_COEFFICIENTS, dense_apply, memory_forward, mm, newton_schulz, token_gradients
from .problem import Problem, Result
from .step_bound import active_bound_scale, bound_scale, step_norms


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


def chunk(p: Problem) -> Result:
    """The chunk-parallel form of the rule (``impl="chunk"``): exact against :func:`reference`.
    The exactly online delta rule (linear memory, l2, gd, window 1, chunk size 1) takes the WY form
    of :mod:`.delta` instead, which is exact at every token without a chunk per token. Under
    ``decay_first`` (chunk size 1) each chunk's gradients are taken at ``(1 - decay_t) W_s``."""
    bound = p.rule.step_bound
    if is_delta_rule(p.rule) and p.channel is None:
        if bound is not None:  # one token a chunk: the bound scales that token's learning rate
            p = replace(p, lr=p.lr * bound_scale(bound, [p.k.unsqueeze(-2)], (p.lr * p.gamma)[..., None, None])[..., 0])
        return delta_rule(p)
    token = p.rule.granularity == "token"
    lay = chunk_layout(p, sanitize=token, keys_values=token)
    n, b, n_chunks, last_len = p.q.shape[2], lay.b, lay.n_chunks, lay.last_len
    # per-chunk views via unbind: indexing one chunk out of the whole tensor would make every
    # backward step materialise a gradient of the whole sequence (quadratic in T)
    kx, vx, q = lay.kx.unbind(2), lay.vx.unbind(2), lay.q.unbind(2)
    cx = (None,) * n_chunks if lay.cx is None else lay.cx.unbind(2)
    if not token:
        return _chunk_granularity(p, lay, q, kx, vx, cx, n, b, last_len)
    if p.rule.optimizer == "muon":
        d_a, a_cum = retention_products(lay)
        return _muon_token(p, lay, q, kx, vx, cx, d_a, a_cum, n, b, last_len)

    g = gate_coefficients(lay, p.rule.optimizer)
    # chunk-end rows (the last chunk may be short): the 2x2 map [[A, m], [0, E]] that carries
    # (W_s, S_s) to the chunk end, and the coefficients of the outer products that follow
    a_end, m_end, e_end = lay.ends(g.a_cum), lay.ends(g.m_coef), lay.ends(g.e_cum)
    mix = torch.stack([torch.stack([a_end, m_end], -1), torch.stack([torch.zeros_like(e_end), e_end], -1)], -2)
    out_coef = torch.stack([lay.ends(g.c_coef), lay.ends(g.s_coef)], -2)  # [B, H, nc, 2, n_ext]
    read_coef = torch.stack([g.a_cum, g.m_coef], -1)  # [B, H, nc, b, 2]
    # a token whose inputs were replaced by zeros: the rows from it on read NaN (through their
    # coefficients of the chunk-start state), and so does the state after its chunk
    assert lay.bad is not None  # (sanitize=True)
    read_coef = poison_rows(lay.rows_after_bad(lay.bad), read_coef)
    mix = poison_rows(lay.bad.any(-1), mix)
    c_coef = g.c_coef
    # the chunks run on [B * H, ...] and W, S as separate matrices: a product of two 3-dim tensors is one
    # bmm, one autograd node (memory.mm), where 4-dim ones, and views of a stacked state, add expands,
    # reshapes and selections to the graph, which cost a small chunk more than its arithmetic
    bh = lambda x: x.flatten(0, 1)  # noqa: E731
    per_chunk = lambda x: bh(x).unbind(1)  # noqa: E731
    kx, vx, q = (per_chunk(x) for x in (lay.kx, lay.vx, lay.q))
    cx = (None,) * n_chunks if lay.cx is None else per_chunk(lay.cx)
    c_coefs = per_chunk(c_coef)
    # [B*H, b, 1]: the rows' coefficients of W_s and S_s; [B*H, n_ext, 1]: the chunk-end state's of the
    # outer products (of W, of S); [B*H, 1, 1]: the 2x2 map's entries
    read_w, read_s = (per_chunk(read_coef[..., i, None]) for i in range(2))
    out_w, out_s = (per_chunk(out_coef[..., i, :, None]) for i in range(2))
    mix_ww, mix_ws, mix_sw, mix_ss = (per_chunk(mix[..., i, k, None, None]) for i in range(2) for k in range(2))
    ret = per_chunk(lay.retention.unsqueeze(-1))  # [B*H, b, 1] per chunk: 1 - decay (decay_first, b = 1)
    # a memory whose gradient factors are products of two projections of the key (gated_mlp) or
    # hold its square (layer norm) can overflow on a finite key: guard those chunk by chunk
    guard = p.spec.architecture == "gated_mlp" or p.spec.layer_norm
    # the stale-step bound's part of the matrices that read the keys, every chunk at once (it does not
    # depend on the memory); a guarded memory may replace a chunk's keys, and computes it chunk by chunk
    key_f2 = per_chunk(step_norms([lay.kx], c_coef)) if bound is not None and not guard else None
    outs = []

    w, s = {m: bh(t) for m, t in p.w0.items()}, {m: bh(t) for m, t in p.s0.items()}
    w_chunk, s_chunk = w, s
    for j in range(n_chunks):
        if j == n_chunks - 1 and last_len < b:
            w_chunk, s_chunk = w, s
        w_s = {m: ret[j] * t for m, t in w.items()} if p.rule.decay_first else w  # decay_first: at the forgotten W
        grads = token_gradients(p.spec, w_s, kx[j], vx[j], p.rule.loss, cx[j])
        c_j, rw, rs, ow, os_ = c_coefs[j], read_w[j], read_s[j], out_w[j], out_s[j]
        mww, mws, msw, mss = mix_ww[j], mix_ws[j], mix_sw[j], mix_ss[j]
        if guard:
            # (on the CPU a host check skips the selections, identities there, in a chunk with no overflow)
            grads, rows = _guard(grads, lay, skip_clean=p.q.device.type == "cpu")
            if rows is not None:
                rw, rs = poison_rows(rows, rw), poison_rows(rows, rs)
                end_bad = rows[..., -1]
                mww, mws, msw, mss = (poison_rows(end_bad, x) for x in (mww, mws, msw, mss))
        if bound is not None:  # row t sees the chunk's learning rates times s_t, and so does the state after it
            scale = _chunk_scale(bound, c_j, grads, kx[j], None if key_f2 is None else key_f2[j])  # [B*H, b]
            if scale is not None:  # (None: no row's bound is active, the papers' rule as it is)
                c_j = scale.unsqueeze(-1) * c_j
                end = scale[..., (last_len if j == n_chunks - 1 else b) - 1, None, None]
                ow, os_ = end * ow, end * os_

        def dual_apply(name: str, x: Tensor, grads=grads, w=w, s=s, rw=rw, rs=rs, c_j=c_j) -> Tensor:
            d, a = grads[name]
            wt, st = w[name].transpose(-1, -2), s[name].transpose(-1, -2)
            # the coefficients scale the narrower of the inputs and the outputs (what autograd keeps)
            if wt.shape[-2] < wt.shape[-1]:
                start = mm(rw * x, wt) + mm(rs * x, st)
            else:
                start = rw * mm(x, wt) + rs * mm(x, st)
            return start - mm(c_j * mm(x, a.transpose(-1, -2)), d)

        outs.append(memory_forward(p.spec, dual_apply, q[j]))
        w, s = (
            {m: mww * w[m] + mws * s[m] - _outer(ow, *grads[m]) for m in w},
            {m: msw * w[m] + mss * s[m] - _outer(os_, *grads[m]) for m in w},
        )
    if last_len == b:
        w_chunk, s_chunk = w, s
    bsz, nh = p.q.shape[:2]
    heads = lambda st: {m: t.unflatten(0, (bsz, nh)) for m, t in st.items()}  # noqa: E731
    out = torch.cat(outs, 1)[:, :n].unflatten(0, (bsz, nh))
    return Result(out, heads(w), heads(s), heads(w_chunk), heads(s_chunk))


def _outer(coef: Tensor, d: Tensor, a: Tensor) -> Tensor:
    """``sum_i coef_i delta_i a_i^T`` ``[B*H, rows, cols]`` from ``coef [B*H, n, 1]``, ``d [B*H, n, rows]``,
    ``a [B*H, n, cols]``; the coefficients scale the narrower factor."""
    if a.shape[-1] <= d.shape[-1]:
        return mm(d.transpose(-1, -2), coef * a)
    return mm((coef * d).transpose(-1, -2), a)


def _chunk_scale(bound: float, coef: Tensor, grads: dict, keys: Tensor, key_f2: Tensor | None) -> Tensor | None:
    """The bound's factor of one chunk from its gradients' inputs, with ``key_f2`` (or None) the part
    of the matrices whose inputs are ``keys`` computed beforehand; None where no row's bound is
    active (:func:`.step_bound.active_bound_scale`)."""
    inputs = [a for _, a in grads.values()]
    if key_f2 is not None and any(a is keys for a in inputs):
        return active_bound_scale(bound, [a for a in inputs if a is not keys], coef, key_f2)
    return active_bound_scale(bound, inputs, coef)


def _guard(grads, lay, skip_clean: bool = False):
    """The chunk's gradient factors with those of every token holding a non-finite one (an
    overflow) replaced by zeros, and the rows at or after such a token ``[B, H, b]``. With
    ``skip_clean`` (a host check: for the CPU) a chunk without such a token returns its factors as
    they are and ``None`` for the rows (the selections would be identities)."""
    total = sum(d.sum(-1) + a.sum(-1) for d, a in grads.values())  # one reading pass per factor
    bad = nonfinite(total)
    if skip_clean and not torch.compiler.is_compiling() and not bool(bad.any()):
        return grads, None
    return {m: (zero_rows(bad, d), zero_rows(bad, a)) for m, (d, a) in grads.items()}, lay.rows_after_bad(bad)


def _muon_token(p: Problem, lay, q, kx, vx, cx, d_a, a_cum, n: int, b: int, last_len: int) -> Result:
    """Muon at token granularity (ATLAS eq. 32-33, parallelised as in its §5.1, eq. 39-41): with
    chunk-local indices, ``K = D_E Gamma`` and ``C = D_A diag(lr)``,

        S_t = E_t S_s + sum_i K(t, i) delta_i a_i^T,     W_t = A_t W_s - sum_{r<=t} C(t, r) NS(S_r)

    with every gradient taken at the chunk start. Chunk by chunk (:func:`_muon_chunk`) the ``b``
    momenta are one product of the outer products, their ``b`` Newton-Schulz iterations one
    batched run (:func:`newton_schulz_batched`), the lr is applied after it through ``C``, and the
    queries read ``W_t`` through the orthogonalised matrices without materialising it.

    Memory stays linear in ``T``: under autograd every chunk but the last is recomputed in the
    backward (:func:`_recomputed`), so what is kept across chunks is only the chunk-start states,
    the chunk's inputs and its gate coefficients; a chunk's ``b`` momenta, their orthogonalised
    copies and the Newton-Schulz intermediates exist one chunk at a time. A carried state with
    pending tokens (``p.resume``) starts the first chunk from the state after them: only its new
    rows are orthogonalised. Returns a :class:`Result` (outputs ``[B, H, N, dv]`` and the states)."""
    n_chunks = len(q)
    # the gate coefficients of every chunk at once (they do not depend on the memory)
    d_e = segprod(lay.momentum)  # [B, H, nc, b, b]
    whole = (d_e @ lay.gamma, d_a * lay.lr.unsqueeze(-2), torch.cumprod(lay.momentum, dim=-1), a_cum, lay.bad)
    coefs = [list(chunk) for chunk in zip(*(c.unbind(2) for c in whole))]
    w, s = dict(p.w0), dict(p.s0)
    w_chunk, s_chunk = w, s
    first, start = 0, (w, s)
    if p.resume is not None:
        # rows t >= first continue from (W, S) after row first - 1: S_t = D_E[t, first-1] S + ...,
        # W_t = D_A[t, first-1] W - ...; the momenta sum only the steps of rows >= first
        first, start = p.replayed, p.resume
        cut = slice(first, None)
        coefs[0][:4] = [
            d_e[:, :, 0, cut, cut] @ lay.gamma[:, :, 0, cut],
            coefs[0][1][..., cut, cut],
            d_e[:, :, 0, cut, first - 1],
            d_a[:, :, 0, cut, first - 1],
        ]
    names = tuple(w)
    outs = []
    for j in range(n_chunks):
        e = (b if j < n_chunks - 1 else last_len) - 1
        if e < b - 1:
            w_chunk, s_chunk = w, s
        static = (p, lay, names, first, e - first)
        tensors = (q[j][:, :, first:], kx[j], vx[j], cx[j], *coefs[j], *(d[m] for d in (w, *start) for m in names))
        if torch.is_grad_enabled() and j < n_chunks - 1:
            o, *ends = _recomputed(_muon_chunk, static, tensors)
        else:
            o, *ends = _muon_chunk(*static, *tensors)
        outs.append(F.pad(o, (0, 0, first, 0)))  # (the rows of a carried state's pending tokens are dropped)
        w, s = dict(zip(names, ends[: len(names)])), dict(zip(names, ends[len(names) :]))
        start, first = (w, s), 0
    if last_len == b:
        w_chunk, s_chunk = w, s
    return Result(torch.cat(outs, 2)[:, :, :n], w, s, w_chunk, s_chunk)


def _recomputed(fn, static: tuple, tensors: tuple) -> tuple:
    """``fn(*static, *tensors)`` (a tuple of tensors) with only ``tensors`` kept for the backward,
    which runs ``fn`` again: activation checkpointing of one chunk.

    Eagerly it is one :class:`_Recompute` node; :func:`torch.utils.checkpoint.checkpoint`
    (non-reentrant) records the chunk's whole graph, hundreds of small long-lived allocations a
    chunk that glibc's heap places in the chunk's freed temporaries: the process's peak memory then
    grew by about 4.4 MB per position at the mixer benchmark's width, against 1.3 MB with the one
    node (docs/ops.md). Under ``torch.compile`` (which cannot trace the node's backward) the chunk
    goes through ``checkpoint``."""
    if torch.compiler.is_compiling():
        return checkpoint(fn, *static, *tensors, use_reentrant=False, preserve_rng_state=False)
    return _Recompute.apply(fn, static, *tensors)


class _Recompute(torch.autograd.Function):
    """See :func:`_recomputed`. Differentiable once (no gradients of gradients)."""

    @staticmethod
    def forward(ctx, fn, static, *tensors):
        ctx.fn, ctx.static = fn, static
        ctx.save_for_backward(*tensors)
        return fn(*static, *tensors)

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads):
        inputs = [
            None if t is None else t.detach().requires_grad_(need)
            for t, need in zip(ctx.saved_tensors, ctx.needs_input_grad[2:])
        ]
        with torch.enable_grad():
            outs = ctx.fn(*ctx.static, *inputs)
        live = [(o, g) for o, g in zip(outs, grads) if g is not None and o.requires_grad]
        want = [x for x in inputs if x is not None and x.requires_grad]
        found = (
            torch.autograd.grad([o for o, _ in live], want, [g for _, g in live], allow_unused=True)
            if live and want
            else ()
        )
        found = iter(found)
        return (None, None, *(next(found, None) if x is not None and x.requires_grad else None for x in inputs))


def _muon_chunk(
    p: Problem, lay, names, first: int, e: int, q, kx, vx, cx, s_coef, w_coef, e_coef, a_coef, bad, *states
):
    """One chunk of :func:`_muon_token`, rows ``first..b-1`` (``first`` > 0 only when resuming):
    ``states`` are the matrices ``names`` (each ``[B, H, rows, cols]``) of the weights the
    gradients are taken at (the chunk start), then of the weights and the momentum before row
    ``first``; ``q [B, H, b - first, dk]``, ``kx, vx [B, H, n_ext, d]``, ``cx`` (as ``vx``; None
    without channel-wise loss weights); ``s_coef`` (``K``) ``[B, H, b - first, n_ext]``,
    ``w_coef`` (``C``) ``[B, H, b - first, b - first]``, ``e_coef``, ``a_coef`` (``E``, ``A`` from
    the start state) ``[B, H, b - first]``, ``bad [B, H, n_ext]`` -> the outputs
    ``[B, H, b - first, dv]``, then the weights and the momentum after row ``first + e``, matrix by
    matrix in the order of ``names``.

    A query reads ``W_t x = A_t W x - sum_r C(t, r) NS(S_r) x``: one product of the chunk's inputs
    with all its orthogonalised matrices (``b x b x rows x cols``, what materialising the ``W_t``
    would cost, without writing them). Both products over the chunk's tokens have zero
    coefficients above the diagonal, so the factors ``delta_i, a_i`` of a token with a non-finite
    one and the products ``NS(S_r) x_t`` of a row ``r`` that is not finite are zeroed before them
    (by selection, on the small ``[b, b, rows]`` products rather than the orthogonalised
    matrices), and the rows from such a token on read NaN. The chunk-end state is NaN then."""
    w_grad, w, s = (dict(zip(names, states[i * len(names) : (i + 1) * len(names)])) for i in range(3))
    at = {m: a_coef[..., None] * t for m, t in w_grad.items()} if p.rule.decay_first else w_grad  # chunk size 1
    grads, rows = _guard(token_gradients(p.spec, at, kx, vx, p.rule.loss, cx), lay)

    def after(marks: Tensor) -> Tensor:  # marked tokens of the span [.., n_ext] -> rows at or after them
        return lay.rows_after_bad(marks)[..., first:]

    rows = rows[..., first:]
    e_col = e_coef[..., None, None]
    s_all = {
        m: torch.addcmul(_outer_sums(s_coef, *grads[m]), e_col, s[m].unsqueeze(2)) for m in w
    }  # [B, H, b - first, rows, cols]
    ortho = {m: newton_schulz_batched(t, p.rule.ns_steps) for m, t in s_all.items()}
    lead = lay.n_ext - lay.b + first  # the span's tokens before row first
    for o in ortho.values():  # S_r of huge but finite factors may overflow
        rows = rows | after(F.pad(nonfinite(o, 2), (lead, 0)))
    rows = rows | after(bad)
    a_col = a_coef.unsqueeze(-1)

    def apply(name: str, x: Tensor) -> Tensor:
        o = ortho[name]  # [B, H, r, rows, cols]
        seen = (x @ o.flatten(2, 3).transpose(-1, -2)).unflatten(
            -1, (o.shape[2], -1)
        )  # [B, H, t, r, rows]: NS(S_r) x_t
        seen = torch.where(rows[..., None, :, None], 0.0, seen)  # NS(S_r) of a marked row r: zeros (selected)
        return a_col * (x @ w[name].transpose(-1, -2)) - (w_coef.unsqueeze(-2) @ seen).squeeze(-2)

    out = poison_rows(rows, memory_forward(p.spec, apply, q))
    end_bad = rows[..., e]  # a marked token up to the state's row leaves a NaN state
    w_end = {
        m: poison_rows(
            end_bad, a_coef[..., e, None, None] * w[m] - torch.einsum("bhr,bhrpc->bhpc", w_coef[..., e, :], ortho[m])
        )
        for m in w
    }
    s_end = [poison_rows(end_bad, s_all[m][:, :, e]) for m in names]
    return (out, *(w_end[m] for m in names), *s_end)


def newton_schulz_batched(g: Tensor, steps: int) -> Tensor:
    """:func:`~.memory.newton_schulz` of each matrix of ``g [..., rows, cols]`` (the same
    polynomial, equal up to rounding; float dtypes), in one batched run of ``steps`` iterations.

    With ``r x m`` the matrix oriented wide (``r = min(rows, cols)``), Muon's step
    ``X <- a X + (b A + c A^2) X``, ``A = X X^T``, costs ``2 r^2 m + r^3`` multiply-adds. Every
    iterate is ``X_k = P_k X_0`` with ``P_k`` a polynomial of ``A_0 = X_0 X_0^T``, so for wide
    matrices (``m >= 1.5 r``) the iteration runs on ``r x r`` matrices instead:
    ``Q_k = a I + b A_k + c A_k^2``, ``P_{k+1} = Q_k P_k``, ``A_{k+1} = Q_k A_k Q_k`` (four
    ``r^3`` products a step), and ``X`` is touched only for ``A_0`` and ``P X_0``. Nearly square
    matrices iterate on ``X`` with fused products (``baddbmm``)."""
    a, b, c = NS_COEFFICIENTS
    rows, cols = g.shape[-2:]
    tall = rows > cols
    x = (g / (torch.linalg.matrix_norm(g, keepdim=True) + 1e-7)).reshape(-1, rows, cols)
    r, m = min(rows, cols), max(rows, cols)
    if 2 * m < 3 * r:
        x = x.transpose(-1, -2) if tall else x
        for _ in range(steps):
            gram = x @ x.transpose(-1, -2)
            x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
        x = x.transpose(-1, -2) if tall else x
    elif steps:
        # a tall X is used as it lies: its Gram matrix is X^T X and the result X P^T (no copies of X)
        gram = x.transpose(-1, -2) @ x if tall else x @ x.transpose(-1, -2)
        eye = a * torch.eye(r, dtype=x.dtype, device=x.device)
        poly = None
        for k in range(steps):
            step = torch.baddbmm(gram, gram, gram, beta=b, alpha=c) + eye
            poly = step if poly is None else step @ poly
            if k < steps - 1:
                gram = step @ gram @ step
        assert poly is not None  # (steps >= 1)
        x = x @ poly.transpose(-1, -2) if tall else poly @ x
    return x.reshape(g.shape)


def _chunk_granularity(p: Problem, lay, q, kx, vx, cx, n: int, b: int, last_len: int) -> Result:
    """One update per chunk with its gates averaged; the chunk's tokens read the previous chunk's memory.
    A short last chunk is not applied: it stays pending in the state until the chunk completes."""
    n_chunks = len(q)
    lr, mom, ret, gamma = lay.lr, lay.momentum, lay.retention, lay.gamma
    coef = gamma.sum(-2) if p.rule.optimizer == "muon" else (lr.unsqueeze(-1) * gamma).sum(-2)  # [B, H, nc, n_ext]
    bound = p.rule.step_bound
    # the bound's part of the matrices that read the keys, every chunk at once
    key_f2 = (None,) * n_chunks if bound is None else step_norms([lay.kx], coef.unsqueeze(-2)).unbind(2)
    coef, keep_s, keep_w, mean_lr = (x.unbind(2) for x in (coef, mom.mean(-1), ret.mean(-1), lr.mean(-1)))
    w, s = dict(p.w0), dict(p.s0)
    outs = []
    for j in range(n_chunks):
        outs.append(memory_forward(p.spec, dense_apply(w), q[j]))
        if j == n_chunks - 1 and last_len < b:
            break
        grads = token_gradients(p.spec, w, kx[j], vx[j], p.rule.loss, cx[j])
        coef_j = coef[j].unsqueeze(-2)
        scale = None if bound is None else _chunk_scale(bound, coef_j, grads, kx[j], key_f2[j])
        if scale is not None:  # the chunk's one step, scaled as a whole
            coef_j = scale.unsqueeze(-1) * coef_j
        step = {m: _outer_sums(coef_j, *grads[m])[:, :, 0] for m in w}
        ks, kw = keep_s[j][..., None, None], keep_w[j][..., None, None]
        if p.rule.optimizer == "muon":
            s = {m: ks * s[m] + step[m] for m in w}
            w = {m: kw * w[m] - mean_lr[j][..., None, None] * newton_schulz(s[m], p.rule.ns_steps) for m in w}
        else:
            s = {m: -step[m] for m in w} if p.rule.optimizer == "gd" else {m: ks * s[m] - step[m] for m in w}
            w = {m: kw * w[m] + s[m] for m in w}
    # the chunk-start state equals the current one: chunk granularity only moves at chunk ends
    return Result(torch.cat(outs, 2)[:, :, :n], w, s, w, s)
