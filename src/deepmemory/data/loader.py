"""Training windows in a reproducible order, and a fixed validation set.

Window ``i`` of a stream is ``tokens[i*L : i*L + L + 1]`` (inputs are its first ``L`` tokens,
targets its last ``L``). Each epoch visits every window once in the order
``randperm(n, seed + epoch)``; the position ``(epoch, cursor)`` is all the state there is,
so a resumed run reads exactly the windows it would have read.
"""

from __future__ import annotations

from typing import Dict

import torch
from torch import Tensor

from .errors import DataError


def _windows(tokens: Tensor, index: Tensor, seq_len: int) -> Tensor:
    offsets = index[:, None] * seq_len + torch.arange(seq_len + 1)
    return tokens[offsets].long()  # [n, L + 1]


class WindowSampler:
    """Global batches of windows of ``seq_len + 1`` tokens; ``state_dict`` is the data position."""

    def __init__(self, tokens: Tensor, seq_len: int, seed: int):
        self.tokens, self.seq_len, self.seed = tokens, seq_len, seed
        self.num_windows = (tokens.numel() - 1) // seq_len
        if self.num_windows < 1:
            raise DataError(f"the training data has {tokens.numel()} tokens, fewer than --seq-len + 1 = {seq_len + 1}")
        self.epoch, self.cursor = 0, 0
        self._order = None

    def _perm(self) -> Tensor:
        if self._order is None or self._order[0] != self.epoch:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            self._order = (self.epoch, torch.randperm(self.num_windows, generator=g))
        return self._order[1]

    def next_batch(self, size: int) -> Tensor:
        """The next ``size`` windows ``[size, seq_len + 1]``, crossing into a new epoch if needed."""
        index = []
        while len(index) < size:
            take = self._perm()[self.cursor:self.cursor + size - len(index)]
            index.extend(take.tolist())
            self.cursor += take.numel()
            if self.cursor == self.num_windows:
                self.epoch, self.cursor = self.epoch + 1, 0
        return _windows(self.tokens, torch.tensor(index), self.seq_len)

    def state_dict(self) -> Dict[str, int]:
        return {"epoch": self.epoch, "cursor": self.cursor, "num_windows": self.num_windows, "seq_len": self.seq_len}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        """Continue at the position ``state_dict()`` returned; ``DataError`` when it is not a
        position in this data (another data set or ``seq_len``, or a damaged record)."""
        if not isinstance(state, dict) or state.get("num_windows") != self.num_windows or state.get("seq_len") != self.seq_len:
            raise DataError(f"the data position {state!r:.100} does not fit this data ({self.num_windows} windows of {self.seq_len})")
        epoch, cursor = state.get("epoch"), state.get("cursor")
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (epoch, cursor)) \
                or not (0 <= epoch < 2**62 and 0 <= cursor < self.num_windows):
            raise DataError(f"the data position {state!r:.100} is damaged: expected an epoch >= 0 and a cursor in [0, {self.num_windows})")
        self.epoch, self.cursor = epoch, cursor


def eval_windows(tokens: Tensor, seq_len: int, max_windows: int) -> Tensor:
    """Up to ``max_windows`` non-overlapping windows ``[n, seq_len + 1]`` spread evenly over the stream."""
    available = (tokens.numel() - 1) // seq_len
    if available < 1:
        raise DataError(f"the validation data has {tokens.numel()} tokens, fewer than --seq-len + 1 = {seq_len + 1}")
    n = min(max_windows, available)
    index = torch.div(torch.arange(n) * available, n, rounding_mode="floor")
    return _windows(tokens, index, seq_len)
