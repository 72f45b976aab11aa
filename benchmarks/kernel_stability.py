"""The DeepTransformer family's inner learning rate: write strength at init and stability on text,
per ``max_lr`` and step bound.

    python benchmarks/kernel_stability.py --models swdt dot --max-lr 1e-4 1e-3 1e-2 0.1 1 --tokens 8192

For each model (``size="tiny"``, random weights as built, float32, no gradients, one thread) and
each ``kernel`` setting:

- ``write``: one write of ``(k, v)`` read back at ``k`` closes the fraction ``<M_1(k) - M_0(k), v -
  M_0(k)> / ||v - M_0(k)||^2`` of the residual (1: a complete write; the mean over heads, layers
  and 256 random unit-RMS inputs, the layer's own projections, learning-rate gate at init; computed
  by ``deepmemory.ops.kernel_memory`` on the one token, in float64); ``write_v``: ``<M_1(k) -
  M_0(k), v> / ||v||^2``, what the write adds along ``v`` (a Hebbian write adds ``v``, not the
  residual: with the residual memory ``M_0(k) = k`` and a short ``v`` the two differ).
- the stream: the Python standard library's source as bytes (validation split, wrapping around) read
  through one ``DeepMemoryCache`` in pieces of ``--piece`` tokens; at each mark, whether every logit
  so far was finite and the largest ``|y|`` the kernel op returned so far (the memory's read, before
  the output norm).

``paper`` is ATLAS's unnormalised Hebbian form on a one-layer tiny model: ``kernel={"window": 4,
"loss": "dot", "depth": 3, "chunk_size": 1, "normalized": False}`` at the layer's defaults.
``--step-bound none`` is the papers' rule. A run directory of ``deepmemory train`` streams with its
trained weights (and its own settings).
"""

from __future__ import annotations

import argparse
import copy
import os
import time

import torch
from transformers import AutoModelForCausalLM

import deepmemory.layers.kernel_memory as kernel_layer
from deepmemory.bench.measure import print_table
from deepmemory.data import build_corpus, load_tokenizer
from deepmemory.layers import KernelMemory
from deepmemory.models import DeepMemoryCache, build
from deepmemory.ops import kernel_memory

# name -> (preset, overrides)
VARIANTS = {
    "paper": (
        "swdt",
        dict(
            num_hidden_layers=1,
            kernel=dict(window=4, loss="dot", depth=3, chunk_size=1, normalized=False, max_lr=1.0, step_bound=1.0),
        ),
    ),
}


@torch.no_grad()
def write_strength(layer: KernelMemory, n: int = 256, seed: int = 0) -> tuple[float, float]:
    """The mean closed fraction of one write (see the module docstring) over ``n`` random inputs,
    and the mean ``<M_1(k) - M_0(k), v> / ||v||^2`` (what a Hebbian write adds along ``v``)."""
    g = torch.Generator().manual_seed(seed)
    layer = copy.deepcopy(layer).double()  # (the model keeps its own)
    x = torch.randn(n, 1, layer.hidden_size, generator=g, dtype=torch.float64)
    _, k, v, _ = layer.qkv(x, None)
    lr = layer.max_lr * torch.sigmoid(layer.lr_proj(x))
    w, scale = dict(layer.initial_weights), layer.log_temp.exp()
    m0, _ = kernel_memory(k, k, v, torch.zeros_like(lr), w, scale, rule=layer.rule)  # no step: M_0(k)
    m1, _ = kernel_memory(k, k, v, lr, w, scale, rule=layer.rule)
    residual = v - m0
    closed = ((m1 - m0) * residual).sum(-1).div(residual.pow(2).sum(-1))
    along_v = ((m1 - m0) * v).sum(-1).div(v.pow(2).sum(-1))
    return float(closed.mean()), float(along_v.mean())


def run(name: str, kernel: dict, text: torch.Tensor, vocab: int, marks: list[int], piece: int) -> list[dict]:
    torch.manual_seed(0)
    if os.path.isdir(name):  # a run directory of deepmemory train: its trained weights and settings
        model = AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32).eval()
        kernel = {k: model.config.kernel[k] for k in ("max_lr", "step_bound") if k in model.config.kernel}
    else:
        preset, overrides = VARIANTS.get(name, (name, {}))
        overrides = dict(overrides, kernel=dict(overrides.get("kernel", {}), **kernel))
        model = build(preset, size="tiny", vocab_size=vocab, **overrides).eval()
    layers = [m for m in model.modules() if isinstance(m, KernelMemory)]
    writes = [write_strength(m) for m in layers]
    write, along_v = (sum(w[i] for w in writes) / len(writes) for i in (0, 1))
    largest = [0.0]
    op = kernel_layer.kernel_memory

    def watched(*args, **kwargs):
        y, st = op(*args, **kwargs)
        top = float(y.abs().max())
        largest[0] = max(largest[0], top) if top == top else float("nan")  # NaN stays
        return y, st

    kernel_layer.kernel_memory = watched
    rows, seen, finite, t0 = [], 0, True, time.time()
    cache = DeepMemoryCache(model.config)
    settings = ", ".join(f"{k}={v}" for k, v in kernel.items())
    try:
        with torch.no_grad():
            for mark in marks:
                while seen < mark:
                    n = min(piece, mark - seen)
                    ids = text[torch.arange(seen, seen + n) % text.numel()][None].long()
                    finite = finite and bool(torch.isfinite(model(ids, cache=cache).logits).all())
                    seen += n
                rows.append(
                    dict(
                        model=name,
                        kernel=settings,
                        write=f"{write:.3g}",
                        write_v=f"{along_v:.3g}",
                        tokens=f"{mark:,}",
                        finite=finite,
                        max_y=f"{largest[0]:.3g}",
                        seconds=f"{time.time() - t0:.0f}",
                    )
                )
                print(" | ".join(f"{k} {v}" for k, v in rows[-1].items()), flush=True)
                if not finite:
                    break
    finally:
        kernel_layer.kernel_memory = op
    return rows


def _bound(text: str):
    return None if text.lower() == "none" else float(text)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--models",
        nargs="+",
        default=["swdt", "dot"],
        help=f"kernel presets (random weights), {', '.join(VARIANTS)}, or run directories of deepmemory train "
        "(trained weights; their own kernel settings)",
    )
    p.add_argument("--max-lr", type=float, nargs="+", default=None, help="max_lr values (default: the model's)")
    p.add_argument("--step-bound", type=_bound, nargs="+", default=[1.0], help="step_bound values ('none': none)")
    p.add_argument("--tokens", type=int, default=8192, help="tokens to stream per setting")
    p.add_argument("--piece", type=int, default=256, help="tokens per forward call (the cache carries the rest)")
    args = p.parse_args()
    torch.set_num_threads(1)
    tok = load_tokenizer("bytes")
    text = build_corpus(None, tok).val
    marks = [m for m in (512, 2048, 8192, 32768) if m < args.tokens] + [args.tokens]
    print(f"torch {torch.__version__}; size tiny, float32, one thread; pieces of {args.piece} tokens", flush=True)
    rows = []
    for name in args.models:
        if os.path.isdir(name):
            rows += run(name, {}, text, tok.vocab_size, marks, args.piece)
            continue
        for bound in args.step_bound:
            for max_lr in args.max_lr or [None]:
                kernel = {"step_bound": bound} if max_lr is None else {"max_lr": max_lr, "step_bound": bound}
                rows += run(name, kernel, text, tok.vocab_size, marks, args.piece)
    print()
    print_table(rows, list(rows[0]), left=("model", "kernel"))


if __name__ == "__main__":
    main()
