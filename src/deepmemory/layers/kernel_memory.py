r"""The DeepTransformer family as a layer: ``KernelMemory`` (DeepTransformer, SWDT, Dot; ATLAS §4,
eq. 22–31), projections, gates and output around the kernel-form memory op
``deepmemory.ops.kernel_memory``, whose docstring holds the rule, its special cases and its cost.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..checks import check_int, check_positive
from ..ops.kernel import KernelRule, KernelState, kernel_memory
from ..tree import State
from .memory_layer import ConvStates, QKVMixer, op_precision

KERNEL_STEP_BOUND = 1.0  # the layer's step_bound when none is given (KernelRule.step_bound)


@dataclass
class KernelMemoryState(State):
    """The kernel memory's :class:`~deepmemory.ops.KernelState` (``recurrent_state``) plus the q,
    k, v conv states."""

    recurrent_state: KernelState
    conv: ConvStates


class KernelMemory(QKVMixer):
    r"""DeepTransformer (``window=None``, ``loss="dot"``), SWDT (``window=c``) and Dot
    (``loss="l2"``, ``window=c``): a deep memory whose first layer is kept implicit
    (``deepmemory.ops.kernel_memory``, ATLAS eq. 22–31). With a window, ``window_rule="omega"``
    (the default) is the paper's Omega rule (ATLAS eq. 27: the window's gradients are taken and
    applied again at every step, and tokens stay in the memory) and ``"swa"`` retires each token's
    write when it leaves the window (the deep form of sliding-window attention).

    Per head: ``q, k, v`` as in :class:`NeuralMemory` (unit q, k), ``lr = max_lr * sigmoid(x W_lr)``
    in ``(0, max_lr)`` (bias 0: ``lr = max_lr / 2`` at ``x = 0``), ``y_t = M_t(q_t)`` with the
    kernel ``exp(τ k·x)`` (``τ = exp(log_temp)``, per head, init ``sqrt(head_dim)``), output
    ``W_o(RMSNorm(y) * silu(x W_g))``. ``depth=1`` is the linear memory (attention when
    ``residual=False``). x ``[B, T, hidden_size]`` (any floating dtype; the memory computes in
    float32, float64 for float64 x, also under autocast) -> ``[B, T, hidden_size]`` in x's dtype
    (autocast's under autocast).

    The settings ``window, window_rule, loss, depth, activation, residual, normalized, chunk_size,
    step_bound`` make the layer's :class:`~deepmemory.ops.KernelRule` (``self.rule``; each also
    readable as an attribute); ``expansion`` sets the hidden width ``expansion * head_dim`` of the
    deeper matrices; ``conv_size=0`` drops the short convolution.

    ``step_bound`` defaults here to ``KERNEL_STEP_BOUND`` = 1.0 (the rule's own default, None, is
    the papers' rule): a chunk's summed step along each matrix's inputs, ``φ*(k)`` of norm
    ``exp(τ/2)`` for the first, stays below 1 (``KernelRule.step_bound``). Without it the
    unnormalised forms multiply every step by ``exp(τ)`` and a Hebbian (``loss="dot"``) deep
    memory's read grows without bound, overflowing within tens of tokens at ``max_lr`` 1
    (docs/models/deep-transformer.md); ``step_bound=None`` is the papers' rule.

    Initialisation: ``W_0 = 0`` (so the memory starts as the identity, or zero without the
    residual); deeper matrices ``N(0, 1/cols)`` so that the first layer's gradient is not zero.

    Raises:
        TypeError / ValueError: a bad setting (one line naming it), a bad ``x`` or a ``state`` that
            is not a :class:`KernelMemoryState` (or was made with other settings).
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        head_dim: int,
        *,
        window: int | None = None,
        window_rule: str = "omega",
        loss: str = "dot",
        depth: int = 2,
        expansion: int = 4,
        activation: str = "gelu",
        residual: bool = True,
        normalized: bool = True,
        chunk_size: int = 16,
        max_lr: float = 1.0,
        conv_size: int = 4,
        step_bound: float | None = KERNEL_STEP_BOUND,
    ):
        super().__init__(hidden_size, num_heads, head_dim, conv_size)
        self.check_settings(dict(expansion=expansion, max_lr=max_lr, conv_size=conv_size))
        self.rule = KernelRule(
            depth=depth,
            activation=activation,
            residual=residual,
            loss=loss,
            window=window,
            window_rule=window_rule,
            normalized=normalized,
            chunk_size=chunk_size,
            step_bound=step_bound,
        )
        self.max_lr = float(max_lr)
        self.lr_proj = nn.Linear(hidden_size, num_heads)
        nn.init.normal_(self.lr_proj.weight, std=0.02)
        nn.init.zeros_(self.lr_proj.bias)
        self.log_temp = nn.Parameter(torch.full((num_heads,), 0.5 * math.log(head_dim)))
        hidden = expansion * head_dim
        self.initial_weights = nn.ParameterDict()
        for l in range(1, depth):
            rows = head_dim if l == depth - 1 else hidden
            self.initial_weights[f"w{l}"] = nn.Parameter(torch.randn(num_heads, rows, hidden) / math.sqrt(hidden))

    def forward(
        self,
        x: Tensor,
        state: KernelMemoryState | None = None,
        return_state: bool = False,
        *,
        cu_seqlens: Tensor | None = None,
    ) -> Tensor | tuple[Tensor, KernelMemoryState]:
        """``x [B, T, hidden_size]`` -> ``y [B, T, hidden_size]`` (and the state to continue from).

        ``cu_seqlens [N + 1]`` (int32/int64, ``[0, l_1, l_1 + l_2, ..., T]``; ``B`` must be 1):
        packed documents, each read as if alone (conv history, stored keys, window and chunks
        restart at its first token); the layer runs once on the batch of documents ``[N, max l_i]``,
        whose padding is the cost. Not supported with ``state`` or ``return_state`` (one-line
        ``ValueError``), nor are malformed boundaries."""
        if cu_seqlens is not None:
            return self.forward_documents(x, state, return_state, cu_seqlens)
        q, k, v, conv = self.read_input(x, state, KernelMemoryState)
        lr = self.max_lr * torch.sigmoid(self.lr_proj(x))
        # one dtype for the op's inputs, which autocast leaves in different ones; the op computes
        # in float32 under lower precisions (float64 for float64) and answers in its inputs' dtype
        with op_precision(x) as cd:
            y, cache = kernel_memory(
                q.to(cd),
                k.to(cd),
                v.to(cd),
                lr.to(cd),
                dict(self.initial_weights),
                self.log_temp.exp(),
                rule=self.rule,
                initial_state=None if state is None else state.recurrent_state,
                output_final_state=return_state,
            )
        out = self.output(x, y)
        if not return_state:
            return out
        assert cache is not None  # (output_final_state=True)
        return out, KernelMemoryState(cache, conv)

    # the rule's fields, read-only (the rule is fixed when the layer is made)
    window = property(lambda self: self.rule.window)
    window_rule = property(lambda self: self.rule.window_rule)
    loss = property(lambda self: self.rule.loss)
    depth = property(lambda self: self.rule.depth)
    activation = property(lambda self: self.rule.activation)
    residual = property(lambda self: self.rule.residual)
    normalized = property(lambda self: self.rule.normalized)
    chunk_size = property(lambda self: self.rule.chunk_size)
    step_bound = property(lambda self: self.rule.step_bound)

    def extra_repr(self) -> str:
        return (
            f"window={self.window}, window_rule={self.window_rule}, loss={self.loss}, depth={self.depth}, "
            f"residual={self.residual}, "
            f"normalized={self.normalized}, chunk_size={self.chunk_size}, step_bound={self.step_bound}"
        )


KernelMemory.SETTING_CHECKS = dict(
    KernelRule.FIELD_CHECKS,
    expansion=check_int,
    max_lr=check_positive,
    conv_size=lambda label, v: check_int(label, v, minimum=0),
)
