r"""Variable-length input: packed documents and padding, laid out as a batch of documents.

A packed row holds several documents one after another; a padded row holds one sequence and
positions that are no token at all. Either way each document must be read as if it were alone:
its memory, momentum, Omega window, conv history and attention start empty, its chunks start at
its first token, and its positions count from 0. Every op and layer of this library reads the
sequences of a batch independently and causally, so a batch of documents is exactly that: each
document is gathered into its own row (right-aligned padding after it, which no earlier position
can see), the model runs once on that batch, and the outputs are scattered back. Nothing is
looped per document. A document that begins at its row's first position can stay where it is
(:meth:`Documents.in_place`), and the others can run in groups of similar lengths
(:meth:`Documents.subset`): the models do both, docs/packing.md.

Boundaries come in the field's two conventions:

- ``cu_seqlens`` (flash-linear-attention, flash-attention): a 1-D integer tensor
  ``[0, l_1, l_1 + l_2, ..., T]`` of the document starts of a single packed row ``[1, T, ...]``;
- a per-token form for batches of rows, ``starts [B, T]`` (a token that begins a document; with
  Hugging Face's packing collator that is ``position_ids == 0``) and ``valid [B, T]`` (the
  ``attention_mask``: 0 marks padding). The first valid token of a row always begins a document,
  and padding between two valid tokens does not end one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Documents:
    """Where the documents of a ``[B, T]`` batch lie. ``index [N, L]`` (int64): the flattened
    position (``b * T + t``) of each document's tokens, in order, 0 where ``valid`` is False;
    ``valid [N, L]`` (bool): the document's real tokens, a prefix of each row; ``lengths [N]``;
    ``batch``, ``seq``: the shape ``[B, T]`` they came from."""

    index: Tensor
    valid: Tensor
    lengths: Tensor
    batch: int
    seq: int

    @property
    def count(self) -> int:
        """``N``, the number of documents."""
        return self.index.shape[0]

    def in_place(self) -> Tensor:
        """``[N]`` bool: the documents that begin at their row's first position and have no padding
        inside. Such a document is read correctly where it lies (what follows it in its row comes
        after it), so only the others need rows of their own."""
        if self.index.shape[1] == 0:  # no document at all
            return torch.zeros(self.count, dtype=torch.bool, device=self.index.device)
        grid = self.index[:, :1] + torch.arange(self.index.shape[1], device=self.index.device)
        return (self.index[:, 0] % self.seq == 0) & ((self.index == grid) | ~self.valid).all(1)

    def subset(self, keep: Tensor) -> Documents:
        """The documents ``keep`` (bool ``[N]``) marks, trimmed to the longest of them."""
        lengths = self.lengths[keep]
        longest = int(lengths.max()) if lengths.numel() else 0
        return Documents(
            index=self.index[keep, :longest],
            valid=self.valid[keep, :longest],
            lengths=lengths,
            batch=self.batch,
            seq=self.seq,
        )

    def to_batch(self, x: Tensor) -> Tensor:
        """``x [B, T, ...]`` -> ``[N, L, ...]``: each document in its own row, zeros after it
        (by selection, so a non-finite value at a padded position does not travel)."""
        flat = x.flatten(0, 1)[self.index]
        return torch.where(self.valid.view(*self.valid.shape, *(1,) * (x.dim() - 2)), flat, flat.new_zeros(()))

    def from_batch(self, y: Tensor) -> Tensor:
        """``y [N, L, ...]`` -> ``[B, T, ...]``: each document's outputs back at its positions;
        zeros at positions that are in no document (padding). Differentiable in ``y``."""
        out = y.new_zeros(self.batch * self.seq, *y.shape[2:])
        out = out.index_put((self.index[self.valid],), y[self.valid])
        return out.unflatten(0, (self.batch, self.seq))


def check_cu_seqlens(cu_seqlens, seq: int, device: torch.device) -> Tensor:
    """``cu_seqlens`` a 1-D integer tensor ``[0, ..., seq]``, strictly increasing (no empty
    document), on ``device`` or the CPU; returns it as int64 on ``device``. One-line
    ``TypeError``/``ValueError`` otherwise."""
    if not isinstance(cu_seqlens, Tensor):
        raise TypeError(f"cu_seqlens must be a torch.Tensor; got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"cu_seqlens must be int32 or int64; got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must be 1-D [N + 1] with N >= 1 documents; got shape {list(cu_seqlens.shape)}")
    cu = cu_seqlens.to(device=device, dtype=torch.int64)
    first, last = int(cu[0]), int(cu[-1])
    if first != 0 or last != seq:
        raise ValueError(f"cu_seqlens must start at 0 and end at the sequence length {seq}; got {first} ... {last}")
    if not bool((cu[1:] > cu[:-1]).all()):
        raise ValueError("cu_seqlens must be strictly increasing (every document holds at least one token)")
    return cu


def documents_from_cu_seqlens(cu_seqlens: Tensor, batch: int, seq: int, device: torch.device) -> Documents:
    """The documents of one packed row ``[1, seq]`` (fla's convention: ``batch`` must be 1).
    Raises a one-line ``ValueError`` for another batch or malformed ``cu_seqlens``."""
    if batch != 1:
        raise ValueError(
            f"with cu_seqlens the documents are packed into one row: the batch must be 1; got {batch} "
            "(flatten the batch into one row and list every document in cu_seqlens)"
        )
    cu = check_cu_seqlens(cu_seqlens, seq, device)
    starts = torch.zeros(1, seq, dtype=torch.bool, device=device)
    starts[0, cu[:-1]] = True
    return documents(starts, None)


def documents(starts: Tensor | None, valid: Tensor | None, shape=None, device=None) -> Documents:
    """The documents of a ``[B, T]`` batch from ``starts`` (bool, a token that begins a document;
    None: none but each row's first) and ``valid`` (bool, False at padding; None: no padding).
    ``shape``/``device`` are needed only when both are None. A row with no valid token holds no
    document. One host synchronisation (the number and the longest length of the documents)."""
    ref = starts if starts is not None else valid
    bsz, seq = ref.shape if ref is not None else shape
    device = ref.device if ref is not None else device
    valid = torch.ones(bsz, seq, dtype=torch.bool, device=device) if valid is None else valid.bool()
    starts = torch.zeros(bsz, seq, dtype=torch.bool, device=device) if starts is None else starts.bool()
    # the first valid token of each row begins a document
    first = valid & (valid.long().cumsum(1) == 1)
    begins = (starts | first) & valid
    flat_valid = valid.flatten()
    pos = flat_valid.nonzero().squeeze(1)  # [n_tokens] flattened positions of the valid tokens
    doc = begins.flatten()[pos].long().cumsum(0) - 1  # [n_tokens] document of each valid token
    n_docs = int(doc[-1]) + 1 if pos.numel() else 0
    lengths = torch.bincount(doc, minlength=n_docs)
    first_rank = lengths.cumsum(0) - lengths  # rank (among valid tokens) of each document's first token
    offset = torch.arange(pos.numel(), device=device) - first_rank[doc]
    longest = int(lengths.max()) if n_docs else 0
    index = torch.zeros(n_docs, longest, dtype=torch.int64, device=device)
    keep = torch.zeros(n_docs, longest, dtype=torch.bool, device=device)
    index[doc, offset] = pos
    keep[doc, offset] = True
    return Documents(index=index, valid=keep, lengths=lengths, batch=bsz, seq=seq)


def state_error(names: str) -> ValueError:
    """The one-line error for a state asked together with ``cu_seqlens`` (``names``: the
    arguments, e.g. ``"initial_state/output_final_state"``). Every document starts empty and the
    batch of documents runs each to the longest one's length, so no single state is the packed
    row's: the state of a document comes from running it alone."""
    return ValueError(
        f"cu_seqlens starts every document empty: {names} are not supported with it; "
        "run the document whose state you need alone"
    )


def by_document(cu_seqlens: Tensor, fn: Callable[..., Tensor], *tokens: Tensor | None) -> Tensor:
    """Run a causal per-sequence computation on each document of one packed row as if it were alone.

    ``tokens``: per-token inputs ``[1, T, ...]`` (None passes through as None), the documents'
    boundaries ``cu_seqlens [N + 1]`` (int32/int64, ``[0, l_1, l_1 + l_2, ..., T]``). Each input is
    laid out ``[N, L_max, ...]`` (:meth:`Documents.to_batch`), ``fn(*batched)`` must return
    ``[N, L_max, ...]``, and its rows are scattered back to ``[1, T, ...]``
    (:meth:`Documents.from_batch`; differentiable). Exact for any ``fn`` that reads its batch rows
    independently and causally. Raises a one-line ``TypeError``/``ValueError`` for malformed
    ``cu_seqlens``, a batch other than 1 or inputs whose ``[B, T]`` differ."""
    ref = next((t for t in tokens if t is not None), None)
    if ref is None or ref.dim() < 2:
        raise ValueError("by_document needs at least one per-token input [1, T, ...]")
    for t in tokens:
        if t is not None and tuple(t.shape[:2]) != tuple(ref.shape[:2]):
            raise ValueError(f"every per-token input must share [B, T] = {list(ref.shape[:2])}; got {list(t.shape)}")
    docs = documents_from_cu_seqlens(cu_seqlens, ref.shape[0], ref.shape[1], ref.device)
    return docs.from_batch(fn(*(None if t is None else docs.to_batch(t) for t in tokens)))


def expand_weights(weights: dict[str, Tensor], count: int) -> dict[str, Tensor]:
    """Per-batch initial weights ``[1, H, rows, cols]`` of a packed row expanded to its ``count``
    documents (``[H, rows, cols]`` ones are shared already); other values pass unchanged."""
    return {
        n: w.expand(count, *w.shape[1:]) if isinstance(w, Tensor) and w.dim() == 4 else w for n, w in weights.items()
    }
