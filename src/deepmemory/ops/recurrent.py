r"""One token of the update rule as a recurrence: the decode step of ``impl="chunk"``.

Reading one token through the chunk form (:mod:`.chunk`) replays the unfinished chunk the state
carries: its layout, gate coefficients and dual-form reads are rebuilt for up to ``chunk_size``
tokens, some thirty small operations a layer whatever the chunk holds. The rule itself needs far
less for one token ``t`` (Titans eq. 13-14 with the Omega window and Muon of ATLAS eq. 32-33;
docs/ops.md): every gradient of a chunk is taken at its start weights ``W_s``, which the state keeps
(``chunk_weights``), so with the window's ``c`` tokens ``i`` (``c - 1`` of them from the state)::

    u_t = sum_i gamma_i grad_W loss_i(W_s)                   (at (1 - decay_t) W_{t-1} under decay_first)
    gd / momentum: S_t = momentum_t S_{t-1} - lr_t u_t,  W_t = (1 - decay_t) W_{t-1} + S_t
    muon:          S_t = momentum_t S_{t-1} + u_t,       W_t = (1 - decay_t) W_{t-1} - lr_t NS(S_t)
    o_t = M_{W_t}(q_t)

which is what :func:`memory_step` computes: one forward and hand-written backward of the window's
keys at ``W_s`` (:func:`~.memory.token_gradients`), one outer-product sum per matrix, the optimizer
step, one read. The chunk form unrolls the same recurrence over a chunk (its coefficients are the
products of these gates), so the two agree to rounding (float64: ``tests/test_recurrent.py``, at
every token of every rule the step takes, against one call over the sequence); Muon orthogonalises
with the chunk form's own :func:`~.chunk.newton_schulz_batched`.

The state it returns is the op's :class:`MemoryState`, field for field what ``neural_memory``
returns after the same tokens, so either path continues the other. It is built anew: the state
passed in is never written (a state may be kept and continued twice). A non-finite input reaches
the output and the state through the arithmetic (a NaN key makes its gradient, the memory and every
later read NaN), as in the token loop.

Not taken (the chunk form runs): ``granularity="chunk"`` (one update per chunk, applied when it
completes) and ``step_bound`` (its factor depends on the whole chunk's inputs).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .chunk import newton_schulz_batched
from .inputs import compute_dtype
from .memory import dense_apply, memory_forward, token_gradients
from .rule import UpdateRule
from .state import MemoryState


def step_supported(rule: UpdateRule) -> bool:
    """Whether :func:`memory_step` computes ``rule``: token granularity without ``step_bound``."""
    return rule.granularity == "token" and rule.step_bound is None


def _heads_first(x: Tensor, cd: torch.dtype) -> Tensor:
    return _as(x.transpose(1, 2), cd)


def _as(x: Tensor, cd: torch.dtype) -> Tensor:
    return x if x.dtype == cd else x.to(cd)


def _dict_as(d: dict[str, Tensor], cd: torch.dtype) -> dict[str, Tensor]:
    return {n: _as(t, cd) for n, t in d.items()}


def memory_step(
    rule: UpdateRule,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    lr: Tensor,
    momentum: Tensor | None,
    decay: Tensor | None,
    window_gate: Tensor | None,
    w0: dict[str, Tensor],
    state: MemoryState | None,
) -> tuple[Tensor, MemoryState]:
    """One token of ``rule`` (:func:`step_supported`) from ``state`` (None: the start of a sequence,
    with the memory ``w0``).

    Inputs as ``neural_memory`` takes them, already checked, with ``T = 1``: ``q, k [B, 1, H, dk]``,
    ``v [B, 1, H, dv]``, ``lr, momentum, decay [B, 1, H]`` (``momentum`` None for ``gd``, ``decay``
    None for no forgetting), ``window_gate [B, 1, H]``, ``[B, 1, H, dv]`` (channel-wise) or None;
    ``w0 {name: [B, H, rows, cols]}`` in the compute dtype (float64 stays, otherwise float32), used
    only without a state; ``state`` made under ``rule`` with the same kind of window gate.
    Returns ``o [B, 1, H, dv]`` in q's dtype and the state after the token (compute dtype)."""
    cd = compute_dtype(q.dtype)
    qq, kk, vv = _heads_first(q, cd), _heads_first(k, cd), _heads_first(v, cd)
    lr_t = _heads_first(lr, cd)  # [B, H, 1]
    zeros = torch.zeros_like(lr_t)  # (the state keeps the gates the op would: zeros for none, ones for no window gate)
    mom_t = zeros if rule.optimizer == "gd" or momentum is None else _heads_first(momentum, cd)
    dec_t = zeros if decay is None else _heads_first(decay, cd)
    gam_t = torch.ones_like(lr_t) if window_gate is None else _heads_first(window_gate, cd)
    channel = gam_t.dim() == 4
    if state is None:
        seen, pending = 0, 0
        w = w0
        s = {n: torch.zeros_like(t) for n, t in w0.items()}
        w_start, s_start = w, s
        hk, hv, hg = kk[:, :, :0], vv[:, :, :0], gam_t[:, :, :0]
        gates_before = {"lr": lr_t[:, :, :0], "momentum": lr_t[:, :, :0], "decay": lr_t[:, :, :0]}
    else:
        seen, pending = state.seen, state.pending
        w, s = _dict_as(state.weights, cd), _dict_as(state.momentum, cd)
        w_start, s_start = _dict_as(state.chunk_weights, cd), _dict_as(state.chunk_momentum, cd)
        hk, hv, hg = _as(state.keys, cd), _as(state.values, cd), _as(state.window_gate, cd)
        gates_before = _dict_as(state.gates, cd)

    # the window: the last window - 1 tokens the state holds, then this one
    c = rule.window
    if c > 1 and hk.shape[2]:
        lo = max(0, hk.shape[2] - (c - 1))
        wk, wv, wg = (torch.cat([h[:, :, lo:], x], 2) for h, x in ((hk, kk), (hv, vv), (hg, gam_t)))
    else:
        wk, wv, wg = kk, vv, gam_t

    retain = None if decay is None else (1.0 - dec_t).unsqueeze(-1)  # [B, H, 1, 1]; None: no forgetting
    # every gradient of a chunk at its start weights (decay_first, chunk size 1: the forgotten W_{t-1})
    at = {n: t if retain is None else retain * t for n, t in w.items()} if rule.decay_first else w_start
    grads = token_gradients(rule.spec, at, wk, wv, rule.loss, wg if channel else None)
    # each token's weight in the step: gamma_i (channel-wise: inside delta), times -lr_t for gd and momentum
    coef = None if channel or (window_gate is None and c == 1) else wg
    if rule.optimizer != "muon":
        coef = -lr_t if coef is None else -lr_t * coef
    step = {n: _outer_sum(coef, *grads[n]) for n in w}  # -lr_t u_t, or u_t for Muon
    keep = mom_t.unsqueeze(-1)
    s_new = step if rule.optimizer == "gd" else {n: torch.addcmul(step[n], keep, s[n]) for n in w}
    if rule.optimizer == "muon":
        rate = lr_t.unsqueeze(-1)
        w_new = {
            n: torch.addcmul(_retained(retain, w[n]), rate, newton_schulz_batched(s_new[n], rule.ns_steps), value=-1)
            for n in w
        }
    else:
        w_new = {n: s_new[n] + w[n] if retain is None else torch.addcmul(s_new[n], retain, w[n]) for n in w}
    o = _as(memory_forward(rule.spec, dense_apply(w_new), qq).transpose(1, 2), q.dtype)

    total = seen + 1
    new_pending = total % rule.chunk_size
    if new_pending == 0:  # the chunk is complete: the next one starts here
        w_start, s_start = w_new, s_new
    elif pending == 0:  # this token opens a chunk: its start is the state before it
        w_start, s_start = w, s
    keep_n = min(total, c - 1 + new_pending)
    step_gates = {"lr": lr_t, "momentum": mom_t, "decay": dec_t}
    return o, MemoryState(
        weights=w_new,
        momentum=s_new,
        chunk_weights=w_start,
        chunk_momentum=s_start,
        keys=_last(hk, kk, keep_n),
        values=_last(hv, vv, keep_n),
        window_gate=_last(hg, gam_t, keep_n),
        gates={n: _last(gates_before[n], g, new_pending) for n, g in step_gates.items()},
        seen=total,
        rule=rule,
    )


def _outer_sum(coef: Tensor | None, d: Tensor, a: Tensor) -> Tensor:
    """``sum_i coef_i d_i a_i^T``: ``coef [B, H, n]`` (None: ones), ``d [B, H, n, rows]``, ``a [B, H, n, cols]``
    -> ``[B, H, rows, cols]`` (one token: a broadcast product, no reduction)."""
    if coef is not None:
        d = d * coef.unsqueeze(-1)
    return d.mT * a if d.shape[2] == 1 else d.mT @ a


def _retained(retain: Tensor | None, w: Tensor) -> Tensor:
    return w if retain is None else retain * w


def _last(before: Tensor, x: Tensor, n: int) -> Tensor:
    """The last ``n`` tokens (dim 2) of ``before`` followed by ``x`` (one token)."""
    if n == 0:
        return x[:, :, :0]
    if n == 1:
        return x
    return torch.cat([before[:, :, before.shape[2] - (n - 1) :], x], 2)
