r"""The kernel-form memory token by token, straight from the equations. Slow; the ground truth.

Two loops, one per way the memory keeps its tokens, sharing nothing with the chunked form
(``deepmemory.ops.kernel``) but the activation functions. Per batch element and head, ``t'`` the
start of ``t``'s chunk (ATLAS eq. 16), ``I_t`` the last ``c = window`` tokens up to ``t``, ``loss_i
= -<M(k_i), v_i>`` (ATLAS eq. 25) or ``0.5||M(k_i) - v_i||^2`` (ATLAS eq. 27), for ``M(x) = [x +]
W_{L-1} σ(… σ(W_0 φ*(x)))``, ``y_t = M_t(q_t)``:

- :func:`kernel_reference`, ``window=None`` and ``window_rule="swa"``::

      M_t = M_init - Σ_{i ∈ I_t} lr_i ∇ loss_i(M_{t'(i)-1})      (I_t = every token so far for None)

  Every token's gradient is the outer product of the backprop signal ``δ_{l,i}`` of each matrix's
  output with its input: ``φ*(k_i)`` for ``W_0`` (ATLAS eq. 22), ``a_{l,i}`` for ``W_l``. So the
  memory is kept as its tokens: per token ``i`` its key and ``D_{l,i} = -lr_i δ_{l,i}`` (and
  ``a_{l,i}``); the deeper matrices are materialised for every read, ``W_l = W_l^init + Σ_{i∈I}
  D_{l,i} a_{l,i}^T``, and ``W_0 φ*(x) = Σ_{i∈I} D_{0,i} exp(scale k_i·x)`` (ATLAS eq. 23–24).
- :func:`omega_reference`, ``window_rule="omega"`` with a window (ATLAS eq. 27–28, ``γ_i^{(t)} =
  lr_t`` as in ATLAS eq. 15)::

      M_t = M_{t-1} - lr_t Σ_{i ∈ I_t} ∇ loss_i(M_{t'-1})

  step by step: at each chunk's start the memory ``M_{t'-1}`` is frozen, each window token's
  gradient is taken there, and each step ``t`` adds ``lr_t`` times the gradients of its window's
  tokens to the deeper matrices (explicit) and to the first layer's per-key signals
  (``W_0 φ*(x) = Σ_i D_{0,i} exp(scale k_i·x)`` over every key so far).

Both divide the first layer's read by ``Σ exp(scale k_i·x)`` over the keys it sums when
normalised (ATLAS eq. 17). The signals ``δ`` come from autograd, one token at a time.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .kernel import KernelState
from .memory import activation


def step_factor(rule, scale: Tensor, coefs: list[Tensor], keys: list[Tensor], inputs: list[list[Tensor]]) -> Tensor:
    """``rule.step_bound``'s factor ``[B, H]`` on one row's step, from its definition: the row
    applies token ``i``'s gradient with weight ``coefs[i] [B, H]`` (only positive weights count);
    ``H_0 = Σ_i c_i φ*(k_i) φ*(k_i)^T`` has ``||H_0||_F^2 = Σ_ij c_i c_j (φ*(k_i)·φ*(k_j))^2``,
    ``φ*(k_i)·φ*(k_j) = exp(scale k_i·k_j)`` (divided by the norms ``exp(scale |k|^2 / 2)`` under a
    normalised read); each deeper matrix's ``H_l = Σ_i c_i a_{l,i} a_{l,i}^T`` is materialised
    (``inputs[l][i] [B, H, cols]``). ``min(1, tau / max_l ||H_l||_F)``."""
    c = torch.stack([torch.where(x > 0, x, 0.0) for x in coefs], -1)  # [B, H, n]
    kk = torch.stack(keys, 2)  # [B, H, n, dk]
    dots = torch.exp(scale[None, :, None, None] * torch.einsum("bhid,bhjd->bhij", kk, kk))
    if rule.normalized:
        norms = torch.diagonal(dots, dim1=-2, dim2=-1)
        dots = dots / torch.sqrt(norms.unsqueeze(-1) * norms.unsqueeze(-2))
    f2 = torch.einsum("bhi,bhj,bhij->bh", c, c, dots.pow(2))
    for a in inputs:
        h = torch.einsum("bhn,bhnr,bhnc->bhrc", c, torch.stack(a, 2), torch.stack(a, 2))
        f2 = torch.maximum(f2, h.pow(2).sum((-1, -2)))
    tau = rule.step_bound
    return torch.where(f2 > tau * tau, tau / torch.sqrt(f2), torch.ones_like(f2))


def kernel_reference(
    q: Tensor, k: Tensor, v: Tensor, lr: Tensor, scale: Tensor, st: KernelState, output_final_state: bool
) -> tuple[Tensor, KernelState | None]:
    """The token loop of ``window=None`` and ``window_rule="swa"``, heads first and validated
    (see ``deepmemory.ops.kernel_memory``):
    ``q, k [B, H, T, dk]``, ``v [B, H, T, dv]``, ``lr [B, H, T]``, ``scale [H]``, the state to start
    from -> ``y [B, H, T, dv]`` and, if asked, the final state (the same :class:`KernelState` as
    the chunked form's)."""
    rule = st.rule
    grad_mode = torch.is_grad_enabled()
    depth, window, b = rule.depth, rule.window, rule.chunk_size
    sc = scale[None, :, None]  # [1, H, 1]
    pend = st.pending_k.shape[2]
    kk = torch.cat([st.pending_k, k], 2)
    vv = torch.cat([st.pending_v, v], 2)
    ll = torch.cat([st.pending_lr, lr], 2)
    n = kk.shape[2]

    # the memory as tokens: position -> key, D_0, and for the deeper matrices (D_l, a_l).
    # Positions count from the start of the unfinished chunk; the state's stored tokens sit just
    # before it. Without a window they never leave, so they are already in the state's matrices.
    n_s = st.keys.shape[2]
    keys: dict[int, Tensor] = {i - n_s: x for i, x in enumerate(st.keys.unbind(2))}
    d0: dict[int, Tensor] = {i - n_s: x for i, x in enumerate(st.signals.unbind(2))}
    deep: dict[int, list[tuple[Tensor, Tensor]]] = {}
    base = list(st.weights)
    if window is not None and depth > 1:
        n_e = st.evict_signals[0].shape[2]
        for j in range(n_e):
            deep[j - n_e] = [(s[:, :, j], a[:, :, j]) for s, a in zip(st.evict_signals, st.evict_inputs)]
        # the state's matrices hold the stored tokens' contributions: keep them as tokens instead
        base = [w - torch.einsum("bhnr,bhnc->bhrc", s, a) for w, s, a in zip(base, st.evict_signals, st.evict_inputs)]

    def members(t: int) -> list[int]:
        """I_t: the stored tokens up to t that are in t's window."""
        return [i for i in sorted(keys) if i <= t and (window is None or i > t - window)]

    def first_layer(x: Tensor, idx: list[int], f: dict[int, Tensor] | None = None) -> Tensor:
        """W_0 φ*(x) = Σ_{i∈I} D_{0,i} exp(scale k_i·x) (normalised: divided by Σ_{i∈I} exp(...));
        the signals of the tokens in ``f`` multiplied by their factor ``[B, H]``."""
        if not idx:  # W_0 = 0
            return x.new_zeros(*x.shape[:-1], st.signals.shape[-1])
        s = sc * torch.einsum("bhd,bhnd->bhn", x, torch.stack([keys[i] for i in idx], 2))
        w = torch.softmax(s, -1) if rule.normalized else torch.exp(s)
        f = f or {}
        return torch.einsum(
            "bhn,bhnr->bhr", w, torch.stack([d0[i] * f[i][..., None] if i in f else d0[i] for i in idx], 2)
        )

    def matrices(idx: list[int], f: dict[int, Tensor] | None = None) -> list[Tensor]:
        """W_l = W_l^init + Σ_{i∈I} D_{l,i} a_{l,i}^T, materialised (``f`` as in ``first_layer``)."""
        f = f or {}
        mats = []
        for l, w in enumerate(base):
            held = [(i, deep[i][l]) for i in idx if i in deep]
            if held:
                w = w + torch.einsum(
                    "bhnr,bhnc->bhrc",
                    torch.stack([d * f[i][..., None] if i in f else d for i, (d, _) in held], 2),
                    torch.stack([a for _, (_, a) in held], 2),
                )
            mats.append(w)
        return mats

    def forward(x: Tensor, z0: Tensor, mats: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
        """M(x) from W_0 φ*(x) = z0, and the outputs z_l of every matrix."""
        z = [z0]
        for w in mats:
            z.append(torch.einsum("bhrc,bhc->bhr", w, activation(rule.activation, z[-1])))
        return (z[-1] + x if rule.residual else z[-1]), z

    ys = []
    with torch.enable_grad():
        for cs in range(0, n, b):
            ce = min(cs + b, n)
            before = members(cs - 1)  # M_{t'-1}: what every token of the chunk takes its gradient at
            mats0 = matrices(before)
            for i in range(cs, ce):
                x = kk[:, :, i]
                z0 = first_layer(x, before)
                z0 = z0 if z0.requires_grad else z0.detach().requires_grad_()
                mats = [w if w.requires_grad else w.detach().requires_grad_() for w in mats0]
                pred, z = forward(x, z0, mats)
                if rule.loss == "l2":
                    loss = 0.5 * (pred - vv[:, :, i]).pow(2).sum(-1)
                else:
                    loss = -(pred * vv[:, :, i]).sum(-1)
                # δ_l = d loss / d z_l (B, H do not interact, so the sum separates them)
                delta = torch.autograd.grad(loss.sum(), z, create_graph=True)
                coef = -ll[:, :, i, None]
                keys[i], d0[i] = x, coef * delta[0]
                deep[i] = [(coef * delta[l], activation(rule.activation, z[l - 1])) for l in range(1, depth)]
            # the step bound: row t's view of the chunk's writes (the state's: the last row)
            factor: dict[int, Tensor] = {}
            for t in range(cs, ce):
                if rule.step_bound is not None:
                    mine = [i for i in members(t) if i >= cs]
                    factor[t] = step_factor(
                        rule,
                        scale,
                        [ll[:, :, i] for i in mine],
                        [keys[i] for i in mine],
                        [[deep[i][l][1] for i in mine] for l in range(depth - 1)],
                    )
                if t >= pend:
                    idx = members(t)
                    f = {i: factor[t] for i in idx if i >= cs} if factor else None
                    y, _ = forward(q[:, :, t - pend], first_layer(q[:, :, t - pend], idx, f), matrices(idx, f))
                    ys.append(y)
            if factor and ce - cs == b:  # a finished chunk: its writes as the state holds them
                end = factor[ce - 1][..., None]
                for i in range(cs, ce):
                    d0[i] = d0[i] * end
                    deep[i] = [(d * end, a) for d, a in deep[i]]
    y = torch.stack(ys, 2)
    if not grad_mode:
        y = y.detach()
    if not output_final_state:
        return y, None

    # the state at the start of the unfinished chunk: its tokens are kept raw, to be replayed
    p = (st.seen + q.shape[2]) % b
    done = n - p
    stored = members(done - 1)
    evict = stored if window is not None else []
    deep_w = matrices(stored)
    empty = [(s[:, :, :0], a[:, :, :0]) for s, a in zip(st.evict_signals, st.evict_inputs)]

    def stack(items: list[Tensor], like: Tensor) -> Tensor:
        return torch.stack(items, 2) if items else like

    final = KernelState(
        keys=stack([keys[i] for i in stored], st.keys[:, :, :0]),
        signals=stack([d0[i] for i in stored], st.signals[:, :, :0]),
        weights=tuple(deep_w),
        evict_signals=tuple(stack([deep[i][l][0] for i in evict], empty[l][0]) for l in range(depth - 1)),
        evict_inputs=tuple(stack([deep[i][l][1] for i in evict], empty[l][1]) for l in range(depth - 1)),
        window_values=vv[:, :, :0],
        pending_k=kk[:, :, done:],
        pending_v=vv[:, :, done:],
        pending_lr=ll[:, :, done:],
        seen=st.seen + q.shape[2],
        rule=rule,
    )
    return y, (final if grad_mode else final.detach())


def omega_reference(
    q: Tensor, k: Tensor, v: Tensor, lr: Tensor, scale: Tensor, st: KernelState, output_final_state: bool
) -> tuple[Tensor, KernelState | None]:
    """The step loop of ``window_rule="omega"`` with a window (ATLAS eq. 27–28), heads first and
    validated (see ``deepmemory.ops.kernel_memory``): ``q, k [B, H, T, dk]``, ``v [B, H, T, dv]``,
    ``lr [B, H, T]``, ``scale [H]``, the state to start from -> ``y [B, H, T, dv]`` and, if asked,
    the final state (the chunked form's :class:`KernelState`)::

        for each chunk t' .. t'+b-1:  M' = M_{t'-1}
            for t in the chunk:       M_t = M_{t-1} - lr_t Σ_{i=t-c+1}^{t} ∇ loss_i(M')
                                      y_t = M_t(q_t)

    The gradients at ``M'`` of the chunk's window tokens are taken in one autograd call (each
    token's loss depends on no other token's forward pass, so the gradient of their sum is each
    one's own).
    """
    rule = st.rule
    grad_mode = torch.is_grad_enabled()
    c, b = rule.window, rule.chunk_size
    assert c is not None  # the omega rule has a window
    sc = scale[None, :, None]  # [1, H, 1]
    pend = st.pending
    kk = torch.cat([st.pending_k, k], 2)
    vv = torch.cat([st.pending_v, v], 2)
    ll = torch.cat([st.pending_lr, lr], 2)
    n = kk.shape[2]

    # positions count from the start of the unfinished chunk; the stored tokens sit before it
    n_s, r = st.keys.shape[2], st.window_values.shape[2]
    keys: dict[int, Tensor] = {i - n_s: x for i, x in enumerate(st.keys.unbind(2))}
    d0: dict[int, Tensor] = {i - n_s: x for i, x in enumerate(st.signals.unbind(2))}
    values: dict[int, Tensor] = {i - r: x for i, x in enumerate(st.window_values.unbind(2))}
    mats = list(st.weights)

    def first_layer(x: Tensor, signals: dict[int, Tensor]) -> Tensor:
        """W_0 φ*(x) = Σ_i D_{0,i} exp(scale k_i·x) over the keys of ``signals`` (normalised: / Σ_i
        exp(...)): ``x [B, H, m, dk]`` -> ``[B, H, m, w0]``."""
        idx = sorted(signals)
        if not idx:  # W_0 = 0
            return x.new_zeros(*x.shape[:-1], st.signals.shape[-1])
        s = sc[..., None] * torch.einsum("bhmd,bhnd->bhmn", x, torch.stack([keys[i] for i in idx], 2))
        w = torch.softmax(s, -1) if rule.normalized else torch.exp(s)
        return torch.einsum("bhmn,bhnr->bhmr", w, torch.stack([signals[i] for i in idx], 2))

    def forward(x: Tensor, z0: Tensor, ws: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
        """M(x) from W_0 φ*(x) = z0, and the outputs z_l of every matrix (``x [B, H, m, dk]``)."""
        z = [z0]
        for w in ws:
            z.append(torch.einsum("bhrc,bhmc->bhmr", w, activation(rule.activation, z[-1])))
        return (z[-1] + x if rule.residual else z[-1]), z

    def gradients(idx: list[int], signals: dict[int, Tensor], ws: list[Tensor]):
        """-∇ loss_i at the memory (signals, ws) for each token i of ``idx``: the first layer's
        -δ_0 (the gradient of W_0 is δ_0 φ*(k_i)^T) and, per deeper matrix, (-δ_l, a_l) (the
        gradient of W_l is δ_l a_l^T); each ``[B, H, len(idx), ·]``."""
        x, val = torch.stack([keys[i] for i in idx], 2), torch.stack([values[i] for i in idx], 2)
        z0 = first_layer(x, signals)
        z0 = z0 if z0.requires_grad else z0.detach().requires_grad_()
        ws = [w if w.requires_grad else w.detach().requires_grad_() for w in ws]
        pred, z = forward(x, z0, ws)
        loss = 0.5 * (pred - val).pow(2).sum(-1) if rule.loss == "l2" else -(pred * val).sum(-1)
        delta = torch.autograd.grad(loss.sum(), z, create_graph=True)
        return -delta[0], [(-delta[l], activation(rule.activation, z[l - 1])) for l in range(1, rule.depth)]

    def state_now(upto: int) -> KernelState:
        """The memory as it is now, which holds the tokens before ``upto``."""
        idx = sorted(i for i in keys if i < upto)
        held = idx[len(idx) - min(c - 1, len(idx)) :]
        return KernelState(
            keys=torch.stack([keys[i] for i in idx], 2) if idx else st.keys[:, :, :0],
            signals=torch.stack([d0[i] for i in idx], 2) if idx else st.signals[:, :, :0],
            weights=tuple(mats),
            evict_signals=st.evict_signals,
            evict_inputs=st.evict_inputs,
            window_values=torch.stack([values[i] for i in held], 2) if held else vv[:, :, :0],
            pending_k=kk[:, :, upto:],
            pending_v=vv[:, :, upto:],
            pending_lr=ll[:, :, upto:],
            seen=st.seen + q.shape[2],
            rule=rule,
        )

    def bounded_steps(cs: int, ce: int, window: list[int], frozen: dict[int, Tensor], start: list[Tensor], g0, deep):
        """The chunk's steps under ``rule.step_bound``: row ``t`` reads the chunk-start memory plus
        the chunk's steps so far, ``Σ_i C(t, i) (-∇ loss_i)``, times its factor; the memory after
        the chunk is its last row's. Fills ``d0`` and ``ys``; returns the deeper matrices."""
        coef = [kk.new_zeros(*kk.shape[:2]) for _ in window]  # C(t, i): the rates applied so far
        mats = start
        for t in range(cs, ce):
            for j, i in enumerate(window):
                if t - c < i <= t:
                    coef[j] = coef[j] + ll[:, :, t]
            applied = [j for j, i in enumerate(window) if i <= t]
            f = step_factor(
                rule,
                scale,
                [coef[j] for j in applied],
                [keys[window[j]] for j in applied],
                [[a[:, :, j] for j in applied] for _, a in deep],
            )
            for j in applied:
                held = frozen.get(window[j], torch.zeros_like(g0[:, :, j]))
                d0[window[j]] = held + (f * coef[j])[..., None] * g0[:, :, j]
            weight = f[..., None] * torch.stack([coef[j] for j in applied], -1)  # [B, H, n]
            mats = [
                w + torch.einsum("bhn,bhnr,bhnc->bhrc", weight, g[:, :, applied], a[:, :, applied])
                for w, (g, a) in zip(start, deep)
            ]
            if t >= pend:
                x = q[:, :, t - pend, None]
                ys.append(forward(x, first_layer(x, d0), mats)[0][:, :, 0])
        return mats

    done = n - (st.seen + q.shape[2]) % b  # the start of the unfinished chunk (n when none)
    final = None
    ys = []
    with torch.enable_grad():
        for cs in range(0, n, b):
            if cs == done and output_final_state:
                final = state_now(cs)
            ce = min(cs + b, n)
            frozen = dict(d0)  # W_0 of M_{t'-1}; its deeper matrices are ``mats`` now
            for t in range(cs, ce):
                keys[t], values[t] = kk[:, :, t], vv[:, :, t]
            window = list(range(max(cs - c + 1, -n_s), ce))  # every token of some I_t of the chunk
            g0, deep = gradients(window, frozen, mats)
            if rule.step_bound is not None:
                mats = bounded_steps(cs, ce, window, frozen, mats, g0, deep)
                continue
            for t in range(cs, ce):
                d0[t] = kk.new_zeros(*kk.shape[:2], st.signals.shape[-1])
                rate = ll[:, :, t, None]
                members = [j for j, i in enumerate(window) if t - c < i <= t]  # I_t
                for j in members:
                    d0[window[j]] = d0[window[j]] + rate * g0[:, :, j]
                mats = [
                    w + rate[..., None] * torch.einsum("bhnr,bhnc->bhrc", g[:, :, members], a[:, :, members])
                    for w, (g, a) in zip(mats, deep)
                ]
                if t >= pend:
                    x = q[:, :, t - pend, None]
                    ys.append(forward(x, first_layer(x, d0), mats)[0][:, :, 0])
    if output_final_state and final is None:
        final = state_now(n)
    y = torch.stack(ys, 2)
    if not grad_mode:
        y = y.detach()
        final = final.detach() if final is not None else None
    return y, final
