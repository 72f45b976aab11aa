"""Memory models ``M_W: R^{dk} -> R^{dv}`` as used by the update rule.

Column convention: every parameter is one matrix per head and is applied as ``W @ x``.
A memory is described by :class:`MemorySpec`; its forward pass is written against an
``apply(name, x)`` callback that returns ``W_name @ x`` for a batch of column vectors
``x`` of shape ``[B, H, N, cols]`` (result ``[B, H, N, rows]``). Plugging in a dense
matrix product gives the ordinary forward pass; plugging in the dual form of the
chunked op reads the memory at per-token weights without materialising them.

For training the memory, :func:`token_gradients` returns, for every matrix, the pair
``(delta, a)`` such that the gradient of token ``i``'s loss is the outer product
``delta_i a_i^T`` (backprop signal of the matrix's output times its input).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

ARCHITECTURES = ("linear", "mlp", "gated_mlp")
ACTIVATIONS = ("gelu", "silu", "relu", "tanh")
LOSSES = ("l2", "dot")

Apply = Callable[[str, Tensor], Tensor]


def activation(name: str, z: Tensor) -> Tensor:
    if name == "gelu":
        return torch.nn.functional.gelu(z)
    if name == "silu":
        return torch.nn.functional.silu(z)
    if name == "relu":
        return torch.relu(z)
    return torch.tanh(z)


def activation_backward(name: str, grad: Tensor, z: Tensor) -> Tensor:
    """``grad * activation'(z)`` through ATen's fused backward kernels: one op where the
    written-out derivative takes several, and each has its own derivative (second order)."""
    if name == "gelu":
        return torch.ops.aten.gelu_backward(grad, z)
    if name == "silu":
        return torch.ops.aten.silu_backward(grad, z)
    if name == "relu":
        return torch.ops.aten.threshold_backward(grad, z, 0)
    return torch.ops.aten.tanh_backward(grad, torch.tanh(z))


@dataclass(frozen=True)
class MemorySpec:
    """Which memory network: ``architecture`` in linear | mlp | gated_mlp.

    ``depth`` counts matrices of an mlp; ``residual`` adds the input to the output of an
    mlp / gated_mlp (``M(x) = x + h``), which needs ``dk == dv``. A linear memory is
    ``M(x) = W0 x`` and ignores both. ``layer_norm`` normalises the network's output before the
    residual, ``M(x) = x + LN(h(x))`` (ATLAS App. E; LayerNorm without gain or bias, eps 1e-5,
    part of the function the inner loop trains through).
    """

    architecture: str = "mlp"
    depth: int = 2
    activation: str = "gelu"
    residual: bool = True
    layer_norm: bool = False

    @property
    def uses_residual(self) -> bool:
        return self.architecture != "linear" and self.residual

    def names(self) -> tuple[str, ...]:
        if self.architecture == "linear":
            return ("w0",)
        if self.architecture == "mlp":
            return tuple(f"w{i}" for i in range(self.depth))
        return ("w_gate", "w_up", "w_out")

    def shapes(self, dk: int, dv: int, hidden: int) -> dict[str, tuple[int, int]]:
        """Expected (rows, cols) of each matrix."""
        if self.architecture == "linear":
            return {"w0": (dv, dk)}
        if self.architecture == "mlp":
            if self.depth == 1:
                return {"w0": (dv, dk)}
            out = {"w0": (hidden, dk)}
            for i in range(1, self.depth - 1):
                out[f"w{i}"] = (hidden, hidden)
            out[f"w{self.depth - 1}"] = (dv, hidden)
            return out
        return {"w_gate": (hidden, dk), "w_up": (hidden, dk), "w_out": (dv, hidden)}

    def hidden_of(self, weights: dict[str, Tensor]) -> int:
        """The hidden width implied by the parameters (0 when there is none)."""
        if self.architecture == "gated_mlp":
            return weights["w_gate"].shape[-2]
        if self.architecture == "mlp" and self.depth > 1:
            return weights["w0"].shape[-2]
        return 0


def dense_apply(weights: dict[str, Tensor]) -> Apply:
    """``apply`` for explicit weights ``[B, H, rows, cols]`` (or ``[B, H, N, rows, cols]`` per token)."""

    def apply(name: str, x: Tensor) -> Tensor:
        w = weights[name]
        if w.dim() == x.dim() + 1:  # one matrix per token
            return torch.einsum("bhnrc,bhnc->bhnr", w, x)
        return x @ w.transpose(-1, -2)

    return apply


LN_EPS = 1e-5


def layer_norm(h: Tensor) -> Tensor:
    """``(h - mean) / sqrt(var + eps)`` over the last dim (no gain, no bias)."""
    return torch.nn.functional.layer_norm(h, h.shape[-1:], eps=LN_EPS)


def layer_norm_backward(grad: Tensor, h: Tensor) -> Tensor:
    """``d loss / d h`` from ``grad = d loss / d layer_norm(h)``, written out so that it stays
    differentiable (the outer loop trains through it):
    ``(grad - mean(grad) - y mean(grad y)) / sqrt(var + eps)`` with ``y = layer_norm(h)``."""
    centred = h - h.mean(-1, keepdim=True)
    inv_std = torch.rsqrt(centred.pow(2).mean(-1, keepdim=True) + LN_EPS)
    y = centred * inv_std
    return inv_std * (grad - grad.mean(-1, keepdim=True) - y * (grad * y).mean(-1, keepdim=True))


def memory_forward(spec: MemorySpec, apply: Apply, x: Tensor) -> Tensor:
    """``M(x)`` for ``x [B, H, N, dk]`` -> ``[B, H, N, dv]``."""
    if spec.architecture == "linear":
        h = apply("w0", x)
        return layer_norm(h) if spec.layer_norm else h
    if spec.architecture == "mlp":
        h = x
        for i in range(spec.depth):
            z = apply(f"w{i}", h)
            h = activation(spec.activation, z) if i < spec.depth - 1 else z
    else:
        h = apply("w_out", activation(spec.activation, apply("w_gate", x)) * apply("w_up", x))
    if spec.layer_norm:
        h = layer_norm(h)
    return x + h if spec.residual else h


def mm(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b``; for two 3-dim tensors ``torch.bmm``, which autograd records as one node, where
    ``matmul`` adds an expand and reshapes of both operands and of the result, and their backward
    (most of the cost of the small per-chunk products of the chunk form, which runs on ``[B * H, ...]``)."""
    return torch.bmm(a, b) if a.dim() == 3 and b.dim() == 3 else a @ b


def loss_grad(loss: str, pred: Tensor, v: Tensor, channel: Tensor | None = None) -> Tensor:
    """d loss_i / d pred_i: ``pred - v`` for l2 (0.5||M(k)-v||^2), ``-v`` for dot (-<M(k), v>),
    times the per-channel weights ``channel`` when given."""
    grad = pred - v if loss == "l2" else -v
    return grad if channel is None else grad * channel


def token_gradients(
    spec: MemorySpec, weights: dict[str, Tensor], k: Tensor, v: Tensor, loss: str, channel: Tensor | None = None
) -> dict[str, tuple[Tensor, Tensor]]:
    """Per-token gradients of ``loss_i(W)`` as outer products, by a hand-written backward.

    ``k [B, H, N, dk]``, ``v [B, H, N, dv]``, weights ``[B, H, rows, cols]``; ``channel [B, H, N,
    dv]`` (or None): per-channel weights of each token's loss, ``sum_c channel_c loss_c`` (the
    channel-wise learning rate, docs/ops.md), applied to ``d loss / d M(k)``. Returns
    ``{name: (delta [B, H, N, rows], a [B, H, N, cols])}`` with
    ``grad_W loss_i = delta_i a_i^T``. Everything stays differentiable (the outer loop
    trains through it).
    """
    act = spec.activation
    out: dict[str, tuple[Tensor, Tensor]] = {}
    if spec.architecture == "gated_mlp":
        wg, wu, wo = weights["w_gate"], weights["w_up"], weights["w_out"]
        g = mm(k, wg.transpose(-1, -2))
        u = mm(k, wu.transpose(-1, -2))
        sg = activation(act, g)
        h = sg * u
        net = mm(h, wo.transpose(-1, -2))
        pred = layer_norm(net) if spec.layer_norm else net
        if spec.residual:
            pred = pred + k
        d_out = loss_grad(loss, pred, v, channel)
        if spec.layer_norm:
            d_out = layer_norm_backward(d_out, net)
        dh = mm(d_out, wo)
        out["w_out"] = (d_out, h)
        out["w_gate"] = (activation_backward(act, dh * u, g), k)
        out["w_up"] = (dh * sg, k)
        return out

    depth = 1 if spec.architecture == "linear" else spec.depth
    names = spec.names()
    inputs, pre = [k], []
    for i in range(depth):
        z = mm(inputs[-1], weights[names[i]].transpose(-1, -2))
        pre.append(z)
        if i < depth - 1:
            inputs.append(activation(act, z))
    net = pre[-1]
    pred = layer_norm(net) if spec.layer_norm else net
    pred = pred + k if spec.uses_residual else pred
    delta = loss_grad(loss, pred, v, channel)
    if spec.layer_norm:
        delta = layer_norm_backward(delta, net)
    for i in reversed(range(depth)):
        out[names[i]] = (delta, inputs[i])
        if i > 0:
            delta = activation_backward(act, mm(delta, weights[names[i]]), pre[i - 1])
    return out


NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # (a, b, c) of Muon's quintic Newton-Schulz step


def newton_schulz(g: Tensor, steps: int) -> Tensor:
    """Muon's quintic Newton-Schulz orthogonalisation of each matrix ``[..., rows, cols]``.

    ``X <- a X + (b A + c A^2) X`` with ``A = X X^T``, ``(a, b, c) = (3.4445, -4.7750, 2.0315)``,
    starting from ``G / ||G||_F``; tall matrices are transposed so that ``A`` is the small Gram matrix.
    """
    a, b, c = NS_COEFFICIENTS
    x = g / (torch.linalg.matrix_norm(g, keepdim=True) + 1e-7)
    tall = g.shape[-2] > g.shape[-1]
    if tall:
        x = x.transpose(-1, -2)
    for _ in range(steps):
        gram = x @ x.transpose(-1, -2)
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.transpose(-1, -2) if tall else x
