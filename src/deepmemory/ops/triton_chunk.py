r"""Triton kernels for the chunked memory op (``impl="triton"``): the same computation as ``chunk``.

Supported: token granularity, ``gd`` / ``momentum``, decay, any Omega window ``c`` with window
gates, losses ``l2`` and ``dot``, for the ``linear`` memory and the ``mlp`` memory of depth 2 with
GELU (with or without the residual). Everything else raises ``ValueError``.

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
from torch.autograd.function import once_differentiable

import triton
import triton.language as tl

from .chunk import _segprod
from .problem import Problem, Result

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# No software pipelining of the chunk loop: multi-buffered loads of whole chunk tiles overflow
# shared memory (linear backward at d = b = 64 compiled for sm_90: 274 KiB with 3 stages, 128 KiB with 1).
_LAUNCH = dict(num_warps=4, num_stages=1)


def _empty(*shape, like: Tensor) -> Tensor:
    """Every kernel output is allocated here (tests fill it with NaN to catch unwritten entries)."""
    return torch.empty(*shape, dtype=like.dtype, device=like.device)


def _block(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def _check(p: Problem) -> None:
    spec = p.spec
    supported = spec.kind == "linear" or (
        spec.kind == "mlp" and spec.depth == 2 and spec.activation == "gelu"
    )
    if not supported or p.granularity != "token" or p.optimizer not in ("gd", "momentum"):
        raise ValueError(
            "impl='triton' supports memory='linear' or memory='mlp' with depth=2 and activation='gelu', "
            "optimizer 'gd' or 'momentum' and granularity='token'; got "
            f"memory={spec.kind!r}, depth={spec.depth}, activation={spec.activation!r}, "
            f"optimizer={p.optimizer!r}, granularity={p.granularity!r}"
        )
    if p.q.device.type != "cuda" and not _INTERPRET:
        raise ValueError(
            f"impl='triton' needs CUDA tensors (got {p.q.device}), or TRITON_INTERPRET=1 set before "
            "deepmemory.ops.triton_chunk is first imported"
        )


# ----------------------------------------------------------------------------------------------
# tiles and the activation


@triton.jit
def _mm(a, b):
    return tl.dot(a, b, input_precision="ieee")


@triton.jit
def _tile(ptr, R: tl.constexpr, C: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr):
    r, c = tl.arange(0, BR), tl.arange(0, BC)
    return tl.load(ptr + r[:, None] * C + c[None, :], mask=(r[:, None] < R) & (c[None, :] < C), other=0.0)


@triton.jit
def _put(ptr, x, R: tl.constexpr, C: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr):
    r, c = tl.arange(0, BR), tl.arange(0, BC)
    tl.store(ptr + r[:, None] * C + c[None, :], x, mask=(r[:, None] < R) & (c[None, :] < C))


@triton.jit
def _vec(ptr, N: tl.constexpr, BN: tl.constexpr):
    r = tl.arange(0, BN)
    return tl.load(ptr + r, mask=r < N, other=0.0)


@triton.jit
def _put_vec(ptr, x, N: tl.constexpr, BN: tl.constexpr):
    r = tl.arange(0, BN)
    tl.store(ptr + r, x, mask=r < N)


@triton.jit
def _dot_all(a, b):
    return tl.sum(tl.sum(a * b, 1), 0)


@triton.jit
def _gelu(z):  # exact (erf) GELU
    return 0.5 * z * (1.0 + tl.erf(z * 0.7071067811865476))


@triton.jit
def _gelu_grad(z):  # Phi(z) + z phi(z)
    return 0.5 * (1.0 + tl.erf(z * 0.7071067811865476)) + z * 0.3989422804014327 * tl.exp(-0.5 * z * z)


@triton.jit
def _gelu_grad2(z):  # phi(z) (2 - z^2)
    return 0.3989422804014327 * tl.exp(-0.5 * z * z) * (2.0 - z * z)


# ----------------------------------------------------------------------------------------------
# linear memory: M(x) = W x, W [dv, dk]


@triton.jit
def _linear_fwd_kernel(
    Q, K, V, C, CE, PE, AR, MR, AE, ME, EE, W0, S0,  # inputs
    O, WS, SS, WF, SF,  # outputs
    NC, B: tl.constexpr, NE: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
    BB: tl.constexpr, BE: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, L2: tl.constexpr,
):
    bh = tl.program_id(0).to(tl.int64)
    w = _tile(W0 + bh * DV * DK, DV, DK, BV, BK)
    s = _tile(S0 + bh * DV * DK, DV, DK, BV, BK)
    for j in range(NC):
        cj = bh * NC + j
        _put(WS + cj * DV * DK, w, DV, DK, BV, BK)
        _put(SS + cj * DV * DK, s, DV, DK, BV, BK)
        q = _tile(Q + cj * B * DK, B, DK, BB, BK)
        kx = _tile(K + cj * NE * DK, NE, DK, BE, BK)
        vx = _tile(V + cj * NE * DV, NE, DV, BE, BV)
        c = _tile(C + cj * B * NE, B, NE, BB, BE)
        ce, pe = _vec(CE + cj * NE, NE, BE)[:, None], _vec(PE + cj * NE, NE, BE)[:, None]
        ar, mr = _vec(AR + cj * B, B, BB)[:, None], _vec(MR + cj * B, B, BB)[:, None]
        ae, m_e, ee = tl.load(AE + cj), tl.load(ME + cj), tl.load(EE + cj)

        if L2:
            delta = _mm(kx, tl.trans(w)) - vx
        else:
            delta = -vx
        o = ar * _mm(q, tl.trans(w)) + mr * _mm(q, tl.trans(s)) - _mm(c * _mm(q, tl.trans(kx)), delta)
        _put(O + cj * B * DV, o, B, DV, BB, BV)
        w_new = ae * w + m_e * s - _mm(tl.trans(delta * ce), kx)
        s = ee * s - _mm(tl.trans(delta * pe), kx)
        w = w_new
    _put(WF + bh * DV * DK, w, DV, DK, BV, BK)
    _put(SF + bh * DV * DK, s, DV, DK, BV, BK)


@triton.jit
def _linear_bwd_kernel(
    Q, K, V, C, CE, PE, AR, MR, AE, ME, EE, WS, SS, DO, DWF, DSF,  # inputs
    DQ, DK_, DV_, DC, DCE, DPE, DAR, DMR, DAE, DME, DEE, DW0, DS0,  # outputs
    NC, B: tl.constexpr, NE: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
    BB: tl.constexpr, BE: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, L2: tl.constexpr,
):
    bh = tl.program_id(0).to(tl.int64)
    dw = _tile(DWF + bh * DV * DK, DV, DK, BV, BK)
    ds = _tile(DSF + bh * DV * DK, DV, DK, BV, BK)
    for jj in range(NC):
        cj = bh * NC + NC - 1 - jj
        w = _tile(WS + cj * DV * DK, DV, DK, BV, BK)
        s = _tile(SS + cj * DV * DK, DV, DK, BV, BK)
        q = _tile(Q + cj * B * DK, B, DK, BB, BK)
        kx = _tile(K + cj * NE * DK, NE, DK, BE, BK)
        vx = _tile(V + cj * NE * DV, NE, DV, BE, BV)
        c = _tile(C + cj * B * NE, B, NE, BB, BE)
        do = _tile(DO + cj * B * DV, B, DV, BB, BV)
        ce, pe = _vec(CE + cj * NE, NE, BE)[:, None], _vec(PE + cj * NE, NE, BE)[:, None]
        ar, mr = _vec(AR + cj * B, B, BB)[:, None], _vec(MR + cj * B, B, BB)[:, None]
        ae, m_e, ee = tl.load(AE + cj), tl.load(ME + cj), tl.load(EE + cj)

        if L2:
            delta = _mm(kx, tl.trans(w)) - vx
        else:
            delta = -vx
        g = _mm(q, tl.trans(kx))
        # read: o = ar q W^T + mr q S^T - (C * q kx^T) delta
        dpm = -_mm(do, tl.trans(delta))
        dg = dpm * c
        d_delta = -_mm(tl.trans(c * g), do)
        dq = ar * _mm(do, w) + mr * _mm(do, s) + _mm(dg, kx)
        dk = _mm(tl.trans(dg), q)
        # step to the chunk end: W' = ae W + me S - sum_i ce_i delta_i kx_i^T, S' = ee S - sum_i pe_i ...
        kdw, kds = _mm(kx, tl.trans(dw)), _mm(kx, tl.trans(ds))
        d_delta += -ce * kdw - pe * kds
        dk += -ce * _mm(delta, dw) - pe * _mm(delta, ds)
        _put(DC + cj * B * NE, dpm * g, B, NE, BB, BE)
        _put_vec(DCE + cj * NE, -tl.sum(delta * kdw, 1), NE, BE)
        _put_vec(DPE + cj * NE, -tl.sum(delta * kds, 1), NE, BE)
        _put_vec(DAR + cj * B, tl.sum(do * _mm(q, tl.trans(w)), 1), B, BB)
        _put_vec(DMR + cj * B, tl.sum(do * _mm(q, tl.trans(s)), 1), B, BB)
        tl.store(DAE + cj, _dot_all(dw, w))
        tl.store(DME + cj, _dot_all(dw, s))
        tl.store(DEE + cj, _dot_all(ds, s))
        dw_new = ae * dw + _mm(tl.trans(ar * do), q)
        ds = m_e * dw + ee * ds + _mm(tl.trans(mr * do), q)
        # back through delta = kx W^T - v (l2) or -v (dot)
        if L2:
            dk += _mm(d_delta, w)
            dw_new += _mm(tl.trans(d_delta), kx)
        dw = dw_new
        _put(DQ + cj * B * DK, dq, B, DK, BB, BK)
        _put(DK_ + cj * NE * DK, dk, NE, DK, BE, BK)
        _put(DV_ + cj * NE * DV, -d_delta, NE, DV, BE, BV)
    _put(DW0 + bh * DV * DK, dw, DV, DK, BV, BK)
    _put(DS0 + bh * DV * DK, ds, DV, DK, BV, BK)


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
        _linear_fwd_kernel[(bh,)](q, kx, vx, c, ce, pe, ar, mr, ae, me, ee, w0, s0, o, ws, ss, wf, sf, nc,
                                  **dims, **_LAUNCH)
        ctx.save_for_backward(q, kx, vx, c, ce, pe, ar, mr, ae, me, ee, ws, ss)
        ctx.dims = dims
        return o, wf, sf

    @staticmethod
    @once_differentiable  # first order only: the kernels' backward is not itself differentiable
    def backward(ctx, do, dwf, dsf):
        q, kx, vx, c, ce, pe, ar, mr, ae, me, ee, ws, ss = ctx.saved_tensors
        bh, nc = q.shape[:2]
        do = torch.zeros(*q.shape[:3], vx.shape[3], dtype=q.dtype, device=q.device) if do is None else do.contiguous()
        dwf = torch.zeros_like(ws[:, 0]) if dwf is None else dwf.contiguous()
        dsf = torch.zeros_like(ss[:, 0]) if dsf is None else dsf.contiguous()
        grads = [_empty(*x.shape, like=x) for x in (q, kx, vx, c, ce, pe, ar, mr, ae, me, ee)]
        dw0, ds0 = _empty(*dwf.shape, like=q), _empty(*dsf.shape, like=q)
        _linear_bwd_kernel[(bh,)](q, kx, vx, c, ce, pe, ar, mr, ae, me, ee, ws, ss, do, dwf, dsf,
                                  *grads, dw0, ds0, nc, **ctx.dims, **_LAUNCH)
        return (*grads, dw0, ds0, None)

@triton.jit
def _mlp_fwd_kernel(
    Q, K, V, C, CE, PE, AR, MR, AE, ME, EE, U0, U1, S0, S1,  # inputs
    O, US0, US1, SS0, SS1, UF0, UF1, SF0, SF1,  # outputs
    NC, B: tl.constexpr, NE: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, HD: tl.constexpr,
    BB: tl.constexpr, BE: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BH: tl.constexpr,
    L2: tl.constexpr, RES: tl.constexpr,
):
    bh = tl.program_id(0).to(tl.int64)
    u0 = _tile(U0 + bh * HD * DK, HD, DK, BH, BK)
    u1 = _tile(U1 + bh * DV * HD, DV, HD, BV, BH)
    s0 = _tile(S0 + bh * HD * DK, HD, DK, BH, BK)
    s1 = _tile(S1 + bh * DV * HD, DV, HD, BV, BH)
    for j in range(NC):
        cj = bh * NC + j
        _put(US0 + cj * HD * DK, u0, HD, DK, BH, BK)
        _put(US1 + cj * DV * HD, u1, DV, HD, BV, BH)
        _put(SS0 + cj * HD * DK, s0, HD, DK, BH, BK)
        _put(SS1 + cj * DV * HD, s1, DV, HD, BV, BH)
        q = _tile(Q + cj * B * DK, B, DK, BB, BK)
        kx = _tile(K + cj * NE * DK, NE, DK, BE, BK)
        vx = _tile(V + cj * NE * DV, NE, DV, BE, BV)
        c = _tile(C + cj * B * NE, B, NE, BB, BE)
        ce, pe = _vec(CE + cj * NE, NE, BE), _vec(PE + cj * NE, NE, BE)
        ar, mr = _vec(AR + cj * B, B, BB)[:, None], _vec(MR + cj * B, B, BB)[:, None]
        ae, m_e, ee = tl.load(AE + cj), tl.load(ME + cj), tl.load(EE + cj)

        # gradient factors of the keys at the chunk-start weights: (d1, kx) for U0, (d2, h) for U1
        z = _mm(kx, tl.trans(u0))
        h = _gelu(z)
        if L2:
            d2 = _mm(h, tl.trans(u1)) - vx
            if RES:
                d2 += kx
        else:
            d2 = -vx
        d1 = _mm(d2, u1) * _gelu_grad(z)
        # dual-form read, layer by layer
        zq = ar * _mm(q, tl.trans(u0)) + mr * _mm(q, tl.trans(s0)) - _mm(c * _mm(q, tl.trans(kx)), d1)
        hq = _gelu(zq)
        o = ar * _mm(hq, tl.trans(u1)) + mr * _mm(hq, tl.trans(s1)) - _mm(c * _mm(hq, tl.trans(h)), d2)
        if RES:
            o += q
        _put(O + cj * B * DV, o, B, DV, BB, BV)
        u0_new = ae * u0 + m_e * s0 - _mm(tl.trans(d1 * ce[:, None]), kx)
        u1_new = ae * u1 + m_e * s1 - _mm(tl.trans(d2 * ce[:, None]), h)
        s0 = ee * s0 - _mm(tl.trans(d1 * pe[:, None]), kx)
        s1 = ee * s1 - _mm(tl.trans(d2 * pe[:, None]), h)
        u0, u1 = u0_new, u1_new
    _put(UF0 + bh * HD * DK, u0, HD, DK, BH, BK)
    _put(UF1 + bh * DV * HD, u1, DV, HD, BV, BH)
    _put(SF0 + bh * HD * DK, s0, HD, DK, BH, BK)
    _put(SF1 + bh * DV * HD, s1, DV, HD, BV, BH)


@triton.jit
def _mlp_bwd_kernel(
    Q, K, V, C, CE, PE, AR, MR, AE, ME, EE, US0, US1, SS0, SS1, DO, DUF0, DUF1, DSF0, DSF1,  # inputs
    DQ, DK_, DV_, DC, DCE, DPE, DAR, DMR, DAE, DME, DEE, DU0, DU1, DS0, DS1,  # outputs
    NC, B: tl.constexpr, NE: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, HD: tl.constexpr,
    BB: tl.constexpr, BE: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BH: tl.constexpr,
    L2: tl.constexpr, RES: tl.constexpr,
):
    bh = tl.program_id(0).to(tl.int64)
    du0 = _tile(DUF0 + bh * HD * DK, HD, DK, BH, BK)
    du1 = _tile(DUF1 + bh * DV * HD, DV, HD, BV, BH)
    ds0 = _tile(DSF0 + bh * HD * DK, HD, DK, BH, BK)
    ds1 = _tile(DSF1 + bh * DV * HD, DV, HD, BV, BH)
    for jj in range(NC):
        cj = bh * NC + NC - 1 - jj
        u0 = _tile(US0 + cj * HD * DK, HD, DK, BH, BK)
        u1 = _tile(US1 + cj * DV * HD, DV, HD, BV, BH)
        s0 = _tile(SS0 + cj * HD * DK, HD, DK, BH, BK)
        s1 = _tile(SS1 + cj * DV * HD, DV, HD, BV, BH)
        q = _tile(Q + cj * B * DK, B, DK, BB, BK)
        kx = _tile(K + cj * NE * DK, NE, DK, BE, BK)
        vx = _tile(V + cj * NE * DV, NE, DV, BE, BV)
        c = _tile(C + cj * B * NE, B, NE, BB, BE)
        do = _tile(DO + cj * B * DV, B, DV, BB, BV)
        ce, pe = _vec(CE + cj * NE, NE, BE)[:, None], _vec(PE + cj * NE, NE, BE)[:, None]
        ar, mr = _vec(AR + cj * B, B, BB)[:, None], _vec(MR + cj * B, B, BB)[:, None]
        ae, m_e, ee = tl.load(AE + cj), tl.load(ME + cj), tl.load(EE + cj)

        # recompute the forward of this chunk
        z = _mm(kx, tl.trans(u0))
        h = _gelu(z)
        gp = _gelu_grad(z)
        if L2:
            d2 = _mm(h, tl.trans(u1)) - vx
            if RES:
                d2 += kx
        else:
            d2 = -vx
        t = _mm(d2, u1)
        d1 = t * gp
        g1 = _mm(q, tl.trans(kx))
        qu0, qs0 = _mm(q, tl.trans(u0)), _mm(q, tl.trans(s0))
        zq = ar * qu0 + mr * qs0 - _mm(c * g1, d1)
        hq = _gelu(zq)
        g2 = _mm(hq, tl.trans(h))

        # read of layer 2: o = [q +] ar hq U1^T + mr hq S1^T - (C * hq h^T) d2
        dp2 = -_mm(do, tl.trans(d2))
        dc = dp2 * g2
        dg2 = dp2 * c
        dhq = ar * _mm(do, u1) + mr * _mm(do, s1) + _mm(dg2, h)
        dh = _mm(tl.trans(dg2), hq)
        dd2 = -_mm(tl.trans(c * g2), do)
        dar = tl.sum(do * _mm(hq, tl.trans(u1)), 1)
        dmr = tl.sum(do * _mm(hq, tl.trans(s1)), 1)
        # read of layer 1: zq = ar q U0^T + mr q S0^T - (C * q kx^T) d1
        dzq = dhq * _gelu_grad(zq)
        dp1 = -_mm(dzq, tl.trans(d1))
        dc += dp1 * g1
        dg1 = dp1 * c
        dq = ar * _mm(dzq, u0) + mr * _mm(dzq, s0) + _mm(dg1, kx)
        if RES:
            dq += do
        dkx = _mm(tl.trans(dg1), q)
        dd1 = -_mm(tl.trans(c * g1), dzq)
        dar += tl.sum(dzq * qu0, 1)
        dmr += tl.sum(dzq * qs0, 1)
        # step to the chunk end: U0' = ae U0 + me S0 - sum_i ce_i d1_i kx_i^T, U1' likewise with (d2, h)
        kdu0, kds0 = _mm(kx, tl.trans(du0)), _mm(kx, tl.trans(ds0))
        hdu1, hds1 = _mm(h, tl.trans(du1)), _mm(h, tl.trans(ds1))
        dd1 += -ce * kdu0 - pe * kds0
        dd2 += -ce * hdu1 - pe * hds1
        dkx += -ce * _mm(d1, du0) - pe * _mm(d1, ds0)
        dh += -ce * _mm(d2, du1) - pe * _mm(d2, ds1)
        _put_vec(DCE + cj * NE, -tl.sum(d1 * kdu0, 1) - tl.sum(d2 * hdu1, 1), NE, BE)
        _put_vec(DPE + cj * NE, -tl.sum(d1 * kds0, 1) - tl.sum(d2 * hds1, 1), NE, BE)
        tl.store(DAE + cj, _dot_all(du0, u0) + _dot_all(du1, u1))
        tl.store(DME + cj, _dot_all(du0, s0) + _dot_all(du1, s1))
        tl.store(DEE + cj, _dot_all(ds0, s0) + _dot_all(ds1, s1))
        ndu0 = ae * du0 + _mm(tl.trans(ar * dzq), q)
        ndu1 = ae * du1 + _mm(tl.trans(ar * do), hq)
        ds0 = m_e * du0 + ee * ds0 + _mm(tl.trans(mr * dzq), q)
        ds1 = m_e * du1 + ee * ds1 + _mm(tl.trans(mr * do), hq)
        # back through the keys' gradient factors: d1 = (d2 U1) * gelu'(z), d2 = h U1^T [+ kx] - v (l2)
        dt = dd1 * gp
        dz = dd1 * t * _gelu_grad2(z)
        dd2 += _mm(dt, tl.trans(u1))
        ndu1 += _mm(tl.trans(d2), dt)
        if L2:
            dh += _mm(dd2, u1)
            ndu1 += _mm(tl.trans(dd2), h)
            if RES:
                dkx += dd2
        dz += dh * gp
        dkx += _mm(dz, u0)
        ndu0 += _mm(tl.trans(dz), kx)
        du0, du1 = ndu0, ndu1

        _put(DC + cj * B * NE, dc, B, NE, BB, BE)
        _put_vec(DAR + cj * B, dar, B, BB)
        _put_vec(DMR + cj * B, dmr, B, BB)
        _put(DQ + cj * B * DK, dq, B, DK, BB, BK)
        _put(DK_ + cj * NE * DK, dkx, NE, DK, BE, BK)
        _put(DV_ + cj * NE * DV, -dd2, NE, DV, BE, BV)
    _put(DU0 + bh * HD * DK, du0, HD, DK, BH, BK)
    _put(DU1 + bh * DV * HD, du1, DV, HD, BV, BH)
    _put(DS0 + bh * HD * DK, ds0, HD, DK, BH, BK)
    _put(DS1 + bh * DV * HD, ds1, DV, HD, BV, BH)


class _MlpChunks(torch.autograd.Function):
    """Chunks of the 2-layer GELU MLP memory (``res``: with the residual): as :class:`_LinearChunks`
    with ``u0, s0 [BH, hd, dk]``, ``u1, s1 [BH, dv, hd]`` -> ``o``, final ``u0, u1, s0, s1``."""

    @staticmethod
    def forward(ctx, q, kx, vx, c, ce, pe, ar, mr, ae, me, ee, u0, u1, s0, s1, l2: bool, res: bool):
        bh, nc, b, dk = q.shape
        ne, dv, hd = kx.shape[2], vx.shape[3], u0.shape[1]
        o = _empty(bh, nc, b, dv, like=q)
        saved = [_empty(bh, nc, *x.shape[1:], like=q) for x in (u0, u1, s0, s1)]
        final = [_empty(*x.shape, like=q) for x in (u0, u1, s0, s1)]
        dims = dict(B=b, NE=ne, DK=dk, DV=dv, HD=hd, BB=_block(b), BE=_block(ne), BK=_block(dk), BV=_block(dv),
                    BH=_block(hd), L2=l2, RES=res)
        _mlp_fwd_kernel[(bh,)](q, kx, vx, c, ce, pe, ar, mr, ae, me, ee, u0, u1, s0, s1, o, *saved, *final, nc,
                               **dims, **_LAUNCH)
        ctx.save_for_backward(q, kx, vx, c, ce, pe, ar, mr, ae, me, ee, *saved)
        ctx.dims = dims
        return (o, *final)

    @staticmethod
    @once_differentiable  # first order only: the kernels' backward is not itself differentiable
    def backward(ctx, do, *dfinal):
        q, kx, vx, c, ce, pe, ar, mr, ae, me, ee, *saved = ctx.saved_tensors
        do = torch.zeros(*q.shape[:3], vx.shape[3], dtype=q.dtype, device=q.device) if do is None else do.contiguous()
        dfinal = [torch.zeros_like(x[:, 0]) if g is None else g.contiguous() for g, x in zip(dfinal, saved)]
        grads = [_empty(*x.shape, like=x) for x in (q, kx, vx, c, ce, pe, ar, mr, ae, me, ee)]
        dstart = [_empty(*x.shape, like=x) for x in dfinal]
        _mlp_bwd_kernel[(q.shape[0],)](q, kx, vx, c, ce, pe, ar, mr, ae, me, ee, *saved, do, *dfinal,
                                       *grads, *dstart, q.shape[1], **ctx.dims, **_LAUNCH)
        return (*grads, *dstart, None, None)


# ----------------------------------------------------------------------------------------------
# the op


def _coefficients(p: Problem, n_chunks: int, b: int, last_len: int):
    """Gate coefficients per chunk (see the module docstring), all ``[B, H, nc, ...]``."""
    c = p.window
    pad, ne = n_chunks * b - p.q.shape[2], c - 1 + b
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
            o, *state = _MlpChunks.apply(*args, w["w0"], w["w1"], s["w0"], s["w1"], l2, p.spec.residual)
            w, s = {"w0": state[0], "w1": state[1]}, {"w0": state[2], "w1": state[3]}
        outs.append(o)
    if last_len == b:
        w_chunk, s_chunk = w, s
    o = torch.cat(outs, 1).reshape(bsz, nh, n_chunks * b, dv)[:, :, :n]
    unflat = lambda d: {m: t.unflatten(0, (bsz, nh)) for m, t in d.items()}  # noqa: E731
    return Result(o, unflat(w), unflat(s), unflat(w_chunk), unflat(s_chunk))
