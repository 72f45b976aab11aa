r"""The neural memory layer (SPEC §3; Titans §4.4, ATLAS App. E): projections, gates and output
around the memory op ``deepmemory.ops.neural_memory``."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Dict, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checks import check_bool, check_choice, check_int, check_positive
from ..ops import ACTIVATIONS, GRANULARITIES, IMPLS, LOSSES, MEMORY_KINDS, OPTIMIZERS, MemorySpec, MemoryState
from ..ops import memory_read, neural_memory
from ..tree import State
from .common import RMSNorm, ShortConv
from .feature_maps import FEATURE_MAPS, make_feature_map

ConvStates = Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]


def _logit(p: float) -> float:
    return math.log(p / (1.0 - p))


class QKVMixer(nn.Module):
    r"""What every memory mixer shares: ``x -> q, k, v`` (linear, causal depthwise conv + SiLU,
    q and k L2-normalised per head) and the gated output ``o = W_o(RMSNorm(y) * silu(x W_g))``.

    ``conv_size=0`` drops the convolution (SiLU kept), for the ablation without it.
    """

    def __init__(self, hidden_size: int, num_heads: int, head_dim: int, conv_size: int):
        super().__init__()
        check_int("hidden_size", hidden_size)
        check_int("num_heads", num_heads)
        check_int("head_dim", head_dim)
        check_int("conv_size", conv_size, minimum=0)
        self.hidden_size, self.num_heads, self.head_dim, self.conv_size = hidden_size, num_heads, head_dim, conv_size
        width = num_heads * head_dim
        self.q_proj = nn.Linear(hidden_size, width, bias=False)
        self.k_proj = nn.Linear(hidden_size, width, bias=False)
        self.v_proj = nn.Linear(hidden_size, width, bias=False)
        if conv_size > 0:
            self.q_conv = ShortConv(width, conv_size)
            self.k_conv = ShortConv(width, conv_size)
            self.v_conv = ShortConv(width, conv_size)
        self.g_proj = nn.Linear(hidden_size, width, bias=False)
        self.o_norm = RMSNorm(head_dim)
        self.o_proj = nn.Linear(width, hidden_size, bias=False)

    def check_input(self, x: Tensor) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor; got {type(x).__name__}")
        if x.dim() != 3 or x.shape[-1] != self.hidden_size:
            raise ValueError(f"x must be [B, T, {self.hidden_size}]; got {list(x.shape)}")
        if x.shape[1] < 1:
            raise ValueError("x must hold at least one token (T >= 1)")

    def qkv(self, x: Tensor, conv: Optional[ConvStates]) -> Tuple[Tensor, Tensor, Tensor, ConvStates]:
        """``q, k, v [B, T, H, head_dim]`` (q, k unit norm) and the new conv states."""
        projs = (self.q_proj(x), self.k_proj(x), self.v_proj(x))
        if self.conv_size == 0:
            outs, new = [F.silu(p) for p in projs], (None, None, None)
        else:
            conv = conv or (None, None, None)
            pairs = [m(p, s, return_state=True) for m, p, s in zip((self.q_conv, self.k_conv, self.v_conv), projs, conv)]
            outs, new = [p[0] for p in pairs], tuple(p[1] for p in pairs)
        q, k, v = (t.unflatten(-1, (self.num_heads, self.head_dim)) for t in outs)
        return F.normalize(q, dim=-1), F.normalize(k, dim=-1), v, new

    def output(self, x: Tensor, y: Tensor) -> Tensor:
        """``y [B, T, H, head_dim]`` -> ``[B, T, hidden_size]``."""
        return self.o_proj(self.o_norm(y).flatten(-2) * F.silu(self.g_proj(x)))


@dataclass
class NeuralMemoryState(State):
    """The op's :class:`MemoryState` plus the q, k, v conv states ``[B, conv_size - 1, H*head_dim]``
    (None without convolution)."""

    memory: MemoryState
    conv: ConvStates


class NeuralMemory(QKVMixer):
    r"""A multi-head neural memory trained while reading (SPEC §3).

    Per head, with ``phi`` the feature map (identity or polynomial) and the gates
    ``lr = max_lr * sigmoid(x W_lr)``, ``momentum = sigmoid(x W_mom)``, ``decay = sigmoid(x W_dec)``,
    ``gamma = sigmoid(x W_gamma)`` (``[B, T, H]``)::

        W_t = update(W_{t-1}; phi(k), v, gates)       (the op's rule: loss, optimizer, window c)
        y_t = M_{W_t}(phi(q_t))                        o_t = W_o(RMSNorm(y_t) * silu(x_t W_g))

    x ``[B, T, hidden_size]`` -> ``[B, T, hidden_size]``.

    Residual memory with a feature map: ``M(x) = x + h(phi(x))`` (SPEC §2: the residual adds the
    un-featured input, whatever the width of ``phi(x)``). The op runs the residual-free network
    ``h`` on ``phi(k)`` with targets ``v - k`` for ``loss="l2"`` (``0.5||k + h(phi(k)) - v||^2``
    is the same loss), with targets ``v`` for ``loss="dot"`` (``<k, v>`` does not depend on the
    weights, so the gradient is unchanged), and ``q`` is added to what it reads.

    Initialisation (why training starts sane): gate weights ``N(0, 0.02^2)``; gate biases give
    ``lr = 0.1 max_lr``, ``momentum = 0.9``, ``decay = 0.01`` and ``gamma = 0.95`` at
    ``x = 0``. The initial memory: hidden matrices ``N(0, 1/cols)``; the output matrix of a
    residual memory ``N(0, 0.01/cols)`` so ``M`` starts near the identity; a linear memory (no
    residual) starts at zero, an empty memory like linear attention's.
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        head_dim: int,
        *,
        chunk_size: int = 16,
        memory: str = "mlp",
        depth: int = 2,
        expansion: int = 4,
        activation: str = "gelu",
        residual: bool = True,
        loss: str = "l2",
        optimizer: str = "momentum",
        ns_steps: int = 5,
        window: int = 1,
        window_gate: bool = True,
        granularity: str = "token",
        feature_map: str = "identity",
        poly_degree: int = 2,
        max_lr: float = 1.0,
        conv_size: int = 4,
        use_decay: bool = True,
        impl: str = "chunk",
    ):
        super().__init__(hidden_size, num_heads, head_dim, conv_size)
        check_int("chunk_size", chunk_size)
        check_choice("memory", memory, MEMORY_KINDS)
        check_int("depth", depth)
        check_int("expansion", expansion)
        check_choice("activation", activation, ACTIVATIONS)
        check_bool("residual", residual)
        check_choice("loss", loss, LOSSES)
        check_choice("optimizer", optimizer, OPTIMIZERS)
        check_int("ns_steps", ns_steps, minimum=0)
        check_int("window", window)
        check_bool("window_gate", window_gate)
        check_choice("granularity", granularity, GRANULARITIES)
        check_choice("feature_map", feature_map, FEATURE_MAPS)
        check_int("poly_degree", poly_degree)
        check_positive("max_lr", max_lr)
        check_bool("use_decay", use_decay)
        check_choice("impl", impl, tuple(IMPLS))

        self.spec = MemorySpec(memory, depth, activation, residual)
        self.loss, self.optimizer, self.ns_steps = loss, optimizer, ns_steps
        self.window, self.chunk_size, self.granularity, self.impl = window, chunk_size, granularity, impl
        self.max_lr = float(max_lr)
        self.phi = make_feature_map(feature_map, head_dim, num_heads, poly_degree)
        key_dim = self.phi.out_dim
        # the op's residual would add phi(k); the un-featured input is added outside the op instead
        self.outer_residual = self.spec.uses_residual and feature_map != "identity"
        self.op_spec = replace(self.spec, residual=False) if self.outer_residual else self.spec

        def gate(p0: float) -> nn.Linear:
            lin = nn.Linear(hidden_size, num_heads)
            nn.init.normal_(lin.weight, std=0.02)
            nn.init.constant_(lin.bias, _logit(p0))
            return lin

        self.lr_proj = gate(0.1)
        self.momentum_proj = gate(0.9) if optimizer != "gd" else None
        self.decay_proj = gate(0.01) if use_decay else None
        self.gamma_proj = gate(0.95) if window > 1 and window_gate else None

        shapes = self.op_spec.shapes(key_dim, head_dim, expansion * head_dim)
        names = self.op_spec.names()
        self.memory_init = nn.ParameterDict()
        for name in names:
            rows, cols = shapes[name]
            w = torch.empty(num_heads, rows, cols)
            if name == names[-1] and self.spec.kind == "linear":
                nn.init.zeros_(w)
            elif name == names[-1] and self.spec.uses_residual:
                nn.init.normal_(w, std=0.1 / math.sqrt(cols))
            else:
                nn.init.normal_(w, std=1.0 / math.sqrt(cols))
            self.memory_init[name] = nn.Parameter(w)

    def _op_kwargs(self) -> Dict:
        spec = self.op_spec
        return dict(memory=spec.kind, depth=spec.depth, activation=spec.activation, residual=spec.residual)

    def forward(
        self, x: Tensor, state: Optional[NeuralMemoryState] = None, return_state: bool = False
    ) -> Union[Tensor, Tuple[Tensor, NeuralMemoryState]]:
        """``x [B, T, hidden_size]`` -> ``y [B, T, hidden_size]`` (and the state to continue from)."""
        self.check_input(x)
        if state is not None and not isinstance(state, NeuralMemoryState):
            raise TypeError(f"state must be a NeuralMemoryState; got {type(state).__name__}")
        q, k, v, conv = self.qkv(x, None if state is None else state.conv)
        fq, fk = self.phi(q), self.phi(k)
        target = v - k if self.outer_residual and self.loss == "l2" else v
        y, mem = neural_memory(
            fq, fk, target,
            self.max_lr * torch.sigmoid(self.lr_proj(x)),
            None if self.momentum_proj is None else torch.sigmoid(self.momentum_proj(x)),
            None if self.decay_proj is None else torch.sigmoid(self.decay_proj(x)),
            dict(self.memory_init),
            **self._op_kwargs(),
            loss=self.loss,
            window=self.window,
            window_gate=None if self.gamma_proj is None else torch.sigmoid(self.gamma_proj(x)),
            optimizer=self.optimizer,
            ns_steps=self.ns_steps,
            chunk_size=self.chunk_size,
            granularity=self.granularity,
            initial_state=None if state is None else state.memory,
            output_final_state=return_state,
            impl=self.impl,
        )
        if self.outer_residual:
            y = y + q
        out = self.output(x, y)
        return (out, NeuralMemoryState(mem, conv)) if return_state else out

    def read(self, q: Tensor, state: Optional[NeuralMemoryState] = None) -> Tensor:
        """Read without writing: ``M_W(phi(q))`` with the weights of ``state`` (the learned initial
        memory when None), residual handled as in ``forward``. ``q [B, T, H, head_dim]`` (already
        projected and normalised) -> ``[B, T, H, head_dim]``."""
        if not isinstance(q, Tensor) or q.dim() != 4 or q.shape[-2:] != (self.num_heads, self.head_dim):
            raise ValueError(f"q must be [B, T, {self.num_heads}, {self.head_dim}]; got {getattr(q, 'shape', type(q).__name__)}")
        if state is not None and not isinstance(state, NeuralMemoryState):
            raise TypeError(f"state must be a NeuralMemoryState or None; got {type(state).__name__}")
        weights = dict(self.memory_init) if state is None else state.memory.weights
        y = memory_read(self.phi(q), weights, **self._op_kwargs())
        return y + q if self.outer_residual else y

    def extra_repr(self) -> str:
        s = self.spec
        return (
            f"memory={s.kind}, depth={s.depth}, residual={s.residual}, loss={self.loss}, optimizer={self.optimizer}, "
            f"window={self.window}, chunk_size={self.chunk_size}, granularity={self.granularity}"
        )
