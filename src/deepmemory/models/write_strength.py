r"""``write_strength``: how much of what a memory is told one write closes, at init and with
every gate saturated.

For each memory layer (``NeuralMemory`` or ``KernelMemory``) of a model, on random inputs ``x``
(one token, unit RMS, as the block's RMSNorm gives the mixer): the layer's own projections make a
unit key ``k`` and a value ``v``; one write of ``(k, v)`` takes the memory from ``M_0`` to ``M_1``
(Titans eq. 13–14, ATLAS eq. 32–33, the gated delta rule, ATLAS eq. 25–28: whatever the layer's
rule is, with the layer's gates, forgetting included), and the read at ``k`` closes the fraction

    f = <M_1(k) - M_0(k), v - M_0(k)> / ||v - M_0(k)||^2

of the residual ``v - M_0(k)`` (per head; 1 is a complete write, above 1 an overshoot, 0 nothing).
For a linear memory with the l2 loss, plain gradient descent and rate ``eta`` it is exactly
``eta ||k||^2 = eta`` (``M_1(k) = M_0(k) + eta (v - M_0(k)) k^T k``). docs/numerics.md#write-strength.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..layers.kernel_memory import KernelMemory
from ..layers.memory_layer import NeuralMemory, QKVMixer

MEMORY_LAYERS = (NeuralMemory, KernelMemory)
SATURATED = 1e3  # a gate's pre-activation: sigmoid(+-1e3) is exactly 1 or 0 in float64
BATCH = 32  # inputs per call of a layer


@dataclass
class WriteStrength:
    """What :func:`write_strength` measured, averaged over the model's memory layers.

    ``step_init``: the op's learning rate at init (``max_lr * sigmoid(x W_lr)``, times ``1 -
    momentum`` where the layer damps its momentum), averaged over heads and inputs;
    ``step_saturated``: the same with the gates saturated (``max_lr``). ``init`` / ``saturated``:
    the closed fraction ``f`` of the residual with the gates at their init values / saturated
    (learning rate ``max_lr``, momentum 0, no forgetting, window gate 1). ``layers``: ``(init,
    saturated)`` of each memory layer, in ``model.modules()`` order. ``family``: the memory's rule
    in a few words (network, inner loss, optimizer, Omega window ``c``, memory LayerNorm)."""

    family: str
    step_init: float
    step_saturated: float
    init: float
    saturated: float
    layers: list[tuple[float, float]] = field(default_factory=list)


def describe(layer: nn.Module) -> str:
    """The rule of a memory layer in a few words: ``"mlp l2 momentum"``, ``"mlp l2 muon c=16 LN"``,
    ``"kernel l2 c=16"``."""
    rule = layer.rule
    if isinstance(layer, KernelMemory):
        words = (
            ["kernel", rule.loss]
            + ([f"c={rule.window}"] if rule.window else [])
            + (["norm"] if rule.normalized else [])
        )
        return " ".join(words)
    words = [rule.architecture, rule.loss, rule.optimizer]
    if rule.window > 1:
        words.append(f"c={rule.window}")
    if rule.decay_first:
        words.append("forget-first")
    if rule.layer_norm:
        words.append("LN")
    return " ".join(words)


def _fix(linear: nn.Linear, on: bool) -> None:
    linear.weight.zero_()
    linear.bias.fill_(SATURATED if on else -SATURATED)


def _set_gates(layer: QKVMixer, lr_on: bool, saturate: bool) -> None:
    """Learning-rate gate at 1 (``lr_on``) or 0; with ``saturate`` (or without a write) no
    forgetting; with ``saturate`` momentum 0 (the largest first step of a damped momentum, the
    same first step otherwise) and window and channel gates 1."""
    with torch.no_grad():
        if saturate or not lr_on:
            _fix(layer.lr_proj, lr_on)
            decay = getattr(layer, "decay_proj", None)
            if decay is not None:  # sigmoid and Mamba-2 gates both forget nothing at -1e3
                _fix(decay, False)
        if saturate:
            for name, on in (("momentum_proj", False), ("gamma_proj", True)):
                gate = getattr(layer, name, None)
                if gate is not None:
                    _fix(gate, on)
            channel = getattr(layer, "channel_proj", None)
            if channel is not None:
                channel[0].weight.zero_()
                _fix(channel[1], True)


def _read_at_key(layer: QKVMixer, x: Tensor) -> Tensor:
    """``M_1(k) [B, 1, H, head_dim]``: the layer's read after writing ``x``'s token, with the query
    projection tied to the key's (so the read is at ``k``), taken before the output gate."""
    read = {}

    def output(x_, y):
        read["y"] = y
        return torch.zeros_like(x_)

    layer.output = output  # (an instance attribute on a copy: the layer passed in is untouched)
    layer(x)
    return read["y"]


def _tied(layer: QKVMixer) -> QKVMixer:
    tied = copy.deepcopy(layer).double()
    with torch.no_grad():
        tied.q_proj.weight.copy_(tied.k_proj.weight)
        if tied.conv_size:
            tied.q_conv.load_state_dict(tied.k_conv.state_dict())
    return tied


def _step(layer: QKVMixer, x: Tensor) -> Tensor:
    lr = layer.max_lr * torch.sigmoid(layer.lr_proj(x))
    if getattr(layer, "damped_momentum", False):
        lr = lr * (1 - torch.sigmoid(layer.momentum_proj(x)))
    return lr


@torch.no_grad()
def layer_write_strength(layer: nn.Module, x: Tensor) -> dict[str, Tensor]:
    """The closed fraction ``f`` and the op's learning rate, per input and head (``[B, H]``), of one
    write of each token of ``x [B, 1, hidden_size]`` into ``layer`` (a ``NeuralMemory`` or
    ``KernelMemory``), with the gates at their init values (``"init"``, ``"step_init"``) and
    saturated (``"saturated"``, ``"step_saturated"``); computed in float64 on a copy of the layer.
    ``TypeError`` for another layer; ``ValueError`` for ``x`` that is not one token per row."""
    if not isinstance(layer, MEMORY_LAYERS):
        raise TypeError(f"layer must be a NeuralMemory or KernelMemory; got {type(layer).__name__}")
    if not isinstance(x, Tensor) or x.dim() != 3 or x.shape[1] != 1 or x.shape[2] != layer.hidden_size:
        raise ValueError(f"x must be [B, 1, {layer.hidden_size}]; got {list(getattr(x, 'shape', []))}")
    x = x.double()
    base = _tied(layer)
    _, k, v, _ = base.qkv(x, None)
    off = _tied(layer)
    _set_gates(off, lr_on=False, saturate=False)
    m0 = _read_at_key(off, x)  # no step, no forgetting: the memory before the write
    out = {}
    for name, saturate in (("init", False), ("saturated", True)):
        tied = _tied(layer)
        if saturate:
            _set_gates(tied, lr_on=True, saturate=True)
        m1 = _read_at_key(tied, x)
        residual = v - m0
        out[name] = ((m1 - m0) * residual).sum(-1)[:, 0] / residual.pow(2).sum(-1)[:, 0]
        out[f"step_{name}"] = _step(tied, x)[:, 0]
    return out


@torch.no_grad()
def write_strength(
    model: nn.Module | str, size: str = "tiny", *, samples: int = 64, seed: int = 0, **overrides
) -> WriteStrength:
    """Measure each memory layer's write strength at init and with saturated gates
    (docs/numerics.md#write-strength): one write of ``(k, v)``, then a read at ``k``, closes the
    fraction ``<M_1(k) - M_0(k), v - M_0(k)> / ||v - M_0(k)||^2`` of the residual, averaged over
    heads and ``samples`` random unit-RMS inputs (a ``torch.Generator`` seeded with ``seed``).

    ``model``: any ``nn.Module`` holding ``NeuralMemory`` / ``KernelMemory`` layers (measured as
    they are), or a preset name, built with ``build(model, size, **overrides)`` under
    ``torch.manual_seed(seed)``. Computed in float64 on copies of the layers; the model is not
    changed. Returns a :class:`WriteStrength`. ``ValueError`` for a model without memory layers
    (``transformer``, ``swa``), ``samples < 1``, or what :func:`~deepmemory.models.build` refuses.
    """
    if isinstance(model, str):
        from .presets import build

        torch.manual_seed(seed)
        model = build(model, size, **overrides)
    elif overrides:
        raise ValueError(f"overrides {sorted(overrides)} apply to a preset name, not to a model")
    if not isinstance(samples, int) or isinstance(samples, bool) or samples < 1:
        raise ValueError(f"samples must be an int >= 1; got {samples!r}")
    layers = [m for m in model.modules() if isinstance(m, MEMORY_LAYERS)]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no memory layer (NeuralMemory or KernelMemory) to measure")
    gen = torch.Generator().manual_seed(seed)
    per_layer, steps = [], []
    for layer in layers:
        x = torch.randn(samples, 1, layer.hidden_size, generator=gen, dtype=torch.float64)
        x = x / x.pow(2).mean(-1, keepdim=True).sqrt()  # unit RMS, as after the block's RMSNorm
        # in batches: a chunked rule pads the token to a chunk, and per-token Muon keeps [B, H, chunk, ...] tensors
        parts = [layer_write_strength(layer, xb) for xb in x.split(BATCH)]
        r = {key: torch.cat([part[key] for part in parts]) for key in parts[0]}
        per_layer.append((r["init"].mean().item(), r["saturated"].mean().item()))
        steps.append((r["step_init"].mean().item(), r["step_saturated"].mean().item()))
    n = len(layers)
    return WriteStrength(
        family=describe(layers[0]),
        step_init=sum(s[0] for s in steps) / n,
        step_saturated=sum(s[1] for s in steps) / n,
        init=sum(p[0] for p in per_layer) / n,
        saturated=sum(p[1] for p in per_layer) / n,
        layers=per_layer,
    )
