"""What the stale-step bound (``step_bound``) costs the memory layer's training step, where it is
inactive and where it acts, measured side by side in one process.

    python benchmarks/step_bound_cost.py --seq 2048 --chunk 16 64

The layer is ``deepmemory bench mixer``'s ``memory-token`` (``NeuralMemory(256, 4, 64)``, MLP memory
depth 2 expansion 4, momentum, token granularity, batch 2, fp32, one thread) with
``step_bound=None`` (the papers' rule), the layer's default ``1.0`` and a bound that acts on most
rows of this random input (``--active``, default 0.05). The cases run interleaved, in a rotating
order, ``--repeat`` times after one warm-up, with the same weights and input; each reports its best
process CPU time of a forward+backward step (CPU time, not wall time: on a shared machine another
process's load inflates both alike but moves wall time by more), as tokens/s and as the time over
the papers' rule. ``active rows`` is the share of rows ``t`` of the chunks whose factor ``s_t`` is
below 1 (``bench mixer``'s ``memory-token-bound`` is the 1.0 row).
"""

from __future__ import annotations

import argparse
import time

import torch

from deepmemory.bench.measure import print_table
from deepmemory.layers import NeuralMemory
from deepmemory.ops import chunk as chunk_module


def active_share(layer: NeuralMemory, x: torch.Tensor) -> float:
    """The share of rows whose factor is below 1 in one forward pass of ``layer`` on ``x``."""
    seen = []
    chunk_scale = chunk_module._chunk_scale

    def spy(*args):
        scale = chunk_scale(*args)
        seen.append(0.0 if scale is None else (scale < 1).float().mean().item())
        return scale

    chunk_module._chunk_scale = spy
    try:
        with torch.no_grad():
            layer(x)
    finally:
        chunk_module._chunk_scale = chunk_scale
    return sum(seen) / max(len(seen), 1)


def measure(seq: int, chunk: int, bounds: list, repeat: int, batch: int) -> list[list]:
    torch.manual_seed(0)
    memory = dict(chunk_size=chunk, architecture="mlp", depth=2, expansion=4, optimizer="momentum")
    layers = [NeuralMemory(256, 4, 64, granularity="token", step_bound=b, **memory) for b in bounds]
    for layer in layers[1:]:
        layer.load_state_dict(layers[0].state_dict())
    x = torch.randn(batch, seq, 256, requires_grad=True)
    best = [float("inf")] * len(layers)
    for r in range(repeat + 1):
        order = list(range(len(layers)))
        order = order[r % len(order) :] + order[: r % len(order)]
        for i in order:
            t0 = time.process_time()
            layers[i](x).sum().backward()
            if r:  # (the first round warms up)
                best[i] = min(best[i], time.process_time() - t0)
    return [
        [chunk, seq, "None" if b is None else b, f"{active_share(layer, x.detach()):.0%}", batch * seq / t, t / best[0]]
        for b, layer, t in zip(bounds, layers, best)
    ]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq", type=int, nargs="+", default=[2048], help="sequence lengths; default 2048")
    ap.add_argument("--chunk", type=int, nargs="+", default=[16, 64], help="chunk sizes; default 16 64")
    ap.add_argument("--active", type=float, default=0.05, help="a bound that acts here; default 0.05")
    ap.add_argument("--repeat", type=int, default=6, help="timed rounds (the best counts); default 6")
    ap.add_argument("--batch", type=int, default=2, help="batch size; default 2")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for chunk in args.chunk:
        for seq in args.seq:
            rows += measure(seq, chunk, [None, 1.0, args.active], args.repeat, args.batch)
    print(f"NeuralMemory(256, 4, 64) training step, B={args.batch}, fp32, 1 thread, torch {torch.__version__}")
    print(f"best process CPU time of {args.repeat} interleaved rounds")
    columns = ["chunk", "T", "step_bound", "active rows", "tokens/s", "time / papers' rule"]
    print_table(
        [dict(zip(columns, [c, t, b, a, f"{tps:.0f}", f"{ratio:.3f}"])) for c, t, b, a, tps, ratio in rows], columns
    )


if __name__ == "__main__":
    main()
