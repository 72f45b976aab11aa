"""``neural_memory``: the one general test-time memory update rule (SPEC §2)."""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
from torch import Tensor

from ..checks import check_bool, check_choice, check_int
from .chunk import chunk
from .memory import ACTIVATIONS, LOSSES, MEMORY_KINDS, MemorySpec, dense_apply, memory_forward
from .problem import Problem, Result
from .reference import reference
from .state import MemoryState

OPTIMIZERS = ("gd", "momentum", "muon")
GRANULARITIES = ("token", "chunk")


def _triton(p: Problem) -> Result:
    try:  # lazily: triton is an optional dependency
        from .triton_chunk import triton_chunk
    except ModuleNotFoundError as e:
        if e.name != "triton":
            raise
        raise ImportError("impl='triton' needs the triton package (pip install triton)") from e
    return triton_chunk(p)


IMPLS = {"chunk": chunk, "reference": reference, "triton": _triton}


def _tensor(name: str, x, rank: int, shape: Tuple, like: Tensor) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(x).__name__}")
    if x.dim() != rank:
        raise ValueError(f"{name} must have {rank} dims {list(shape)}; got shape {list(x.shape)}")
    if x.device != like.device:
        raise ValueError(f"{name} is on {x.device} but q is on {like.device}")
    if x.dtype != like.dtype:
        raise TypeError(f"{name} has dtype {x.dtype} but q has {like.dtype}")
    for i, (got, want) in enumerate(zip(x.shape, shape)):
        if want is not None and got != want:
            raise ValueError(f"{name} must have shape {list(shape)} (None = any); got {list(x.shape)} (dim {i})")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_params(params, spec: MemorySpec, bsz: int, nh: int, dk: int, dv: int, q: Tensor) -> Dict[str, Tensor]:
    if not isinstance(params, dict):
        raise TypeError(f"params must be a dict of tensors; got {type(params).__name__}")
    names = spec.names()
    missing = [n for n in names if n not in params]
    extra = [n for n in params if n not in names]
    if missing or extra:
        raise ValueError(
            f"params for memory={spec.kind!r}" + (f" depth={spec.depth}" if spec.kind == "mlp" else "")
            + f" must be exactly {list(names)}; missing {missing}, unexpected {extra}"
        )
    for n in names:
        w = params[n]
        if not isinstance(w, Tensor):
            raise TypeError(f"params[{n!r}] must be a torch.Tensor; got {type(w).__name__}")
        if w.dim() not in (3, 4):
            raise ValueError(f"params[{n!r}] must be [H, rows, cols] or [B, H, rows, cols]; got shape {list(w.shape)}")
        if w.device != q.device:
            raise ValueError(f"params[{n!r}] is on {w.device} but q is on {q.device}")
        if not w.is_floating_point():
            raise TypeError(f"params[{n!r}] must be floating point; got {w.dtype}")
        if w.shape[-3] != nh or (w.dim() == 4 and w.shape[0] != bsz):
            raise ValueError(f"params[{n!r}] has shape {list(w.shape)}; expected leading dims [{nh}] or [{bsz}, {nh}]")
    hidden = spec.hidden_of(params)
    for n, (rows, cols) in spec.shapes(dk, dv, hidden).items():
        if tuple(params[n].shape[-2:]) != (rows, cols):
            raise ValueError(f"params[{n!r}] must be [..., {rows}, {cols}] for dk={dk}, dv={dv}, hidden={hidden}; got {list(params[n].shape)}")
    if spec.uses_residual and dk != dv:
        raise ValueError(f"a residual {spec.kind} memory needs dk == dv; got dk={dk}, dv={dv} (pass residual=False)")
    cd = _compute_dtype(q.dtype)
    return {n: params[n].to(cd).expand(bsz, nh, *params[n].shape[-2:]) for n in names}


def memory_read(
    q: Tensor,
    weights: Dict[str, Tensor],
    *,
    memory: str = "mlp",
    depth: int = 2,
    activation: str = "gelu",
    residual: bool = True,
) -> Tensor:
    """Read a memory without writing: ``M_W(q)`` for ``q [B, T, H, dk]`` and weights
    ``{name: [H, rows, cols] or [B, H, rows, cols]}`` (e.g. ``state.weights``) -> ``[B, T, H, dv]``."""
    check_choice("memory", memory, MEMORY_KINDS)
    check_choice("activation", activation, ACTIVATIONS)
    check_int("depth", depth)
    if not isinstance(q, Tensor) or q.dim() != 4:
        raise ValueError(f"q must be a 4-dim tensor [B, T, H, dk]; got {getattr(q, 'shape', type(q).__name__)}")
    spec = MemorySpec(memory, depth, activation, residual)
    bsz, _, nh, dk = q.shape
    dv = weights[spec.names()[-1]].shape[-2] if spec.names()[-1] in weights else dk
    w = _check_params(weights, spec, bsz, nh, dk, dv, q)
    cd = _compute_dtype(q.dtype)
    return memory_forward(spec, dense_apply(w), _heads_first(q, cd)).transpose(1, 2).to(q.dtype)


def _heads_first(x: Tensor, cd: torch.dtype) -> Tensor:
    return x.transpose(1, 2).to(cd)


def neural_memory(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    lr: Tensor,
    momentum: Optional[Tensor],
    decay: Optional[Tensor],
    params: Dict[str, Tensor],
    *,
    memory: str = "mlp",
    depth: int = 2,
    activation: str = "gelu",
    residual: bool = True,
    loss: str = "l2",
    window: int = 1,
    window_gate: Optional[Tensor] = None,
    optimizer: str = "momentum",
    ns_steps: int = 5,
    chunk_size: int = 64,
    granularity: str = "token",
    initial_state: Optional[MemoryState] = None,
    output_final_state: bool = False,
    impl: str = "chunk",
) -> Tuple[Tensor, Optional[MemoryState]]:
    r"""Read and train a neural memory over a sequence, per batch element and head.

    For tokens ``t`` with chunk start ``t' = b * floor(t / b)``::

        u_t = sum_{i=t-c+1}^{t} gamma_i grad_W loss_i(W_{t'})       loss_i = 0.5||M_W(k_i) - v_i||^2 | -<M_W(k_i), v_i>
        gd/momentum: S_t = momentum_t S_{t-1} - lr_t u_t;  W_t = (1 - decay_t) W_{t-1} + S_t
        muon:        S_t = momentum_t S_{t-1} + u_t;       W_t = (1 - decay_t) W_{t-1} - lr_t NS(S_t)
        o_t = M_{W_t}(q_t)

    ``granularity="chunk"`` makes one update per chunk with gates averaged over it, and tokens
    read the previous chunk's memory.

    Shapes: ``q, k [B, T, H, dk]``, ``v [B, T, H, dv]``; ``lr, momentum, decay, window_gate
    [B, T, H]`` (``momentum`` may be None for ``gd``, ``decay`` None for no forgetting,
    ``window_gate`` None for all ones); ``params``: the initial memory, ``{name: [H, rows, cols]
    or [B, H, rows, cols]}`` (linear ``w0 [H, dv, dk]``; mlp ``w0 [H, hidden, dk] .. w{depth-1}
    [H, dv, hidden]``; gated_mlp ``w_gate, w_up [H, hidden, dk]``, ``w_out [H, dv, hidden]``),
    replaced by ``initial_state`` when given. Returns ``o [B, T, H, dv]`` in q's dtype and, if
    ``output_final_state``, a :class:`MemoryState` (float32 under lower precisions) that
    continues the sequence exactly from any split point.
    """
    check_choice("memory", memory, MEMORY_KINDS)
    check_choice("activation", activation, ACTIVATIONS)
    check_choice("loss", loss, LOSSES)
    check_choice("optimizer", optimizer, OPTIMIZERS)
    check_choice("granularity", granularity, GRANULARITIES)
    check_choice("impl", impl, tuple(IMPLS))
    check_int("depth", depth)
    check_int("window", window)
    check_int("chunk_size", chunk_size)
    check_int("ns_steps", ns_steps, minimum=0)
    check_bool("residual", residual)
    if not isinstance(q, Tensor):
        raise TypeError(f"q must be a torch.Tensor; got {type(q).__name__}")
    if q.dim() != 4:
        raise ValueError(f"q must have 4 dims [B, T, H, dk]; got shape {list(q.shape)}")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise TypeError(f"q must be float16, bfloat16, float32 or float64; got {q.dtype}")
    bsz, seq, nh, dk = q.shape
    if seq < 1:
        raise ValueError("q must hold at least one token (T >= 1)")
    _tensor("k", k, 4, (bsz, seq, nh, dk), q)
    _tensor("v", v, 4, (bsz, seq, nh, None), q)
    dv = v.shape[-1]
    _tensor("lr", lr, 3, (bsz, seq, nh), q)
    if momentum is None:
        if optimizer != "gd":
            raise ValueError(f"momentum gates are required for optimizer={optimizer!r} (only 'gd' takes None)")
    else:
        _tensor("momentum", momentum, 3, (bsz, seq, nh), q)
    if decay is not None:
        _tensor("decay", decay, 3, (bsz, seq, nh), q)
    if window_gate is not None:
        _tensor("window_gate", window_gate, 3, (bsz, seq, nh), q)
    spec = MemorySpec(memory, depth, activation, residual)
    w0 = _check_params(params, spec, bsz, nh, dk, dv, q)
    config = (memory, depth if memory == "mlp" else None, activation, residual, loss, optimizer, window, chunk_size, granularity)

    cd = _compute_dtype(q.dtype)
    zeros = q.new_zeros(bsz, seq, nh)
    gates = {
        "lr": _heads_first(lr, cd),
        "momentum": _heads_first(zeros if optimizer == "gd" else momentum, cd),
        "decay": _heads_first(zeros if decay is None else decay, cd),
    }
    gam = _heads_first(zeros + 1 if window_gate is None else window_gate, cd)
    kk, vv = _heads_first(k, cd), _heads_first(v, cd)
    qq = _heads_first(q, cd)

    if initial_state is None:
        seen, pending = 0, 0
        s0 = {n: torch.zeros_like(w) for n, w in w0.items()}
        hk, hv, hg = kk[:, :, :0], vv[:, :, :0], gam[:, :, :0]
    else:
        if not isinstance(initial_state, MemoryState):
            raise TypeError(f"initial_state must be a MemoryState (the op's final_state); got {type(initial_state).__name__}")
        if initial_state.config != config:
            raise ValueError(f"initial_state was made with settings {initial_state.config}, not {config}")
        st = initial_state
        for n, w in w0.items():
            if st.weights[n].shape != w.shape:
                raise ValueError(f"initial_state.weights[{n!r}] has shape {list(st.weights[n].shape)}; expected {list(w.shape)}")
        if st.keys.device != q.device:
            raise ValueError(f"initial_state is on {st.keys.device} but q is on {q.device}")
        seen, pending = st.seen, st.pending
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

    problem = Problem(
        spec=spec, loss=loss, optimizer=optimizer, ns_steps=ns_steps, window=window,
        chunk_size=chunk_size, granularity=granularity, q=qq,
        k=torch.cat([hk, kk], 2), v=torch.cat([hv, vv], 2), gamma=torch.cat([hg, gam], 2),
        lr=gates["lr"], momentum=gates["momentum"], decay=gates["decay"],
        n_hist=hk.shape[2], w0=w0, s0=s0, low_precision=q.dtype in (torch.float16, torch.bfloat16),
    )
    res: Result = IMPLS[impl](problem)
    o = res.o[:, :, pending:].transpose(1, 2).to(q.dtype)
    if not output_final_state:
        return o, None

    total = seen + seq
    new_pending = total % chunk_size
    keep = min(total, window - 1 + new_pending)
    return o, MemoryState(
        weights=res.weights,
        momentum=res.momentum,
        chunk_weights=res.chunk_weights,
        chunk_momentum=res.chunk_momentum,
        keys=problem.k[:, :, problem.k.shape[2] - keep :],
        values=problem.v[:, :, problem.v.shape[2] - keep :],
        window_gate=problem.gamma[:, :, problem.gamma.shape[2] - keep :],
        gates={n: g[:, :, g.shape[2] - new_pending :] for n, g in gates.items()},
        seen=total,
        config=config,
    )
