"""Training windows in a reproducible order, and a fixed validation set.

Window ``i`` of a stream is ``tokens[i*L : i*L + L + 1]`` (inputs are its first ``L`` tokens,
targets its last ``L``). Each epoch visits every window once in the order
``randperm(n, seed + epoch)``; the position ``(epoch, cursor)`` is all the state there is,
so a resumed run reads exactly the windows it would have read.

Documents packed with boundaries: given the sorted offsets where the stream's documents begin
(``Corpus.train_starts``), a window also comes with ``starts [n, L + 1]`` (bool), True at the
tokens that begin a document, found by one ``searchsorted`` over the window's offsets (no loop
over documents). :func:`packed_position_ids` and :func:`packed_labels` turn it into Hugging
Face's conventions: ``position_ids`` that restart at 0 at each document (the row's first token
begins one too), and labels that are ``-100`` where the target begins a new document.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .errors import DataError
from .tasks.base import IGNORE_INDEX  # -100: a label that is not scored


def _offsets(index: Tensor, seq_len: int) -> Tensor:
    return index[:, None] * seq_len + torch.arange(seq_len + 1)  # [n, L + 1] int64


def _windows(tokens: Tensor, index: Tensor, seq_len: int) -> Tensor:
    return tokens[_offsets(index, seq_len)].long()  # [n, L + 1]


def check_document_starts(doc_starts: Tensor, num_tokens: int, name: str = "doc_starts") -> Tensor:
    """``doc_starts`` a 1-D integer tensor of offsets in ``[0, num_tokens)``, sorted; returned as
    int64 on the CPU. One-line ``TypeError``/``ValueError`` otherwise."""
    if not isinstance(doc_starts, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(doc_starts).__name__}")
    if doc_starts.dtype not in (torch.int64, torch.int32) or doc_starts.dim() != 1:
        raise TypeError(
            f"{name} must be a 1-D int32 or int64 tensor; got {doc_starts.dtype} of shape {list(doc_starts.shape)}"
        )
    starts = doc_starts.to(device="cpu", dtype=torch.int64)
    if starts.numel():
        if int(starts.min()) < 0 or int(starts.max()) >= max(num_tokens, 1):
            raise ValueError(
                f"{name} must lie in [0, {num_tokens}) (the stream's tokens); got values in "
                f"[{int(starts.min())}, {int(starts.max())}]"
            )
        if not bool((starts[1:] >= starts[:-1]).all()):
            raise ValueError(f"{name} must be sorted")
    return starts


def window_starts(doc_starts: Tensor, offsets: Tensor) -> Tensor:
    """``starts [n, L + 1]`` (bool): True where the stream offset ``offsets [n, L + 1]`` is one of
    ``doc_starts`` (sorted int64), i.e. where a document begins. One ``searchsorted``:
    ``O(n L log D)`` for ``D`` documents."""
    if doc_starts.numel() == 0:
        return torch.zeros(offsets.shape, dtype=torch.bool)
    at = torch.searchsorted(doc_starts, offsets).clamp_max(doc_starts.numel() - 1)  # the first start >= offset
    return doc_starts[at] == offsets


def packed_position_ids(starts: Tensor) -> Tensor:
    """``starts [B, T]`` (bool, a token that begins a document) -> ``position_ids [B, T]`` (int64):
    each token's place in its document, counting from 0 (Hugging Face's packing convention,
    ``DataCollatorWithFlattening``). A row's first token counts as a start: a row that begins inside
    a document reads that piece as a document of its own. ``ValueError`` unless ``starts`` is a 2-D
    bool tensor."""
    if not isinstance(starts, Tensor) or starts.dtype != torch.bool or starts.dim() != 2:
        raise ValueError(
            f"starts must be a 2-D bool tensor [batch, seq]; got {getattr(starts, 'dtype', type(starts).__name__)} "
            f"of shape {list(getattr(starts, 'shape', []))}"
        )
    t = torch.arange(starts.shape[1], device=starts.device)
    begin = starts.clone()
    begin[:, :1] = True
    last = torch.where(begin, t, torch.zeros_like(t)).cummax(dim=1).values  # the latest start at or before t
    return t - last


def packed_labels(input_ids: Tensor, starts: Tensor) -> Tensor:
    """Hugging Face's causal-LM labels for packed documents: ``input_ids [B, T]`` with
    ``IGNORE_INDEX`` (-100) where ``starts [B, T]`` is True (the model shifts them: the label at
    ``t`` is the target of position ``t - 1``, and predicting a document's first token from the
    previous document is not a valid target). ``ValueError`` when the shapes differ."""
    if not isinstance(starts, Tensor) or starts.dtype != torch.bool or starts.shape != input_ids.shape:
        raise ValueError(
            f"starts must be a bool tensor of the shape of input_ids {list(input_ids.shape)}; "
            f"got {getattr(starts, 'dtype', type(starts).__name__)} of shape {list(getattr(starts, 'shape', []))}"
        )
    return input_ids.masked_fill(starts, IGNORE_INDEX)


class WindowSampler:
    """Global batches of windows of ``seq_len + 1`` tokens; ``state_dict`` is the data position.

    ``doc_starts`` (optional, 1-D int64, sorted offsets in ``[0, tokens.numel())``): where the
    stream's documents begin; :meth:`next_packed` needs it. One-line ``TypeError``/``ValueError``
    for a malformed one, ``DataError`` when the stream holds no whole window.
    """

    def __init__(self, tokens: Tensor, seq_len: int, seed: int, doc_starts: Tensor | None = None):
        self.tokens, self.seq_len, self.seed = tokens, seq_len, seed
        self.num_windows = (tokens.numel() - 1) // seq_len
        if self.num_windows < 1:
            raise DataError(f"the training data has {tokens.numel()} tokens, fewer than --seq-len + 1 = {seq_len + 1}")
        self.doc_starts = None if doc_starts is None else check_document_starts(doc_starts, tokens.numel())
        self.epoch, self.cursor = 0, 0
        self._order = None

    def _perm(self) -> Tensor:
        if self._order is None or self._order[0] != self.epoch:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            self._order = (self.epoch, torch.randperm(self.num_windows, generator=g))
        return self._order[1]

    def _next_index(self, size: int) -> Tensor:
        index = []
        while len(index) < size:
            take = self._perm()[self.cursor : self.cursor + size - len(index)]
            index.extend(take.tolist())
            self.cursor += take.numel()
            if self.cursor == self.num_windows:
                self.epoch, self.cursor = self.epoch + 1, 0
        return torch.tensor(index, dtype=torch.int64)

    def next_batch(self, size: int) -> Tensor:
        """The next ``size`` windows ``[size, seq_len + 1]`` (int64), crossing into a new epoch if needed."""
        return _windows(self.tokens, self._next_index(size), self.seq_len)

    def next_packed(self, size: int) -> tuple[Tensor, Tensor]:
        """The next ``size`` windows, the same ones :meth:`next_batch` would give, with where
        documents begin in them: ``(rows [size, seq_len + 1] int64, starts [size, seq_len + 1]
        bool)``. ``ValueError`` when the sampler has no ``doc_starts``."""
        if self.doc_starts is None:
            raise ValueError("next_packed needs the document starts: build the WindowSampler with doc_starts")
        offsets = _offsets(self._next_index(size), self.seq_len)
        return self.tokens[offsets].long(), window_starts(self.doc_starts, offsets)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "cursor": self.cursor, "num_windows": self.num_windows, "seq_len": self.seq_len}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue at the position ``state_dict()`` returned; ``DataError`` when it is not a
        position in this data (another data set or ``seq_len``, or a damaged record)."""
        if (
            not isinstance(state, dict)
            or state.get("num_windows") != self.num_windows
            or state.get("seq_len") != self.seq_len
        ):
            raise DataError(
                f"the data position {state!r:.100} does not fit this data ({self.num_windows} windows of "
                f"{self.seq_len})"
            )
        epoch, cursor = state.get("epoch"), state.get("cursor")
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (epoch, cursor)) or not (
            0 <= epoch < 2**62 and 0 <= cursor < self.num_windows
        ):
            raise DataError(
                f"the data position {state!r:.100} is damaged: expected an epoch >= 0 and a cursor in [0, "
                f"{self.num_windows})"
            )
        self.epoch, self.cursor = epoch, cursor


def _eval_index(num_tokens: int, seq_len: int, max_windows: int) -> Tensor:
    available = (num_tokens - 1) // seq_len
    if available < 1:
        raise DataError(f"the validation data has {num_tokens} tokens, fewer than --seq-len + 1 = {seq_len + 1}")
    n = min(max_windows, available)
    return torch.div(torch.arange(n) * available, n, rounding_mode="floor")


def eval_windows(tokens: Tensor, seq_len: int, max_windows: int) -> Tensor:
    """Up to ``max_windows`` non-overlapping windows ``[n, seq_len + 1]`` spread evenly over the stream."""
    return _windows(tokens, _eval_index(tokens.numel(), seq_len, max_windows), seq_len)


def eval_window_starts(doc_starts: Tensor, num_tokens: int, seq_len: int, max_windows: int) -> Tensor:
    """``starts [n, seq_len + 1]`` (bool) of the windows :func:`eval_windows` gives for a stream of
    ``num_tokens`` tokens whose documents begin at ``doc_starts``: True where a document begins.
    ``DataError``/``TypeError``/``ValueError`` as :func:`eval_windows` and :class:`WindowSampler`."""
    doc_starts = check_document_starts(doc_starts, num_tokens)
    return window_starts(doc_starts, _offsets(_eval_index(num_tokens, seq_len, max_windows), seq_len))
