r"""Triton kernels for the chunked memory op (``impl="triton"``): the same computation as ``chunk``.

Supported: token granularity, ``gd`` / ``momentum``, decay, any Omega window ``c`` with window
gates (one per token and head; channel-wise ones run in ``impl="chunk"``), losses ``l2`` and ``dot``, for the ``linear`` memory and the ``mlp`` memory of depth 2 with
GELU (with or without the residual). Everything else raises ``ValueError`` (``decay_first`` too:
Gated DeltaNet runs in ``impl="chunk"``'s WY form).

Split of the work. The gate coefficients of a chunk (``b`` local tokens, ``ne = c - 1 + b``
keys reaching ``c - 1`` tokens back) do not depend on the memory; they are built for all chunks
at once in PyTorch, which also differentiates them back to ``lr``, ``momentum``, ``decay`` and
``gamma``::

    C    [b, ne]  W_t = A_t W_s + m_t S_s - sum_i C(t, i) delta_i a_i^T    (rows t = 1..b)
    a, m [b]      A_t, m_t
    ce, pe [ne]   row e of C and of P (S_t = E_t S_s - sum_i P(t, i) delta_i a_i^T), e = chunk end
    ae, me, ee    A_e, m_e, E_e

(``gd`` is ``momentum = 0``: ``D_E = I`` and ``E = 0``.) The kernels do what depends on the
memory, walking the chunks of one (batch, head) in order: the keys' gradient factors
``(delta, a)`` at the chunk-start weights, the dual-form read of the queries
``A_t W x + m_t S x - (C * X A^T) Delta`` layer by layer, and the step of the state to the chunk
end. Chunk-start states are stored (``T / b`` states, as the PyTorch path keeps); the backward
kernels walk the chunks in reverse from them, recomputing the gradient factors.

How the state is tiled, so that a head's state never has to sit in one program's registers:

- linear: the rows of ``W, S [dv, dk]`` are independent (``delta = k W^T - v`` row by row), so
  the grid is (batch * head, ``dv / BV``) and each program owns ``BV`` rows. Backward gradients
  that sum over ``dv`` (of ``q``, ``k`` and the coefficients) are written per row block and added
  in PyTorch.
- mlp: the hidden units are coupled (``d2`` sums over all of them), so one program per
  (batch, head) keeps the state in global memory (the buffer of chunk-start states it writes
  anyway) and sweeps it in blocks of ``BH`` hidden units: a first sweep for ``d2``, a second for
  the read and the step to the chunk end (backward: a third sweep for the terms that need the
  complete gradient of ``d2``).

Products accumulate in float32 (float64 inputs stay float64). Matrix products use TF32 when the
caller's tensors are float16/bfloat16 (``Problem.low_precision``) and exact float32 otherwise.

A ragged last chunk is a second launch started from the first one's final state, so that the
state at its start (``chunk_weights`` of the op's final state) is an ordinary differentiable output.

Causality for any input: inside a chunk a later token meets the earlier rows only through exact
zero coefficients, and ``0 * NaN`` is NaN. So the kernels never see a non-finite key, value or
gate: :func:`~.coefficients.chunk_layout` (``sanitize=True, keys_values=True``) replaces them by
zeros at their token and marks it, and afterwards every output row from the first marked token
on, and every state after it, is set to NaN by selection (what the token-by-token reference gives
there; rows before it are bitwise those of the clean input). Queries are left alone: each reaches
only its own row. The supported memories hold no product of two projections of a key (nor a
square) inside a token's own gradient factors, so a finite key or value overflows there only when
one matrix product with it does (about ``3e38 / |W|`` in float32); that is not guarded.
"""

from __future__ import annotations

import os
from dataclasses import replace

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.autograd.function import once_differentiable

from .coefficients import chunk_layout, gate_coefficients, poison_rows
from .problem import Problem, Result
from .step_bound import bound_scale

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# No software pipelining of the chunk loop: multi-buffered loads of whole chunk tiles overflow
# shared memory (linear backward at d = b = 64 compiled for sm_90: 274 KiB with 3 stages, 128 KiB with 1).
_LAUNCH = dict(num_warps=4, num_stages=1)
# Largest tile of state rows (linear) and of hidden units (mlp) one program holds at a time.
V_BLOCK = 32
H_BLOCK = 32


def _empty(*shape, like: Tensor) -> Tensor:
    """Every kernel output is allocated here (tests fill it with NaN to catch unwritten entries)."""
    return torch.empty(*shape, dtype=like.dtype, device=like.device)


def _block(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def linear_dims(b: int, ne: int, dk: int, dv: int, l2: bool, mom: bool, prec: str) -> dict:
    """Compile-time sizes and switches of the linear kernels (chunk ``b``, ``ne`` keys per chunk)."""
    return dict(
        B=b,
        NE=ne,
        DK=dk,
        DV=dv,
        BB=_block(b),
        BE=_block(ne),
        BK=_block(dk),
        BV=min(_block(dv), V_BLOCK),
        L2=l2,
        MOM=mom,
        PREC=prec,
    )


def mlp_dims(b: int, ne: int, dk: int, dv: int, hd: int, l2: bool, res: bool, prec: str) -> dict:
    """Compile-time sizes of the mlp kernels (``hd`` hidden units). Chunks of more than 32 keys
    sweep half as many hidden units at a time: the backward at 64 keys then fits an H100's shared
    memory (220 KiB at d = 64 instead of 296; ``python -m deepmemory.bench.triton_resources``)."""
    be = _block(ne)
    bh = H_BLOCK if be <= 32 else max(16, H_BLOCK // 2)
    return dict(
        B=b,
        NE=ne,
        DK=dk,
        DV=dv,
        HD=hd,
        BB=_block(b),
        BE=be,
        BK=_block(dk),
        BV=_block(dv),
        BH=min(_block(hd), bh),
        L2=l2,
        RES=res,
        PREC=prec,
    )


def _check(p: Problem) -> None:
    spec = p.spec
    supported = spec.architecture == "linear" or (
        spec.architecture == "mlp" and spec.depth == 2 and spec.activation == "gelu"
    )
    if not supported or p.rule.granularity != "token" or p.rule.optimizer not in ("gd", "momentum") or spec.layer_norm:
        raise ValueError(
            "impl='triton' supports architecture='linear' or architecture='mlp' with depth=2 and activation='gelu', "
            "no layer_norm, optimizer 'gd' or 'momentum' and granularity='token'; got "
            f"memory={spec.architecture!r}, depth={spec.depth}, activation={spec.activation!r}, layer_norm={spec.layer_norm}, "
            f"optimizer={p.rule.optimizer!r}, granularity={p.rule.granularity!r}"
        )
    if p.channel is not None:
        raise ValueError(
            "impl='triton' does not support a channel-wise window_gate [B, T, H, dv]; impl='chunk' computes it"
        )
    if p.rule.step_bound is not None and spec.architecture != "linear":
        raise ValueError(
            "impl='triton' supports step_bound only for architecture='linear' (an MLP's bound reads its hidden "
            "activations chunk by chunk); impl='chunk' computes it"
        )
    if p.rule.decay_first:
        raise ValueError(
            "impl='triton' does not support decay_first (Gated DeltaNet); impl='chunk' computes it "
            "(in the WY form for the linear memory with l2 and gd)"
        )
    if p.q.device.type != "cuda" and not _INTERPRET:
        raise ValueError(
            f"impl='triton' needs CUDA tensors (got {p.q.device}), or TRITON_INTERPRET=1 set before "
            "deepmemory.ops.triton_chunk is first imported"
        )


# ----------------------------------------------------------------------------------------------
# tiles and the activation


@triton.jit
def _mm(a, b, PREC: tl.constexpr):
    return tl.dot(a, b, input_precision=PREC)


@triton.jit
def _ld(ptr, r0, c0, R: tl.constexpr, C: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr):
    """The ``[BR, BC]`` tile at ``(r0, c0)`` of a row-major ``[R, C]`` matrix, zero outside it."""
    r, c = r0 + tl.arange(0, BR), c0 + tl.arange(0, BC)
    return tl.load(ptr + r[:, None] * C + c[None, :], mask=(r[:, None] < R) & (c[None, :] < C), other=0.0)


@triton.jit
def _st(ptr, x, r0, c0, R: tl.constexpr, C: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr):
    r, c = r0 + tl.arange(0, BR), c0 + tl.arange(0, BC)
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


@triton.jit
def _chunk_inputs(
    Q,
    K,
    C,
    CE,
    PE,
    AR,
    MR,
    AE,
    ME,
    EE,
    cj,
    B: tl.constexpr,
    NE: tl.constexpr,
    DK: tl.constexpr,
    BB: tl.constexpr,
    BE: tl.constexpr,
    BK: tl.constexpr,
):
    """What every kernel reads of chunk ``cj``: queries, keys and the gate coefficients."""
    q = _ld(Q + cj * B * DK, 0, 0, B, DK, BB, BK)
    kx = _ld(K + cj * NE * DK, 0, 0, NE, DK, BE, BK)
    c = _ld(C + cj * B * NE, 0, 0, B, NE, BB, BE)
    ce, pe = _vec(CE + cj * NE, NE, BE)[:, None], _vec(PE + cj * NE, NE, BE)[:, None]
    ar, mr = _vec(AR + cj * B, B, BB)[:, None], _vec(MR + cj * B, B, BB)[:, None]
    return q, kx, c, ce, pe, ar, mr, tl.load(AE + cj), tl.load(ME + cj), tl.load(EE + cj)


# ----------------------------------------------------------------------------------------------
# linear memory: M(x) = W x, W [dv, dk]; program (bh, vb) owns the rows v0 = vb * BV ... of W and S


@triton.jit
def _linear_delta(kx, vx, w, L2: tl.constexpr, PREC: tl.constexpr):
    """The keys' output-gradient factor at ``W``: ``kx W^T - v`` (l2) or ``-v`` (dot)."""
    if L2:
        return _mm(kx, tl.trans(w), PREC) - vx
    else:
        return -vx


@triton.jit
def _linear_fwd_kernel(
    Q,
    K,
    V,
    C,
    CE,
    PE,
    AR,
    MR,
    AE,
    ME,
    EE,
    W0,
    S0,  # inputs
    O,
    WS,
    SS,
    WF,
    SF,  # outputs (SS: only with MOM)
    NC,
    B: tl.constexpr,
    NE: tl.constexpr,
    DK: tl.constexpr,
    DV: tl.constexpr,
    BB: tl.constexpr,
    BE: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    L2: tl.constexpr,
    MOM: tl.constexpr,
    PREC: tl.constexpr,
):
    bh, v0 = tl.program_id(0).to(tl.int64), tl.program_id(1) * BV
    w = _ld(W0 + bh * DV * DK, v0, 0, DV, DK, BV, BK)
    if MOM:
        s = _ld(S0 + bh * DV * DK, v0, 0, DV, DK, BV, BK)
    for j in range(NC):
        cj = bh * NC + j
        _st(WS + cj * DV * DK, w, v0, 0, DV, DK, BV, BK)
        q, kx, c, ce, pe, ar, mr, ae, m_e, ee = _chunk_inputs(
            Q, K, C, CE, PE, AR, MR, AE, ME, EE, cj, B, NE, DK, BB, BE, BK
        )
        delta = _linear_delta(kx, _ld(V + cj * NE * DV, 0, v0, NE, DV, BE, BV), w, L2, PREC)
        o = ar * _mm(q, tl.trans(w), PREC) - _mm(c * _mm(q, tl.trans(kx), PREC), delta, PREC)
        w_new = ae * w - _mm(tl.trans(delta * ce), kx, PREC)
        if MOM:
            _st(SS + cj * DV * DK, s, v0, 0, DV, DK, BV, BK)
            o += mr * _mm(q, tl.trans(s), PREC)
            w_new += m_e * s
            s = ee * s - _mm(tl.trans(delta * pe), kx, PREC)
        _st(O + cj * B * DV, o, 0, v0, B, DV, BB, BV)
        w = w_new
    _st(WF + bh * DV * DK, w, v0, 0, DV, DK, BV, BK)
    if MOM:
        _st(SF + bh * DV * DK, s, v0, 0, DV, DK, BV, BK)
    else:
        # gd (momentum 0): S never reaches W or a read, and the returned S is the last chunk's
        # -sum_i pe_i delta_i kx_i^T alone, so it is computed for that chunk only
        cj = bh * NC + NC - 1
        kx = _ld(K + cj * NE * DK, 0, 0, NE, DK, BE, BK)
        pe = _vec(PE + cj * NE, NE, BE)[:, None]
        delta = _linear_delta(
            kx, _ld(V + cj * NE * DV, 0, v0, NE, DV, BE, BV), _ld(WS + cj * DV * DK, v0, 0, DV, DK, BV, BK), L2, PREC
        )
        _st(SF + bh * DV * DK, -_mm(tl.trans(delta * pe), kx, PREC), v0, 0, DV, DK, BV, BK)


@triton.jit
def _linear_bwd_kernel(
    Q,
    K,
    V,
    C,
    CE,
    PE,
    AR,
    MR,
    AE,
    ME,
    EE,
    WS,
    SS,
    DO,
    DWF,
    DSF,  # inputs (SS: only with MOM)
    DQ,
    DK_,
    DV_,
    DC,
    DCE,
    DPE,
    DAR,
    DMR,
    DAE,
    DME,
    DEE,
    DW0,
    DS0,  # outputs (DQ ... DEE: one per row block)
    NC,
    B: tl.constexpr,
    NE: tl.constexpr,
    DK: tl.constexpr,
    DV: tl.constexpr,
    BB: tl.constexpr,
    BE: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    L2: tl.constexpr,
    MOM: tl.constexpr,
    PREC: tl.constexpr,
):
    bh, v0 = tl.program_id(0).to(tl.int64), tl.program_id(1) * BV
    part = tl.program_id(1).to(tl.int64) * tl.num_programs(0) + bh  # this program's slot in the partial sums
    dw = _ld(DWF + bh * DV * DK, v0, 0, DV, DK, BV, BK)
    ds = _ld(DSF + bh * DV * DK, v0, 0, DV, DK, BV, BK)
    for jj in range(NC):
        cj = bh * NC + NC - 1 - jj
        pj = part * NC + NC - 1 - jj
        w = _ld(WS + cj * DV * DK, v0, 0, DV, DK, BV, BK)
        q, kx, c, ce, pe, ar, mr, ae, m_e, ee = _chunk_inputs(
            Q, K, C, CE, PE, AR, MR, AE, ME, EE, cj, B, NE, DK, BB, BE, BK
        )
        do = _ld(DO + cj * B * DV, 0, v0, B, DV, BB, BV)
        delta = _linear_delta(kx, _ld(V + cj * NE * DV, 0, v0, NE, DV, BE, BV), w, L2, PREC)
        g = _mm(q, tl.trans(kx), PREC)
        # read: o = ar q W^T + mr q S^T - (C * q kx^T) delta
        dpm = -_mm(do, tl.trans(delta), PREC)
        dg = dpm * c
        d_delta = -_mm(tl.trans(c * g), do, PREC)
        dq = ar * _mm(do, w, PREC) + _mm(dg, kx, PREC)
        dk = _mm(tl.trans(dg), q, PREC)
        # step to the chunk end: W' = ae W + me S - sum_i ce_i delta_i kx_i^T, S' = ee S - sum_i pe_i ...
        kdw = _mm(kx, tl.trans(dw), PREC)
        d_delta -= ce * kdw
        dk -= ce * _mm(delta, dw, PREC)
        zero_b = tl.zeros((BB,), dtype=kx.dtype)
        dmr, dme, dee = zero_b, tl.sum(zero_b, 0), tl.sum(zero_b, 0)
        if MOM:
            s = _ld(SS + cj * DV * DK, v0, 0, DV, DK, BV, BK)
            dq += mr * _mm(do, s, PREC)
            dmr = tl.sum(do * _mm(q, tl.trans(s), PREC), 1)
            dme, dee = _dot_all(dw, s), _dot_all(ds, s)
            kds = _mm(kx, tl.trans(ds), PREC)
            d_delta -= pe * kds
            dk -= pe * _mm(delta, ds, PREC)
            dpe = -tl.sum(delta * kds, 1)
            ds_new = m_e * dw + ee * ds + _mm(tl.trans(mr * do), q, PREC)
        else:
            # gd: only the returned S, the last chunk's, depends on pe
            dpe = tl.zeros((BE,), dtype=kx.dtype)
            if jj == 0:
                kds = _mm(kx, tl.trans(ds), PREC)
                d_delta -= pe * kds
                dk -= pe * _mm(delta, ds, PREC)
                dpe = -tl.sum(delta * kds, 1)
        _st(DC + pj * B * NE, dpm * g, 0, 0, B, NE, BB, BE)
        _put_vec(DCE + pj * NE, -tl.sum(delta * kdw, 1), NE, BE)
        _put_vec(DPE + pj * NE, dpe, NE, BE)
        _put_vec(DAR + pj * B, tl.sum(do * _mm(q, tl.trans(w), PREC), 1), B, BB)
        _put_vec(DMR + pj * B, dmr, B, BB)
        tl.store(DAE + pj, _dot_all(dw, w))
        tl.store(DME + pj, dme)
        tl.store(DEE + pj, dee)
        dw_new = ae * dw + _mm(tl.trans(ar * do), q, PREC)
        if MOM:
            ds = ds_new
        # back through delta = kx W^T - v (l2) or -v (dot)
        if L2:
            dk += _mm(d_delta, w, PREC)
            dw_new += _mm(tl.trans(d_delta), kx, PREC)
        dw = dw_new
        _st(DQ + pj * B * DK, dq, 0, 0, B, DK, BB, BK)
        _st(DK_ + pj * NE * DK, dk, 0, 0, NE, DK, BE, BK)
        _st(DV_ + cj * NE * DV, -d_delta, 0, v0, NE, DV, BE, BV)
    _st(DW0 + bh * DV * DK, dw, v0, 0, DV, DK, BV, BK)
    if not MOM:
        ds = ds * 0.0  # the initial S only meets zero coefficients under gd
    _st(DS0 + bh * DV * DK, ds, v0, 0, DV, DK, BV, BK)


class _LinearChunks(torch.autograd.Function):
    """Chunks of the linear memory. ``q [BH, nc, b, dk]``, ``kx [BH, nc, ne, dk]``,
    ``vx [BH, nc, ne, dv]``, coefficients as in the module docstring (``[BH, nc, ...]``),
    ``w0, s0 [BH, dv, dk]`` -> ``o [BH, nc, b, dv]``, final ``w``, ``s``. ``mom``: momentum
    (else gd, whose chunk-start ``S`` the backward does not need)."""

    @staticmethod
    def forward(ctx, q, kx, vx, c, ce, pe, ar, mr, ae, me, ee, w0, s0, l2: bool, mom: bool, prec: str):
        bh, nc, b, dk = q.shape
        ne, dv = kx.shape[2], vx.shape[3]
        o = _empty(bh, nc, b, dv, like=q)
        ws = _empty(bh, nc, dv, dk, like=q)
        ss = _empty(bh, nc, dv, dk, like=q) if mom else ws  # under gd a placeholder the kernels never touch
        wf, sf = _empty(bh, dv, dk, like=q), _empty(bh, dv, dk, like=q)
        dims = linear_dims(b, ne, dk, dv, l2, mom, prec)
        grid = (bh, triton.cdiv(dv, dims["BV"]))
        _linear_fwd_kernel[grid](
            q, kx, vx, c, ce, pe, ar, mr, ae, me, ee, w0, s0, o, ws, ss, wf, sf, nc, **dims, **_LAUNCH
        )
        ctx.save_for_backward(q, kx, vx, c, ce, pe, ar, mr, ae, me, ee, ws, ss)
        ctx.dims, ctx.grid = dims, grid
        return o, wf, sf

    @staticmethod
    @once_differentiable  # first order only: the kernels' backward is not itself differentiable
    def backward(ctx, do, dwf, dsf):
        q, kx, vx, c, ce, pe, ar, mr, ae, me, ee, ws, ss = ctx.saved_tensors
        nv = ctx.grid[1]
        do = torch.zeros(*q.shape[:3], vx.shape[3], dtype=q.dtype, device=q.device) if do is None else do.contiguous()
        dwf = torch.zeros_like(ws[:, 0]) if dwf is None else dwf.contiguous()
        dsf = torch.zeros_like(ss[:, 0]) if dsf is None else dsf.contiguous()
        summed = (q, kx, c, ce, pe, ar, mr, ae, me, ee)  # gradients that sum over the rows of W
        parts = [_empty(nv, *x.shape, like=x) for x in summed]
        dvx, dw0, ds0 = _empty(*vx.shape, like=vx), _empty(*dwf.shape, like=q), _empty(*dsf.shape, like=q)
        dq, dkx, dc, dce, dpe, dar, dmr, dae, dme, dee = parts
        _linear_bwd_kernel[ctx.grid](
            q,
            kx,
            vx,
            c,
            ce,
            pe,
            ar,
            mr,
            ae,
            me,
            ee,
            ws,
            ss,
            do,
            dwf,
            dsf,
            dq,
            dkx,
            dvx,
            dc,
            dce,
            dpe,
            dar,
            dmr,
            dae,
            dme,
            dee,
            dw0,
            ds0,
            q.shape[1],
            **ctx.dims,
            **_LAUNCH,
        )
        dq, dkx, dc, dce, dpe, dar, dmr, dae, dme, dee = (x[0] if nv == 1 else x.sum(0) for x in parts)
        return dq, dkx, dvx, dc, dce, dpe, dar, dmr, dae, dme, dee, dw0, ds0, None, None, None


# ----------------------------------------------------------------------------------------------
# mlp memory of depth 2: M(x) = U1 gelu(U0 x) [+ x], U0 [hd, dk], U1 [dv, hd]. One program per
# (batch, head); the state lives in the buffers of chunk-start states (index j: start of chunk j,
# NC: the end) and is swept in blocks of BH hidden units: rows h0.. of U0, S0, columns of U1, S1.


@triton.jit
def _mlp_d2(
    kx,
    vx,
    U0,
    U1,
    DK: tl.constexpr,
    DV: tl.constexpr,
    HD: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    BH: tl.constexpr,
    L2: tl.constexpr,
    RES: tl.constexpr,
    PREC: tl.constexpr,
):
    """Output-layer gradient factor of the keys: ``d2 = gelu(kx U0^T) U1^T [+ kx] - v`` (l2), ``-v`` (dot)."""
    d2 = -vx
    if L2:
        if RES:
            d2 += kx
        for h0 in range(0, HD, BH):
            z = _mm(kx, tl.trans(_ld(U0, h0, 0, HD, DK, BH, BK)), PREC)
            d2 += _mm(_gelu(z), tl.trans(_ld(U1, 0, h0, DV, HD, BV, BH)), PREC)
    return d2


@triton.jit
def _mlp_fwd_kernel(
    Q,
    K,
    V,
    C,
    CE,
    PE,
    AR,
    MR,
    AE,
    ME,
    EE,  # inputs
    U0,
    U1,
    S0,
    S1,  # state buffers [BH, NC + 1, ...], entry 0 filled by the caller
    O,  # output
    NC,
    B: tl.constexpr,
    NE: tl.constexpr,
    DK: tl.constexpr,
    DV: tl.constexpr,
    HD: tl.constexpr,
    BB: tl.constexpr,
    BE: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    BH: tl.constexpr,
    L2: tl.constexpr,
    RES: tl.constexpr,
    PREC: tl.constexpr,
):
    bh = tl.program_id(0).to(tl.int64)
    for j in range(NC):
        cj = bh * NC + j
        st = bh * (NC + 1) + j
        u0p, s0p, u1p, s1p = U0 + st * HD * DK, S0 + st * HD * DK, U1 + st * DV * HD, S1 + st * DV * HD
        q, kx, c, ce, pe, ar, mr, ae, m_e, ee = _chunk_inputs(
            Q, K, C, CE, PE, AR, MR, AE, ME, EE, cj, B, NE, DK, BB, BE, BK
        )
        vx = _ld(V + cj * NE * DV, 0, 0, NE, DV, BE, BV)
        gk = c * _mm(q, tl.trans(kx), PREC)
        d2 = _mlp_d2(kx, vx, u0p, u1p, DK, DV, HD, BK, BV, BH, L2, RES, PREC)
        # dual-form read, layer by layer; the layer-2 term (C * hq h^T) d2 sums over all hidden units
        o = tl.zeros((BB, BV), dtype=kx.dtype)
        g2 = tl.zeros((BB, BE), dtype=kx.dtype)
        for h0 in range(0, HD, BH):
            u0, s0 = _ld(u0p, h0, 0, HD, DK, BH, BK), _ld(s0p, h0, 0, HD, DK, BH, BK)
            u1, s1 = _ld(u1p, 0, h0, DV, HD, BV, BH), _ld(s1p, 0, h0, DV, HD, BV, BH)
            z = _mm(kx, tl.trans(u0), PREC)
            h = _gelu(z)
            d1 = _mm(d2, u1, PREC) * _gelu_grad(z)
            zq = ar * _mm(q, tl.trans(u0), PREC) + mr * _mm(q, tl.trans(s0), PREC) - _mm(gk, d1, PREC)
            hq = _gelu(zq)
            o += ar * _mm(hq, tl.trans(u1), PREC) + mr * _mm(hq, tl.trans(s1), PREC)
            g2 += _mm(hq, tl.trans(h), PREC)
            # step this block to the chunk end, into the next entry of the buffers
            _st(u0p + HD * DK, ae * u0 + m_e * s0 - _mm(tl.trans(d1 * ce), kx, PREC), h0, 0, HD, DK, BH, BK)
            _st(s0p + HD * DK, ee * s0 - _mm(tl.trans(d1 * pe), kx, PREC), h0, 0, HD, DK, BH, BK)
            _st(u1p + DV * HD, ae * u1 + m_e * s1 - _mm(tl.trans(d2 * ce), h, PREC), 0, h0, DV, HD, BV, BH)
            _st(s1p + DV * HD, ee * s1 - _mm(tl.trans(d2 * pe), h, PREC), 0, h0, DV, HD, BV, BH)
        o -= _mm(c * g2, d2, PREC)
        if RES:
            o += q
        _st(O + cj * B * DV, o, 0, 0, B, DV, BB, BV)
        tl.debug_barrier()  # the next chunk reads what other threads of this program just stored


@triton.jit
def _mlp_bwd_kernel(
    Q,
    K,
    V,
    C,
    CE,
    PE,
    AR,
    MR,
    AE,
    ME,
    EE,
    U0,
    U1,
    S0,
    S1,
    DO,  # inputs (U0 ... S1: the state buffers)
    GU0,
    GU1,
    GS0,
    GS1,  # in: gradient of the final state; out: of the initial state (updated in place)
    DQ,
    DK_,
    DV_,
    DC,
    DCE,
    DPE,
    DAR,
    DMR,
    DAE,
    DME,
    DEE,  # outputs
    NC,
    B: tl.constexpr,
    NE: tl.constexpr,
    DK: tl.constexpr,
    DV: tl.constexpr,
    HD: tl.constexpr,
    BB: tl.constexpr,
    BE: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    BH: tl.constexpr,
    L2: tl.constexpr,
    RES: tl.constexpr,
    PREC: tl.constexpr,
):
    bh = tl.program_id(0).to(tl.int64)
    gu0p, gs0p, gu1p, gs1p = GU0 + bh * HD * DK, GS0 + bh * HD * DK, GU1 + bh * DV * HD, GS1 + bh * DV * HD
    for jj in range(NC):
        cj = bh * NC + NC - 1 - jj
        st = bh * (NC + 1) + NC - 1 - jj
        u0p, s0p, u1p, s1p = U0 + st * HD * DK, S0 + st * HD * DK, U1 + st * DV * HD, S1 + st * DV * HD
        q, kx, c, ce, pe, ar, mr, ae, m_e, ee = _chunk_inputs(
            Q, K, C, CE, PE, AR, MR, AE, ME, EE, cj, B, NE, DK, BB, BE, BK
        )
        vx = _ld(V + cj * NE * DV, 0, 0, NE, DV, BE, BV)
        do = _ld(DO + cj * B * DV, 0, 0, B, DV, BB, BV)
        g1 = _mm(q, tl.trans(kx), PREC)
        gk = c * g1
        d2 = _mlp_d2(kx, vx, u0p, u1p, DK, DV, HD, BK, BV, BH, L2, RES, PREC)
        dp2 = -_mm(do, tl.trans(d2), PREC)
        dg2 = dp2 * c

        # sweep 1: everything that needs one block of hidden units at a time; the sums over blocks
        # (g2, dp1, and parts of dq, dkx, dd2 and of the coefficient gradients) accumulate
        g2 = tl.zeros((BB, BE), dtype=kx.dtype)
        dp1 = tl.zeros((BB, BE), dtype=kx.dtype)
        dq = tl.zeros((BB, BK), dtype=kx.dtype)
        dkx = tl.zeros((BE, BK), dtype=kx.dtype)
        dd2 = tl.zeros((BE, BV), dtype=kx.dtype)
        dar = tl.zeros((BB,), dtype=kx.dtype)
        dmr = tl.zeros((BB,), dtype=kx.dtype)
        dce = tl.zeros((BE,), dtype=kx.dtype)
        dpe = tl.zeros((BE,), dtype=kx.dtype)
        dae = tl.sum(dce, 0)  # 0-d zeros of the compute dtype
        dme, dee = dae, dae
        for h0 in range(0, HD, BH):
            u0, s0 = _ld(u0p, h0, 0, HD, DK, BH, BK), _ld(s0p, h0, 0, HD, DK, BH, BK)
            u1, s1 = _ld(u1p, 0, h0, DV, HD, BV, BH), _ld(s1p, 0, h0, DV, HD, BV, BH)
            gu0, gs0 = _ld(gu0p, h0, 0, HD, DK, BH, BK), _ld(gs0p, h0, 0, HD, DK, BH, BK)
            gu1, gs1 = _ld(gu1p, 0, h0, DV, HD, BV, BH), _ld(gs1p, 0, h0, DV, HD, BV, BH)
            # recompute the forward of this block
            z = _mm(kx, tl.trans(u0), PREC)
            h = _gelu(z)
            gp = _gelu_grad(z)
            t = _mm(d2, u1, PREC)
            d1 = t * gp
            qu0, qs0 = _mm(q, tl.trans(u0), PREC), _mm(q, tl.trans(s0), PREC)
            zq = ar * qu0 + mr * qs0 - _mm(gk, d1, PREC)
            hq = _gelu(zq)
            g2 += _mm(hq, tl.trans(h), PREC)
            # read of layer 2: o = [q +] ar hq U1^T + mr hq S1^T - (C * hq h^T) d2
            dou1, dos1 = _mm(do, u1, PREC), _mm(do, s1, PREC)
            dhq = ar * dou1 + mr * dos1 + _mm(dg2, h, PREC)
            dh = _mm(tl.trans(dg2), hq, PREC)
            dar += tl.sum(hq * dou1, 1)
            dmr += tl.sum(hq * dos1, 1)
            # read of layer 1: zq = ar q U0^T + mr q S0^T - (C * q kx^T) d1
            dzq = dhq * _gelu_grad(zq)
            dp1 -= _mm(dzq, tl.trans(d1), PREC)
            dq += ar * _mm(dzq, u0, PREC) + mr * _mm(dzq, s0, PREC)
            dd1 = -_mm(tl.trans(gk), dzq, PREC)
            dar += tl.sum(dzq * qu0, 1)
            dmr += tl.sum(dzq * qs0, 1)
            # step to the chunk end: U0' = ae U0 + me S0 - sum_i ce_i d1_i kx_i^T, U1' likewise with (d2, h)
            kgu0, kgs0 = _mm(kx, tl.trans(gu0), PREC), _mm(kx, tl.trans(gs0), PREC)
            d2gu1, d2gs1 = _mm(d2, gu1, PREC), _mm(d2, gs1, PREC)
            dd1 += -ce * kgu0 - pe * kgs0
            dh += -ce * d2gu1 - pe * d2gs1
            dce -= tl.sum(d1 * kgu0, 1) + tl.sum(h * d2gu1, 1)
            dpe -= tl.sum(d1 * kgs0, 1) + tl.sum(h * d2gs1, 1)
            dae += _dot_all(gu0, u0) + _dot_all(gu1, u1)
            dme += _dot_all(gu0, s0) + _dot_all(gu1, s1)
            dee += _dot_all(gs0, s0) + _dot_all(gs1, s1)
            # back through the keys' gradient factors d1 = (d2 U1) * gelu'(z) and h = gelu(z); the
            # l2 path through d2 = h U1^T [+ kx] - v waits for the complete dd2 (sweep 2)
            dt = dd1 * gp
            dz = dd1 * t * _gelu_grad2(z) + dh * gp
            dd2 += _mm(dt, tl.trans(u1), PREC) - _mm(ce * h, tl.trans(gu1), PREC) - _mm(pe * h, tl.trans(gs1), PREC)
            dkx += _mm(dz, u0, PREC) - ce * _mm(d1, gu0, PREC) - pe * _mm(d1, gs0, PREC)
            _st(gu0p, ae * gu0 + _mm(tl.trans(ar * dzq), q, PREC) + _mm(tl.trans(dz), kx, PREC), h0, 0, HD, DK, BH, BK)
            _st(gs0p, m_e * gu0 + ee * gs0 + _mm(tl.trans(mr * dzq), q, PREC), h0, 0, HD, DK, BH, BK)
            _st(gu1p, ae * gu1 + _mm(tl.trans(ar * do), hq, PREC) + _mm(tl.trans(d2), dt, PREC), 0, h0, DV, HD, BV, BH)
            _st(gs1p, m_e * gu1 + ee * gs1 + _mm(tl.trans(mr * do), hq, PREC), 0, h0, DV, HD, BV, BH)
        tl.debug_barrier()

        dd2 -= _mm(tl.trans(c * g2), do, PREC)
        dg1 = dp1 * c
        dq += _mm(dg1, kx, PREC)
        dkx += _mm(tl.trans(dg1), q, PREC)
        if RES:
            dq += do
        if L2:
            if RES:
                dkx += dd2
            # sweep 2: d2 = h U1^T [+ kx] - v sends dd2 U1 back into h and dd2^T h into U1
            for h0 in range(0, HD, BH):
                u0, u1 = _ld(u0p, h0, 0, HD, DK, BH, BK), _ld(u1p, 0, h0, DV, HD, BV, BH)
                z = _mm(kx, tl.trans(u0), PREC)
                dz = _mm(dd2, u1, PREC) * _gelu_grad(z)
                dkx += _mm(dz, u0, PREC)
                gu0 = _ld(gu0p, h0, 0, HD, DK, BH, BK) + _mm(tl.trans(dz), kx, PREC)
                gu1 = _ld(gu1p, 0, h0, DV, HD, BV, BH) + _mm(tl.trans(dd2), _gelu(z), PREC)
                _st(gu0p, gu0, h0, 0, HD, DK, BH, BK)
                _st(gu1p, gu1, 0, h0, DV, HD, BV, BH)
            tl.debug_barrier()

        _st(DC + cj * B * NE, dp2 * g2 + dp1 * g1, 0, 0, B, NE, BB, BE)
        _put_vec(DAR + cj * B, dar, B, BB)
        _put_vec(DMR + cj * B, dmr, B, BB)
        _put_vec(DCE + cj * NE, dce, NE, BE)
        _put_vec(DPE + cj * NE, dpe, NE, BE)
        tl.store(DAE + cj, dae)
        tl.store(DME + cj, dme)
        tl.store(DEE + cj, dee)
        _st(DQ + cj * B * DK, dq, 0, 0, B, DK, BB, BK)
        _st(DK_ + cj * NE * DK, dkx, 0, 0, NE, DK, BE, BK)
        _st(DV_ + cj * NE * DV, -dd2, 0, 0, NE, DV, BE, BV)


class _MlpChunks(torch.autograd.Function):
    """Chunks of the 2-layer GELU MLP memory (``res``: with the residual): as :class:`_LinearChunks`
    with ``u0, s0 [BH, hd, dk]``, ``u1, s1 [BH, dv, hd]`` -> ``o``, final ``u0, u1, s0, s1``."""

    @staticmethod
    def forward(ctx, q, kx, vx, c, ce, pe, ar, mr, ae, me, ee, u0, u1, s0, s1, l2: bool, res: bool, prec: str):
        bh, nc, b, dk = q.shape
        ne, dv, hd = kx.shape[2], vx.shape[3], u0.shape[1]
        o = _empty(bh, nc, b, dv, like=q)
        states = []
        for x in (u0, u1, s0, s1):
            buf = _empty(bh, nc + 1, *x.shape[1:], like=x)
            buf[:, 0] = x
            states.append(buf)
        dims = mlp_dims(b, ne, dk, dv, hd, l2, res, prec)
        _mlp_fwd_kernel[(bh,)](q, kx, vx, c, ce, pe, ar, mr, ae, me, ee, *states, o, nc, **dims, **_LAUNCH)
        ctx.save_for_backward(q, kx, vx, c, ce, pe, ar, mr, ae, me, ee, *states)
        ctx.dims = dims
        return (o, *(buf[:, nc].clone() for buf in states))

    @staticmethod
    @once_differentiable  # first order only: the kernels' backward is not itself differentiable
    def backward(ctx, do, *dfinal):
        q, kx, vx, c, ce, pe, ar, mr, ae, me, ee, *states = ctx.saved_tensors
        do = torch.zeros(*q.shape[:3], vx.shape[3], dtype=q.dtype, device=q.device) if do is None else do.contiguous()
        # the kernel turns these into the gradients of the initial state in place
        grad_state = [
            torch.zeros_like(x[:, 0]) if g is None else g.contiguous().clone() for g, x in zip(dfinal, states)
        ]
        grads = [_empty(*x.shape, like=x) for x in (q, kx, vx, c, ce, pe, ar, mr, ae, me, ee)]
        _mlp_bwd_kernel[(q.shape[0],)](
            q,
            kx,
            vx,
            c,
            ce,
            pe,
            ar,
            mr,
            ae,
            me,
            ee,
            *states,
            do,
            *grad_state,
            *grads,
            q.shape[1],
            **ctx.dims,
            **_LAUNCH,
        )
        return (*grads, *grad_state, None, None, None)


# ----------------------------------------------------------------------------------------------
# the op


def triton_chunk(p: Problem) -> Result:
    """The chunk-parallel form in Triton kernels (``impl="triton"``): the same layout and gate
    coefficients as ``impl="chunk"`` (ops/coefficients.py), one program per (batch, head) walking
    its chunks. Raises ``ValueError`` (one line) for a rule the kernels do not cover, or for CPU
    tensors without ``TRITON_INTERPRET=1``."""
    _check(p)
    bsz, nh, n, dk = p.q.shape
    dv = p.dv
    lay = chunk_layout(p, sanitize=True, keys_values=True)
    g = gate_coefficients(lay, p.rule.optimizer)
    if p.rule.step_bound is not None:  # the linear memory's inputs are its keys: every chunk's factor at once
        scale = bound_scale(p.rule.step_bound, [lay.kx], g.c_coef).unsqueeze(-1)
        g = replace(g, c_coef=scale * g.c_coef, s_coef=scale * g.s_coef)
    b, n_chunks, last_len = lay.b, lay.n_chunks, lay.last_len
    # the kernels carry the state from chunk to chunk, so a marked token reaches every later row
    assert lay.bad is not None  # (sanitize=True)
    marked = lay.bad.any(-1)  # [B, H, nc]
    before = torch.cumsum(marked, -1) - marked.long() > 0  # a marked token in an earlier chunk
    rows_bad = lay.rows_after_bad(lay.bad) | before.unsqueeze(-1)  # [B, H, nc, b]

    flat = lambda x: x.flatten(0, 1).contiguous()  # noqa: E731  [B, H, ...] -> [BH, ...]
    kx, vx, q = flat(lay.kx), flat(lay.vx), flat(lay.q)  # [BH, nc, n_ext | b, d]
    coefs = [
        flat(x)
        for x in (
            g.c_coef,
            lay.ends(g.c_coef),
            lay.ends(g.s_coef),
            g.a_cum,
            g.m_coef,
            lay.ends(g.a_cum),
            lay.ends(g.m_coef),
            lay.ends(g.e_cum),
        )
    ]
    w, s = ({m: flat(t) for m, t in d.items()} for d in (p.w0, p.s0))

    l2 = p.rule.loss == "l2"
    prec = "tf32" if p.low_precision else "ieee"
    n_full = n_chunks if last_len == b else n_chunks - 1
    outs = []
    for lo, hi in ((0, n_full), (n_full, n_chunks)):
        if lo == hi:
            continue
        w_chunk, s_chunk = w, s
        args = [x[:, lo:hi].contiguous() for x in (q, kx, vx, *coefs)]
        if p.spec.architecture == "linear":
            o, wf, sf = _LinearChunks.apply(*args, w["w0"], s["w0"], l2, p.rule.optimizer == "momentum", prec)
            w, s = {"w0": wf}, {"w0": sf}
        else:
            o, *state = _MlpChunks.apply(*args, w["w0"], w["w1"], s["w0"], s["w1"], l2, p.spec.residual, prec)
            w, s = {"w0": state[0], "w1": state[1]}, {"w0": state[2], "w1": state[3]}
        outs.append(o)
    if last_len == b:
        w_chunk, s_chunk = w, s
    o = torch.cat(outs, 1).reshape(bsz, nh, n_chunks * b, dv)[:, :, :n]
    o = poison_rows(rows_bad.flatten(2)[:, :, :n], o)
    # the final state follows every token; the state at the start of the unfinished chunk, those before it
    chunk_bad = before[:, :, -1] if last_len < b else marked.any(-1)
    unflat = lambda d, bad: {m: poison_rows(bad, t.unflatten(0, (bsz, nh))) for m, t in d.items()}  # noqa: E731
    end_bad = marked.any(-1)
    return Result(o, unflat(w, end_bad), unflat(s, end_bad), unflat(w_chunk, chunk_bad), unflat(s_chunk, chunk_bad))
