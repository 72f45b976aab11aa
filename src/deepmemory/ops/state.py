"""The recurrent state of the memory op, returned as ``final_state`` and accepted as ``initial_state``."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Dict, Tuple

import torch
from torch import Tensor


@dataclass
class MemoryState:
    """Everything needed to continue a sequence exactly, at any split point.

    - ``weights`` / ``momentum``: the memory ``W`` and its momentum ``S`` after the last token
      (``{name: [B, H, rows, cols]}``). Under ``granularity="chunk"`` these are the state after
      the last *complete* chunk, which is what the next tokens read.
    - ``chunk_weights`` / ``chunk_momentum``: ``W`` and ``S`` at the start of the unfinished
      chunk (gradients inside a chunk are all taken there). Equal to ``weights``/``momentum``
      when the sequence ends on a chunk boundary.
    - ``keys [B, H, n, dk]``, ``values [B, H, n, dv]``, ``window_gate [B, H, n]``: the last
      ``n = min(seen, window - 1 + pending)`` tokens: the Omega window reaches ``window - 1``
      tokens before the unfinished chunk, whose ``pending`` tokens are replayed on resume.
    - ``gates``: ``lr``, ``momentum``, ``decay`` ``[B, H, pending]`` of the pending tokens.
    - ``seen``: how many tokens the memory has read; ``config``: the op settings it was made with.
    """

    weights: Dict[str, Tensor]
    momentum: Dict[str, Tensor]
    chunk_weights: Dict[str, Tensor]
    chunk_momentum: Dict[str, Tensor]
    keys: Tensor
    values: Tensor
    window_gate: Tensor
    gates: Dict[str, Tensor]
    seen: int
    config: Tuple = field(default=())

    @property
    def pending(self) -> int:
        return self.gates["lr"].shape[-1]

    def tensors(self) -> Dict[str, Tensor]:
        """All tensors by a flat dotted name (for caches, checkpoints and ``detach``)."""
        out = {}
        for group in ("weights", "momentum", "chunk_weights", "chunk_momentum", "gates"):
            for name, t in getattr(self, group).items():
                out[f"{group}.{name}"] = t
        out["keys"], out["values"], out["window_gate"] = self.keys, self.values, self.window_gate
        return out

    def map(self, fn) -> "MemoryState":
        """A copy with ``fn`` applied to every tensor (e.g. ``lambda t: t.detach()``)."""
        return replace(
            self,
            weights={n: fn(t) for n, t in self.weights.items()},
            momentum={n: fn(t) for n, t in self.momentum.items()},
            chunk_weights={n: fn(t) for n, t in self.chunk_weights.items()},
            chunk_momentum={n: fn(t) for n, t in self.chunk_momentum.items()},
            keys=fn(self.keys),
            values=fn(self.values),
            window_gate=fn(self.window_gate),
            gates={n: fn(t) for n, t in self.gates.items()},
        )

    def detach(self) -> "MemoryState":
        return self.map(torch.Tensor.detach)
