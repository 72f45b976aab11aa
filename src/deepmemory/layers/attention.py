"""Softmax attention with RoPE, an optional sliding window and persistent memory tokens.

Persistent memory (Titans eq. 19) is ``N_p`` learned, input-independent tokens ``P [N_p, hidden]``
prepended to what attention sees. They get keys and values from the same ``k``/``v`` projections as
the user's tokens and no position: their score is ``q_t . k_p`` with the query *before* RoPE, as if
they sat at relative distance 0 from every query, so what they contribute does not drift with the
absolute position. They are visible to every query (also beyond a sliding window), produce no
output and take no position: the user's tokens keep positions ``0, 1, ...``.

One SDPA call scores both kinds of keys: queries are widened to ``[RoPE(q) | q]``, user keys to
``[RoPE(k) | 0]`` and persistent keys to ``[0 | k_p]``, which gives ``RoPE(q).RoPE(k)`` and
``q.k_p`` in the same softmax.

Causality for any input. A masked key gets probability exactly 0, but ``0 * NaN`` is NaN in
``P @ V``, and with a mask tensor the score ``q.k`` of a NaN key is NaN before the mask is added.
Measured with PyTorch 2.13's CPU kernels (float32 and float64): one NaN in the key or value of
token ``j`` made every earlier row NaN with a boolean or additive mask; with ``is_causal=True`` a
NaN key was harmless but a NaN value reached the earlier rows of ``j``'s 512-token block. So the
keys and values of a token holding a non-finite value are replaced by zeros before the call, and
afterwards the rows that see such a token (causally, within the window) are set to NaN by
selection: rows that do not see it are bitwise those of the clean input, rows that do read NaN as
they would have, and a sliding window forgets the token again. Cost: a few elementwise passes over
``k`` and ``v``, and with a mask a ``[B, H, S] @ [S, T]`` product of 0/1 counts (``1 / head_dim``
of the scores' work); without a mask a running maximum (docs/models/index.md).

A sliding window over a long input (``T >= 2 window``) runs in blocks (:meth:`Attention.attend_window`):
queries ``window`` at a time, each block over the ``2 window - 1`` keys it can reach, so the work and
the memory grow as ``T window`` rather than ``T^2``; the visible keys are the mask's, and the rows
that see a marked token are found from a running count of the marks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checks import check_int, check_positive
from ..ops.coefficients import nonfinite, zero_rows
from ..ops.varlen import by_document, state_error
from ..tree import State, check_state_fits


def check_input(x, hidden_size: int) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor; got {type(x).__name__}")
    if x.dim() != 3 or x.shape[-1] != hidden_size:
        raise ValueError(f"x must be [B, T, {hidden_size}]; got shape {list(x.shape)}")


def rope(x: Tensor, pos: Tensor, theta: float) -> Tensor:
    """Rotate pairs ``(x_i, x_{i+D/2})`` of ``x [..., T, D]`` by ``pos_t * theta^(-2i/D)``."""
    return rotate(x, *rope_tables(pos, x.shape[-1], theta, x.dtype))


def rope_tables(pos: Tensor, dim: int, theta: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``cos, sin [T, dim / 2]`` of the angles ``pos_t * theta^(-2i/dim)`` for :func:`rotate`, in the
    dtype the rotation of a ``dtype`` tensor runs in (float64 for float64, else float32); slices of
    them rotate the tokens at slices of ``pos``."""
    half = dim // 2
    inv_freq = theta ** (-torch.arange(half, dtype=torch.float64, device=pos.device) / half)
    # float64 angles: positions in the millions keep their phase; rotate in at least float32
    ang = pos.to(torch.float64)[:, None] * inv_freq
    cd = torch.float64 if dtype == torch.float64 else torch.float32
    return ang.cos().to(cd), ang.sin().to(cd)


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """RoPE of ``x [..., T, D]`` with the tables of :func:`rope_tables` ``[T, D / 2]``."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].to(cos.dtype), x[..., half:].to(cos.dtype)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


def sees_marked(bad: Tensor, mask: Tensor | None) -> Tensor:
    """Whether each query sees a marked key: ``bad [B, H, S]``, ``mask [T, S]`` (True = visible;
    None = causal with ``T == S``) -> ``[B, H, T]``. A running maximum without a mask, else a
    product of 0/1 counts (nothing of size ``B H T S`` is made)."""
    if mask is None:
        return torch.cummax(bad, dim=-1).values
    return (bad.to(torch.float32) @ mask.transpose(0, 1).to(torch.float32)) > 0


@dataclass
class AttentionState(State):
    """KV cache: RoPE'd keys and values ``[B, H, n, head_dim]`` of the last ``n`` tokens (all of
    them for full attention, at most ``window - 1`` for a sliding window) and ``pos``, the number
    of user tokens seen (the next token's position)."""

    k: Tensor
    v: Tensor
    pos: int


class Attention(nn.Module):
    """Causal multi-head softmax attention ``x [B, T, hidden] -> [B, T, hidden]``.

    ``y_t = W_o concat_h softmax_s(q_t . k_s / sqrt(D)) v_s`` over the persistent tokens and the
    user tokens ``s <= t`` (``t - s < window`` for a sliding window: each query sees itself and
    ``window - 1`` tokens back). RoPE on q and k at the tokens' absolute positions.
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        head_dim: int,
        *,
        window: int | None = None,
        num_persistent: int = 0,
        rope_theta: float = 10000.0,
    ):
        super().__init__()
        check_int("hidden_size", hidden_size, 1)
        check_int("num_heads", num_heads, 1)
        check_int("head_dim", head_dim, 2)
        if head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE; got {head_dim}")
        if window is not None:
            check_int("window", window, 1)
        check_int("num_persistent", num_persistent, 0)
        check_positive("rope_theta", rope_theta)
        self.hidden_size, self.num_heads, self.head_dim = hidden_size, num_heads, head_dim
        self.window, self.num_persistent, self.rope_theta = window, num_persistent, float(rope_theta)
        width = num_heads * head_dim
        self.q_proj = nn.Linear(hidden_size, width, bias=False)
        self.k_proj = nn.Linear(hidden_size, width, bias=False)
        self.v_proj = nn.Linear(hidden_size, width, bias=False)
        self.o_proj = nn.Linear(width, hidden_size, bias=False)
        self.persistent = nn.Parameter(torch.randn(num_persistent, hidden_size) * 0.02) if num_persistent else None

    def heads(self, x: Tensor) -> Tensor:
        """``[B, T, H * D] -> [B, H, T, D]``."""
        return x.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)

    def keys_values(self, x: Tensor, pos: Tensor, tables: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
        """RoPE'd keys and values ``[B, H, T, D]`` of tokens ``x [B, T, hidden]`` at positions ``pos [T]``
        (``tables``: their :func:`rope_tables`, when already made)."""
        k = self.heads(self.k_proj(x))
        tables = tables or rope_tables(pos, self.head_dim, self.rope_theta, k.dtype)
        return rotate(k, *tables), self.heads(self.v_proj(x))

    def queries(self, x: Tensor, pos: Tensor, tables: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
        """``q`` and ``RoPE(q)`` ``[B, H, T, D]`` of ``x [B, T, hidden]`` at positions ``pos [T]``."""
        q = self.heads(self.q_proj(x))
        return q, rotate(q, *(tables or rope_tables(pos, self.head_dim, self.rope_theta, q.dtype)))

    def attend(
        self, x: Tensor, pos: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, prefix: Tensor | None = None
    ) -> Tensor:
        """Queries from ``x [B, T, hidden]`` at positions ``pos [T]`` over user keys/values
        ``k, v [B, H, S, D]`` (``mask [T, S]``, True = visible; None = causal with ``S == T``),
        the persistent tokens and the always-visible ``prefix [B or 1, N, hidden]``."""
        q, qr = self.queries(x, pos)
        return self.attend_queries(q, qr, k, v, mask, self.fixed_keys(prefix, x.shape[0]))

    def attend_queries(
        self, q: Tensor, qr: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, fixed: tuple[Tensor, Tensor] | None
    ) -> Tensor:
        """:meth:`attend` from the queries (:meth:`queries`) and the keys and values of the persistent
        tokens and the prefix (:meth:`fixed_keys`) -> ``[B, T, hidden]``."""
        k, v, bad = self._sanitized(k, v)
        scale = self.head_dim**-0.5
        if fixed is None:
            y = F.scaled_dot_product_attention(qr, k, v, attn_mask=mask, is_causal=mask is None, scale=scale)
        else:
            kp, vp = fixed
            n_q, n_k = q.shape[2], k.shape[2]
            q2 = torch.cat([qr, q], dim=-1)
            k2 = torch.cat([torch.cat([torch.zeros_like(kp), kp], -1), torch.cat([k, torch.zeros_like(k)], -1)], 2)
            visible = torch.ones(n_q, n_k, dtype=torch.bool, device=q.device).tril() if mask is None else mask
            visible = torch.cat([visible.new_ones(n_q, kp.shape[2]), visible], dim=1)
            y = F.scaled_dot_product_attention(q2, k2, torch.cat([vp, v], 2), attn_mask=visible, scale=scale)
        y = torch.where(sees_marked(bad, mask)[..., None], torch.nan, y)
        return self.o_proj(y.transpose(1, 2).flatten(2))

    def _sanitized(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The keys and values with those of a token holding a non-finite value replaced by zeros,
        and those tokens ``bad [B, H, S]``."""
        # a user token holding a NaN or an infinity is read as zeros here and poisons, by selection,
        # exactly the rows that see it (module docstring)
        # (a NaN or an infinity shows in the sum, one reading pass: x - x is NaN exactly there;
        # half precisions sum in float32, where a finite vector cannot overflow)
        acc = torch.float64 if k.dtype == torch.float64 else torch.float32
        total = k.sum(-1, dtype=acc) + v.sum(-1, dtype=acc)
        bad = nonfinite(total)  # [B, H, S]
        return zero_rows(bad, k), zero_rows(bad, v), bad

    def fixed_keys(self, prefix: Tensor | None, bsz: int) -> tuple[Tensor, Tensor] | None:
        """Keys and values ``[B, H, N, D]`` of the persistent tokens and the prefix (None without either)."""
        fixed = [f if f.dim() == 3 else f[None] for f in (self.persistent, prefix) if f is not None]
        if not fixed:
            return None
        kp = torch.cat([self.heads(self.k_proj(f)).expand(bsz, -1, -1, -1) for f in fixed], 2)
        vp = torch.cat([self.heads(self.v_proj(f)).expand(bsz, -1, -1, -1) for f in fixed], 2)
        return kp, vp

    def attend_window(
        self, x: Tensor, pos: Tensor, k: Tensor, v: Tensor, n_old: int, prefix: Tensor | None = None
    ) -> Tensor:
        """:meth:`attend` for a sliding window over ``n_old + T`` user keys, ``k, v [B, H, n_old + T, D]``
        (``n_old < window``: the cache's), in blocks: the queries in blocks of ``window`` tokens,
        each over the ``2 window - 1`` keys its window can reach (and the persistent tokens and the
        prefix), instead of every query over every key. The same visible keys as :meth:`attend`'s
        mask, so the same result up to the order of the softmax's sums; the work and the memory
        grow as ``T window`` instead of ``T^2``."""
        q, qr = self.queries(x, pos)
        k, v, bad = self._sanitized(k, v)
        fixed = self.fixed_keys(prefix, x.shape[0])
        w = cast(int, self.window)
        bsz, nh, t, d = q.shape
        nb = -(-t // w)  # query blocks
        span = 2 * w - 1  # keys a block reaches: w - 1 before its first query, then its own w
        left = w - 1 - n_old  # zeros before the first key, so block i starts at padded key i * w
        # queries beyond T (padding of the last block) see the zero keys padded after the last one
        kb, vb = (F.pad(z, (0, 0, left, nb * w - t)).unfold(2, span, w).transpose(-1, -2) for z in (k, v))
        qb = F.pad(qr, (0, 0, 0, nb * w - t)).unflatten(2, (nb, w))  # [B, H, nb, w, D]
        # visible: 0 <= query - key < w, and not a padded key before the first (block i's key l sits
        # at padded index i w + l; query r of the block at i w + w - 1 + r)
        r, col = torch.arange(w, device=x.device), torch.arange(span, device=x.device)
        dist = r[:, None] + (w - 1) - col[None, :]  # [w, span]
        padded = (torch.arange(nb, device=x.device)[:, None] * w + col[None, :]) < left  # [nb, span]
        visible = ((dist >= 0) & (dist < w))[None] & ~padded[:, None, :]  # [nb, w, span]
        if fixed is not None:
            kp, vp = fixed
            n_p = kp.shape[2]
            qb = torch.cat([qb, F.pad(q, (0, 0, 0, nb * w - t)).unflatten(2, (nb, w))], -1)
            kp2 = torch.cat([torch.zeros_like(kp), kp], -1)[:, :, None].expand(-1, -1, nb, -1, -1)
            kb = torch.cat([kp2, torch.cat([kb, torch.zeros_like(kb)], -1)], 3)
            vb = torch.cat([vp[:, :, None].expand(-1, -1, nb, -1, -1), vb], 3)
            visible = torch.cat([visible.new_ones(nb, w, n_p), visible], -1)
        # SDPA over [B, H * nb, w, .]: the blocks ride along with the heads
        flat = lambda z: z.flatten(1, 2)  # noqa: E731
        y = F.scaled_dot_product_attention(
            flat(qb), flat(kb), flat(vb), attn_mask=visible.repeat(nh, 1, 1), scale=self.head_dim**-0.5
        )
        y = y.unflatten(1, (nh, nb)).flatten(2, 3)[:, :, :t]  # [B, H, T, D]
        # a query sees a marked key when one lies among the w keys ending at its own
        marks = F.pad(bad.to(torch.int32).cumsum(-1), (1 + max(0, left), 0))  # marks[.., j]: among keys < j - pad
        ends = torch.arange(t, device=x.device) + n_old + 1 + max(0, left)
        seen = marks[..., ends] - marks[..., ends - w] > 0
        y = torch.where(seen[..., None], torch.nan, y)
        return self.o_proj(y.transpose(1, 2).flatten(2))

    def forward(
        self,
        x: Tensor,
        state: AttentionState | None = None,
        return_state: bool = False,
        *,
        prefix: Tensor | None = None,
        cu_seqlens: Tensor | None = None,
    ) -> Tensor | tuple[Tensor, AttentionState]:
        """``x [B, T, hidden]``; ``prefix [B or 1, N, hidden]``: extra always-visible tokens
        without position, treated like the persistent ones (MAL passes the memory's output at the
        persistent tokens).

        ``cu_seqlens`` (1-D int32/int64 ``[0, l_1, l_1 + l_2, ..., T]``, one entry per document
        plus one; ``B`` must be 1): packed documents, each read as if alone: a query sees only its
        own document's tokens (and the persistent tokens and ``prefix``, shared by every
        document), positions restart at 0 for RoPE. Attention runs once on the batch of documents
        ``[n_docs, max l_i]`` (:func:`deepmemory.ops.varlen.by_document`), whose padding is the
        cost. Not supported with ``state`` or ``return_state`` (one-line ``ValueError``), nor are
        malformed boundaries."""
        check_input(x, self.hidden_size)
        if cu_seqlens is not None:
            if state is not None or return_state:
                raise state_error("state/return_state")
            # (without return_state, forward returns the tensor alone)
            return by_document(cu_seqlens, lambda xs: cast(Tensor, self.forward(xs, prefix=prefix)), x)
        if state is not None and not isinstance(state, AttentionState):
            raise TypeError(f"state must be an AttentionState; got {type(state).__name__}")
        if state is not None:
            check_state_fits(state, x)
        if prefix is not None and (
            not isinstance(prefix, Tensor) or prefix.dim() != 3 or prefix.shape[-1] != self.hidden_size
        ):
            raise ValueError(
                f"prefix must be a [B, N, {self.hidden_size}] tensor; got {getattr(prefix, 'shape', prefix)!r}"
            )
        start = 0 if state is None else state.pos
        n_new = x.shape[1]
        pos = torch.arange(start, start + n_new, device=x.device)
        k, v = self.keys_values(x, pos)
        if state is not None:
            k, v = torch.cat([state.k.to(k.dtype), k], 2), torch.cat([state.v.to(v.dtype), v], 2)
        n_old = k.shape[2] - n_new
        if self.window is not None and n_new >= 2 * self.window and n_old < self.window:
            y = self.attend_window(x, pos, k, v, n_old, prefix)  # the same visible keys, in blocks
        else:
            y = self._attend_masked(x, pos, k, v, start, n_old, prefix)
        if not return_state:
            return y
        keep = k.shape[2] if self.window is None else min(k.shape[2], self.window - 1)
        return y, AttentionState(k[:, :, k.shape[2] - keep :], v[:, :, v.shape[2] - keep :], start + n_new)

    def _attend_masked(
        self, x: Tensor, pos: Tensor, k: Tensor, v: Tensor, start: int, n_old: int, prefix: Tensor | None
    ) -> Tensor:
        n_new = x.shape[1]
        mask = None
        if n_old or (self.window is not None and self.window < n_new):
            kpos = torch.arange(start - n_old, start + n_new, device=x.device)
            dist = pos[:, None] - kpos[None, :]
            mask = dist >= 0
            if self.window is not None:
                mask = mask & (dist < self.window)
        return self.attend(x, pos, k, v, mask, prefix)
