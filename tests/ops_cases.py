"""Random inputs for the memory op tests (float64, normalised keys, moderate gates)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from deepmemory.ops import MemorySpec


def make_params(kind: str, nh: int, dk: int, dv: int, hidden: int, depth: int = 2, batch: int | None = None, gen=None):
    spec = MemorySpec(kind, depth)
    lead = (nh,) if batch is None else (batch, nh)
    return {
        n: torch.randn(*lead, r, c, dtype=torch.float64, generator=gen) / c**0.5
        for n, (r, c) in spec.shapes(dk, dv, hidden).items()
    }


def make_inputs(
    bsz: int,
    seq: int,
    nh: int,
    dk: int,
    dv: int,
    *,
    optimizer: str = "momentum",
    seed: int = 0,
    lr_scale: float = 1.0,
    channel: bool = False,
):
    """q, k, v, lr, momentum, decay and the window gate (``[B, T, H, dv]`` if ``channel``)."""
    g = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(bsz, seq, nh, dk, dtype=torch.float64, generator=g), dim=-1)
    k = F.normalize(torch.randn(bsz, seq, nh, dk, dtype=torch.float64, generator=g), dim=-1)
    v = torch.randn(bsz, seq, nh, dv, dtype=torch.float64, generator=g)
    lr = lr_scale * (0.1 if optimizer == "muon" else 0.5) * torch.rand(bsz, seq, nh, dtype=torch.float64, generator=g)
    momentum = torch.rand(bsz, seq, nh, dtype=torch.float64, generator=g)
    decay = 0.2 * torch.rand(bsz, seq, nh, dtype=torch.float64, generator=g)
    gamma = torch.rand(bsz, seq, nh, *((dv,) if channel else ()), dtype=torch.float64, generator=g)
    return q, k, v, lr, momentum, decay, gamma


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    scale = b.abs().max().item()
    return (a - b).abs().max().item() / (scale if scale > 0 else 1.0)


def streamed(inputs, params, cuts, **kw):
    """The op run in pieces ending at ``cuts`` (then the end), each continuing the previous state:
    ``inputs`` = (q, k, v, lr, momentum, decay, window_gate) ``[B, T, ...]``; returns the outputs
    joined along T and the last state."""
    from deepmemory.ops import neural_memory

    q, k, v, lr, mom, dec, gam = inputs
    outs, state, lo = [], None, 0
    for hi in list(cuts) + [q.shape[1]]:
        piece = lambda t, lo=lo, hi=hi: None if t is None else t[:, lo:hi]  # noqa: E731
        o, state = neural_memory(
            *(piece(t) for t in (q, k, v, lr, mom, dec)),
            params,
            window_gate=piece(gam),
            initial_state=state,
            output_final_state=True,
            **kw,
        )
        outs.append(o)
        lo = hi
    return torch.cat(outs, 1), state
