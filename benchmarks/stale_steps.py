"""Stream text and random input through a NeuralMemory with and without the stale-step bound
(``step_bound``) and report when its memory stops being finite and how large it grows.

    python benchmarks/stale_steps.py --tokens 65536

One row per (setting, input, step_bound): the first token whose output is not finite (``-`` if
none) and the largest Frobenius norm of a memory matrix after 1K, 8K and all tokens (``inf`` once
non-finite). The layer is ``NeuralMemory(64, 4, 16)`` at its defaults (max_lr 1, damped
momentum, chunk 16, window 1) with one setting changed; the input is the standard library's own
source through a fixed random byte embedding, or i.i.d. normal vectors; pieces of 4096 tokens
with the state carried; one thread.
"""

from __future__ import annotations

import argparse
import math
import sysconfig
import time
from pathlib import Path

import torch

from deepmemory.bench.measure import print_table
from deepmemory.layers import NeuralMemory

HIDDEN, HEADS, HEAD_DIM = 64, 4, 16
SETTINGS = {
    "chunk 64": dict(chunk_size=64),
    "chunk 128": dict(chunk_size=128),
    "window 4": dict(window=4),
    "window 16": dict(window=16),
    "chunk 64, window 4": dict(chunk_size=64, window=4),
    "undamped momentum": dict(damped_momentum=False),
    "gd, chunk 64": dict(optimizer="gd", chunk_size=64),
}


def text_bytes(n: int) -> torch.Tensor:
    root = Path(sysconfig.get_paths()["stdlib"])
    out = bytearray()
    for path in sorted(root.glob("*.py")):
        out += path.read_bytes()
        if len(out) >= n:
            break
    return torch.tensor(list(out[:n]), dtype=torch.long)


def layer_input(kind: str, n: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    if kind == "random":
        return torch.randn(1, n, HIDDEN, generator=gen)
    return torch.randn(256, HIDDEN, generator=gen)[text_bytes(n)][None]


def stream(layer: NeuralMemory, x: torch.Tensor, piece: int = 4096):
    state, first_bad, largest, marks = None, None, 0.0, {}
    with torch.no_grad():
        for lo in range(0, x.shape[1], piece):
            y, state = layer(x[:, lo:lo + piece], state, return_state=True)
            bad = ~torch.isfinite(y).all(-1)[0]
            if bad.any():
                first_bad = lo + int(bad.nonzero()[0])
                break
            largest = max([largest] + [float(w.norm(dim=(-2, -1)).max()) for w in state.recurrent_state.weights.values()])
            if not math.isfinite(largest):
                first_bad = lo + piece
                break
            marks[lo + piece] = largest
    return first_bad, marks


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=65536, help="tokens streamed per row (a multiple of 4096)")
    args = p.parse_args()
    torch.set_num_threads(1)
    x = {kind: layer_input(kind, args.tokens) for kind in ("text", "random")}
    rows = []
    for name, change in SETTINGS.items():
        for kind in ("text", "random"):
            for bound in (None, 1.0):
                t0 = time.time()
                torch.manual_seed(0)
                layer = NeuralMemory(HIDDEN, HEADS, HEAD_DIM, step_bound=bound, **change)
                first_bad, marks = stream(layer, x[kind])

                def at(n):
                    got = [v for k, v in marks.items() if k <= n]
                    return "inf" if first_bad is not None and first_bad < n else f"{max(got):.3g}" if got else "-"

                rows.append({"setting": name, "input": kind, "step_bound": str(bound),
                             "first non-finite": "-" if first_bad is None else str(first_bad),
                             "max|W| 4K": at(4096), "max|W| 8K": at(8192), f"max|W| {args.tokens // 1024}K": at(args.tokens),
                             "time": f"{time.time() - t0:.0f}s"})
                print(" | ".join(rows[-1].values()), flush=True)
    print()
    print_table(rows, list(rows[0]), left=("setting", "input"))


if __name__ == "__main__":
    main()
