"""``neural_memory``: the one general test-time memory update rule (:class:`UpdateRule`; Titans
eq. 13–14 with ATLAS's Omega window and Muon), and ``memory_read``."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..checks import check_choice
from .chunk import chunk
from .inputs import (
    check_query,
    check_ranges,
    check_sequence,
    check_tensor,
    check_weight_shapes,
    check_weights,
    compute_dtype,
    rule_mismatch,
)
from .memory import MemorySpec, dense_apply, memory_forward
from .problem import Problem, Result
from .recurrent import memory_step, step_supported
from .reference import reference
from .rule import UpdateRule, resolve_rule
from .state import MemoryState
from .varlen import by_document, expand_weights, state_error


def _triton(p: Problem) -> Result:
    try:  # lazily: triton is an optional dependency
        from .triton_chunk import triton_chunk
    except ModuleNotFoundError as e:
        if e.name != "triton":
            raise
        raise ImportError("impl='triton' needs the triton package (pip install triton)") from e
    return triton_chunk(p)


IMPLS = {"chunk": chunk, "reference": reference, "triton": _triton}


def _initial_weights(
    weights, spec: MemorySpec, bsz: int, nh: int, dk: int, dv: int, q: Tensor, arg: str = "weights"
) -> dict[str, Tensor]:
    names = spec.names()
    what = f"architecture={spec.architecture!r}" + (f" depth={spec.depth}" if spec.architecture == "mlp" else "")
    check_weights(weights, names, what, bsz, nh, q, arg)
    hidden = spec.hidden_of(weights)
    check_weight_shapes(weights, spec.shapes(dk, dv, hidden), f"dk={dk}, dv={dv}, hidden={hidden}", arg)
    if spec.uses_residual and dk != dv:
        raise ValueError(
            f"a residual {spec.architecture} memory needs dk == dv; got dk={dk}, dv={dv} (pass residual=False)"
        )
    cd = compute_dtype(q.dtype)
    return {n: weights[n].to(cd).expand(bsz, nh, *weights[n].shape[-2:]) for n in names}


def memory_read(q: Tensor, weights: dict[str, Tensor], *, rule: UpdateRule | None = None, **settings: Any) -> Tensor:
    """Read a memory without writing: ``M_W(q)``.

    ``q [B, T, H, dk]`` (float) and ``weights {name: [H, rows, cols] or [B, H, rows, cols]}``
    (e.g. ``state.weights``) -> ``[B, T, H, dv]`` in q's dtype. The memory network is the rule's
    (``rule=``, or the keywords ``architecture``, ``depth``, ``activation``, ``residual`` of
    :class:`UpdateRule`). Raises ``TypeError``/``ValueError`` (one line) for a bad rule, a
    malformed ``q`` or weights that do not fit the memory.
    """
    rule = resolve_rule(rule, settings)
    check_query(q)
    spec = rule.spec
    bsz, _, nh, dk = q.shape
    last = weights.get(spec.names()[-1]) if isinstance(weights, dict) else None
    dv = last.shape[-2] if isinstance(last, Tensor) and last.dim() >= 2 else dk
    w = _initial_weights(weights, spec, bsz, nh, dk, dv, q, arg="weights")
    cd = compute_dtype(q.dtype)
    return memory_forward(spec, dense_apply(w), _heads_first(q, cd)).transpose(1, 2).to(q.dtype)


def _heads_first(x: Tensor, cd: torch.dtype) -> Tensor:
    return x.transpose(1, 2).to(cd)


def _check_state(st, rule: UpdateRule, w0: dict[str, Tensor], q: Tensor, channel: bool) -> None:
    """``st`` continues a call of ``rule`` with memory shapes ``w0`` on q's device, with the same
    kind of window gate (per head or channel-wise); a one-line ``TypeError``/``ValueError`` otherwise."""
    if not isinstance(st, MemoryState):
        raise TypeError(f"initial_state must be a MemoryState (the op's final_state); got {type(st).__name__}")
    if st.rule != rule:
        raise ValueError(rule_mismatch(st.rule, rule))
    for n, w in w0.items():
        if st.weights[n].shape != w.shape:
            raise ValueError(
                f"initial_state.weights[{n!r}] has shape {list(st.weights[n].shape)}; expected {list(w.shape)}"
            )
    if st.keys.device != q.device:
        raise ValueError(f"initial_state is on {st.keys.device} but q is on {q.device}")
    if (st.window_gate.dim() == 4) != channel:
        raise ValueError(
            "initial_state was made with a "
            + (
                "channel-wise window_gate; pass window_gate [B, T, H, dv]"
                if st.window_gate.dim() == 4
                else "per-head window_gate (or none); pass window_gate [B, T, H] or None"
            )
        )


def neural_memory(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    lr: Tensor,
    momentum: Tensor | None,
    decay: Tensor | None,
    weights: dict[str, Tensor],
    *,
    rule: UpdateRule | None = None,
    window_gate: Tensor | None = None,
    initial_state: MemoryState | None = None,
    output_final_state: bool = False,
    impl: str = "chunk",
    cu_seqlens: Tensor | None = None,
    **settings: Any,
) -> tuple[Tensor, MemoryState | None]:
    r"""Read and train a neural memory over a sequence, per batch element and head.

    For tokens ``t`` with chunk start ``t' = b * floor(t / b)``::

        u_t = sum_{i=t-c+1}^{t} gamma_i grad_W loss_i(W_{t'})       loss_i = 0.5||M_W(k_i) - v_i||^2 | -<M_W(k_i), v_i>
        gd/momentum: S_t = momentum_t S_{t-1} - lr_t u_t;  W_t = (1 - decay_t) W_{t-1} + S_t
        muon:        S_t = momentum_t S_{t-1} + u_t;       W_t = (1 - decay_t) W_{t-1} - lr_t NS(S_t)
        o_t = M_{W_t}(q_t)

    ``granularity="chunk"`` makes one update per chunk with gates averaged over it, and tokens
    read the previous chunk's memory. ``decay_first=True`` (Gated DeltaNet; ``chunk_size=1``) takes
    the gradient at the forgotten ``(1 - decay_t) W_{t-1}``; with the linear memory, l2, gd and
    window 1 ``impl="chunk"`` computes that delta rule in the WY form (docs/ops.md).

    The rule (memory, loss, optimizer, Newton–Schulz steps, window ``c``, chunk size ``b``,
    granularity) is ``rule=UpdateRule(...)``; its fields may instead be passed as keywords
    (``architecture="mlp", chunk_size=16, ...``), a convenience that builds the same rule.

    Shapes and ranges: ``q, k [B, T, H, dk]``, ``v [B, T, H, dv]`` (float16, bfloat16, float32 or
    float64, all alike, on one device); ``lr, momentum, decay, window_gate [B, T, H]`` in q's dtype
    (``lr >= 0``; ``momentum``, ``decay``, ``window_gate`` in [0, 1]; ``momentum`` may be None for
    ``gd``, ``decay`` None for no forgetting, ``window_gate`` None for all ones); ``window_gate``
    may instead be channel-wise, ``[B, T, H, dv]``: token ``i``'s loss becomes
    ``sum_c gamma_ic loss_ic`` over the value channels (``loss_ic = 0.5 (M_W(k_i)_c - v_ic)^2`` or
    ``-M_W(k_i)_c v_ic``), so with window 1 the step of token ``t`` is the per-channel learning rate
    ``lr_t gamma_t`` of Miras §5.4 (for the linear memory exactly ``diag(lr_t gamma_t)`` times the
    gradient; docs/ops.md). Channel-wise gates run in ``impl="chunk"`` and ``"reference"`` (the
    chunk form leaves the WY delta-rule path for its generic one, exact at chunk size 1); the state
    then carries them, so a continued call must pass them too. ``weights``: the
    initial memory, ``{name: [H, rows, cols] or [B, H, rows, cols]}`` (linear ``w0 [H, dv, dk]``;
    mlp ``w0 [H, hidden, dk] .. w{depth-1} [H, dv, hidden]``; gated_mlp ``w_gate, w_up [H,
    hidden, dk]``, ``w_out [H, dv, hidden]``), replaced by ``initial_state`` when given.
    ``impl``: ``"chunk"`` (default), ``"reference"`` (the token loop) or ``"triton"``.

    ``cu_seqlens [N + 1]`` (int32 or int64, flash-linear-attention's convention ``[0, l_1, l_1 +
    l_2, ..., T]``, strictly increasing): the row holds ``N`` packed documents and each is read as
    if alone (memory, momentum, Omega window and chunks restart at its first token), so ``B`` must
    be 1. The documents run as one batch ``[N, max l_i]``, right-padded (``deepmemory.ops.varlen``):
    the cost is the padding to the longest document. Not supported with ``initial_state`` or
    ``output_final_state`` (``ValueError``): run the document whose state you need alone.

    The gate ranges are checked, with a one-line ``ValueError`` (outside them the memory grows
    geometrically, e.g. momentum 1.5 overflows it, or turns NaN): one fused reduction over all
    gates, so one device sync per call on GPU; skipped while ``torch.compile`` traces (compiled
    code runs unchecked). NaN passes the check (``(x < low) | (x > high)`` is False for it): a NaN
    gate is not an error here, it propagates to the outputs from its token on. ``lr`` has no upper
    bound in the op (how large a step stays stable depends on the keys, the memory and the loss;
    the layers bound it by ``max_lr``).

    Returns ``o [B, T, H, dv]`` in q's dtype and, if ``output_final_state``, a
    :class:`MemoryState` (float32 under lower precisions) that continues the sequence exactly from
    any split point.

    Raises:
        TypeError: a tensor of the wrong type or dtype, an unknown keyword, a rule that is not an
            :class:`UpdateRule`, an ``initial_state`` that is not a :class:`MemoryState`,
            ``cu_seqlens`` not an int32/int64 tensor.
        ValueError: bad settings, shapes, devices, missing momentum gates, a gate out of its range
            (naming the gate, the range, the value and its ``[batch, token, head]``), both
            ``rule=`` and keywords, or an ``initial_state`` made with another rule or shape;
            malformed ``cu_seqlens`` (not ``[0, ..., T]``, not increasing), ``B != 1`` or a state
            asked with it.
        ImportError: ``impl="triton"`` without the triton package.
    """
    rule = resolve_rule(rule, settings)
    check_choice("impl", impl, tuple(IMPLS))
    if cu_seqlens is not None and (initial_state is not None or output_final_state):
        raise state_error("initial_state/output_final_state")
    bsz, seq, nh, dk, dv = check_sequence(q, k, v, lr)
    if momentum is None:
        if rule.optimizer != "gd":
            raise ValueError(f"momentum gates are required for optimizer={rule.optimizer!r} (only 'gd' takes None)")
    else:
        check_tensor("momentum", momentum, (bsz, seq, nh), q)
    if decay is not None:
        check_tensor("decay", decay, (bsz, seq, nh), q)
    channel = isinstance(window_gate, Tensor) and window_gate.dim() == 4
    if isinstance(window_gate, Tensor) and window_gate.dim() not in (3, 4):
        raise ValueError(
            f"window_gate must be [B, T, H] = {[bsz, seq, nh]} or channel-wise [B, T, H, dv] = {[bsz, seq, nh, dv]}; "
            f"got shape {list(window_gate.shape)}"
        )
    if window_gate is not None:
        check_tensor("window_gate", window_gate, (bsz, seq, nh, dv) if channel else (bsz, seq, nh), q)
    w0 = _initial_weights(weights, rule.spec, bsz, nh, dk, dv, q)
    # the gates' ranges, last (one device sync): lr unbounded above, the layers bound it by max_lr
    check_ranges(
        [
            ("lr", lr, 0.0, None),
            ("momentum", momentum, 0.0, 1.0),
            ("decay", decay, 0.0, 1.0),
            ("window_gate", window_gate, 0.0, 1.0),
        ]
    )
    if cu_seqlens is not None:  # each document alone, as one batch of documents

        def run(q, k, v, lr, momentum, decay, window_gate):
            return neural_memory(
                q,
                k,
                v,
                lr,
                momentum,
                decay,
                expand_weights(weights, q.shape[0]),
                rule=rule,
                window_gate=window_gate,
                impl=impl,
            )[0]

        return by_document(cu_seqlens, run, q, k, v, lr, momentum, decay, window_gate), None

    if initial_state is not None:
        _check_state(initial_state, rule, w0, q, channel)
    if seq == 1 and impl == "chunk" and step_supported(rule):  # decoding: one token as a recurrence
        o, state = memory_step(rule, q, k, v, lr, momentum, decay, window_gate, w0, initial_state)
        return o, (state if output_final_state else None)

    cd = compute_dtype(q.dtype)
    zeros = q.new_zeros(bsz, seq, nh)
    gates = {
        "lr": _heads_first(lr, cd),
        # (momentum is None only for gd: checked above)
        "momentum": _heads_first(zeros if rule.optimizer == "gd" or momentum is None else momentum, cd),
        "decay": _heads_first(zeros if decay is None else decay, cd),
    }
    gam = _heads_first(zeros + 1 if window_gate is None else window_gate, cd)
    kk, vv = _heads_first(k, cd), _heads_first(v, cd)
    qq = _heads_first(q, cd)

    if initial_state is None:
        seen, pending, resume = 0, 0, None
        s0 = {n: torch.zeros_like(w) for n, w in w0.items()}
        hk, hv, hg = kk[:, :, :0], vv[:, :, :0], gam[:, :, :0]
    else:
        st = initial_state
        seen, pending = st.seen, st.pending
        # the state after the pending tokens (token granularity: chunk granularity has not moved since the chunk start)
        resume = (
            ({n: t.to(cd) for n, t in st.weights.items()}, {n: t.to(cd) for n, t in st.momentum.items()})
            if pending
            else None
        )
        w0 = {n: t.to(cd) for n, t in st.chunk_weights.items()}
        s0 = {n: t.to(cd) for n, t in st.chunk_momentum.items()}
        tail_k, tail_v, tail_g = st.keys.to(cd), st.values.to(cd), st.window_gate.to(cd)
        hist = tail_k.shape[2] - pending
        hk, hv, hg = tail_k[:, :, :hist], tail_v[:, :, :hist], tail_g[:, :, :hist]
        kk = torch.cat([tail_k[:, :, hist:], kk], 2)
        vv = torch.cat([tail_v[:, :, hist:], vv], 2)
        gam = torch.cat([tail_g[:, :, hist:], gam], 2)
        qq = torch.cat([qq.new_zeros(bsz, nh, pending, dk), qq], 2)
        gates = {n: torch.cat([st.gates[n].to(cd), g], 2) for n, g in gates.items()}

    gam = torch.cat([hg, gam], 2)
    problem = Problem(
        rule=rule,
        q=qq,
        k=torch.cat([hk, kk], 2),
        v=torch.cat([hv, vv], 2),
        gamma=torch.ones_like(gam[..., 0]) if channel else gam,
        lr=gates["lr"],
        momentum=gates["momentum"],
        decay=gates["decay"],
        n_hist=hk.shape[2],
        w0=w0,
        s0=s0,
        low_precision=q.dtype in (torch.float16, torch.bfloat16),
        replayed=pending,
        resume=resume,
        channel=gam if channel else None,
    )
    res: Result = IMPLS[impl](problem)
    o = res.o[:, :, pending:].transpose(1, 2).to(q.dtype)
    if not output_final_state:
        return o, None

    total = seen + seq
    new_pending = total % rule.chunk_size
    keep = min(total, rule.window - 1 + new_pending)
    return o, MemoryState(
        weights=res.weights,
        momentum=res.momentum,
        chunk_weights=res.chunk_weights,
        chunk_momentum=res.chunk_momentum,
        keys=problem.k[:, :, problem.k.shape[2] - keep :],
        values=problem.v[:, :, problem.v.shape[2] - keep :],
        window_gate=gam[:, :, gam.shape[2] - keep :],
        gates={n: g[:, :, g.shape[2] - new_pending :] for n, g in gates.items()},
        seen=total,
        rule=rule,
    )
