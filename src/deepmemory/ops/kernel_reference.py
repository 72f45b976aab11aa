r"""The kernel-form memory token by token, straight from the equations. Slow; the ground truth.

Per batch element and head (``t'`` the start of ``t``'s chunk, ATLAS eq. 16; ``I_t`` the tokens of
the window at ``t``, ATLAS eq. 27; ``lr`` in the place of the paper's ``γ_i^{(t)}``)::

    M_t = M_init - Σ_{i ∈ I_t} lr_i ∇ loss_i(M_{t'(i)-1})     loss_i = -<M(k_i), v_i> (ATLAS eq. 25)
                                                              | 0.5||M(k_i) - v_i||^2 (ATLAS eq. 27)
    y_t = M_t(q_t)

for ``M(x) = [x +] W_{L-1} σ(… σ(W_0 φ*(x)))``. Every token's gradient is the outer product of the
backprop signal ``δ_{l,i}`` of each matrix's output with its input: ``φ*(k_i)`` for ``W_0``
(ATLAS eq. 22), ``a_{l,i}`` for ``W_l``. So the memory is kept as its tokens: per token ``i`` its key
and ``D_{l,i} = -lr_i δ_{l,i}`` (and ``a_{l,i}``); the deeper matrices are materialised for every
read, ``W_l = W_l^init + Σ_{i∈I} D_{l,i} a_{l,i}^T``, and ``W_0 φ*(x) = Σ_{i∈I} D_{0,i}
exp(scale k_i·x)`` (ATLAS eq. 23–24), divided by ``Σ_{i∈I} exp(scale k_i·x)`` when normalised
(ATLAS eq. 17). The signals ``δ`` come from autograd, one token at a time, so this shares nothing
with the chunked form but the activation functions.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor

from .kernel import KernelState
from .memory import activation


def kernel_reference(
    q: Tensor, k: Tensor, v: Tensor, lr: Tensor, scale: Tensor, st: KernelState, output_final_state: bool
) -> Tuple[Tensor, Optional[KernelState]]:
    """The token loop, heads first and validated (see ``deepmemory.ops.kernel_memory``):
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
    keys: Dict[int, Tensor] = {i - n_s: x for i, x in enumerate(st.keys.unbind(2))}
    d0: Dict[int, Tensor] = {i - n_s: x for i, x in enumerate(st.signals.unbind(2))}
    deep: Dict[int, List[Tuple[Tensor, Tensor]]] = {}
    base = list(st.weights)
    if window is not None and depth > 1:
        n_e = st.evict_signals[0].shape[2]
        for j in range(n_e):
            deep[j - n_e] = [(s[:, :, j], a[:, :, j]) for s, a in zip(st.evict_signals, st.evict_inputs)]
        # the state's matrices hold the stored tokens' contributions: keep them as tokens instead
        base = [w - torch.einsum("bhnr,bhnc->bhrc", s, a) for w, s, a in zip(base, st.evict_signals, st.evict_inputs)]

    def members(t: int) -> List[int]:
        """I_t: the stored tokens up to t that are in t's window."""
        return [i for i in sorted(keys) if i <= t and (window is None or i > t - window)]

    def first_layer(x: Tensor, idx: List[int]) -> Tensor:
        """W_0 φ*(x) = Σ_{i∈I} D_{0,i} exp(scale k_i·x) (normalised: divided by Σ_{i∈I} exp(...))."""
        if not idx:  # W_0 = 0
            return x.new_zeros(*x.shape[:-1], st.signals.shape[-1])
        s = sc * torch.einsum("bhd,bhnd->bhn", x, torch.stack([keys[i] for i in idx], 2))
        w = torch.softmax(s, -1) if rule.normalized else torch.exp(s)
        return torch.einsum("bhn,bhnr->bhr", w, torch.stack([d0[i] for i in idx], 2))

    def matrices(idx: List[int]) -> List[Tensor]:
        """W_l = W_l^init + Σ_{i∈I} D_{l,i} a_{l,i}^T, materialised."""
        mats = []
        for l, w in enumerate(base):
            held = [deep[i][l] for i in idx if i in deep]
            if held:
                w = w + torch.einsum("bhnr,bhnc->bhrc", torch.stack([d for d, _ in held], 2), torch.stack([a for _, a in held], 2))
            mats.append(w)
        return mats

    def forward(x: Tensor, z0: Tensor, mats: List[Tensor]) -> Tuple[Tensor, List[Tensor]]:
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
            for t in range(max(cs, pend), ce):
                idx = members(t)
                y, _ = forward(q[:, :, t - pend], first_layer(q[:, :, t - pend], idx), matrices(idx))
                ys.append(y)
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

    def stack(items: List[Tensor], like: Tensor) -> Tensor:
        return torch.stack(items, 2) if items else like

    final = KernelState(
        keys=stack([keys[i] for i in stored], st.keys[:, :, :0]),
        signals=stack([d0[i] for i in stored], st.signals[:, :, :0]),
        weights=tuple(deep_w),
        evict_signals=tuple(stack([deep[i][l][0] for i in evict], empty[l][0]) for l in range(depth - 1)),
        evict_inputs=tuple(stack([deep[i][l][1] for i in evict], empty[l][1]) for l in range(depth - 1)),
        pending_k=kk[:, :, done:], pending_v=vv[:, :, done:], pending_lr=ll[:, :, done:],
        seen=st.seen + q.shape[2], rule=rule,
    )
    return y, (final if grad_mode else final.detach())
