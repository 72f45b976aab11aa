r"""Triton kernels for the chunked memory op (``impl="triton"``): the same computation as ``chunk``.

Supported: token granularity, ``gd`` / ``momentum``, decay, any Omega window ``c`` with window
gates, losses ``l2`` and ``dot``, for the ``linear`` memory and the ``mlp`` memory of depth 2 with
GELU and a residual. Everything else raises ``ValueError``.

Split of the work. The gate coefficients of a chunk (``b`` local tokens, ``ne = c - 1 + b``
keys reaching ``c - 1`` tokens back) do not depend on the memory; they are built for all chunks
at once in PyTorch, which also differentiates them back to ``lr``, ``momentum``, ``decay`` and
``gamma``::

    C    [b, ne]  W_t = A_t W_s + m_t S_s - sum_i C(t, i) delta_i a_i^T    (rows t = 1..b)
    a, m [b]      A_t, m_t
    ce, pe [ne]   row e of C and of P (S_t = E_t S_s - sum_i P(t, i) delta_i a_i^T), e = chunk end
    ae, me, ee    A_e, m_e, E_e

(``gd`` is ``momentum = 0``: ``D_E = I`` and ``E = 0``.) The kernels do what depends on the
memory: one program per (batch, head) walks the chunks in order, takes the keys' gradient
factors ``(delta, a)`` at the chunk-start weights, reads the queries in the dual form
``A_t W x + m_t S x - (C * X A^T) Delta`` layer by layer, and steps the state to the chunk end.
Chunk-start states are stored (``T / b`` states, as the PyTorch path keeps); the backward kernel
walks the chunks in reverse from them, recomputing the gradient factors. All products accumulate
in float32 (float64 inputs stay float64).

A ragged last chunk is a second launch started from the first one's final state, so that the
state at its start (``chunk_weights`` of the op's final state) is an ordinary differentiable output.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor

import triton
import triton.language as tl

from .chunk import _segprod
from .problem import Problem, Result

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_INV_SQRT2 = 0.7071067811865476
_INV_SQRT2PI = 0.3989422804014327


def _empty(*shape, like: Tensor) -> Tensor:
    """Every kernel output is allocated here (tests fill it with NaN to catch unwritten entries)."""
    return torch.empty(*shape, dtype=like.dtype, device=like.device)


def _block(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def _check(p: Problem) -> None:
    spec = p.spec
    supported = spec.kind == "linear" or (
        spec.kind == "mlp" and spec.depth == 2 and spec.activation == "gelu" and spec.residual
    )
    if not supported or p.granularity != "token" or p.optimizer not in ("gd", "momentum"):
        raise ValueError(
            "impl='triton' supports memory='linear' or memory='mlp' with depth=2, activation='gelu', "
            "residual=True, optimizer 'gd' or 'momentum' and granularity='token'; got "
            f"memory={spec.kind!r}, depth={spec.depth}, activation={spec.activation!r}, residual={spec.residual}, "
            f"optimizer={p.optimizer!r}, granularity={p.granularity!r}"
        )
    if p.q.device.type != "cuda" and not _INTERPRET:
        raise ValueError(
            f"impl='triton' needs CUDA tensors (got {p.q.device}), or TRITON_INTERPRET=1 set before "
            "deepmemory.ops.triton_chunk is first imported"
        )


# ----------------------------------------------------------------------------------------------
# linear memory: M(x) = W x, W [dv, dk]


@triton.jit
def _linear_fwd_kernel(
    Q, K, V, C, CE, PE, AR, MR, AE, ME, EE, W0, S0,  # inputs
    O, WS, SS, WF, SF,  # outputs
    NC, B: tl.constexpr, NE: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
    BB: tl.constexpr, BE: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, L2: tl.constexpr,
):
    bh = tl.program_id(0)
    rb, re, rk, rv = tl.arange(0, BB), tl.arange(0, BE), tl.arange(0, BK), tl.arange(0, BV)
    mb, me, mk, mv = rb < B, re < NE, rk < DK, rv < DV
    w_off = rv[:, None] * DK + rk[None, :]
    w_mask = mv[:, None] & mk[None, :]
    w = tl.load(W0 + bh * DV * DK + w_off, mask=w_mask, other=0.0)
    s = tl.load(S0 + bh * DV * DK + w_off, mask=w_mask, other=0.0)
    for j in range(NC):
        cj = bh * NC + j
        tl.store(WS + cj * DV * DK + w_off, w, mask=w_mask)
        tl.store(SS + cj * DV * DK + w_off, s, mask=w_mask)
        q = tl.load(Q + cj * B * DK + rb[:, None] * DK + rk[None, :], mask=mb[:, None] & mk[None, :], other=0.0)
        kx = tl.load(K + cj * NE * DK + re[:, None] * DK + rk[None, :], mask=me[:, None] & mk[None, :], other=0.0)
        vx = tl.load(V + cj * NE * DV + re[:, None] * DV + rv[None, :], mask=me[:, None] & mv[None, :], other=0.0)
        c = tl.load(C + cj * B * NE + rb[:, None] * NE + re[None, :], mask=mb[:, None] & me[None, :], other=0.0)
        ce = tl.load(CE + cj * NE + re, mask=me, other=0.0)
        pe = tl.load(PE + cj * NE + re, mask=me, other=0.0)
        ar = tl.load(AR + cj * B + rb, mask=mb, other=0.0)
        mr = tl.load(MR + cj * B + rb, mask=mb, other=0.0)
        ae, m_e, ee = tl.load(AE + cj), tl.load(ME + cj), tl.load(EE + cj)

        if L2:
            delta = tl.dot(kx, tl.trans(w), input_precision="ieee") - vx
        else:
            delta = -vx
        g = tl.dot(q, tl.trans(kx), input_precision="ieee")
        o = (
            ar[:, None] * tl.dot(q, tl.trans(w), input_precision="ieee")
            + mr[:, None] * tl.dot(q, tl.trans(s), input_precision="ieee")
            - tl.dot(c * g, delta, input_precision="ieee")
        )
        tl.store(O + cj * B * DV + rb[:, None] * DV + rv[None, :], o, mask=mb[:, None] & mv[None, :])
        w_new = ae * w + m_e * s - tl.dot(tl.trans(delta * ce[:, None]), kx, input_precision="ieee")
        s = ee * s - tl.dot(tl.trans(delta * pe[:, None]), kx, input_precision="ieee")
        w = w_new
    tl.store(WF + bh * DV * DK + w_off, w, mask=w_mask)
    tl.store(SF + bh * DV * DK + w_off, s, mask=w_mask)


@triton.jit
def _linear_bwd_kernel(
    Q, K, V, C, CE, PE, AR, MR, AE, ME, EE, WS, SS, DO, DWF, DSF,  # inputs
    DQ, DK_, DV_, DC, DCE, DPE, DAR, DMR, DAE, DME, DEE, DW0, DS0,  # outputs
    NC, B: tl.constexpr, NE: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
    BB: tl.constexpr, BE: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, L2: tl.constexpr,
):
    bh = tl.program_id(0)
    rb, re, rk, rv = tl.arange(0, BB), tl.arange(0, BE), tl.arange(0, BK), tl.arange(0, BV)
    mb, me, mk, mv = rb < B, re < NE, rk < DK, rv < DV
    w_off = rv[:, None] * DK + rk[None, :]
    w_mask = mv[:, None] & mk[None, :]
    bk_off, bk_mask = rb[:, None] * DK + rk[None, :], mb[:, None] & mk[None, :]
    ek_off, ek_mask = re[:, None] * DK + rk[None, :], me[:, None] & mk[None, :]
    ev_off, ev_mask = re[:, None] * DV + rv[None, :], me[:, None] & mv[None, :]
    be_off, be_mask = rb[:, None] * NE + re[None, :], mb[:, None] & me[None, :]
    dw = tl.load(DWF + bh * DV * DK + w_off, mask=w_mask, other=0.0)
    ds = tl.load(DSF + bh * DV * DK + w_off, mask=w_mask, other=0.0)
    for jj in range(NC):
        cj = bh * NC + NC - 1 - jj
        w = tl.load(WS + cj * DV * DK + w_off, mask=w_mask, other=0.0)
        s = tl.load(SS + cj * DV * DK + w_off, mask=w_mask, other=0.0)
        q = tl.load(Q + cj * B * DK + bk_off, mask=bk_mask, other=0.0)
        kx = tl.load(K + cj * NE * DK + ek_off, mask=ek_mask, other=0.0)
        vx = tl.load(V + cj * NE * DV + ev_off, mask=ev_mask, other=0.0)
        c = tl.load(C + cj * B * NE + be_off, mask=be_mask, other=0.0)
        do = tl.load(DO + cj * B * DV + rb[:, None] * DV + rv[None, :], mask=mb[:, None] & mv[None, :], other=0.0)
        ce = tl.load(CE + cj * NE + re, mask=me, other=0.0)
        pe = tl.load(PE + cj * NE + re, mask=me, other=0.0)
        ar = tl.load(AR + cj * B + rb, mask=mb, other=0.0)
        mr = tl.load(MR + cj * B + rb, mask=mb, other=0.0)
        ae, m_e, ee = tl.load(AE + cj), tl.load(ME + cj), tl.load(EE + cj)

        if L2:
            delta = tl.dot(kx, tl.trans(w), input_precision="ieee") - vx
        else:
            delta = -vx
        g = tl.dot(q, tl.trans(kx), input_precision="ieee")
        qw = tl.dot(q, tl.trans(w), input_precision="ieee")
        qs = tl.dot(q, tl.trans(s), input_precision="ieee")
        kdw = tl.dot(kx, tl.trans(dw), input_precision="ieee")  # [ne, dv]: dW_end k_i
        kds = tl.dot(kx, tl.trans(ds), input_precision="ieee")
        dpm = -tl.dot(do, tl.trans(delta), input_precision="ieee")  # d(C * G)
        dg = dpm * c
        d_delta = -tl.dot(tl.trans(c * g), do, input_precision="ieee") - ce[:, None] * kdw - pe[:, None] * kds

        tl.store(DC + cj * B * NE + be_off, dpm * g, mask=be_mask)
        tl.store(DCE + cj * NE + re, -tl.sum(delta * kdw, 1), mask=me)
        tl.store(DPE + cj * NE + re, -tl.sum(delta * kds, 1), mask=me)
        tl.store(DAR + cj * B + rb, tl.sum(do * qw, 1), mask=mb)
        tl.store(DMR + cj * B + rb, tl.sum(do * qs, 1), mask=mb)
        tl.store(DAE + cj, tl.sum(tl.sum(dw * w, 1), 0))
        tl.store(DME + cj, tl.sum(tl.sum(dw * s, 1), 0))
        tl.store(DEE + cj, tl.sum(tl.sum(ds * s, 1), 0))
        dq = (
            ar[:, None] * tl.dot(do, w, input_precision="ieee")
            + mr[:, None] * tl.dot(do, s, input_precision="ieee")
            + tl.dot(dg, kx, input_precision="ieee")
        )
        tl.store(DQ + cj * B * DK + bk_off, dq, mask=bk_mask)
        dk = (
            tl.dot(tl.trans(dg), q, input_precision="ieee")
            - ce[:, None] * tl.dot(delta, dw, input_precision="ieee")
            - pe[:, None] * tl.dot(delta, ds, input_precision="ieee")
        )
        dw_new = ae * dw + tl.dot(tl.trans(ar[:, None] * do), q, input_precision="ieee")
        if L2:
            dk += tl.dot(d_delta, w, input_precision="ieee")
            dw_new += tl.dot(tl.trans(d_delta), kx, input_precision="ieee")
        tl.store(DK_ + cj * NE * DK + ek_off, dk, mask=ek_mask)
        tl.store(DV_ + cj * NE * DV + ev_off, -d_delta, mask=ev_mask)  # delta = kW^T - v or -v
        ds = m_e * dw + ee * ds + tl.dot(tl.trans(mr[:, None] * do), q, input_precision="ieee")
        dw = dw_new
    tl.store(DW0 + bh * DV * DK + w_off, dw, mask=w_mask)
    tl.store(DS0 + bh * DV * DK + w_off, ds, mask=w_mask)


class _LinearChunks(torch.autograd.Function):
    """Chunks of the linear memory. ``q [BH, nc, b, dk]``, ``kx [BH, nc, ne, dk]``,
    ``vx [BH, nc, ne, dv]``, coefficients as in the module docstring (``[BH, nc, ...]``),
    ``w0, s0 [BH, dv, dk]`` -> ``o [BH, nc, b, dv]``, final ``w``, ``s``."""

    @staticmethod
    def forward(ctx, q, kx, vx, c, ce, pe, ar, mr, ae, me, ee, w0, s0, l2: bool):
        bh, nc, b, dk = q.shape
        ne, dv = kx.shape[2], vx.shape[3]
        o = _empty(bh, nc, b, dv, like=q)
        ws, ss = _empty(bh, nc, dv, dk, like=q), _empty(bh, nc, dv, dk, like=q)
        wf, sf = _empty(bh, dv, dk, like=q), _empty(bh, dv, dk, like=q)
        dims = dict(B=b, NE=ne, DK=dk, DV=dv, BB=_block(b), BE=_block(ne), BK=_block(dk), BV=_block(dv), L2=l2)
        _linear_fwd_kernel[(bh,)](q, kx, vx, c, ce, pe, ar, mr, ae, me, ee, w0, s0, o, ws, ss, wf, sf, nc, **dims)
        ctx.save_for_backward(q, kx, vx, c, ce, pe, ar, mr, ae, me, ee, ws, ss)
        ctx.dims = dims
        return o, wf, sf

    @staticmethod
    def backward(ctx, do, dwf, dsf):
        q, kx, vx, c, ce, pe, ar, mr, ae, me, ee, ws, ss = ctx.saved_tensors
        bh, nc = q.shape[:2]
        do = torch.zeros(*q.shape[:3], vx.shape[3], dtype=q.dtype, device=q.device) if do is None else do.contiguous()
        dwf = torch.zeros_like(ws[:, 0]) if dwf is None else dwf.contiguous()
        dsf = torch.zeros_like(ss[:, 0]) if dsf is None else dsf.contiguous()
        grads = [_empty(*x.shape, like=x) for x in (q, kx, vx, c, ce, pe, ar, mr, ae, me, ee)]
        dw0, ds0 = _empty(*dwf.shape, like=q), _empty(*dsf.shape, like=q)
        _linear_bwd_kernel[(bh,)](q, kx, vx, c, ce, pe, ar, mr, ae, me, ee, ws, ss, do, dwf, dsf,
                                  *grads, dw0, ds0, nc, **ctx.dims)
        return (*grads, dw0, ds0, None)


# ----------------------------------------------------------------------------------------------
# the op


def _coefficients(p: Problem, n_chunks: int, b: int, last_len: int):
    """Gate coefficients per chunk (see the module docstring), all ``[B, H, nc, ...]``."""
    c = p.window
    n, pad = p.q.shape[2], n_chunks * b - p.q.shape[2]
    ne = c - 1 + b
    lr = F.pad(p.lr, (0, pad)).unflatten(2, (n_chunks, b))
    mom = F.pad(p.momentum, (0, pad)).unflatten(2, (n_chunks, b))
    ret = 1.0 - F.pad(p.decay, (0, pad)).unflatten(2, (n_chunks, b))
    gx = F.pad(p.gamma, (c - 1 - p.n_hist, pad)).unfold(2, ne, b)  # [B, H, nc, ne]
    t_idx = torch.arange(b, device=lr.device)[:, None]
    i_idx = torch.arange(ne, device=lr.device)[None, :]
    gamma = ((i_idx >= t_idx) & (i_idx <= t_idx + c - 1)) * gx.unsqueeze(-2)  # [B, H, nc, b, ne]

    d_a = _segprod(ret)
    a_cum, e_cum = torch.cumprod(ret, -1), torch.cumprod(mom, -1)
    p_coef = (_segprod(mom) * lr.unsqueeze(-2)) @ gamma
    c_coef = d_a @ p_coef
    m_cum = (d_a @ e_cum.unsqueeze(-1)).squeeze(-1)
    # the state steps to the chunk's last token: b - 1, or last_len - 1 for a ragged last chunk
    ends = torch.full((n_chunks,), b - 1, device=lr.device)
    ends[-1] = last_len - 1
    rows = torch.arange(n_chunks, device=lr.device)
    end = lambda x: x[:, :, rows, ends]  # noqa: E731
    return c_coef, end(c_coef), end(p_coef), a_cum, m_cum, end(a_cum), end(m_cum), end(e_cum)


def triton_chunk(p: Problem) -> Result:
    _check(p)
    bsz, nh, n, dk = p.q.shape
    dv, b, c = p.dv, p.chunk_size, p.window
    n_chunks = -(-n // b)
    pad = n_chunks * b - n
    last_len = n - (n_chunks - 1) * b
    ne = c - 1 + b
    lead = c - 1 - p.n_hist

    flat = lambda x: x.flatten(0, 1).contiguous()  # noqa: E731  [B, H, ...] -> [BH, ...]
    kx = flat(F.pad(p.k, (0, 0, lead, pad)).unfold(2, ne, b).transpose(-1, -2))  # [BH, nc, ne, dk]
    vx = flat(F.pad(p.v, (0, 0, lead, pad)).unfold(2, ne, b).transpose(-1, -2))
    q = flat(F.pad(p.q, (0, 0, 0, pad)).unflatten(2, (n_chunks, b)))
    coefs = [flat(x) for x in _coefficients(p, n_chunks, b, last_len)]
    w, s = ({m: flat(t) for m, t in d.items()} for d in (p.w0, p.s0))

    l2 = p.loss == "l2"
    n_full = n_chunks if last_len == b else n_chunks - 1
    outs = []
    for lo, hi in ((0, n_full), (n_full, n_chunks)):
        if lo == hi:
            continue
        w_chunk, s_chunk = w, s
        args = [x[:, lo:hi].contiguous() for x in (q, kx, vx, *coefs)]
        if p.spec.kind == "linear":
            o, wf, sf = _LinearChunks.apply(*args, w["w0"], s["w0"], l2)
            w, s = {"w0": wf}, {"w0": sf}
        else:
            o, *state = _MlpChunks.apply(*args, w["w0"], w["w1"], s["w0"], s["w1"], l2)
            w, s = {"w0": state[0], "w1": state[1]}, {"w0": state[2], "w1": state[3]}
        outs.append(o)
    if last_len == b:
        w_chunk, s_chunk = w, s
    o = torch.cat(outs, 1).reshape(bsz, nh, n_chunks * b, dv)[:, :, :n]
    unflat = lambda d: {m: t.unflatten(0, (bsz, nh)) for m, t in d.items()}  # noqa: E731
    return Result(o, unflat(w), unflat(s), unflat(w_chunk), unflat(s_chunk))
