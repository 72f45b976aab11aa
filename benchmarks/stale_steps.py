"""Stream text and random input through a NeuralMemory with and without the stale-step bound
(``step_bound``) and report when its memory stops being finite and how large it grows.

    python benchmarks/stale_steps.py --tokens 65536

One row per (setting, input, step_bound): the first token whose output is not finite (``-`` if
none) and the largest Frobenius norm of a memory matrix after 1K, 8K and all tokens (``inf`` once
non-finite). The layer is ``NeuralMemory(64, 4, 16)`` at its defaults (max_lr 1, damped
momentum, chunk 16, window 1) with one setting changed; the input is the standard library's own
source through a fixed random byte embedding, or i.i.d. normal vectors; pieces of 4096 tokens
with the state carried; one thread.

A second table shows what the bound does not cover: momentum carried from chunk to chunk. The op
alone, with the linear memory (l2, random unit keys and normal values, 4096 tokens), the gates held
constant (``lr = 0.9 (1 - momentum)``, damped as the layer gives them; decay 0.001) and
``step_bound=1``, reports the final ``|W|`` for windows 1 and 4, chunk sizes 1 and 16 and momenta
0 to 0.99. A third table holds the layer's learned gates at an extreme the training could reach
(momentum 0.99, learning-rate gate 0.9, decay 0.001; biases set, 16K tokens) and reports the largest
``|W|`` for windows 1 and 4, with and without the bound.
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F

from deepmemory.bench.measure import print_table
from deepmemory.data.corpus import stdlib_documents
from deepmemory.layers import NeuralMemory
from deepmemory.ops import neural_memory

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
    """The first ``n`` bytes of the standard library's sources, in the training corpus's order."""
    return torch.tensor(list(b"".join(data for _, data in stdlib_documents())[:n]), dtype=torch.long)


def layer_input(kind: str, n: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    if kind == "random":
        return torch.randn(1, n, HIDDEN, generator=gen)
    return torch.randn(256, HIDDEN, generator=gen)[text_bytes(n)][None]


def stream(layer: NeuralMemory, x: torch.Tensor, piece: int = 4096):
    state, first_bad, largest, marks = None, None, 0.0, {}
    with torch.no_grad():
        for lo in range(0, x.shape[1], piece):
            y, state = layer(x[:, lo : lo + piece], state, return_state=True)
            bad = ~torch.isfinite(y).all(-1)[0]
            if bad.any():
                first_bad = lo + int(bad.nonzero()[0])
                break
            largest = max(
                [largest] + [float(w.norm(dim=(-2, -1)).max()) for w in state.recurrent_state.weights.values()]
            )
            if not math.isfinite(largest):
                first_bad = lo + piece
                break
            marks[lo + piece] = largest
    return first_bad, marks


def momentum_rows(tokens: int = 4096):
    """Final ``|W|`` of the linear memory at constant gates, per window, chunk size and momentum."""
    gen = torch.Generator().manual_seed(0)
    k = F.normalize(torch.randn(1, tokens, 1, 16, dtype=torch.float64, generator=gen), dim=-1)
    v = torch.randn(1, tokens, 1, 16, dtype=torch.float64, generator=gen)
    rows = []
    for window in (1, 4):
        for chunk in (1, 16):
            row = {"window": str(window), "chunk": str(chunk)}
            for m in (0.0, 0.9, 0.95, 0.97, 0.99):
                gate = lambda x: torch.full((1, tokens, 1), x, dtype=torch.float64)  # noqa: E731
                _, st = neural_memory(
                    k,
                    k,
                    v,
                    gate(0.9 * (1 - m)),
                    gate(m),
                    gate(0.001),
                    {"w0": torch.zeros(1, 16, 16, dtype=torch.float64)},
                    architecture="linear",
                    residual=False,
                    optimizer="momentum",
                    chunk_size=chunk,
                    window=window,
                    step_bound=1.0,
                    output_final_state=True,
                )
                row[f"momentum {m}"] = f"{float(st.weights['w0'].norm()):.3g}"
            rows.append(row)
    return rows


def extreme_gate_rows(tokens: int = 16384):
    """The default layer (windows 1 and 4) with its gate biases at momentum 0.99, lr 0.9, decay 0.001."""
    logit = lambda p: math.log(p / (1 - p))  # noqa: E731
    rows = []
    for window in (1, 4):
        for kind in ("text", "random"):
            for bound in (None, 1.0):
                torch.manual_seed(1)
                layer = NeuralMemory(HIDDEN, HEADS, HEAD_DIM, window=window, step_bound=bound)
                with torch.no_grad():
                    layer.momentum_proj.bias.fill_(logit(0.99))
                    layer.lr_proj.bias.fill_(logit(0.9))
                    layer.decay_proj.bias.fill_(logit(0.001))
                first_bad, marks = stream(layer, layer_input(kind, tokens))
                rows.append(
                    {
                        "window": str(window),
                        "input": kind,
                        "step_bound": str(bound),
                        "first non-finite": "-" if first_bad is None else str(first_bad),
                        "max|W|": f"{max(marks.values()):.3g}" if marks else "-",
                    }
                )
    return rows


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

                def at(n, marks=marks, first_bad=first_bad):
                    got = [v for k, v in marks.items() if k <= n]
                    return "inf" if first_bad is not None and first_bad < n else f"{max(got):.3g}" if got else "-"

                rows.append(
                    {
                        "setting": name,
                        "input": kind,
                        "step_bound": str(bound),
                        "first non-finite": "-" if first_bad is None else str(first_bad),
                        "max|W| 4K": at(4096),
                        "max|W| 8K": at(8192),
                        f"max|W| {args.tokens // 1024}K": at(args.tokens),
                        "time": f"{time.time() - t0:.0f}s",
                    }
                )
                print(" | ".join(rows[-1].values()), flush=True)
    print()
    print_table(rows, list(rows[0]), left=("setting", "input"))
    print("\nmomentum carried from chunk to chunk (op, linear memory, constant gates, step_bound=1): final |W|")
    mom = momentum_rows()
    print_table(mom, list(mom[0]), left=("window", "chunk"))
    print("\nthe layer with extreme learned gates (momentum 0.99, lr gate 0.9, decay 0.001), 16K tokens")
    ext = extreme_gate_rows()
    print_table(ext, list(ext[0]), left=("window", "input"))


if __name__ == "__main__":
    main()
