"""The recurrent state of the memory op, returned as ``final_state`` and accepted as ``initial_state``."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ..tree import State
from .rule import UpdateRule


@dataclass
class MemoryState(State):
    """Everything needed to continue a sequence exactly, at any split point.

    - ``weights`` / ``momentum``: the memory ``W`` and its momentum ``S`` after the last token
      (``{name: [B, H, rows, cols]}``). Under ``granularity="chunk"`` these are the state after
      the last *complete* chunk, which is what the next tokens read.
    - ``chunk_weights`` / ``chunk_momentum``: ``W`` and ``S`` at the start of the unfinished
      chunk (gradients inside a chunk are all taken there). Equal to ``weights``/``momentum``
      when the sequence ends on a chunk boundary.
    - ``keys [B, H, n, dk]``, ``values [B, H, n, dv]``, ``window_gate [B, H, n]`` (``[B, H, n,
      dv]`` when channel-wise): the last
      ``n = min(seen, window - 1 + pending)`` tokens: the Omega window reaches ``window - 1``
      tokens before the unfinished chunk, whose ``pending`` tokens are replayed on resume.
    - ``gates``: ``lr``, ``momentum``, ``decay`` ``[B, H, pending]`` of the pending tokens.
    - ``seen``: how many tokens the memory has read; ``rule``: the :class:`UpdateRule` it was made with.
    """

    weights: dict[str, Tensor]
    momentum: dict[str, Tensor]
    chunk_weights: dict[str, Tensor]
    chunk_momentum: dict[str, Tensor]
    keys: Tensor
    values: Tensor
    window_gate: Tensor
    gates: dict[str, Tensor]
    seen: int
    rule: UpdateRule

    @property
    def pending(self) -> int:
        return self.gates["lr"].shape[-1]
