"""The normalised input shared by the implementations of the op."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from torch import Tensor

from .memory import MemorySpec
from .rule import UpdateRule


@dataclass
class Problem:
    """One call of the op, in heads-first layout and compute precision, with its :class:`UpdateRule`.

    The sequence starts on a chunk boundary: tokens of an unfinished chunk carried in the state
    are replayed first (their queries are zero and their outputs dropped by the caller).
    ``k``, ``v``, ``gamma`` are *extended* by ``n_hist`` earlier tokens that only enter the
    Omega window. Shapes: ``q [B, H, N, dk]``; ``k [B, H, n_hist + N, dk]``,
    ``v [B, H, n_hist + N, dv]``, ``gamma [B, H, n_hist + N]``; ``lr``, ``momentum``,
    ``decay [B, H, N]``; ``w0``, ``s0`` ``{name: [B, H, rows, cols]}`` at the start.
    ``channel [B, H, n_hist + N, dv]`` or None: per-channel weights of each token's loss (the
    channel-wise window gate, extended like ``gamma``, which is then all ones).
    ``low_precision``: the caller's tensors are float16/bfloat16, so fast paths may use TF32 products.
    ``replayed``, ``resume``: the first ``replayed`` rows are the pending tokens of a carried state
    and ``resume`` (``(weights, momentum)``, as ``w0``, or None) the state after them; an
    implementation may start the first chunk's recurrence there instead of replaying those rows
    (its gradients are still taken at ``w0``).
    """

    rule: UpdateRule
    q: Tensor
    k: Tensor
    v: Tensor
    gamma: Tensor
    lr: Tensor
    momentum: Tensor
    decay: Tensor
    n_hist: int
    w0: dict[str, Tensor]
    s0: dict[str, Tensor]
    low_precision: bool = False
    replayed: int = 0
    resume: tuple[dict[str, Tensor], dict[str, Tensor]] | None = None
    channel: Tensor | None = None

    @property
    def dv(self) -> int:
        return self.v.shape[-1]

    @property
    def spec(self) -> MemorySpec:
        """The memory network the op trains (the rule's, with the caller's residual handling)."""
        return self.rule.spec


class Result(NamedTuple):
    """``o [B, H, N, dv]``; state after the last token; state at the start of the unfinished chunk."""

    o: Tensor
    weights: dict[str, Tensor]
    momentum: dict[str, Tensor]
    chunk_weights: dict[str, Tensor]
    chunk_momentum: dict[str, Tensor]
