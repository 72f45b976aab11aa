r"""The neural memory layer (Titans §4.4, ATLAS App. E): projections, gates and output
around the memory op ``deepmemory.ops.neural_memory``."""

from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checks import Check, check_bool, check_choice, check_int, check_positive, check_settings
from ..ops import IMPLS, MemoryState, UpdateRule, memory_read, neural_memory
from ..ops.rule import resolve_rule
from ..ops.varlen import by_document, state_error
from ..tree import State, check_state_fits
from .common import RMSNorm, ShortConv
from .feature_maps import FEATURE_MAPS, make_feature_map

ConvStates = tuple[Tensor | None, Tensor | None, Tensor | None]


def _logit(p: float) -> float:
    return math.log(p / (1.0 - p))


@contextlib.contextmanager
def op_precision(x: Tensor) -> Iterator[torch.dtype]:
    """Run a mixer's memory op: yields the one dtype its q, k, v and gates are cast to, with
    autocast off inside.

    Autocast picks each operation's dtype from per-device lists (``prod`` runs in float32, on CUDA
    ``norm``, ``pow`` and ``exp`` too), so q, k and v can leave their projections and feature
    maps in different dtypes, while the ops take them alike and set their own precision (float32
    state and accumulations under float16/bfloat16 inputs, docs/ops.md), which autocast would
    otherwise override inside them. Under autocast on x's device the dtype is autocast's (float64
    x stays float64, as autocast leaves it); otherwise x's, so nothing changes without autocast.
    """
    dev = x.device.type
    if not (torch.amp.is_autocast_available(dev) and torch.is_autocast_enabled(dev)):
        yield x.dtype
        return
    with torch.autocast(dev, enabled=False):
        yield x.dtype if x.dtype == torch.float64 else torch.get_autocast_dtype(dev)


def _cast(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    return None if t is None else t.to(dtype)


class QKVMixer(nn.Module):
    r"""What every memory mixer shares: ``x -> q, k, v`` (linear, causal depthwise conv + SiLU,
    q and k L2-normalised per head) and the gated output ``o = W_o(RMSNorm(y) * silu(x W_g))``.

    ``conv_size=0`` drops the convolution (SiLU kept), for the ablation without it. ``value_dim``
    (default ``head_dim``) is the width of each head's values and read, and so of the output norm
    and gate (Gated DeltaNet's ``expand_v``: values twice as wide as keys).
    """

    def __init__(self, hidden_size: int, num_heads: int, head_dim: int, conv_size: int, value_dim: int | None = None):
        super().__init__()
        check_int("hidden_size", hidden_size)
        check_int("num_heads", num_heads)
        check_int("head_dim", head_dim)
        check_int("conv_size", conv_size, minimum=0)
        value_dim = head_dim if value_dim is None else value_dim
        check_int("value_dim", value_dim)
        self.hidden_size, self.num_heads, self.head_dim, self.conv_size = hidden_size, num_heads, head_dim, conv_size
        self.value_dim = value_dim
        width, v_width = num_heads * head_dim, num_heads * value_dim
        self.q_proj = nn.Linear(hidden_size, width, bias=False)
        self.k_proj = nn.Linear(hidden_size, width, bias=False)
        self.v_proj = nn.Linear(hidden_size, v_width, bias=False)
        if conv_size > 0:
            self.q_conv = ShortConv(width, conv_size)
            self.k_conv = ShortConv(width, conv_size)
            self.v_conv = ShortConv(v_width, conv_size)
        self.g_proj = nn.Linear(hidden_size, v_width, bias=False)
        self.o_norm = RMSNorm(value_dim)
        self.o_proj = nn.Linear(v_width, hidden_size, bias=False)

    # one check per keyword setting of the mixer, filled in by each subclass
    SETTING_CHECKS: ClassVar[dict[str, Check]] = {}

    @classmethod
    def check_settings(cls, settings: dict, group: str | None = None) -> None:
        """Validate keyword settings of the mixer without building it: a one-line ``TypeError`` /
        ``ValueError`` naming the setting (as ``group['name']`` when ``group`` is given). The
        rule's fields are checked by the rule object's own checks, the layer's by its own."""
        check_settings(settings, cls.SETTING_CHECKS, group or cls.__name__, qualify=group is not None)

    def read_input(self, x: Tensor, state, state_type: type[Any]) -> tuple[Tensor, Tensor, Tensor, ConvStates]:
        """Check ``x`` and ``state`` (None or a ``state_type``); ``q, k, v`` and the new conv states."""
        self.check_input(x)
        if state is not None and not isinstance(state, state_type):
            raise TypeError(f"state must be a {state_type.__name__}; got {type(state).__name__}")
        if state is not None:
            check_state_fits(state, x)
        return self.qkv(x, None if state is None else state.conv)

    def check_input(self, x: Tensor) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor; got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor; got {x.dtype}")
        if x.dim() != 3 or x.shape[-1] != self.hidden_size:
            raise ValueError(f"x must be [B, T, {self.hidden_size}]; got {list(x.shape)}")
        if x.shape[1] < 1:
            raise ValueError("x must hold at least one token (T >= 1)")

    def qkv(self, x: Tensor, conv: ConvStates | None) -> tuple[Tensor, Tensor, Tensor, ConvStates]:
        """``q, k [B, T, H, head_dim]`` (unit norm), ``v [B, T, H, value_dim]`` and the new conv states."""
        projs = (self.q_proj(x), self.k_proj(x), self.v_proj(x))
        if self.conv_size == 0:
            outs, new = [F.silu(p) for p in projs], (None, None, None)
        else:
            conv = conv or (None, None, None)
            pairs = [
                m(p, s, return_state=True) for m, p, s in zip((self.q_conv, self.k_conv, self.v_conv), projs, conv)
            ]
            outs, new = [p[0] for p in pairs], tuple(p[1] for p in pairs)
        q, k = (t.unflatten(-1, (self.num_heads, self.head_dim)) for t in outs[:2])
        v = outs[2].unflatten(-1, (self.num_heads, self.value_dim))
        return F.normalize(q, dim=-1), F.normalize(k, dim=-1), v, new

    def forward_documents(self, x: Tensor, state, return_state: bool, cu_seqlens: Tensor) -> Tensor:
        """``forward`` on each packed document of ``x [1, T, hidden_size]`` alone (``cu_seqlens``,
        no state), as one batch of documents."""
        if state is not None or return_state:
            raise state_error("state/return_state")
        self.check_input(x)
        return by_document(cu_seqlens, self.forward, x)

    def output(self, x: Tensor, y: Tensor) -> Tensor:
        """``y [B, T, H, value_dim]`` -> ``[B, T, hidden_size]``."""
        return self.o_proj(self.o_norm(y).flatten(-2) * F.silu(self.g_proj(x)))


@dataclass
class NeuralMemoryState(State):
    """The op's :class:`MemoryState` (``recurrent_state``) plus the q, k, v conv states
    ``[B, conv_size - 1, H*head_dim]`` (``H*value_dim`` for v; None without convolution)."""

    recurrent_state: MemoryState
    conv: ConvStates


class NeuralMemory(QKVMixer):
    r"""A multi-head neural memory trained while reading (Titans §3–4.4, ATLAS App. E).

    Per head, with ``phi`` the feature map (identity or polynomial) and the gates
    ``lr = max_lr * sigmoid(x W_lr)``, ``momentum = sigmoid(x W_mom)``, ``decay = sigmoid(x W_dec)``,
    ``gamma = sigmoid(x W_gamma)`` (``[B, T, H]``); with ``optimizer="momentum"`` and
    ``damped_momentum`` (the default) the op's learning rate is ``lr * (1 - momentum)``.
    ``channel_lr_rank=r > 0`` makes the learning rate channel-wise (Miras §5.4, "Channel-wise
    Parameters"): a rank-``r`` projection gives ``c = sigmoid(x W_down W_up) [B, T, H, head_dim]``,
    which the op receives as a channel-wise window gate (times ``gamma`` where there is one), so
    token ``t``'s loss weighs value channel ``j`` by ``c_tj`` and its step is
    ``eta_t = lr_t c_t`` per channel (for the linear memory exactly ``diag(eta_t)`` times the
    gradient); it runs in ``impl="chunk"`` or ``"reference"``.
    ``decay_gate="mamba2"`` parametrises the forgetting as Mamba-2 and Gated DeltaNet do, through
    its logarithm ``g = log(1 - decay) = -exp(A_log) * softplus(x W_a + dt_bias)`` per head
    (``W_a`` and ``dt_bias`` are ``decay_proj``'s weight and bias, ``A_log [H]`` a parameter), so
    the op's ``decay = 1 - exp(g)`` (``-expm1(g)``: exact for tiny ``g``). With ``max_lr=1`` the
    learning rate is Gated DeltaNet's ``beta = sigmoid(x W_beta)``::

        W_t = update(W_{t-1}; phi(k), v, gates)       (the op's rule: loss, optimizer, window c)
        y_t = M_{W_t}(phi(q_t))                        o_t = W_o(RMSNorm(y_t) * silu(x_t W_g))

    x ``[B, T, hidden_size]`` -> ``[B, T, hidden_size]``.

    The stale-step bound: given as keywords, the rule's ``step_bound`` defaults here to 1.0 for
    ``gd`` and ``momentum`` (None for ``muon``; :func:`default_step_bound`), so that a chunk's
    steps, all taken at its start weights, never overshoot its least-squares fit along any
    direction of a matrix's inputs, whatever the chunk size, window or ``max_lr`` (momentum
    carried between chunks is not bounded; ``UpdateRule.step_bound``, docs/numerics.md); where it
    is inactive the rule is the papers'.
    ``step_bound=None`` is the papers' rule everywhere (the presets use it); a ``rule=`` object
    is taken as it is.

    Residual memory with a feature map: ``M(x) = x + h(phi(x))`` (docs/layers.md: the residual adds the
    un-featured input, whatever the width of ``phi(x)``). The op runs the residual-free network
    ``h`` on ``phi(k)`` with targets ``v - k`` for ``loss="l2"`` (``0.5||k + h(phi(k)) - v||^2``
    is the same loss), with targets ``v`` for ``loss="dot"`` (``<k, v>`` does not depend on the
    weights, so the gradient is unchanged), and ``q`` is added to what it reads.

    ``expand_v=e`` makes each head's values, memory output, output norm and gate ``e * head_dim``
    wide (keys and queries stay ``head_dim``): Gated DeltaNet's layout in flash-linear-attention
    and the paper has ``e = 2``. It needs a memory without the residual (``M(x) = x + h(x)`` reads
    back its input's width): a linear memory, or ``residual=False``.

    Initialisation (why training starts sane): gate weights ``N(0, 0.02^2)``; gate biases give
    ``lr = 0.1 max_lr``, ``momentum = 0.9``, ``decay = 0.01``, ``gamma = 0.95`` and channel
    gates ``0.95`` at ``x = 0`` (the low-rank factors ``N(0, 0.02^2)``); under
    ``decay_gate="mamba2"`` Mamba-2's: ``exp(A_log)`` uniform in [1, 16], ``softplus(dt_bias)`` log-uniform in
    [1e-3, 0.1], so ``1 - decay`` lies in about [0.2, 1) at
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
        rule: UpdateRule | None = None,
        expansion: int = 4,
        feature_map: str = "identity",
        poly_degree: int = 2,
        poly_constant: bool = False,
        max_lr: float = 1.0,
        conv_size: int = 4,
        use_decay: bool = True,
        decay_gate: str = "sigmoid",
        learned_window_gate: bool = True,
        channel_lr_rank: int = 0,
        damped_momentum: bool = True,
        impl: str = "chunk",
        expand_v: int = 1,
        **rule_settings,
    ):
        check_int("expand_v", expand_v)
        super().__init__(hidden_size, num_heads, head_dim, conv_size, value_dim=expand_v * head_dim)
        layer = dict(
            expand_v=expand_v,
            expansion=expansion,
            feature_map=feature_map,
            poly_degree=poly_degree,
            poly_constant=poly_constant,
            max_lr=max_lr,
            conv_size=conv_size,
            use_decay=use_decay,
            decay_gate=decay_gate,
            learned_window_gate=learned_window_gate,
            channel_lr_rank=channel_lr_rank,
            damped_momentum=damped_momentum,
            impl=impl,
        )
        # (a rule given whole is checked with the layer too: expand_v needs its memory without the residual)
        self.check_settings({**layer, **(rule.to_dict() if rule is not None else {}), **rule_settings})
        if rule is None and "step_bound" not in rule_settings:
            rule_settings["step_bound"] = default_step_bound(rule_settings.get("optimizer", UpdateRule.optimizer))
        rule = resolve_rule(rule, rule_settings, LAYER_RULE_DEFAULTS)
        self.phi = make_feature_map(feature_map, head_dim, num_heads, poly_degree, poly_constant)
        key_dim = cast(int, self.phi.out_dim)  # (an int attribute of every feature map)
        # the op's residual would add phi(k); the un-featured input is added outside the op instead
        self.outer_residual = rule.spec.uses_residual and feature_map != "identity"
        self.rule = rule.replace(residual=False) if self.outer_residual else rule
        self.impl = impl
        self.max_lr = float(max_lr)
        self.damped_momentum = damped_momentum and rule.optimizer == "momentum"
        optimizer, window = rule.optimizer, rule.window

        def gate(p0: float) -> nn.Linear:
            lin = nn.Linear(hidden_size, num_heads)
            nn.init.normal_(lin.weight, std=0.02)
            nn.init.constant_(lin.bias, _logit(p0))
            return lin

        self.lr_proj = gate(0.1)
        self.momentum_proj = gate(0.9) if optimizer != "gd" else None
        self.decay_proj = gate(0.01) if use_decay else None
        self.A_log = None
        if use_decay and decay_gate == "mamba2":
            # Mamba-2's initialisation: A uniform in [1, 16], the step dt log-uniform in [1e-3, 0.1]
            # with dt_bias its inverse softplus (dt + log(1 - exp(-dt)))
            with torch.no_grad():
                dt = torch.exp(torch.empty(num_heads).uniform_(math.log(1e-3), math.log(0.1)))
                assert self.decay_proj is not None  # (use_decay)
                self.decay_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
            self.A_log = nn.Parameter(torch.empty(num_heads).uniform_(1.0, 16.0).log())
        self.gamma_proj = gate(0.95) if window > 1 and learned_window_gate else None
        self.channel_proj = None
        if channel_lr_rank > hidden_size:
            raise ValueError(
                f"channel_lr_rank must be <= hidden_size ({hidden_size}): it is the rank of a projection of x; "
                f"got {channel_lr_rank}"
            )
        if channel_lr_rank:  # Miras §5.4: channel-wise rates through a low-rank projection
            down = nn.Linear(hidden_size, channel_lr_rank, bias=False)
            up = nn.Linear(channel_lr_rank, num_heads * self.value_dim)
            self.channel_proj = nn.Sequential(down, up)
            for lin in (down, up):
                nn.init.normal_(lin.weight, std=0.02)
            nn.init.constant_(up.bias, _logit(0.95))

        spec = self.rule.spec
        shapes = spec.shapes(key_dim, self.value_dim, expansion * head_dim)
        names = spec.names()
        self.initial_weights = nn.ParameterDict()
        for name in names:
            rows, cols = shapes[name]
            w = torch.empty(num_heads, rows, cols)
            if name == names[-1] and spec.architecture == "linear":
                nn.init.zeros_(w)
            elif name == names[-1] and rule.spec.uses_residual:
                nn.init.normal_(w, std=0.1 / math.sqrt(cols))
            else:
                nn.init.normal_(w, std=1.0 / math.sqrt(cols))
            self.initial_weights[name] = nn.Parameter(w)

    @classmethod
    def check_settings(cls, settings: dict, group: str | None = None) -> None:
        """Each setting as :meth:`QKVMixer.check_settings` does, then those that only hold together
        (over the defaults): the rule's (``decay_first`` needs ``chunk_size=1`` and token
        granularity), ``decay_gate="mamba2"``, which needs ``use_decay=True``, and
        ``channel_lr_rank``, which needs ``impl`` other than ``"triton"``, and ``step_bound`` (given
        or the default of :func:`default_step_bound`), which ``impl="triton"`` computes only for the
        linear memory. One-line ``TypeError`` / ``ValueError``."""
        super().check_settings(settings, group)
        merged = dict(SETTINGS, **settings)
        UpdateRule.from_settings(merged)
        if merged["decay_gate"] != "sigmoid" and not merged["use_decay"]:
            raise ValueError(f"decay_gate={merged['decay_gate']!r} shapes the forget gate: it needs use_decay=True")
        if merged["channel_lr_rank"] and merged["impl"] == "triton":
            raise ValueError(
                "channel_lr_rank needs impl='chunk' or 'reference': the Triton kernels take one window gate per head"
            )
        if merged["expand_v"] > 1 and UpdateRule.from_settings(merged).spec.uses_residual:
            raise ValueError(
                f"expand_v={merged['expand_v']} makes values wider than keys: it needs a memory without the residual "
                "M(x) = x + h(x) (architecture='linear', or residual=False)"
            )
        bound = settings.get("step_bound", default_step_bound(merged["optimizer"]))
        if bound is not None and merged["impl"] == "triton" and merged["architecture"] != "linear":
            raise ValueError(
                f"impl='triton' computes step_bound only for architecture='linear'; pass step_bound=None for the "
                f"papers' rule in Triton, or impl='chunk' (got architecture={merged['architecture']!r}, "
                f"step_bound={bound})"
            )

    def forward(
        self,
        x: Tensor,
        state: NeuralMemoryState | None = None,
        return_state: bool = False,
        *,
        cu_seqlens: Tensor | None = None,
    ) -> Tensor | tuple[Tensor, NeuralMemoryState]:
        """``x [B, T, hidden_size]`` -> ``y [B, T, hidden_size]`` (and the state to continue from).

        ``cu_seqlens [N + 1]`` (int32/int64, ``[0, l_1, l_1 + l_2, ..., T]``; ``B`` must be 1):
        packed documents, each read as if alone (conv history, memory, momentum, window and chunks
        restart at its first token); the layer runs once on the batch of documents ``[N, max l_i]``
        (:func:`deepmemory.ops.varlen.by_document`), whose padding is the cost. Not supported
        with ``state`` or ``return_state`` (one-line ``ValueError``), nor are malformed boundaries."""
        if cu_seqlens is not None:
            return self.forward_documents(x, state, return_state, cu_seqlens)
        q, k, v, conv = self.read_input(x, state, NeuralMemoryState)
        fq, fk = self.phi(q), self.phi(k)
        target = v - k if self.outer_residual and self.rule.loss == "l2" else v
        lr = self.max_lr * torch.sigmoid(self.lr_proj(x))
        momentum = None if self.momentum_proj is None else torch.sigmoid(self.momentum_proj(x))
        if self.damped_momentum:
            # S_t = m_t S_{t-1} - (1 - m_t) lr_t u_t: a momentum that averages gradients instead of
            # summing up to 1/(1 - m) of them keeps the chunk's step in the stable range of plain
            # gd for any m and chunk size (docs/numerics.md); Titans eq. 13-14 with theta_t = lr_t (1 - m_t)
            assert momentum is not None  # (optimizer='momentum')
            lr = lr * (1 - momentum)
        decay: Tensor | None
        if self.A_log is not None:  # decay = 1 - exp(g), g = -exp(A_log) softplus(x W_a + dt_bias)
            assert self.decay_proj is not None  # (A_log only with use_decay)
            decay = -torch.expm1(-self.A_log.exp() * F.softplus(self.decay_proj(x)))
        else:
            decay = None if self.decay_proj is None else torch.sigmoid(self.decay_proj(x))
        window_gate = None if self.gamma_proj is None else torch.sigmoid(self.gamma_proj(x))
        if self.channel_proj is not None:  # [B, T, H, head_dim]: per value channel, times gamma
            channel = torch.sigmoid(self.channel_proj(x)).unflatten(-1, (self.num_heads, self.value_dim))
            window_gate = channel if window_gate is None else channel * window_gate.unsqueeze(-1)
        with op_precision(x) as cd:  # one dtype for the op's inputs (they differ under autocast)
            y, mem = neural_memory(
                fq.to(cd),
                fk.to(cd),
                target.to(cd),
                lr.to(cd),
                _cast(momentum, cd),
                _cast(decay, cd),
                dict(self.initial_weights),
                rule=self.rule,
                window_gate=_cast(window_gate, cd),
                initial_state=None if state is None else state.recurrent_state,
                output_final_state=return_state,
                impl=self.impl,
            )
        if self.outer_residual:
            y = y + q
        out = self.output(x, y)
        if not return_state:
            return out
        assert mem is not None  # (output_final_state=True)
        return out, NeuralMemoryState(mem, conv)

    def read(self, q: Tensor, state: NeuralMemoryState | None = None) -> Tensor:
        """Read without writing: ``M_W(phi(q))`` with the weights of ``state`` (the learned initial
        memory when None), residual handled as in ``forward``. ``q [B, T, H, head_dim]`` (already
        projected and normalised) -> ``[B, T, H, value_dim]``."""
        if not isinstance(q, Tensor) or q.dim() != 4 or q.shape[-2:] != (self.num_heads, self.head_dim):
            raise ValueError(
                f"q must be [B, T, {self.num_heads}, {self.head_dim}]; got {getattr(q, 'shape', type(q).__name__)}"
            )
        if state is not None and not isinstance(state, NeuralMemoryState):
            raise TypeError(f"state must be a NeuralMemoryState or None; got {type(state).__name__}")
        weights = dict(self.initial_weights) if state is None else state.recurrent_state.weights
        with op_precision(q) as cd:
            y = memory_read(self.phi(q).to(cd), weights, rule=self.rule)
        return y + q if self.outer_residual else y

    def extra_repr(self) -> str:
        r = self.rule
        return (
            f"architecture={r.architecture}, depth={r.depth}, residual={r.residual}, loss={r.loss}, "
            f"optimizer={r.optimizer}, "
            f"window={r.window}, chunk_size={r.chunk_size}, granularity={r.granularity}, decay_first={r.decay_first}, "
            f"step_bound={r.step_bound}"
            + (f", channel_lr_rank={self.channel_proj[0].out_features}" if self.channel_proj is not None else "")
        )


def default_step_bound(optimizer: str) -> float | None:
    """The layer's ``step_bound`` when none is given: 1.0 for ``gd`` and ``momentum`` (a chunk's
    stale steps never overshoot its least-squares fit along any direction of a matrix's inputs,
    docs/numerics.md), None for ``muon``, whose steps are orthogonalised."""
    return None if optimizer == "muon" else 1.0


def _keyword_defaults(cls) -> dict:
    params = inspect.signature(cls).parameters.values()
    return {p.name: p.default for p in params if p.kind is p.KEYWORD_ONLY}


# how the forget gate is made from x: Titans' sigmoid, or Mamba-2's (Gated DeltaNet's) log-decay
DECAY_GATES = ("sigmoid", "mamba2")
# the layer's defaults for fields of the rule (small models: chunks of 16 tokens)
LAYER_RULE_DEFAULTS = dict(chunk_size=16)
# the keyword settings of the layer and their defaults: the rule's fields and the layer's own
LAYER_SETTINGS = {k: v for k, v in _keyword_defaults(NeuralMemory).items() if k != "rule"}
SETTINGS = dict(LAYER_SETTINGS, **dict(UpdateRule().to_dict(), **LAYER_RULE_DEFAULTS))
LAYER_CHECKS = {
    "expand_v": check_int,
    "expansion": check_int,
    "poly_degree": check_int,
    "poly_constant": check_bool,
    "conv_size": lambda label, v: check_int(label, v, minimum=0),
    "learned_window_gate": check_bool,
    "channel_lr_rank": lambda label, v: check_int(label, v, minimum=0),
    "damped_momentum": check_bool,
    "use_decay": check_bool,
    "decay_gate": lambda label, v: check_choice(label, v, DECAY_GATES),
    "feature_map": lambda label, v: check_choice(label, v, FEATURE_MAPS),
    "max_lr": check_positive,
    "impl": lambda label, v: check_choice(label, v, tuple(IMPLS)),
}
NeuralMemory.SETTING_CHECKS = {name: (LAYER_CHECKS.get(name) or UpdateRule.FIELD_CHECKS[name]) for name in SETTINGS}
