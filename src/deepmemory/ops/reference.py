"""The update rule token by token, straight from the equations (Titans eq. 13–14 with ATLAS's Omega rule and
Muon). Slow; the ground truth.

Per-token gradients come from autograd here (the chunked form uses a hand-written backward),
so the two implementations share nothing but the memory's forward pass.
"""

from __future__ import annotations

import dataclasses
from typing import Any, cast

import torch
from torch import Tensor

from .memory import dense_apply, memory_forward, newton_schulz
from .problem import Problem, Result


def _loss(p: Problem, weights: dict[str, Tensor], k: Tensor, v: Tensor, gamma: Tensor, channel) -> Tensor:
    """sum_i gamma_i loss_i(W) over the window (and over batch and heads, which do not interact);
    with channel-wise weights ``loss_i = sum_c channel_ic loss_ic``."""
    pred = memory_forward(p.spec, dense_apply(weights), k)
    per_channel = 0.5 * (pred - v).pow(2) if p.rule.loss == "l2" else -(pred * v)
    if channel is not None:
        per_channel = channel * per_channel
    return (gamma * per_channel.sum(-1)).sum()


def _surprise(p: Problem, w_grad: dict[str, Tensor], x: int) -> dict[str, Tensor]:
    """u_t = sum_{i=t-c+1}^{t} gamma_i grad_W loss_i(W_{t'}) for the token at extended index x."""
    lo = max(0, x - p.rule.window + 1)
    names = list(w_grad)
    leaves = [w if w.requires_grad else w.detach().requires_grad_() for w in w_grad.values()]
    channel = None if p.channel is None else p.channel[:, :, lo : x + 1]
    loss = _loss(
        p, dict(zip(names, leaves)), p.k[:, :, lo : x + 1], p.v[:, :, lo : x + 1], p.gamma[:, :, lo : x + 1], channel
    )
    grads = torch.autograd.grad(loss, leaves, create_graph=True)
    return dict(zip(names, grads))


def _curvature(p: Problem, weights: dict[str, Tensor], x: int) -> dict[str, Tensor]:
    """For each weight matrix, ``U_t = sum_{i=t-c+1}^{t} gamma_i a_i a_i^T`` ``[B, H, cols, cols]``
    with ``a_i`` the input the matrix multiplies when the memory reads key ``i`` (``step_bound``):
    the inputs are recorded as the memory's forward pass meets each matrix."""
    lo = max(0, x - p.rule.window + 1)
    k, g = p.k[:, :, lo : x + 1], p.gamma[:, :, lo : x + 1]
    seen, dense = {}, dense_apply(weights)

    def record(name: str, a: Tensor) -> Tensor:
        seen[name] = a
        return dense(name, a)

    memory_forward(p.spec, record, k)
    return {m: (g.unsqueeze(-1) * a).transpose(-1, -2) @ a for m, a in seen.items()}


def _bound(p: Problem, h: dict[str, Tensor]) -> Tensor:
    """``min(1, step_bound / F)`` ``[B, H]``, ``F`` the largest ``||H||_F`` of the chunk's step so far
    along each matrix's inputs (``h {name: [B, H, cols, cols]}``)."""
    bound = p.rule.step_bound
    assert bound is not None  # called only with a bound
    f2 = torch.stack([t.pow(2).sum((-2, -1)) for t in h.values()]).amax(0)
    over = f2 > bound**2  # (where the bound is inactive the factor is a constant 1, with no gradient)
    return torch.where(over, bound / torch.where(over, f2, 1.0).sqrt(), 1.0)


def _col(t: Tensor) -> Tensor:
    return t[:, :, None, None]


def _constant(t: Tensor) -> Tensor:
    """``t`` cut from autograd: a no-grad view of an ``nn.Parameter`` is a leaf outside any graph,
    which ``autograd.grad`` cannot differentiate; an inference tensor is copied out of inference mode."""
    return t.clone() if t.is_inference() else t.detach()


def _as_constants(p: Problem) -> Result:
    """:func:`reference` of ``p`` called without gradient tracking: the per-token gradients still
    need autograd, so it runs with it on the inputs as constants, and returns detached results."""
    with torch.inference_mode(False), torch.enable_grad():
        fields: dict[str, Any] = {
            f: ({m: _constant(t) for m, t in getattr(p, f).items()} if f in ("w0", "s0") else _constant(getattr(p, f)))
            for f in ("q", "k", "v", "gamma", "lr", "momentum", "decay", "w0", "s0")
        }
        fields["channel"] = None if p.channel is None else _constant(p.channel)
        res = reference(dataclasses.replace(p, **fields))
    parts: list[Any] = [r.detach() if isinstance(r, Tensor) else {m: t.detach() for m, t in r.items()} for r in res]
    return Result(*parts)


def reference(p: Problem) -> Result:
    """The rule token by token (``impl="reference"``): per-token gradients by autograd at the chunk
    start (under ``decay_first``, at chunk size 1, at the forgotten ``(1 - decay_t) W_{t-1}``), then
    the optimizer step of ``p.rule``; the ground truth the fast forms are tested against.
    Returns the outputs ``[B, H, N, dv]`` and the states after the last token and at the start of
    the unfinished chunk (see :class:`Result`). Under ``torch.no_grad()`` / ``torch.inference_mode()``
    the inputs enter as constants and the results leave as constants (nothing flows back)."""
    if not torch.is_grad_enabled():
        return _as_constants(p)
    n, b, bound = p.q.shape[2], p.rule.chunk_size, p.rule.step_bound
    w, s = dict(p.w0), dict(p.s0)
    w_chunk, s_chunk = w, s
    outs = []
    with torch.enable_grad():
        for t in range(n):
            x = p.n_hist + t
            lr, mom, ret = p.lr[:, :, t], p.momentum[:, :, t], 1.0 - p.decay[:, :, t]
            if t % b == 0:
                w_chunk, s_chunk = w, s
                # step_bound: the same recurrence without gradients (wz, sz), and on each matrix's
                # inputs' outer products (hw, hs: the chunk's step so far along those directions);
                # the state is (wz, sz) plus the gradients' part times min(1, bound / max ||hw||_F),
                # while (wu, su) run on unscaled
                wu, su, wz, sz = w, s, w, s
                hs: dict = {}
                hw: dict = {}
            if p.rule.granularity == "token":
                # decay_first (Gated DeltaNet; chunk_size 1): the gradient at the forgotten weights
                at = {m: _col(ret) * w_chunk[m] for m in w} if p.rule.decay_first else w_chunk
                u = _surprise(p, at, x)
                if p.rule.optimizer == "muon":
                    s = {m: _col(mom) * s[m] + u[m] for m in w}
                    w = {m: _col(ret) * w[m] - _col(lr) * newton_schulz(s[m], p.rule.ns_steps) for m in w}
                else:
                    keep = 0.0 if p.rule.optimizer == "gd" else _col(mom)
                    su = {m: (0.0 if p.rule.optimizer == "gd" else keep * su[m]) - _col(lr) * u[m] for m in w}
                    wu = {m: _col(ret) * wu[m] + su[m] for m in w}
                    w, s = wu, su
                    if bound is not None:
                        sz = {m: keep * sz[m] for m in w}
                        wz = {m: _col(ret) * wz[m] + sz[m] for m in w}
                        cur = _curvature(p, at, x)
                        hs = {m: (0.0 if t % b == 0 else keep * hs[m]) + _col(lr) * cur[m] for m in cur}
                        hw = {m: (0.0 if t % b == 0 else _col(ret) * hw[m]) + hs[m] for m in cur}
                        f = _col(_bound(p, hw))
                        scaled = f < 1  # (elsewhere the unscaled state as it is: the papers' rule, bitwise)
                        w = {m: torch.where(scaled, wz[m] + f * (wu[m] - wz[m]), wu[m]) for m in w}
                        s = {m: torch.where(scaled, sz[m] + f * (su[m] - sz[m]), su[m]) for m in w}
                outs.append(memory_forward(p.spec, dense_apply(w), p.q[:, :, t : t + 1]))
            else:
                # tokens of chunk J read W_{J-1}; the chunk's single update lands after its last token
                outs.append(memory_forward(p.spec, dense_apply(w), p.q[:, :, t : t + 1]))
                if t % b == b - 1:
                    start = t - b + 1
                    us = [_surprise(p, w_chunk, p.n_hist + i) for i in range(start, t + 1)]
                    mean_mom = p.momentum[:, :, start : t + 1].mean(-1)
                    mean_ret = 1.0 - p.decay[:, :, start : t + 1].mean(-1)
                    if p.rule.optimizer == "muon":
                        mean_lr = p.lr[:, :, start : t + 1].mean(-1)
                        s = {m: _col(mean_mom) * s[m] + sum(u[m] for u in us) for m in w}
                        w = {m: _col(mean_ret) * w[m] - _col(mean_lr) * newton_schulz(s[m], p.rule.ns_steps) for m in w}
                    else:
                        step = {m: sum(_col(p.lr[:, :, start + j]) * u[m] for j, u in enumerate(us)) for m in w}
                        if bound is not None:
                            curs = [_curvature(p, w_chunk, p.n_hist + i) for i in range(start, t + 1)]
                            h = {m: sum(_col(p.lr[:, :, start + j]) * c[m] for j, c in enumerate(curs)) for m in w}
                            f = _col(_bound(p, cast(dict[str, Tensor], h)))  # (sums of b >= 1 tensors)
                            step = {m: torch.where(f < 1, f * step[m], step[m]) for m in w}
                        keep = 0.0 if p.rule.optimizer == "gd" else _col(mean_mom)
                        s = {m: keep * s[m] - step[m] for m in w}
                        w = {m: _col(mean_ret) * w[m] + s[m] for m in w}
    if n % b == 0:
        w_chunk, s_chunk = w, s
    return Result(torch.cat(outs, dim=2) if outs else p.q.new_zeros(*p.q.shape[:3], p.dv), w, s, w_chunk, s_chunk)
