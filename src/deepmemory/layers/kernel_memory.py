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
(``W_1 … W_{L-1}``, learned initial values) follow the same rule; they are materialised at chunk
starts and, inside a chunk, read in dual form (TTT's, as in the op):
``W_l(t) a = W_l(t'-1) a + Σ_i sign(t, i) D_{l,i} (a_{l,i}·a)`` with ``+1`` for the chunk's tokens in
``I_t`` and ``-1`` for the earlier tokens that have left ``I_t`` by ``t``.

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

Cost: the first layer reads the stored tokens, O(T^2) like attention (O(T·c) with a window). The
state is what attention's cache is (per token a key and a first-layer signal, its "value") plus the
deeper matrices; with a window, also each stored token's deeper signals and inputs, to retire them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from ..ops import ACTIVATIONS, LOSSES
from ..ops.memory import activation as act_fn
from ..ops.memory import activation_backward
from ..checks import check_bool, check_choice, check_int
from ..tree import State
from .memory_layer import ConvStates, QKVMixer


@dataclass
class KernelCache(State):
    """What continues a sequence exactly, as of the start of the unfinished chunk (whose gradients
    are all taken there, so its raw inputs are kept and replayed).

    - ``keys [B, H, n, dk]``, ``signals [B, H, n, w0]``: the first layer's stored tokens (the last
      ``window`` ones, all of them for ``window=None``).
    - ``weights``: the deeper matrices ``W_l [B, H, rows, cols]`` (l = 1 .. depth-1) at that point.
    - ``evict_signals`` / ``evict_inputs``: per deeper matrix, ``D_{l,i} [B, H, n_e, rows]`` and
      ``a_{l,i} [B, H, n_e, cols]`` of the tokens still in the window (their contribution is
      subtracted when they leave it; ``n_e = 0`` for ``window=None``).
    - ``pending_k [B, H, p, dk]``, ``pending_v [B, H, p, dv]``, ``pending_lr [B, H, p]``: the
      unfinished chunk; ``seen``: tokens read so far; ``config``: the settings it was made with.
    """

    keys: Tensor
    signals: Tensor
    weights: Tuple[Tensor, ...]
    evict_signals: Tuple[Tensor, ...]
    evict_inputs: Tuple[Tensor, ...]
    pending_k: Tensor
    pending_v: Tensor
    pending_lr: Tensor
    seen: int
    config: Tuple = ()



def _kernel_read(x: Tensor, keys: Tensor, d0: Tensor, scale: Tensor, mask: Optional[Tensor], normalized: bool) -> Tensor:
    """``Σ_i D_i exp(scale k_i·x)`` (divided by ``Σ_i exp(scale k_i·x)`` when ``normalized``) over
    the stored tokens ``mask [m, n]`` allows (None: all)."""
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


def _read(x, keys, d0, mask, weights, dual, scale, cfg):
    """``M(x)`` and its pre-activations ``z_l``. The deeper matrices are ``weights`` plus, in dual
    form, ``Σ_i sign[t, i] D_{l,i} a_{l,i}^T`` for ``dual = (sign [m, n], signals, inputs)``."""
    depth, act, residual, normalized = cfg
    z = [_kernel_read(x, keys, d0, scale, mask, normalized)]
    for l in range(1, depth):
        a = act_fn(act, z[-1])
        out = a @ weights[l - 1].transpose(-1, -2)
        if dual is not None:
            sign, sig, inp = dual
            out = out + ((a @ inp[l - 1].transpose(-1, -2)) * sign) @ sig[l - 1]
        z.append(out)
    return (z[-1] + x if residual else z[-1]), z


def _write(k, v, lr, keys, d0, weights, scale, loss, cfg):
    """Signals ``D_l = -lr δ_l`` (first layer, then deeper) and inputs ``a_l`` of a chunk's tokens:
    one forward and a hand-written backward of its keys at the chunk-start memory (every stored
    token is in the window of the chunk start)."""
    depth, act = cfg[0], cfg[1]
    pred, z = _read(k, keys, d0, None, weights, None, scale, cfg)
    delta = pred - v if loss == "l2" else -v
    coef = -lr.unsqueeze(-1)
    signals, inputs = [], []
    for l in reversed(range(1, depth)):
        signals.insert(0, coef * delta)
        inputs.insert(0, act_fn(act, z[l - 1]))
        delta = activation_backward(act, delta @ weights[l - 1], z[l - 1])
    return coef * delta, signals, inputs


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
    ``y [B, H, T, dv]`` and, if asked, the cache that continues the sequence exactly.

    Per chunk, the deeper matrices are materialised at its start; a query at ``t`` adds the
    chunk's tokens up to ``t`` and subtracts the stored tokens that left the window by ``t``."""
    bsz, nh, seq, dk = q.shape
    dv = v.shape[-1]
    config = (depth, activation, residual, loss, window, normalized, chunk_size)
    names = [f"w{l}" for l in range(1, depth)]
    if initial_state is None:
        w0_width = weights[names[0]].shape[-1] if depth > 1 else dv
        st = KernelCache(
            keys=k.new_zeros(bsz, nh, 0, dk), signals=k.new_zeros(bsz, nh, 0, w0_width),
            weights=tuple(weights[n].expand(bsz, -1, -1, -1) for n in names),
            evict_signals=tuple(k.new_zeros(bsz, nh, 0, weights[n].shape[-2]) for n in names),
            evict_inputs=tuple(k.new_zeros(bsz, nh, 0, weights[n].shape[-1]) for n in names),
            pending_k=k[:, :, :0], pending_v=v[:, :, :0], pending_lr=lr[:, :, :0], seen=0, config=config,
        )
    else:
        st = initial_state
        if not isinstance(st, KernelCache):
            raise TypeError(f"initial_state must be a KernelCache; got {type(st).__name__}")
        if st.config != config:
            raise ValueError(f"initial_state was made with settings {st.config}, not {config}")
    sc = scale.reshape(1, nh, 1, 1)
    cfg = (depth, activation, residual, normalized)
    pend = st.pending_k.shape[2]
    kk = torch.cat([st.pending_k, k], 2)
    vv = torch.cat([st.pending_v, v], 2)
    ll = torch.cat([st.pending_lr, lr], 2)
    qq = torch.cat([q.new_zeros(bsz, nh, pend, dk), q], 2)
    keys, d0, mats = st.keys, st.signals, list(st.weights)
    ev_sig, ev_inp = list(st.evict_signals), list(st.evict_inputs)
    n, b = kk.shape[2], chunk_size
    outs = []
    for s in range(0, n, b):
        e = min(s + b, n)
        new_d0, new_sig, new_inp = _write(kk[:, :, s:e], vv[:, :, s:e], ll[:, :, s:e], keys, d0, mats, sc, loss, cfg)
        all_keys, all_d0 = torch.cat([keys, kk[:, :, s:e]], 2), torch.cat([d0, new_d0], 2)
        all_sig = [torch.cat(p, 2) for p in zip(ev_sig, new_sig)]
        all_inp = [torch.cat(p, 2) for p in zip(ev_inp, new_inp)]
        # stored tokens sit at s-n0 .. s-1, the chunk at s .. e-1; query t sees i in (t-c, t]
        pos_t = torch.arange(s, e, device=q.device)[:, None]
        pos_i = torch.arange(s - keys.shape[2], e, device=q.device)
        mask = pos_i <= pos_t
        if window is not None:
            mask = mask & (pos_i > pos_t - window)
        # deeper matrices: + the chunk's tokens in t's window, - the stored ones gone from it by t
        n_e = ev_sig[0].shape[2] if ev_sig else 0
        if window is None:
            gone = mask.new_zeros(e - s, n_e)
        else:
            gone = torch.arange(s - n_e, s, device=q.device) <= pos_t - window
        sign = torch.cat([-gone.to(q.dtype), mask[:, keys.shape[2] :].to(q.dtype)], 1)
        if e > pend:
            lo = max(s, pend)
            y, _ = _read(qq[:, :, lo:e], all_keys, all_d0, mask[lo - s :], mats, (sign[lo - s :], all_sig, all_inp), sc, cfg)
            outs.append(y)
        if e - s < b:  # unfinished chunk: its raw inputs are kept instead
            break
        mats = [w + torch.einsum("bhi,bhir,bhic->bhrc", sign[-1].expand(bsz, nh, -1), d, a)
                for w, d, a in zip(mats, all_sig, all_inp)]
        keep = all_keys.shape[2] if window is None else min(window, all_keys.shape[2])
        keys, d0 = all_keys[:, :, -keep:], all_d0[:, :, -keep:]
        keep_e = 0 if window is None else min(window, all_keys.shape[2])
        ev_sig = [t[:, :, t.shape[2] - keep_e :] for t in all_sig]
        ev_inp = [t[:, :, t.shape[2] - keep_e :] for t in all_inp]
    y = torch.cat(outs, 2)
    if not output_final_state:
        return y, None
    p = (st.seen + seq) % b
    return y, KernelCache(
        keys=keys, signals=d0, weights=tuple(mats), evict_signals=tuple(ev_sig), evict_inputs=tuple(ev_inp),
        pending_k=kk[:, :, n - p :], pending_v=vv[:, :, n - p :], pending_lr=ll[:, :, n - p :],
        seen=st.seen + seq, config=config,
    )


@dataclass
class KernelMemoryState(State):
    """The kernel memory's :class:`KernelCache` plus the q, k, v conv states."""

    cache: KernelCache
    conv: ConvStates



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
