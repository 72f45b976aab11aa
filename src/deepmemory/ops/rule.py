r"""``UpdateRule``: the memory update rule as one frozen, self-validating value.

Every memory model of the library is a configuration of one rule (Titans eq. 13–14 with the
Omega window and Muon of ATLAS, see docs/ops.md)::

    u_t = sum_{i=t-c+1}^{t} gamma_i grad_W loss_i(W_{t'})       loss_i = 0.5||M_W(k_i) - v_i||^2 | -<M_W(k_i), v_i>
    gd/momentum: S_t = momentum_t S_{t-1} - lr_t u_t;  W_t = (1 - decay_t) W_{t-1} + S_t
    muon:        S_t = momentum_t S_{t-1} + u_t;       W_t = (1 - decay_t) W_{t-1} - lr_t NS(S_t)
    o_t = M_{W_t}(q_t)

An :class:`UpdateRule` fixes everything in it but the data and the gates: which memory ``M``,
the inner loss, the optimizer, Newton–Schulz steps, the window ``c``, the chunk size, the
granularity and the order of forgetting (``decay_first``: the gradient at ``(1 - decay_t) W_{t-1}``,
Gated DeltaNet). The op (``neural_memory(..., rule=rule)``), every implementation, the op's
``MemoryState``, the layer ``NeuralMemory`` and the model config all carry the same object.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..checks import RENAMED, Settings, check_bool, check_choice, check_int, check_positive
from .memory import ACTIVATIONS, ARCHITECTURES, LOSSES, MemorySpec

OPTIMIZERS = ("gd", "momentum", "muon")
GRANULARITIES = ("token", "chunk")


@dataclass(frozen=True)
class UpdateRule(Settings):
    """The settings of the memory update rule (all validated when the rule is made).

    Args:
        architecture: the memory network ``M``: ``"linear"`` (``W0 x``), ``"mlp"`` (``depth`` matrices,
            ``activation`` between them) or ``"gated_mlp"`` (ATLAS eq. 43, Atlas++).
        depth: matrices of an ``mlp`` memory (int >= 1; ignored by the other kinds).
        activation: ``"gelu"``, ``"silu"``, ``"relu"`` or ``"tanh"``.
        residual: ``M(x) = x + h(x)`` for ``mlp`` / ``gated_mlp`` (needs ``dk == dv``; ignored by
            ``linear``).
        layer_norm: normalise the network's output, ``M(x) = x + LN(h(x))`` (ATLAS App. E;
            LayerNorm without gain or bias; for ``linear``, ``M(x) = LN(W0 x)``).
        loss: the inner loss: ``"l2"`` (``0.5||M(k) - v||^2``, Titans) or ``"dot"``
            (``-<M(k), v>``, Hebbian: DLA, DeepTransformer).
        optimizer: ``"gd"``, ``"momentum"`` (Titans eq. 13–14) or ``"muon"`` (Atlas: momentum
            orthogonalised by Newton–Schulz, the learning rate applied after it).
        ns_steps: Newton–Schulz iterations of Muon (int >= 0).
        window: the Omega window ``c`` (int >= 1; 1 is Titans' online rule).
        chunk_size: tokens whose gradients are taken at the same weights (int >= 1; 1 is fully
            online). It changes the rule, not only its speed.
        granularity: ``"token"`` (one update per token, the papers' rule) or ``"chunk"`` (one
            update per chunk with averaged gates; tokens read the previous chunk's memory).
        decay_first: Gated DeltaNet: forget, then take the gradient at the forgotten weights,
            ``u_t = sum_i gamma_i grad_W loss_i((1 - decay_t) W_{t-1})`` (the gated delta rule,
            Gated DeltaNet arXiv 2412.06464 §3.1; with the linear memory, the l2 loss and gd,
            ``S_t = alpha_t S_{t-1} (I - beta_t k_t k_t^T) + beta_t v_t k_t^T``). False (the default)
            takes it at ``W_{t-1}`` as Titans eq. 13–14 do. Forgetting before the gradient is defined
            token by token: it needs ``chunk_size=1`` and ``granularity="token"``.
        step_bound: None (the default: the papers' rule) or a positive number ``tau`` bounding the
            stale steps of a chunk (gd and momentum). Token ``t`` of a chunk sees the chunk's
            gradients, all taken at its start, with weights ``C(t, i)`` (learning rates times the
            momentum, forgetting and window products). For each weight matrix, with ``a_i`` its
            input for token ``i`` (the keys, for the linear memory), ``H_t = sum_i C(t, i) a_i
            a_i^T`` is that step along the matrix's input directions (the curvature of the step
            for the l2 loss of a linear memory: ``b`` repeats of one unit key give ``||H_t|| =
            b lr``). Where the largest ``||H_t||_F`` exceeds ``tau``, the chunk's learning rates, as
            token ``t`` and the state after it see them, are multiplied by ``tau / ||H_t||_F``;
            elsewhere nothing changes. ``tau = 1`` forbids overshooting the chunk's least-squares
            fit along any input direction (Gated DeltaNet's ``beta <= 1``, for a chunk). Momentum
            carried from chunk to chunk is not bounded. docs/ops.md, docs/numerics.md.

    Raises:
        TypeError / ValueError: a one-line message naming the first bad field; ``ValueError`` for
            ``decay_first`` with ``chunk_size != 1`` or ``granularity="chunk"``, and for
            ``step_bound`` with ``optimizer="muon"``.
    """

    architecture: str = "mlp"
    depth: int = 2
    activation: str = "gelu"
    residual: bool = True
    layer_norm: bool = False
    loss: str = "l2"
    optimizer: str = "momentum"
    ns_steps: int = 5
    window: int = 1
    chunk_size: int = 64
    granularity: str = "token"
    decay_first: bool = False
    step_bound: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.step_bound is not None and self.optimizer == "muon":
            raise ValueError(
                "step_bound bounds the summed steps of optimizer='gd' or 'momentum'; Muon's step is "
                "orthogonalised (lr times a matrix of unit singular values), bounded as it is: pass step_bound=None"
            )
        if self.decay_first and (self.chunk_size != 1 or self.granularity != "token"):
            raise ValueError(
                "decay_first (forget, then take the gradient) is defined token by token: it needs chunk_size=1 "
                f"and granularity='token'; got chunk_size={self.chunk_size}, granularity={self.granularity!r}"
            )

    @property
    def spec(self) -> MemorySpec:
        """The memory network alone (what a read needs)."""
        return MemorySpec(self.architecture, self.depth, self.activation, self.residual, self.layer_norm)


# one check per field: ``check(label, value)`` raises a one-line error naming ``label``
UpdateRule.FIELD_CHECKS = {
    "architecture": lambda label, v: check_choice(label, v, ARCHITECTURES),
    "depth": check_int,
    "activation": lambda label, v: check_choice(label, v, ACTIVATIONS),
    "residual": check_bool,
    "layer_norm": check_bool,
    "loss": lambda label, v: check_choice(label, v, LOSSES),
    "optimizer": lambda label, v: check_choice(label, v, OPTIMIZERS),
    "ns_steps": lambda label, v: check_int(label, v, minimum=0),
    "window": check_int,
    "chunk_size": check_int,
    "granularity": lambda label, v: check_choice(label, v, GRANULARITIES),
    "decay_first": check_bool,
    "step_bound": lambda label, v: None if v is None else check_positive(label, v),
}
FIELDS = UpdateRule.field_names()
assert tuple(UpdateRule.FIELD_CHECKS) == FIELDS


def resolve_rule(
    rule: UpdateRule | None, settings: dict[str, Any], defaults: dict[str, Any] | None = None
) -> UpdateRule:
    """The rule of a call that takes ``rule=`` or the rule's fields as keywords (``settings``,
    over ``defaults``), not both. One-line ``TypeError`` for a rule that is not an
    :class:`UpdateRule` or an unknown keyword, ``ValueError`` for both forms at once."""
    if rule is None:
        unknown = sorted(set(settings) - set(FIELDS))
        renamed = [k for k in unknown if k in RENAMED]
        if renamed:
            raise TypeError(f"keyword {renamed[0]!r} was renamed {RENAMED[renamed[0]]!r} (CHANGELOG.md)")
        if unknown:
            raise TypeError(f"unexpected keyword argument(s) {unknown}; the rule's settings are {', '.join(FIELDS)}")
        return UpdateRule(**dict(defaults or {}, **settings))
    if not isinstance(rule, UpdateRule):
        raise TypeError(f"rule must be an UpdateRule; got {type(rule).__name__}")
    if settings:
        raise ValueError(
            f"pass the rule's settings in rule=, or as keywords, not both; got rule= and {sorted(settings)}"
        )
    return rule
