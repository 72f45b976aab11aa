r"""Residual blocks (Titans §4; docs/blocks.md): Transformer++, memory-only (LMM, Gated DeltaNet, DeepTransformer
family) and the Titans hybrids MAC, MAG and MAL.

Every block is pre-norm: ``x = x + mixer(RMSNorm(x))`` then ``x = x + SwiGLU(RMSNorm(x))``, with
``forward(x, state=None, return_state=False)`` on ``x [B, T, hidden]`` like every mixer.

Persistent memory ``P [N_p, hidden]`` lives in the blocks' attention (``attn.persistent``); it is
position-free and always visible to attention (see :mod:`.attention`). Where the equations send
``x~ = [P | x]`` through the neural memory (MAG, MAL), ``P`` enters the memory once, at the start of
a sequence (``state=None``), before the user's tokens; a continued sequence does not see it again.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checks import check_int, check_positive
from ..ops.varlen import by_document, state_error
from ..tree import State, check_state_fits
from .attention import Attention, AttentionState, check_input, rope_tables
from .common import RMSNorm, SwiGLU, default_intermediate_size
from .memory_layer import NeuralMemory, NeuralMemoryState


class _Block(nn.Module):
    """The two norms and the SwiGLU MLP every block has.

    MLP width: ``intermediate_size``, or ``2/3 * mlp_ratio * hidden`` rounded up to a multiple of 32
    (the parameter count of a GELU MLP of width ``mlp_ratio * hidden``)."""

    def __init__(self, hidden_size: int, mlp_ratio: float, intermediate_size: int | None, eps: float):
        super().__init__()
        check_int("hidden_size", hidden_size, 1)
        if intermediate_size is None:
            check_positive("mlp_ratio", mlp_ratio)
            intermediate_size = default_intermediate_size(hidden_size, mlp_ratio)
        else:
            check_int("intermediate_size", intermediate_size, 1)
        check_positive("eps", eps)
        self.hidden_size, self.eps = hidden_size, float(eps)
        self.mixer_norm = RMSNorm(hidden_size, eps)
        self.mlp_norm = RMSNorm(hidden_size, eps)
        self.mlp = SwiGLU(hidden_size, intermediate_size)

    # the block's computation on one batch, ``(x, state, return_state)``: each subclass defines it
    _forward: Callable[..., Any]

    def forward(self, x: Tensor, state=None, return_state: bool = False, *, cu_seqlens: Tensor | None = None):
        """``x [B, T, hidden_size]`` -> ``[B, T, hidden_size]``, and the state to continue from
        when ``return_state`` (``state``: a previous call's, to continue a sequence).

        ``cu_seqlens [N + 1]`` (int32/int64, ``[0, l_1, l_1 + l_2, ..., T]``; ``B`` must be 1):
        packed documents, each read as if alone (memory, conv, attention, segments, positions
        restart); the block runs once on the batch of documents ``[N, max l_i]``
        (:func:`deepmemory.ops.varlen.by_document`). Not with ``state``/``return_state``
        (one-line ``ValueError``)."""
        if cu_seqlens is not None:
            if state is not None or return_state:
                raise state_error("state/return_state")
            check_input(x, self.hidden_size)
            return by_document(cu_seqlens, self._forward, x)
        return self._forward(x, state, return_state)

    def check(self, x: Tensor, state=None, state_type=None) -> None:
        check_input(x, self.hidden_size)
        if x.shape[1] < 1:
            raise ValueError("x must hold at least one token (T >= 1)")
        if state is not None and state_type is not None and not isinstance(state, state_type):
            raise TypeError(f"state must be a {state_type.__name__}; got {type(state).__name__}")
        if state is not None:
            check_state_fits(state, x)

    def finish(self, x: Tensor, state, return_state: bool):
        x = x + self.mlp(self.mlp_norm(x))
        return (x, state) if return_state else x


def _memory_kwargs(memory_kwargs) -> dict:
    if memory_kwargs is None:
        return {}
    if not isinstance(memory_kwargs, dict):
        raise TypeError(f"memory_kwargs must be a dict of NeuralMemory arguments; got {type(memory_kwargs).__name__}")
    return memory_kwargs


class TransformerBlock(_Block):
    """Transformer++ block: ``x + Attn(RMSNorm(x))``, ``x + SwiGLU(RMSNorm(x))``; RoPE attention,
    full causal (``window=None``) or sliding-window. State: the attention's KV cache."""

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        head_dim: int,
        intermediate_size: int | None = None,
        *,
        window: int | None = None,
        num_persistent: int = 0,
        mlp_ratio: float = 4.0,
        rope_theta: float = 10000.0,
        eps: float = 1e-6,
    ):
        super().__init__(hidden_size, mlp_ratio, intermediate_size, eps)
        self.attn = Attention(
            hidden_size, num_heads, head_dim, window=window, num_persistent=num_persistent, rope_theta=rope_theta
        )

    def _forward(
        self, x: Tensor, state: AttentionState | None = None, return_state: bool = False
    ) -> Tensor | tuple[Tensor, AttentionState]:
        self.check(x, state, AttentionState)
        y, state = self.attn(self.mixer_norm(x), state, return_state=True)
        return self.finish(x + y, state, return_state)


class MemoryBlock(_Block):
    """``x + mixer(RMSNorm(x))``, ``x + SwiGLU(RMSNorm(x))`` around a constructed mixer: LMM
    (``NeuralMemory()``), Gated DeltaNet (``NeuralMemory(architecture="linear", optimizer="gd",
    loss="l2", window=1)``), the DeepTransformer family (``KernelMemory``). State: the mixer's.

    ``hidden_size`` defaults to ``mixer.hidden_size``. ``num_persistent`` (int >= 0) learned
    persistent tokens ``P [N_p, hidden]`` (Titans eq. 19; the LMM of Titans' ablations has them):
    the mixer reads ``[P | RMSNorm(x)]`` at the start of a sequence (``state=None``) and their
    outputs are dropped, so ``P`` is what the memory holds before the first user token; a
    continued sequence does not see them again."""

    def __init__(
        self,
        mixer: nn.Module,
        hidden_size: int | None = None,
        intermediate_size: int | None = None,
        *,
        num_persistent: int = 0,
        mlp_ratio: float = 4.0,
        eps: float = 1e-6,
    ):
        if not isinstance(mixer, nn.Module):
            raise TypeError(
                f"mixer must be an nn.Module with forward(x, state, return_state); got {type(mixer).__name__}"
            )
        if hidden_size is None:
            hidden_size = getattr(mixer, "hidden_size", None)
            if hidden_size is None:
                raise ValueError("hidden_size is required when the mixer has no hidden_size attribute")
        super().__init__(hidden_size, mlp_ratio, intermediate_size, eps)
        check_int("num_persistent", num_persistent, 0)
        self.mixer = mixer
        self.num_persistent = num_persistent
        self.persistent = nn.Parameter(torch.randn(num_persistent, hidden_size) * 0.02) if num_persistent else None

    def _forward(self, x: Tensor, state: State | None = None, return_state: bool = False):
        self.check(x)
        h = self.mixer_norm(x)
        if state is None and self.persistent is not None:
            p = self.persistent[None].expand(h.shape[0], -1, -1).to(h.dtype)
            y, state = self.mixer(torch.cat([p, h], 1), None, return_state=True)
            y = y[:, self.num_persistent :]
        else:
            y, state = self.mixer(h, state, return_state=True)
        return self.finish(x + y, state, return_state)


@dataclass
class HybridState(State):
    """State of MAG and MAL: the attention's KV cache and the neural memory's state."""

    attn: AttentionState
    memory: NeuralMemoryState

    @property
    def pos(self) -> int:
        """Tokens read so far (the next token's position)."""
        return self.attn.pos


class _Hybrid(_Block):
    """Attention with persistent tokens and a neural memory (the Titans hybrids): sliding-window
    attention (``window``; None for MAC's, bounded by its segments) and a memory that reads
    ``[P | x]`` (MAG, MAL) or the attention's output (MAC)."""

    # whether the attention holds the persistent tokens (MAG, MAC) or the memory's output does (MAL)
    attn_persistent: bool

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        head_dim: int,
        intermediate_size: int | None = None,
        *,
        window: int | None = 2048,
        num_persistent: int = 16,
        mlp_ratio: float = 4.0,
        rope_theta: float = 10000.0,
        eps: float = 1e-6,
        memory_kwargs: dict | None = None,
    ):
        attn_persistent = self.attn_persistent
        super().__init__(hidden_size, mlp_ratio, intermediate_size, eps)
        if window is not None:
            check_int("window", window, 1)
        check_int("num_persistent", num_persistent, 0)
        self.num_persistent = num_persistent
        self.attn = Attention(
            hidden_size,
            num_heads,
            head_dim,
            window=window,
            num_persistent=num_persistent if attn_persistent else 0,
            rope_theta=rope_theta,
        )
        self.memory = NeuralMemory(hidden_size, num_heads, head_dim, **_memory_kwargs(memory_kwargs))

    def memory_branch(
        self, h: Tensor, state: HybridState | None, p: Tensor | None
    ) -> tuple[Tensor | None, Tensor, NeuralMemoryState]:
        """``M(x~)`` for ``x~ = [p | h]``: the memory's outputs at the persistent tokens (None unless
        the sequence starts here) and at the user's tokens, and its new state."""
        if state is not None or p is None:
            y, mem = self.memory(h, None if state is None else state.memory, return_state=True)
            return None, y, mem
        y, mem = self.memory(torch.cat([p.expand(h.shape[0], -1, -1).to(h.dtype), h], 1), None, return_state=True)
        return y[:, : self.num_persistent], y[:, self.num_persistent :], mem


class MAGBlock(_Hybrid):
    r"""Memory as a gate (Titans §4.2): with ``x~ = [P | RMSNorm(x)]``::

        y = SWA(x~)                                     (P always visible, window over user tokens)
        o = RMSNorm_1(y) * sigmoid(RMSNorm_2(M(x~)))    (learnable vector-valued norm weights)
        x = x + o;  x = x + SwiGLU(RMSNorm(x))

    Outputs at the persistent positions are dropped. ``memory_kwargs`` go to :class:`NeuralMemory`.
    """

    attn_persistent = True

    def __init__(self, hidden_size: int, *args, eps: float = 1e-6, **kwargs):
        super().__init__(hidden_size, *args, eps=eps, **kwargs)
        self.attn_out_norm = RMSNorm(hidden_size, eps)
        self.memory_out_norm = RMSNorm(hidden_size, eps)

    def _forward(
        self, x: Tensor, state: HybridState | None = None, return_state: bool = False
    ) -> Tensor | tuple[Tensor, HybridState]:
        self.check(x, state, HybridState)
        h = self.mixer_norm(x)
        y, attn_state = self.attn(h, None if state is None else state.attn, return_state=True)
        _, m, mem = self.memory_branch(h, state, self.attn.persistent)
        o = self.attn_out_norm(y) * torch.sigmoid(self.memory_out_norm(m))
        return self.finish(x + o, HybridState(attn_state, mem), return_state)


class MALBlock(_Hybrid):
    r"""Memory as a layer (Titans §4.3): with ``x~ = [P | RMSNorm(x)]``::

        y = M(x~);  o = SWA(y);  x = x + o;  x = x + SwiGLU(RMSNorm(x))

    The attention's always-visible prefix is ``y`` at the persistent positions, ``M(P)``: it depends
    only on parameters, so a continued sequence recomputes it (the memory read from its initial
    state over ``P``) rather than carrying it, which keeps its gradient. One residual goes around
    the composed mixer, as the equations read; separately residual memory and attention layers are
    a ``MemoryBlock`` followed by a ``TransformerBlock(window=...)``.
    """

    attn_persistent = False

    def __init__(self, hidden_size: int, *args, num_persistent: int = 16, **kwargs):
        super().__init__(hidden_size, *args, num_persistent=num_persistent, **kwargs)
        self.persistent = nn.Parameter(torch.randn(num_persistent, hidden_size) * 0.02) if num_persistent else None

    def _forward(
        self, x: Tensor, state: HybridState | None = None, return_state: bool = False
    ) -> Tensor | tuple[Tensor, HybridState]:
        self.check(x, state, HybridState)
        h = self.mixer_norm(x)
        prefix, y, mem = self.memory_branch(h, state, self.persistent)
        if prefix is None and self.persistent is not None:
            prefix = self.memory(self.persistent[None].to(h.dtype))
        o, attn_state = self.attn(y, None if state is None else state.attn, return_state=True, prefix=prefix)
        return self.finish(x + o, HybridState(attn_state, mem), return_state)


@dataclass
class MACState(State):
    """State of MAC at absolute position ``pos`` (``n = pos % segment_size`` tokens into a segment):

    - ``memory``: the neural memory after the last token; ``memory_start``: at the start of the
      current segment, what its retrievals read (None = the learned initial memory);
    - ``k, v [B, H, 2n, D]``: attention keys/values of the segment so far, retrievals ``h`` first.
    """

    memory: NeuralMemoryState | None
    memory_start: NeuralMemoryState | None
    k: Tensor
    v: Tensor
    pos: int


class MACBlock(_Hybrid):
    r"""Memory as a context (Titans §4.1). Segments of ``C = segment_size`` tokens at absolute
    positions ``[sC, (s+1)C)``; for segment ``S`` with ``x = RMSNorm(input)``::

        q_j = normalize(W_q x_j) per head;  h_j = W_h M*_prev(q_j)     (read-only, memory before S)
        y   = Attn([P | h | S])          query t sees P, h_j and x_j for j in S with j <= t
        M*(y) = NeuralMemory(y)          write with y; its output is the read after the write
        o   = RMSNorm_1(y) * sigmoid(RMSNorm_2(M*(y)))
        x   = x + o;  x = x + SwiGLU(RMSNorm(x))

    ``h_j`` depends on token ``j``, so it is visible only from position ``j`` on (earlier queries
    would see the future); it takes RoPE position ``j``. Attention spans ``N_p + 2C`` keys at most.
    A segment cut by a call boundary continues exactly: the state keeps its keys, values and the
    memory from its start. ``memory_kwargs`` go to :class:`NeuralMemory`.
    """

    attn_persistent = True

    def __init__(self, hidden_size: int, num_heads: int, head_dim: int, *args, segment_size: int = 512, **kwargs):
        super().__init__(hidden_size, num_heads, head_dim, *args, window=None, **kwargs)
        check_int("segment_size", segment_size, 1)
        self.segment_size = segment_size
        width = num_heads * head_dim
        self.retrieve_q = nn.Linear(hidden_size, width, bias=False)
        self.retrieve_o = nn.Linear(num_heads * self.memory.value_dim, hidden_size, bias=False)
        self.attn_out_norm = RMSNorm(hidden_size, self.eps)
        self.memory_out_norm = RMSNorm(hidden_size, self.eps)

    def retrieve(self, x: Tensor, memory_state) -> Tensor:
        """``h = W_h M*(normalize(W_q x))`` at the memory of ``memory_state``: ``[B, n, hidden]``."""
        q = F.normalize(self.retrieve_q(x).unflatten(-1, (self.attn.num_heads, self.attn.head_dim)), dim=-1)
        return self.retrieve_o(self.memory.read(q, memory_state).flatten(2))

    def _forward(
        self, x: Tensor, state: MACState | None = None, return_state: bool = False
    ) -> Tensor | tuple[Tensor, MACState]:
        self.check(x, state, MACState)
        h = self.mixer_norm(x)
        bsz, seq, _ = x.shape
        c, nh, hd = self.segment_size, self.attn.num_heads, self.attn.head_dim
        if state is None:
            mem, mem_start, pos = None, None, 0
            k_seg = v_seg = h.new_zeros(bsz, nh, 0, hd)
        else:
            mem, mem_start, pos = state.memory, state.memory_start, state.pos
            k_seg, v_seg = state.k.to(h.dtype), state.v.to(h.dtype)
        attn = self.attn
        # what does not depend on the memory is computed once for the whole input, not per segment:
        # the tokens' queries, keys and values, their retrieval queries, RoPE's tables and the keys of P;
        # split into the segments' pieces at once (one backward node each: a slice per segment would
        # make every segment's backward write a gradient of the whole input)
        sizes, at = [], pos
        while at < pos + seq:
            sizes.append(min(pos + seq - at, c - at % c))
            at += sizes[-1]
        positions = torch.arange(pos, pos + seq, device=x.device)
        cos, sin = rope_tables(positions, hd, attn.rope_theta, h.dtype)
        q_all, qr_all = attn.queries(h, positions, (cos, sin))
        kx_all, vx_all = attn.keys_values(h, positions, (cos, sin))
        retrieve_q = F.normalize(self.retrieve_q(h).unflatten(-1, (nh, hd)), dim=-1)
        pieces = zip(
            *(t.split(sizes, 2) for t in (q_all, qr_all, kx_all, vx_all)),
            retrieve_q.split(sizes, 1),
            *(t.split(sizes, 0) for t in (positions, cos, sin)),
        )
        fixed = attn.fixed_keys(None, bsz)
        masks: dict[tuple[int, int], Tensor] = {}
        ys, ms = [], []
        for q_s, qr_s, kx, vx, rq_s, p_s, cos_s, sin_s in pieces:
            done = pos % c  # tokens of this segment already seen
            n = p_s.shape[0]
            retrieved = self.retrieve_o(self.memory.read(rq_s, mem_start).flatten(2))
            kh, vh = attn.keys_values(retrieved, p_s, (cos_s, sin_s))
            k_seg = torch.cat([k_seg[:, :, :done], kh, k_seg[:, :, done:], kx], 2)
            v_seg = torch.cat([v_seg[:, :, :done], vh, v_seg[:, :, done:], vx], 2)
            if (done, n) not in masks:  # key j (retrievals, then tokens) is visible from its own position on
                kpos = torch.arange(done + n, device=x.device).repeat(2)
                masks[done, n] = kpos[None, :] <= torch.arange(done, done + n, device=x.device)[:, None]
            y = attn.attend_queries(q_s, qr_s, k_seg, v_seg, masks[done, n], fixed)
            m, mem = self.memory(y, mem, return_state=True)
            ys.append(y)
            ms.append(m)
            pos += n
            if pos % c == 0:  # segment complete: the next one reads the memory written so far
                mem_start, k_seg, v_seg = mem, k_seg[:, :, :0], v_seg[:, :, :0]
        # the output gate reads each token alone: once over all segments
        y, m = (torch.cat(t, 1) if len(t) > 1 else t[0] for t in (ys, ms))
        o = self.attn_out_norm(y) * torch.sigmoid(self.memory_out_norm(m))
        return self.finish(x + o, MACState(mem, mem_start, k_seg, v_seg, pos), return_state)
