r"""``kernel_memory``: the DeepTransformer family in kernel form (ATLAS §4, eq. 22–31).

A memory ``M(x) = x + W_{L-1} σ(… σ(W_0 φ*(x)))`` whose first matrix acts on the infinite feature
map of ``exp`` (ATLAS eq. 22–23: ``φ*(k)·φ*(x) = exp(k·x)``) can never be stored, but it never has
to be: it starts at ``W_0 = 0`` and only ever grows by gradient outer products ``δ_i φ*(k_i)^T``, so

    W_0 φ*(x) = Σ_i D_i exp(τ k_i·x)           (D_i: the summed -lr δ_i of key i, its stored "value")

is an attention read over the stored keys (ATLAS eq. 24). Per batch element and head (``t' = t -
mod(t, b)`` the start of ``t``'s chunk of ``b = chunk_size`` tokens, as in ATLAS eq. 16; ``I_t =
{t-c+1, …, t}`` the window of ``c = window`` tokens; ``loss_i = -<M(k_i), v_i>`` (dot) or ``0.5
||M(k_i) - v_i||^2`` (l2)), the op computes ``y_t = M_t(q_t)`` (read after write) for one of three
rules:

- ``window=None`` (DeepTransformer, ATLAS eq. 25): each token's gradient is taken once, at the
  memory just before its chunk, and kept::

      M_t = M_{t-1} - lr_t ∇ loss_t(M_{t'-1})

- ``window=c, window_rule="omega"`` (SWDT, Dot: the Omega rule, ATLAS eq. 27–28): at every step
  the window's ``c`` gradients are taken again at the memory before the step's chunk and applied
  again, with the step's learning rate in the place of ``γ_i^{(t)}`` (ATLAS eq. 15)::

      M_t = M_{t-1} - lr_t Σ_{i ∈ I_t} ∇ loss_i(M_{t'-1})

  A token stays in the memory after it leaves the window (its writes are never taken back); while
  in the window its gradient is applied once per step. ``window=1`` is ``window=None``.
- ``window=c, window_rule="swa"``: each token's gradient is taken once (``lr_i``, at its chunk's
  start) and its whole contribution leaves the memory when the token leaves the window::

      M_t = M_init - Σ_{i ∈ I_t} lr_i ∇ loss_i(M_{t'(i)-1})

  the deep form of sliding-window attention (ATLAS eq. 18), which it is for the linear memory.

With ``chunk_size=1`` every gradient is taken at the memory just before its step (the online
rules of ATLAS eq. 25, 27 and 30); a larger chunk takes the chunk's gradients at its start, which
changes the rule, not only its speed. Inside a chunk the omega rule gives token ``i``'s gradient
the coefficient ``C[t, i] = Σ_{s=t'}^{t} lr_s [i ∈ I_s]`` at step ``t`` (the Omega band of
``deepmemory.ops.coefficients`` summed over the chunk's steps). The other matrices (``W_1 …
W_{L-1}``, learned initial values) follow the same rule.

Special cases (tested):

- linear memory (``depth=1``, ``residual=False``), dot loss, ``lr = 1``, ``normalized=False``:
  ``y_t = Σ_{i≤t} v_i exp(τ q_t·k_i)``, unnormalised causal attention (ATLAS eq. 26) for
  ``window=None``; with ``normalized=True`` softmax attention (ATLAS eq. 1 / eq. 17) and, with
  ``window=c`` under ``"swa"``, sliding-window attention (ATLAS eq. 18). Under ``"omega"`` (ATLAS
  eq. 20 with ``φ*``) token ``i`` is weighted by the number of steps it has spent in the window,
  ``y_t = Σ_{i≤t} min(t - i + 1, c) v_i exp(τ q_t·k_i)``.
- l2 loss, ``chunk_size=1``, ``window=None`` (or ``window=1``), linear memory: the delta-rule
  Transformer of ATLAS eq. 30–31 (Dot, online case): ``M_t = M_{t-1} + lr_t (v_t - M_{t-1}φ*(k_t))
  φ*(k_t)^T``.
- ``window=None``, any depth: the main op's rule (``neural_memory`` with gd, Omega window 1, no
  decay) with ``φ*`` keys.

``normalized=True`` divides the implicit read by its own normaliser,
``Σ_{i∈S} D_i e^{s_i} / Σ_{i∈S} e^{s_i}`` over the keys ``S`` the memory holds (Nadaraya–Watson,
ATLAS eq. 17): every token so far, or the window's under ``"swa"``. The linear case becomes softmax
attention and the exponentials stay bounded; the paper's forms are unnormalised (``False``).
Writes are unchanged; an empty memory reads 0.

Two implementations, chosen by ``impl``: ``"chunk"`` (the fast form: per chunk, the deeper
matrices are materialised at its start and read in dual form inside it, ``W_l(t) a = W_l(t'-1) a +
Σ_i C[t, i] G_{l,i} (a_{l,i}·a)`` with ``G = -δ``; under ``"swa"`` ``C[t, i] = lr_i`` for the
chunk's tokens in ``I_t`` and ``-lr_i`` for earlier tokens that have left ``I_t`` by ``t``; under
``"omega"`` ``C`` above, over the chunk's tokens and the ``c - 1`` before it, whose gradients are
taken again at the chunk's start; gradients of the memory's own inner loss by a hand-written
backward) and ``"reference"`` (``deepmemory.ops.kernel_reference``: token by token, every matrix
materialised, every gradient from autograd). Both accept and return the same :class:`KernelState`.

Cost per layer and sequence (``T`` tokens, chunk ``b``, ``d`` the head width): ``window=None``,
O(T^2 d) like attention (the chunks' gradients and reads each visit every stored key); ``"swa"``,
O(T c d): the stored keys are the window's; ``"omega"``, O(T^2 d) too, about ``1 + (c-1)/(2b)``
times ``window=None``'s: nothing ever leaves the memory, so the reads visit every stored key as for
``window=None``, and every chunk takes ``b + c - 1`` gradients instead of ``b``. The state is what attention's cache
is (per
stored token a key and a first-layer signal, its "value": the window's under ``"swa"``, all so far
otherwise) plus the deeper matrices; under ``"swa"`` also each stored token's deeper signals and
inputs, to retire them; under ``"omega"`` the values of the last ``c - 1`` tokens, whose gradients
the next chunk takes again.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..checks import Settings, check_bool, check_choice, check_int, check_positive
from ..tree import State
from .coefficients import gram_step_scale, input_gram, nonfinite, poison_rows, zero_rows
from .inputs import check_sequence, check_weight_shapes, check_weights, compute_dtype, rule_mismatch
from .memory import ACTIVATIONS, LOSSES, activation_backward
from .memory import activation as act_fn
from .varlen import by_document, expand_weights, state_error

KERNEL_IMPLS = ("chunk", "reference")
WINDOW_RULES = ("omega", "swa")


@dataclass(frozen=True)
class KernelRule(Settings):
    """The settings of the kernel-form memory rule (all validated when the rule is made).

    Args:
        depth: matrices of the memory, the implicit first one included (int >= 1; 1 is the
            linear memory ``W_0 φ*(x)``, i.e. attention when ``residual=False``).
        activation: between the matrices: ``"gelu"``, ``"silu"``, ``"relu"`` or ``"tanh"``.
        residual: ``M(x) = x + h(x)`` (needs ``dk == dv``).
        loss: the inner loss: ``"dot"`` (``-<M(k), v>``, Hebbian: DeepTransformer, SWDT,
            ATLAS eq. 25) or ``"l2"`` (``0.5||M(k) - v||^2``: Dot, ATLAS eq. 27).
        window: the window ``c`` (int >= 1) of the rule, or None: every token's gradient taken
            once and kept (DeepTransformer, ATLAS eq. 25).
        window_rule: what a finite window does: ``"omega"`` (ATLAS eq. 27–28, SWDT and Dot: at
            every step the window's gradients are taken again at the memory before the step and
            applied again; a token's writes stay after it leaves the window) or ``"swa"`` (each
            gradient applied once and taken back when its token leaves the window: the deep form
            of sliding-window attention, ATLAS eq. 18; bounded state, O(T·c)). Without a window
            both read the same (``window=None`` is ``"omega"`` with ``window=1``).
        normalized: divide the first layer's read by its normaliser (softmax, ATLAS eq. 17)
            instead of the paper's unnormalised form (ATLAS eq. 26).
        chunk_size: tokens whose gradients are taken at the same memory (int >= 1; 1 is fully
            online). It changes the rule, not only its speed.
        step_bound: None (the papers' rule) or ``tau > 0``: the bound on a chunk's summed step of
            ``UpdateRule.step_bound``, for every matrix the implicit first one included. Row
            ``t`` of a chunk applies the chunk's gradients with weights ``C(t, i)`` (the summed
            learning rates of the steps up to ``t`` that apply token ``i``'s); for each matrix,
            ``H_t = Σ_i C(t, i) a_i a_i^T`` over its inputs ``a_i`` (``φ*(k_i)`` for the first:
            ``||φ*(k)||^2 = exp(scale |k|^2)``, ``cos^2(φ*(k_i), φ*(k_j)) = exp(-scale |k_i -
            k_j|^2)``; under ``normalized`` its inputs count as unit vectors, the read being a
            weighted mean of the signals). Where the largest ``||H_t||_F`` exceeds ``tau``, the
            chunk's learning rates as row ``t`` sees them, and as the state after the chunk sees
            them for its last row, are multiplied by ``tau / ||H_t||_F``. It keeps the exponential
            kernel's ``exp(scale)`` from multiplying every step, and a Hebbian (``"dot"``) deep
            memory, whose loss has no minimum, from growing without bound (docs/models/deep-transformer.md).

    Raises:
        TypeError / ValueError: a one-line message naming the first bad field.
    """

    depth: int = 2
    activation: str = "gelu"
    residual: bool = True
    loss: str = "dot"
    window: int | None = None
    window_rule: str = "omega"
    normalized: bool = True
    chunk_size: int = 16
    step_bound: float | None = None

    def omega(self) -> bool:
        """Whether the rule takes a finite window's gradients again at every step (``window``
        set and ``window_rule="omega"``, ATLAS eq. 27)."""
        return self.window is not None and self.window_rule == "omega"

    def names(self) -> tuple[str, ...]:
        """The explicit (deeper) matrices, ``w1 .. w{depth-1}`` (none for ``depth=1``)."""
        return tuple(f"w{l}" for l in range(1, self.depth))

    def shapes(self, dv: int, hidden: int) -> dict[str, tuple[int, int]]:
        """``(rows, cols)`` of each deeper matrix: ``w1 .. w{depth-2}`` are ``[hidden, hidden]``,
        ``w{depth-1}`` is ``[dv, hidden]`` (the implicit ``W_0`` maps ``φ*(x)`` to ``hidden``)."""
        return {n: (dv if l == self.depth - 1 else hidden, hidden) for l, n in enumerate(self.names(), 1)}


KernelRule.FIELD_CHECKS = {
    "depth": check_int,
    "activation": lambda label, v: check_choice(label, v, ACTIVATIONS),
    "residual": check_bool,
    "loss": lambda label, v: check_choice(label, v, LOSSES),
    "window": lambda label, v: None if v is None else check_int(label, v),
    "window_rule": lambda label, v: check_choice(label, v, WINDOW_RULES),
    "normalized": check_bool,
    "chunk_size": check_int,
    "step_bound": lambda label, v: None if v is None else check_positive(label, v),
}
KERNEL_FIELDS = KernelRule.field_names()
assert tuple(KernelRule.FIELD_CHECKS) == KERNEL_FIELDS


@dataclass
class KernelState(State):
    """What continues a sequence exactly, as of the start of the unfinished chunk (whose gradients
    are all taken there, so its raw inputs are kept and replayed). Heads first, in the compute
    dtype (float32 under lower precisions).

    - ``keys [B, H, n, dk]``, ``signals [B, H, n, w0]``: the first layer's stored tokens (the last
      ``window`` ones under ``window_rule="swa"``, all of them otherwise) and their summed
      signals ``D_{0,i}``.
    - ``weights``: the deeper matrices ``W_l [B, H, rows, cols]`` (l = 1 .. depth-1) at that point.
    - ``evict_signals`` / ``evict_inputs``: per deeper matrix, ``D_{l,i} [B, H, n_e, rows]`` and
      ``a_{l,i} [B, H, n_e, cols]`` of the tokens still in the window (their contribution is
      subtracted when they leave it; ``n_e = 0`` unless ``window_rule="swa"`` with a window).
    - ``window_values [B, H, r, dv]``: the values of the last ``r = min(window - 1, n)`` stored
      tokens, whose gradients the next chunk takes again (``r = 0`` unless ``window_rule="omega"``
      with a window; their keys are the last ``r`` of ``keys``).
    - ``pending_k [B, H, p, dk]``, ``pending_v [B, H, p, dv]``, ``pending_lr [B, H, p]``: the
      unfinished chunk (``p = seen % chunk_size``); ``seen``: tokens read so far; ``rule``: the
      :class:`KernelRule` it was made with (a state continues only the same rule).
    """

    keys: Tensor
    signals: Tensor
    weights: tuple[Tensor, ...]
    evict_signals: tuple[Tensor, ...]
    evict_inputs: tuple[Tensor, ...]
    window_values: Tensor
    pending_k: Tensor
    pending_v: Tensor
    pending_lr: Tensor
    seen: int
    rule: KernelRule

    @property
    def pending(self) -> int:
        """Tokens of the unfinished chunk."""
        return self.pending_k.shape[2]


# ---------------------------------------------------------------------------------------------
# validation


def _check_weights(weights, rule: KernelRule, bsz: int, nh: int, dv: int, q: Tensor) -> dict[str, Tensor]:
    check_weights(weights, rule.names(), f"depth={rule.depth}", bsz, nh, q)
    hidden = weights["w1"].shape[-1] if rule.depth > 1 else dv
    check_weight_shapes(weights, rule.shapes(dv, hidden), f"dv={dv}, hidden={hidden}")
    return weights


def _check_state(st, rule: KernelRule, shapes: dict[str, tuple[int | None, ...]], q: Tensor) -> None:
    """``st`` a :class:`KernelState` of the same rule whose tensors fit ``shapes`` (None = any)."""
    if not isinstance(st, KernelState):
        raise TypeError(f"initial_state must be a KernelState (the op's final_state); got {type(st).__name__}")
    if st.rule != rule:
        raise ValueError(rule_mismatch(st.rule, rule))
    if st.keys.device != q.device:
        raise ValueError(f"initial_state is on {st.keys.device} but q is on {q.device}")
    n_w = len(rule.names())
    for name in ("weights", "evict_signals", "evict_inputs"):
        if not isinstance(getattr(st, name), tuple) or len(getattr(st, name)) != n_w:
            raise ValueError(f"initial_state.{name} must be a tuple of {n_w} tensors for depth={rule.depth}")
    for name, want in shapes.items():
        field, _, idx = name.partition("[")
        t = getattr(st, field)[int(idx[:-1])] if idx else getattr(st, field)
        got = tuple(t.shape)
        if len(got) != len(want) or any(w is not None and g != w for g, w in zip(got, want)):
            shown = ", ".join("n" if w is None else str(w) for w in want)
            raise ValueError(f"initial_state.{name} has shape {list(got)}; expected [{shown}] (n = any)")
    want_r = min(rule.window - 1, st.keys.shape[2]) if rule.window is not None and rule.omega() else 0
    if st.window_values.shape[2] != want_r:
        raise ValueError(
            f"initial_state holds {st.window_values.shape[2]} window values but {st.keys.shape[2]} stored keys; "
            f"expected {want_r} for window={rule.window}, window_rule={rule.window_rule!r}"
        )
    if st.pending != st.seen % rule.chunk_size:
        raise ValueError(
            f"initial_state holds {st.pending} pending tokens but seen={st.seen} with chunk_size={rule.chunk_size}"
        )


# ---------------------------------------------------------------------------------------------
# the fast (chunk) form


def _kernel_weights(x: Tensor, keys: Tensor, scale: Tensor, mask: Tensor | None, normalized: bool) -> Tensor:
    """The first layer's read weights ``exp(scale k_i·x)`` (divided by their sum over the row when
    ``normalized``) of the stored tokens ``mask [m, n]`` allows (None: all), exact zeros elsewhere:
    ``x [B, H, m, dk]``, ``keys [B, H, n, dk]`` (n >= 1) -> ``[B, H, m, n]``."""
    s = scale * (x @ keys.transpose(-1, -2))  # [B, H, m, n]
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    if not normalized:
        return torch.exp(s)
    m = s.amax(-1, keepdim=True).clamp_min(torch.finfo(s.dtype).min).detach()  # all masked -> finite
    w = torch.exp(s - m)
    den = w.sum(-1, keepdim=True)
    return w / torch.where(den > 0, den, torch.ones_like(den))


def _kernel_read(x: Tensor, keys: Tensor, d0: Tensor, scale: Tensor, mask: Tensor | None, normalized: bool) -> Tensor:
    """``W_0 φ*(x) = Σ_i D_i exp(scale k_i·x)`` (divided by ``Σ_i exp(scale k_i·x)`` when
    ``normalized``) over the stored tokens ``mask [m, n]`` allows (None: all)."""
    if keys.shape[-2] == 0:  # nothing stored yet: W_0 = 0
        return x.new_zeros(*x.shape[:-1], d0.shape[-1])
    return _kernel_weights(x, keys, scale, mask, normalized) @ d0


def _read(x, z0, weights, dual, rule: KernelRule):
    """``M(x)`` and its pre-activations ``z_l`` from the first layer's output ``z0 = W_0 φ*(x)``.
    The deeper matrices are ``weights`` plus, in dual form, ``Σ_i coef[t, i] G_{l,i} a_{l,i}^T``
    for ``dual = (select [m, n], coef ([B, H,] m, n), signals G, inputs a)``; the terms ``select``
    leaves out are left out by selection (a NaN input there stays out)."""
    z = [z0]
    for l in range(1, rule.depth):
        a = act_fn(rule.activation, z[-1])
        out = a @ weights[l - 1].transpose(-1, -2)
        if dual is not None:
            select, coef, sig, inp = dual
            out = out + torch.where(select, (a @ inp[l - 1].transpose(-1, -2)) * coef, 0.0) @ sig[l - 1]
        z.append(out)
    return (z[-1] + x if rule.residual else z[-1]), z


def _gradient(k, v, keys, d0, weights, scale, rule: KernelRule):
    """The negative gradient signals ``G_l = -δ_l`` (first layer, then deeper) and inputs ``a_l`` of
    tokens ``(k, v)`` at the memory held by ``keys, d0, weights`` (every stored token read): one
    forward and a hand-written backward of ``loss_i``."""
    pred, z = _read(k, _kernel_read(k, keys, d0, scale, None, rule.normalized), weights, None, rule)
    delta = pred - v if rule.loss == "l2" else -v
    signals: list[Tensor] = []
    inputs: list[Tensor] = []
    for l in reversed(range(1, rule.depth)):
        signals.insert(0, -delta)
        inputs.insert(0, act_fn(rule.activation, z[l - 1]))
        delta = activation_backward(rule.activation, delta @ weights[l - 1], z[l - 1])
    return -delta, signals, inputs


def _write(k, v, lr, keys, d0, weights, scale, rule: KernelRule):
    """Signals ``D_l = -lr δ_l`` (first layer, then deeper) and inputs ``a_l`` of a chunk's tokens
    at the chunk-start memory (under ``"swa"`` every stored token is in the window of the chunk
    start)."""
    g0, signals, inputs = _gradient(k, v, keys, d0, weights, scale, rule)
    coef = lr.unsqueeze(-1)
    return coef * g0, [coef * g for g in signals], inputs


def _step_scale(
    coef: Tensor, keys: Tensor, inputs: list[Tensor], bad: Tensor, scale: Tensor, rule: KernelRule
) -> Tensor:
    """``rule.step_bound``'s factor ``[B, H, m]`` on the rows of ``coef [B, H, m, n]``, the weights of
    the gradients of ``n`` tokens with keys ``keys [B, H, n, dk]`` and deeper inputs ``inputs``
    (:func:`~.coefficients.gram_step_scale`; the first matrix's inputs are ``φ*(k_i)``: ``||φ*(k)||^2
    = exp(scale |k|^2)``, 1 under a normalised read, and ``cos^2(φ*(k_i), φ*(k_j)) = exp(2 scale
    k_i·k_j - scale |k_i|^2 - scale |k_j|^2) = exp(-scale |k_i - k_j|^2)``). The tokens flagged in
    ``bad [B, H, n]`` count as nothing (the rows that see them are poisoned anyway), so that their
    values reach no other row."""
    assert rule.step_bound is not None
    keys = zero_rows(bad, keys)
    sq = keys.pow(2).sum(-1)
    cos2 = torch.exp((scale * (2 * keys @ keys.transpose(-1, -2) - sq.unsqueeze(-1) - sq.unsqueeze(-2))).clamp_max(0))
    norm2 = torch.ones_like(sq) if rule.normalized else torch.exp(scale[..., 0] * sq)
    grams = [(torch.where(bad, 0.0, norm2), cos2)] + [input_gram(zero_rows(bad, a)) for a in inputs]
    return gram_step_scale(grams, coef, rule.step_bound)


def _sees(visible: Tensor, bad: Tensor) -> Tensor:
    """Whether each query row sees a marked token: ``visible [m, n]``, ``bad [B, H, n]`` -> ``[B, H, m]``
    (a product of counts, so nothing of size ``B H m n`` is made)."""
    return (bad.to(visible.device, torch.float32) @ visible.transpose(0, 1).to(torch.float32)) > 0


def kernel_chunk(
    q: Tensor, k: Tensor, v: Tensor, lr: Tensor, scale: Tensor, st: KernelState, output_final_state: bool
) -> tuple[Tensor, KernelState | None]:
    """The fast form, heads first and validated (see :func:`kernel_memory`): ``q, k [B, H, T, dk]``,
    ``v [B, H, T, dv]``, ``lr [B, H, T]``, ``scale [H]``, the state to start from ->
    ``y [B, H, T, dv]`` and the final state.

    Per chunk, the deeper matrices are materialised at its start; a query at ``t`` adds the
    chunk's tokens up to ``t`` and subtracts the stored tokens that left the window by ``t``.

    Causality for any input: a query meets the stored tokens it must not see only through exact
    zeros, and ``0 * NaN`` is NaN. So the reads take the signals ``D_i`` of a token whose signal is
    not finite (a non-finite or overflowing ``k``, ``v`` or ``lr``) as zeros, the masked terms are
    selected (``masked_fill``, ``torch.where``) rather than multiplied, and the rows that see such a
    token are set to NaN by selection. The stored first-layer signals are kept zeroed, with a flag
    per token, so that each chunk checks only its own (the state gets NaN rows back for the
    flagged tokens); the deeper matrices, which gather every token of a chunk, turn NaN as in the
    reference."""
    rule = st.rule
    window = rule.window
    bsz, nh, seq, dk = q.shape
    sc = scale.reshape(1, nh, 1, 1)
    pend = st.pending_k.shape[2]
    kk = torch.cat([st.pending_k, k], 2)
    vv = torch.cat([st.pending_v, v], 2)
    ll = torch.cat([st.pending_lr, lr], 2)
    qq = torch.cat([q.new_zeros(bsz, nh, pend, dk), q], 2)
    bad0 = nonfinite(st.signals, 1)  # [B, H, n]: stored tokens whose signal must not enter a product
    keys, d0, mats = st.keys, zero_rows(bad0, st.signals), list(st.weights)
    ev_sig, ev_inp = list(st.evict_signals), list(st.evict_inputs)
    n, b = kk.shape[2], rule.chunk_size
    outs = []
    for s in range(0, n, b):
        e = min(s + b, n)
        new_d0, new_sig, new_inp = _write(kk[:, :, s:e], vv[:, :, s:e], ll[:, :, s:e], keys, d0, mats, sc, rule)
        # every chunk token's write reads every stored token: a flagged one flags them all
        new_bad = nonfinite(new_d0, 1) | bad0.any(-1, keepdim=True)
        all_keys, all_d0 = torch.cat([keys, kk[:, :, s:e]], 2), torch.cat([d0, zero_rows(new_bad, new_d0)], 2)
        all_bad0 = torch.cat([bad0, new_bad], 2)
        all_sig = [torch.cat(p, 2) for p in zip(ev_sig, new_sig)]
        all_inp = [torch.cat(p, 2) for p in zip(ev_inp, new_inp)]
        bad_sig = [nonfinite(t, 1) for t in all_sig]  # the window's tokens and the chunk's: bounded
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
        sign: Tensor = torch.cat([-gone.to(q.dtype), mask[:, keys.shape[2] :].to(q.dtype)], 1)
        visible = sign != 0  # [m, n_e + m]
        n0 = keys.shape[2]
        bound = None
        if rule.step_bound is not None:  # row t's view of the chunk's writes (the state's: the last row)
            flagged = new_bad
            for bd in bad_sig:
                flagged = flagged | bd[:, :, n_e:]
            coef = torch.where(mask[:, n0:], ll[:, :, s:e].unsqueeze(-2), 0.0)  # C [B, H, m, m]
            bound = _step_scale(coef, kk[:, :, s:e], new_inp, flagged, sc, rule)  # [B, H, m]
            sign = torch.cat([-gone.to(q.dtype).expand(bsz, nh, -1, -1), sign[:, n_e:] * bound.unsqueeze(-1)], -1)
        if e > pend:
            lo = max(s, pend)
            read_sig = [zero_rows(bd, t) for bd, t in zip(bad_sig, all_sig)]
            x = qq[:, :, lo:e]
            if bound is None:
                z0 = _kernel_read(x, all_keys, all_d0, sc, mask[lo - s :], rule.normalized)
            else:  # the stored tokens as they are, the chunk's scaled by the row's factor
                w = _kernel_weights(x, all_keys, sc, mask[lo - s :], rule.normalized)
                z0 = w[..., :n0] @ d0 + (w[..., n0:] * bound[:, :, lo - s :, None]) @ all_d0[:, :, n0:]
            y, _ = _read(x, z0, mats, (visible[lo - s :], sign[..., lo - s :, :], read_sig, all_inp), rule)
            # the rows that see a flagged token (in the first layer or a deeper one)
            seen = _sees(mask[lo - s :], all_bad0)
            for bd in bad_sig:
                seen = seen | _sees(visible[lo - s :], bd)
            outs.append(poison_rows(seen, y))
        if e - s < b:  # unfinished chunk: its raw inputs are kept instead
            break
        mats = [
            w + torch.einsum("bhi,bhir,bhic->bhrc", sign[..., -1, :].expand(bsz, nh, -1), d, a)
            for w, d, a in zip(mats, all_sig, all_inp)
        ]
        if bound is not None:  # the chunk's writes as the state after it holds them
            end = bound[:, :, -1, None, None]
            all_d0 = torch.cat([d0, all_d0[:, :, n0:] * end], 2)
            all_sig = [torch.cat([t[:, :, :n_e], t[:, :, n_e:] * end], 2) for t in all_sig]
        keep = all_keys.shape[2] if window is None else min(window, all_keys.shape[2])
        keys, d0, bad0 = all_keys[:, :, -keep:], all_d0[:, :, -keep:], all_bad0[:, :, -keep:]
        keep_e = 0 if window is None else min(window, all_keys.shape[2])
        ev_sig = [t[:, :, t.shape[2] - keep_e :] for t in all_sig]
        ev_inp = [t[:, :, t.shape[2] - keep_e :] for t in all_inp]
    y = torch.cat(outs, 2)
    if not output_final_state:
        return y, None
    p = (st.seen + seq) % b
    return y, KernelState(
        keys=keys,
        signals=poison_rows(bad0, d0),
        weights=tuple(mats),
        evict_signals=tuple(ev_sig),
        evict_inputs=tuple(ev_inp),
        window_values=st.window_values,
        pending_k=kk[:, :, n - p :],
        pending_v=vv[:, :, n - p :],
        pending_lr=ll[:, :, n - p :],
        seen=st.seen + seq,
        rule=rule,
    )


def omega_chunk(
    q: Tensor, k: Tensor, v: Tensor, lr: Tensor, scale: Tensor, st: KernelState, output_final_state: bool
) -> tuple[Tensor, KernelState | None]:
    """The fast form of ``window_rule="omega"`` with a window (ATLAS eq. 27–28), heads first and
    validated (see :func:`kernel_memory`): ``q, k [B, H, T, dk]``, ``v [B, H, T, dv]``,
    ``lr [B, H, T]``, ``scale [H]``, the state to start from -> ``y [B, H, T, dv]`` and the final
    state.

    Per chunk (steps ``t' .. t'+b-1``), the gradient signals ``G_i = -δ_i`` of the window's tokens
    ``E = {t'-c+1, …, t'+b-1}`` are taken once at the chunk-start memory ``M_{t'-1}``; by step ``t``
    the chunk has applied token ``i``'s with the summed rate ``C[t, i] = Σ_{s=t'}^{t} lr_s [s-c < i
    <= s]`` (``[B, H, b, c - 1 + b]``). A query at ``t``
    reads the stored first-layer signals plus ``C[t, i] G_{0,i}`` on ``E``'s keys, and the deeper
    matrices materialised at the chunk start plus ``C[t, i] G_{l,i} a_{l,i}^T`` in dual form. At the
    chunk's end ``E``'s stored signals gain ``C[t'+b-1, i] G_{0,i}`` and the deeper matrices the
    outer products; every key stays.

    Causality for any input, as in :func:`kernel_chunk`: signals of a token that are not finite
    are read as zeros and the rows that see such a token set to NaN, by selection; ``C`` is a
    cumulative sum of selected learning rates, so a step's ``lr`` reaches no earlier row."""
    rule = st.rule
    c, b = rule.window, rule.chunk_size
    assert c is not None  # the omega rule has a window
    bsz, nh, seq, dk = q.shape
    sc = scale.reshape(1, nh, 1, 1)
    pend = st.pending
    kk = torch.cat([st.pending_k, k], 2)
    vv = torch.cat([st.pending_v, v], 2)
    ll = torch.cat([st.pending_lr, lr], 2)
    qq = torch.cat([q.new_zeros(bsz, nh, pend, dk), q], 2)
    bad0 = nonfinite(st.signals, 1)  # [B, H, n]: stored tokens whose signal must not enter a product
    keys, d0, mats, win_v = st.keys, zero_rows(bad0, st.signals), list(st.weights), st.window_values
    n = kk.shape[2]
    outs = []
    for s in range(0, n, b):
        e = min(s + b, n)
        n0, r = keys.shape[2], win_v.shape[2]
        # E: the last r stored tokens (positions s-r .. s-1) and the chunk's (s .. e-1)
        e_k, e_v = torch.cat([keys[:, :, n0 - r :], kk[:, :, s:e]], 2), torch.cat([win_v, vv[:, :, s:e]], 2)
        g0, gs, inputs = _gradient(e_k, e_v, keys, d0, mats, sc, rule)
        # every write reads every stored token: a flagged one flags them all
        e_bad = nonfinite(g0, 1) | bad0.any(-1, keepdim=True)
        g_bad = [nonfinite(g, 1) for g in gs]
        pos_t = torch.arange(s, e, device=q.device)[:, None]
        pos_e = torch.arange(s - r, e, device=q.device)
        in_window = (pos_e <= pos_t) & (pos_e > pos_t - c)  # [step, i]: i ∈ I_step
        coef = torch.cumsum(torch.where(in_window, ll[:, :, s:e, None], 0.0), 2)  # C [B, H, m, r + m]
        if rule.step_bound is not None:  # row t's view of the chunk's steps (the state's: the last row)
            flagged = e_bad
            for bd in g_bad:
                flagged = flagged | bd
            coef = _step_scale(coef, e_k, inputs, flagged, sc, rule).unsqueeze(-1) * coef
        applied = pos_e <= pos_t  # where C is not structurally zero (E starts within c-1 of t')
        if e > pend:
            lo = max(s, pend)
            rows = slice(lo - s, None)
            x = qq[:, :, lo:e]
            all_keys = torch.cat([keys, kk[:, :, s:e]], 2)
            causal = torch.arange(s - n0, e, device=q.device) <= pos_t[rows]
            w = _kernel_weights(x, all_keys, sc, causal, rule.normalized)  # [B, H, m, n0 + m]
            z0 = w[..., :n0] @ d0 + (w[..., n0 - r :] * coef[:, :, rows]) @ zero_rows(e_bad, g0)
            dual = (applied[rows], coef[:, :, rows], [zero_rows(bd, g) for bd, g in zip(g_bad, gs)], inputs)
            y, _ = _read(x, z0, mats, dual, rule)
            # the rows that see a flagged token (in the first layer or a deeper one)
            seen = _sees(applied[rows], e_bad)
            for bd in g_bad:
                seen = seen | _sees(applied[rows], bd)
            outs.append(poison_rows(seen, y))
        if e - s < b:  # unfinished chunk: its raw inputs are kept instead
            break
        last = coef[:, :, -1]  # [B, H, r + m]: what the chunk applied of each of E's gradients
        mats = [w + torch.einsum("bhi,bhir,bhic->bhrc", last, g, a) for w, g, a in zip(mats, gs, inputs)]
        e_d0 = torch.cat([d0[:, :, n0 - r :], d0.new_zeros(bsz, nh, e - s, d0.shape[-1])], 2) + last.unsqueeze(-1) * g0
        e_bad = e_bad | torch.cat([bad0[:, :, n0 - r :], e_bad.new_zeros(bsz, nh, e - s)], 2) | nonfinite(e_d0, 1)
        keys = torch.cat([keys, kk[:, :, s:e]], 2)
        d0 = torch.cat([d0[:, :, : n0 - r], zero_rows(e_bad, e_d0)], 2)
        bad0 = torch.cat([bad0[:, :, : n0 - r], e_bad], 2)
        keep = min(c - 1, keys.shape[2])
        win_v = e_v[:, :, e_v.shape[2] - keep :]
    y = torch.cat(outs, 2)
    if not output_final_state:
        return y, None
    p = (st.seen + seq) % b
    return y, KernelState(
        keys=keys,
        signals=poison_rows(bad0, d0),
        weights=tuple(mats),
        evict_signals=st.evict_signals,
        evict_inputs=st.evict_inputs,
        window_values=win_v,
        pending_k=kk[:, :, n - p :],
        pending_v=vv[:, :, n - p :],
        pending_lr=ll[:, :, n - p :],
        seen=st.seen + seq,
        rule=rule,
    )


# ---------------------------------------------------------------------------------------------
# the op


def kernel_memory(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    lr: Tensor,
    weights: dict[str, Tensor],
    scale: Tensor,
    *,
    rule: KernelRule = KernelRule(),
    initial_state: KernelState | None = None,
    output_final_state: bool = False,
    impl: str = "chunk",
    cu_seqlens: Tensor | None = None,
) -> tuple[Tensor, KernelState | None]:
    r"""Read and train a kernel-form deep memory over a sequence, per batch element and head.

    For tokens ``t`` (``t'`` the start of ``t``'s chunk, ATLAS eq. 16; ``I_t`` the last
    ``c = rule.window`` tokens up to ``t``)::

        window=None:          M_t = M_{t-1} - lr_t ∇ loss_t(M_{t'-1})                  (ATLAS eq. 25)
        window_rule="omega":  M_t = M_{t-1} - lr_t Σ_{i ∈ I_t} ∇ loss_i(M_{t'-1})       (ATLAS eq. 27–28)
        window_rule="swa":    M_t = M_init - Σ_{i ∈ I_t} lr_i ∇ loss_i(M_{t'(i)-1})     (deep SWA, eq. 18)
        loss_i = -<M(k_i), v_i> | 0.5||M(k_i) - v_i||^2,   y_t = M_t(q_t)
        M(x) = x + W_{L-1} σ(… σ(W_0 φ*(x)))                W_0 φ*(x) = Σ_i D_i exp(scale · k_i·x)

    with ``W_0`` kept implicit (ATLAS eq. 22–24: it starts at 0 and only gains outer products
    ``D_i φ*(k_i)^T``). ``loss="dot"`` is DeepTransformer (ATLAS eq. 25; linear memory: eq. 26) and
    SWDT with a window; ``loss="l2"`` is Dot (ATLAS eq. 27; linear, online: eq. 30–31).
    ``rule.normalized`` divides the first layer's read by ``Σ_i exp(scale · k_i·x)`` over the keys
    it holds (softmax, ATLAS eq. 17–18). See the module docstring for the rules, their special
    cases and their cost.

    Shapes: ``q, k [B, T, H, dk]``, ``v [B, T, H, dv]``, ``lr [B, T, H]`` (the learning rate of
    each token, any real; the layer's is in ``(0, max_lr)``), all of one floating dtype and
    device, ``T >= 1``. ``weights``: the initial deeper matrices ``{"w1" .. "w{depth-1}":
    [H, rows, cols] or [B, H, rows, cols]}`` (``[hidden, hidden]``, the last ``[dv, hidden]``;
    ``{}`` for ``depth=1``), any floating dtype, ignored when ``initial_state`` is given (the
    state holds the current ones). ``scale [H]``: the kernel temperature ``τ`` (floating; the
    kernel is ``exp(scale · k·x)``). ``rule``: a :class:`KernelRule`. ``impl``: ``"chunk"`` (fast)
    or ``"reference"`` (token loop, ``deepmemory.ops.kernel_reference``); they agree and accept
    each other's states. Computation is in float64 for float64 inputs, float32 otherwise.

    ``cu_seqlens [N + 1]`` (int32 or int64, flash-linear-attention's convention ``[0, l_1, l_1 +
    l_2, ..., T]``, strictly increasing): the row holds ``N`` packed documents and each is read as
    if alone (stored keys, window and chunks restart at its first token), so ``B`` must be 1. The
    documents run as one batch ``[N, max l_i]``, right-padded (``deepmemory.ops.varlen``): the
    cost is the padding to the longest document. Not supported with ``initial_state`` or
    ``output_final_state`` (``ValueError``): run the document whose state you need alone.

    Returns ``y [B, T, H, dv]`` in q's dtype and, if ``output_final_state``, a
    :class:`KernelState` (compute dtype) that continues the sequence exactly from this point,
    else None.

    Raises:
        TypeError: a non-tensor input, a dtype other than q's (or a non-floating q, weights or
            scale), ``rule`` not a :class:`KernelRule`, ``initial_state`` not a :class:`KernelState`.
        ValueError: a wrong rank or shape (``k``, ``v``, ``lr``, ``weights``, ``scale``), a
            different device, ``T = 0``, ``residual`` with ``dk != dv``, an unknown ``impl``, an
            ``initial_state`` made with another rule or for other shapes; malformed
            ``cu_seqlens`` (not ``[0, ..., T]``, not increasing; ``TypeError`` for a non-integer
            one), ``B != 1`` or a state asked with it.
        All messages are one line naming the argument.
    """
    if not isinstance(rule, KernelRule):
        raise TypeError(f"rule must be a KernelRule; got {type(rule).__name__}")
    check_choice("impl", impl, KERNEL_IMPLS)
    check_bool("output_final_state", output_final_state)
    if cu_seqlens is not None and (initial_state is not None or output_final_state):
        raise state_error("initial_state/output_final_state")
    bsz, seq, nh, dk, dv = check_sequence(q, k, v, lr)
    if not isinstance(scale, Tensor):
        raise TypeError(f"scale must be a torch.Tensor [H]; got {type(scale).__name__}")
    if tuple(scale.shape) != (nh,):
        raise ValueError(f"scale must have shape [{nh}] (one temperature per head); got {list(scale.shape)}")
    if scale.device != q.device:
        raise ValueError(f"scale is on {scale.device} but q is on {q.device}")
    if not scale.is_floating_point():
        raise TypeError(f"scale must be floating point; got {scale.dtype}")
    if rule.residual and dk != dv:
        raise ValueError(f"a residual kernel memory needs dk == dv; got dk={dk}, dv={dv} (use residual=False)")
    weights = _check_weights(weights, rule, bsz, nh, dv, q)
    if cu_seqlens is not None:  # each document alone, as one batch of documents

        def run(q, k, v, lr):
            return kernel_memory(q, k, v, lr, expand_weights(weights, q.shape[0]), scale, rule=rule, impl=impl)[0]

        return by_document(cu_seqlens, run, q, k, v, lr), None

    cd = compute_dtype(q.dtype)
    qq, kk, vv, ll = (t.transpose(1, 2).to(cd) for t in (q, k, v, lr))
    names = rule.names()
    hidden = weights["w1"].shape[-1] if rule.depth > 1 else dv
    shapes = rule.shapes(dv, hidden)
    if initial_state is None:
        start = tuple(weights[n].to(cd).expand(bsz, nh, *shapes[n]) for n in names)
        st = KernelState(
            keys=kk.new_zeros(bsz, nh, 0, dk),
            signals=kk.new_zeros(bsz, nh, 0, hidden),
            weights=start,
            evict_signals=tuple(kk.new_zeros(bsz, nh, 0, shapes[n][0]) for n in names),
            evict_inputs=tuple(kk.new_zeros(bsz, nh, 0, shapes[n][1]) for n in names),
            window_values=vv[:, :, :0],
            pending_k=kk[:, :, :0],
            pending_v=vv[:, :, :0],
            pending_lr=ll[:, :, :0],
            seen=0,
            rule=rule,
        )
    else:
        want = {
            "keys": (bsz, nh, None, dk),
            "signals": (bsz, nh, None, hidden),
            "pending_k": (bsz, nh, None, dk),
            "pending_v": (bsz, nh, None, dv),
            "pending_lr": (bsz, nh, None),
            "window_values": (bsz, nh, None, dv),
        }
        for l, n in enumerate(names):
            want[f"weights[{l}]"] = (bsz, nh, *shapes[n])
            want[f"evict_signals[{l}]"] = (bsz, nh, None, shapes[n][0])
            want[f"evict_inputs[{l}]"] = (bsz, nh, None, shapes[n][1])
        _check_state(initial_state, rule, want, q)
        st = initial_state.map(lambda t: t.to(cd))
    if impl == "chunk":
        loop = omega_chunk if rule.omega() else kernel_chunk
    else:
        from .kernel_reference import kernel_reference, omega_reference

        loop = omega_reference if rule.omega() else kernel_reference
    y, final = loop(qq, kk, vv, ll, scale.to(cd), st, output_final_state)
    return y.transpose(1, 2).to(q.dtype), final
