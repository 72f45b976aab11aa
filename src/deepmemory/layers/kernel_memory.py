r"""The DeepTransformer family in kernel form (ATLAS §4, eq. 22–31; SPEC §4).

A memory ``M(x) = x + W_{L-1} σ(… σ(W_0 φ*(x)))`` whose first matrix acts on the infinite feature map
of ``exp`` (``φ*(k)·φ*(x) = exp(k·x)``) can never be stored, but it never has to be: it starts at
``W_0 = 0`` and only ever grows by gradient outer products ``δ_i φ*(k_i)^T``, so

    W_0 φ*(x) = Σ_i D_i exp(τ k_i·x)           (D_i = -lr_i δ_i, the stored "value" of token i)

is an attention read over the stored keys. What the layer computes, per head (``t'`` the start of
``t``'s chunk, ``I_t = {t-c+1, …, t}`` the window, every token so far when ``window=None``)::

    M_t = M_init - Σ_{i ∈ I_t} lr_i ∇ loss_i(M_{t'(i)})     loss_i = -<M(k_i), v_i> | 0.5||M(k_i) - v_i||^2
    y_t = M_t(q_t)                                        (read after write)

i.e. gradient descent on the Omega objective ``Σ_{i∈I_t} loss_i`` where each token's gradient is
taken once, at the memory of its chunk start (``chunk_size=1``: the memory just before it, the
online rule of eq. 25/30), and leaves the memory when it leaves the window. The other matrices
(``W_1 … W_{L-1}``, learned initial values) are handled the same way, in dual form:
``W_l(t) a = W_l,init a + Σ_{i∈I_t} D_{l,i} (a_{l,i}·a)``, so no per-token weights are materialised.

Why this is the paper's family. With a linear memory (``depth=1``, no residual), the dot loss and
``lr = 1``: ``y_t = Σ_{i∈I_t} v_i exp(τ q_t·k_i)``, unnormalised causal attention (eq. 26) for
``window=None`` and sliding-window attention for ``window=c`` (eq. 18): DeepTransformer and SWDT
contain Transformers and SWA. With the l2 loss, ``chunk_size=1`` and ``window=None`` it is the
delta-rule Transformer of eq. 30–31 (Dot): ``M_t = M_{t-1} + lr_t (v_t - M_{t-1}φ*(k_t)) φ*(k_t)^T``.
For ``window=None`` the rule is exactly the op's (gd, Omega window 1, no decay) with ``φ*`` keys.
A finite window retires a token's whole contribution at once, which is what makes sliding-window
attention a special case; the paper's per-position weights ``γ_i^{(t)}`` reduce to ``lr_i`` here.

``normalized=True`` divides the implicit read by its own normaliser,
``Σ_{i∈I} D_i e^{s_i} / Σ_{i∈I} e^{s_i}`` (Nadaraya–Watson, eq. 17): the linear case becomes softmax
attention, and the exponentials stay bounded. Writes are unchanged; an empty token set reads 0.
``τ`` is a learned per-head temperature (q and k are unit vectors; init ``sqrt(head_dim)``).

Cost: every read looks at the stored tokens, O(T^2) like attention (O(T·c) with a window); the
state stores per token its key, its first-layer signal and, per deeper matrix, its signal and input.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Dict, List, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from ..ops import ACTIVATIONS, LOSSES
from ..ops.memory import activation as act_fn
from ..ops.memory import activation_grad
from .memory_layer import ConvStates, QKVMixer, check_bool, check_choice, check_int


@dataclass
class KernelCache:
    """The stored tokens: those of the window before the unfinished chunk, and the unfinished
    chunk's raw inputs (its gradients are taken at the chunk start, so they are replayed).

    ``keys [B, H, n, dk]``; ``signals``: per matrix ``D_l [B, H, n, rows_l]``; ``inputs``: per
    matrix after the first ``a_l [B, H, n, cols_l]``; ``pending_k [B, H, p, dk]``,
    ``pending_v [B, H, p, dv]``, ``pending_lr [B, H, p]``; ``seen``: tokens read so far.
    """

    keys: Tensor
    signals: Tuple[Tensor, ...]
    inputs: Tuple[Tensor, ...]
    pending_k: Tensor
    pending_v: Tensor
    pending_lr: Tensor
    seen: int

    def map(self, fn) -> "KernelCache":
        return replace(
            self, keys=fn(self.keys), signals=tuple(map(fn, self.signals)), inputs=tuple(map(fn, self.inputs)),
            pending_k=fn(self.pending_k), pending_v=fn(self.pending_v), pending_lr=fn(self.pending_lr),
        )

    def detach(self) -> "KernelCache":
        return self.map(torch.Tensor.detach)


def _kernel_read(x, keys, d0, scale, mask, normalized):
    """``Σ_i D_i exp(scale k_i·x)`` over the tokens ``mask`` allows (``[m, n]`` bool or None = all)."""
    if keys.shape[-2] == 0:  # nothing stored yet: W_0 = 0
        return x.new_zeros(*x.shape[:-1], d0.shape[-1])
    s = scale * (x @ keys.transpose(-1, -2))  # [B, H, m, n]
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    if normalized:
        m = s.amax(-1, keepdim=True).clamp_min(torch.finfo(s.dtype).min).detach()  # all masked -> finite
        w = torch.exp(s - m)
        den = w.sum(-1, keepdim=True)
        w = w / torch.where(den > 0, den, torch.ones_like(den))
    else:
        w = torch.exp(s)
    return w @ d0


def _read(x, cache_keys, signals, inputs, init, scale, mask, cfg):
    """Forward of ``M`` at the memory the stored tokens (restricted by ``mask``) define.
    Returns the output and the pre-activations ``z_l`` (for the backward)."""
    depth, act, residual, normalized = cfg
    z = [_kernel_read(x, cache_keys, signals[0], scale, mask, normalized)]
    for l in range(1, depth):
        a = act_fn(act, z[-1])
        g = a @ inputs[l - 1].transpose(-1, -2)
        if mask is not None:
            g = g * mask
        z.append(a @ init[l - 1].transpose(-1, -2) + g @ signals[l])
    out = z[-1] + x if residual else z[-1]
    return out, z


def _write(k, v, lr, keys, signals, inputs, init, scale, loss, cfg):
    """The chunk's stored signals ``D_l = -lr δ_l`` and inputs, from one forward and a hand-written
    backward of its keys at the chunk-start memory (all stored tokens are in its window)."""
    depth, act = cfg[0], cfg[1]
    pred, z = _read(k, keys, signals, inputs, init, scale, None, cfg)
    delta = pred - v if loss == "l2" else -v
    new_signals: List[Tensor] = [None] * depth
    new_inputs: List[Tensor] = [None] * (depth - 1)
    coef = -lr.unsqueeze(-1)
    for l in reversed(range(depth)):
        new_signals[l] = coef * delta
        if l == 0:
            break
        a = act_fn(act, z[l - 1])
        new_inputs[l - 1] = a
        # W_l^T δ at the chunk start: W_l,init^T δ + Σ_i a_{l,i} (D_{l,i}·δ)
        back = delta @ init[l - 1] + (delta @ signals[l].transpose(-1, -2)) @ inputs[l - 1]
        delta = back * activation_grad(act, z[l - 1])
    return new_signals, new_inputs


def kernel_memory(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    lr: Tensor,
    weights: Dict[str, Tensor],
    scale: Tensor,
    *,
    depth: int = 2,
    activation: str = "gelu",
    residual: bool = True,
    loss: str = "dot",
    window: Optional[int] = None,
    normalized: bool = True,
    chunk_size: int = 16,
    initial_state: Optional[KernelCache] = None,
    output_final_state: bool = False,
) -> Tuple[Tensor, Optional[KernelCache]]:
    """The kernel-form memory (module docstring), heads first: ``q, k [B, H, T, dk]``,
    ``v [B, H, T, dv]``, ``lr [B, H, T]``, ``scale [H]`` (the kernel is ``exp(scale k·x)``),
    ``weights {"w1" .. "w{depth-1}": [H, rows, cols]}`` the initial deeper matrices ->
    ``y [B, H, T, dv]`` and, if asked, the cache that continues the sequence exactly."""
    bsz, nh, seq, dk = q.shape
    dv = v.shape[-1]
    init = [weights[f"w{l}"].unsqueeze(0) for l in range(1, depth)]
    widths = [init[0].shape[-1] if depth > 1 else dv] + [w.shape[-2] for w in init]
    sc = scale.reshape(1, nh, 1, 1)
    cfg = (depth, activation, residual, normalized)
    if initial_state is None:
        st = KernelCache(
            keys=k.new_zeros(bsz, nh, 0, dk),
            signals=tuple(k.new_zeros(bsz, nh, 0, w) for w in widths),
            inputs=tuple(k.new_zeros(bsz, nh, 0, w.shape[-1]) for w in init),
            pending_k=k[:, :, :0], pending_v=v[:, :, :0], pending_lr=lr[:, :, :0], seen=0,
        )
    else:
        st = initial_state
    pend = st.pending_k.shape[2]
    kk = torch.cat([st.pending_k, k], 2)
    vv = torch.cat([st.pending_v, v], 2)
    ll = torch.cat([st.pending_lr, lr], 2)
    qq = torch.cat([q.new_zeros(bsz, nh, pend, dk), q], 2)
    keys, signals, inputs = st.keys, list(st.signals), list(st.inputs)
    n, b = kk.shape[2], chunk_size
    outs = []
    for s in range(0, n, b):
        e = min(s + b, n)
        new_s, new_i = _write(kk[:, :, s:e], vv[:, :, s:e], ll[:, :, s:e], keys, signals, inputs, init, sc, loss, cfg)
        all_keys = torch.cat([keys, kk[:, :, s:e]], 2)
        all_sig = [torch.cat(p, 2) for p in zip(signals, new_s)]
        all_inp = [torch.cat(p, 2) for p in zip(inputs, new_i)]
        # positions: stored tokens s-n0 .. s-1, then the chunk s .. e-1; query t sees i in (t-c, t]
        n0 = keys.shape[2]
        pos_i = torch.arange(s - n0, e, device=q.device)
        pos_t = torch.arange(s, e, device=q.device)[:, None]
        mask = pos_i <= pos_t
        if window is not None:
            mask = mask & (pos_i > pos_t - window)
        if e > pend:
            lo = max(s, pend)
            y, _ = _read(qq[:, :, lo:e], all_keys, all_sig, all_inp, init, sc, mask[lo - s :], cfg)
            outs.append(y)
        if e - s < b:  # unfinished chunk: keep its raw inputs, drop its signals
            break
        keep = all_keys.shape[2] if window is None else min(window, all_keys.shape[2])
        keys = all_keys[:, :, -keep:]
        signals = [t[:, :, -keep:] for t in all_sig]
        inputs = [t[:, :, -keep:] for t in all_inp]
    y = torch.cat(outs, 2)
    if not output_final_state:
        return y, None
    total = st.seen + seq
    p = total % b
    return y, KernelCache(
        keys=keys, signals=tuple(signals), inputs=tuple(inputs),
        pending_k=kk[:, :, n - p :], pending_v=vv[:, :, n - p :], pending_lr=ll[:, :, n - p :], seen=total,
    )


@dataclass
class KernelMemoryState:
    """The kernel memory's :class:`KernelCache` plus the q, k, v conv states."""

    cache: KernelCache
    conv: ConvStates

    def detach(self) -> "KernelMemoryState":
        return replace(self, cache=self.cache.detach(), conv=tuple(None if c is None else c.detach() for c in self.conv))


class KernelMemory(QKVMixer):
    r"""DeepTransformer (``window=None``, ``loss="dot"``), SWDT (``window=c``) and Dot
    (``loss="l2"``): a deep memory whose first layer is kept implicit (module docstring).

    Per head: ``q, k, v`` as in :class:`NeuralMemory` (unit q, k), ``lr = max_lr * sigmoid(x W_lr)``
    (bias 0: ``lr = max_lr / 2`` at ``x = 0``), ``y_t = M_t(q_t)`` with the kernel
    ``exp(τ k·x)``, output ``W_o(RMSNorm(y) * silu(x W_g))``. ``depth=1`` is the linear memory
    (attention when ``residual=False``). x ``[B, T, hidden_size]`` -> ``[B, T, hidden_size]``.

    Initialisation: ``W_0 = 0`` (so the memory starts as the identity, or zero without the
    residual); deeper matrices ``N(0, 1/cols)`` so that the first layer's gradient is not zero.
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        head_dim: int,
        *,
        window: Optional[int] = None,
        loss: str = "dot",
        depth: int = 2,
        expansion: int = 4,
        activation: str = "gelu",
        residual: bool = True,
        normalized: bool = True,
        chunk_size: int = 16,
        max_lr: float = 1.0,
        conv_size: int = 4,
    ):
        super().__init__(hidden_size, num_heads, head_dim, conv_size)
        if window is not None:
            check_int("window", window)
        check_choice("loss", loss, LOSSES)
        check_int("depth", depth)
        check_int("expansion", expansion)
        check_choice("activation", activation, ACTIVATIONS)
        check_bool("residual", residual)
        check_bool("normalized", normalized)
        check_int("chunk_size", chunk_size)
        if isinstance(max_lr, bool) or not isinstance(max_lr, (int, float)) or not max_lr > 0:
            raise ValueError(f"max_lr must be a positive number; got {max_lr!r}")
        self.window, self.loss, self.depth, self.activation = window, loss, depth, activation
        self.residual, self.normalized, self.chunk_size, self.max_lr = residual, normalized, chunk_size, float(max_lr)
        self.lr_proj = nn.Linear(hidden_size, num_heads)
        nn.init.normal_(self.lr_proj.weight, std=0.02)
        nn.init.zeros_(self.lr_proj.bias)
        self.log_temp = nn.Parameter(torch.full((num_heads,), 0.5 * math.log(head_dim)))
        hidden = expansion * head_dim
        self.memory_init = nn.ParameterDict()
        for l in range(1, depth):
            rows = head_dim if l == depth - 1 else hidden
            self.memory_init[f"w{l}"] = nn.Parameter(torch.randn(num_heads, rows, hidden) / math.sqrt(hidden))

    def forward(
        self, x: Tensor, state: Optional[KernelMemoryState] = None, return_state: bool = False
    ) -> Union[Tensor, Tuple[Tensor, KernelMemoryState]]:
        """``x [B, T, hidden_size]`` -> ``y [B, T, hidden_size]`` (and the state to continue from)."""
        self.check_input(x)
        if state is not None and not isinstance(state, KernelMemoryState):
            raise TypeError(f"state must be a KernelMemoryState; got {type(state).__name__}")
        q, k, v, conv = self.qkv(x, None if state is None else state.conv)
        lr = self.max_lr * torch.sigmoid(self.lr_proj(x))
        # low precisions compute in float32, like the op
        cd = torch.float64 if x.dtype == torch.float64 else torch.float32
        y, cache = kernel_memory(
            *(t.transpose(1, 2).to(cd) for t in (q, k, v, lr)),
            {n: w.to(cd) for n, w in self.memory_init.items()},
            self.log_temp.exp().to(cd),
            depth=self.depth, activation=self.activation, residual=self.residual, loss=self.loss,
            window=self.window, normalized=self.normalized, chunk_size=self.chunk_size,
            initial_state=None if state is None else state.cache, output_final_state=return_state,
        )
        out = self.output(x, y.transpose(1, 2).to(x.dtype))
        return (out, KernelMemoryState(cache, conv)) if return_state else out

    def extra_repr(self) -> str:
        return (
            f"window={self.window}, loss={self.loss}, depth={self.depth}, residual={self.residual}, "
            f"normalized={self.normalized}, chunk_size={self.chunk_size}"
        )
