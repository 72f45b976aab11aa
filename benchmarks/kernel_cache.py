"""The cache of the DeepTransformer family against the context: how many bytes a model keeps after
reading T tokens, and what a token read then costs.

    python benchmarks/kernel_cache.py --context 64 256 1024 2048 8192

Each model (tiny, random weights, float32, no gradients, one thread) reads the Python standard
library's source as bytes through one ``DeepMemoryCache`` in pieces of ``--piece`` tokens (the
cache a decode carries). At each context: the bytes of every tensor in the cache
(``DeepMemoryCache.nbytes``), that size over the size at the first context, the bytes added per
token since the previous context, the milliseconds per token of the last piece read, and whether
every logit was finite. ``swdt-swa`` is ``swdt`` with ``kernel={"window": "attention",
"window_rule": "swa"}`` (the deep sliding-window attention, which retires tokens).
"""

from __future__ import annotations

import argparse
import time

import torch

from deepmemory.bench.measure import print_table
from deepmemory.data import build_corpus, load_tokenizer
from deepmemory.models import DeepMemoryCache, build

# name -> (preset, overrides)
VARIANTS = {"swdt-swa": ("swdt", dict(kernel=dict(window="attention", window_rule="swa")))}
MODELS = ["deep-transformer", "swdt", "dot", "swdt-swa", "transformer", "titans-lmm"]


def cache_rows(name: str, text: torch.Tensor, vocab: int, contexts: list[int], piece: int) -> list[dict]:
    preset, overrides = VARIANTS.get(name, (name, {}))
    torch.manual_seed(0)
    model = build(preset, size="tiny", vocab_size=vocab, **overrides).eval()
    cache = DeepMemoryCache(model.config)
    rows, seen, finite, first, last = [], 0, True, None, (0, 0)
    with torch.no_grad():
        for ctx in contexts:
            while seen < ctx:
                n = min(piece, ctx - seen)
                ids = text[torch.arange(seen, seen + n) % text.numel()][None].long()
                t0 = time.perf_counter()
                logits = model(ids, cache=cache).logits
                ms = 1e3 * (time.perf_counter() - t0) / n
                finite = finite and bool(torch.isfinite(logits).all())
                seen += n
            size = cache.nbytes()
            first = first or size
            rows.append(
                {
                    "model": name,
                    "context": f"{ctx:,}",
                    "cache KiB": f"{size / 1024:.0f}",
                    "x at first": f"{size / first:.2f}",
                    "B/token added": f"{(size - last[1]) / (ctx - last[0]):.0f}" if rows else "",
                    "ms/token (last piece)": f"{ms:.2f}",
                    "finite": finite,
                }
            )
            last = (ctx, size)
            print(" | ".join(f"{k} {v}" for k, v in rows[-1].items()), flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=MODELS, help=f"presets, or {', '.join(VARIANTS)}")
    p.add_argument("--context", type=int, nargs="+", default=[64, 256, 1024, 2048, 8192], help="contexts (tokens)")
    p.add_argument("--piece", type=int, default=64, help="tokens per forward call (the cache carries the rest)")
    args = p.parse_args()
    if min(args.context) < 1 or args.piece < 1:
        p.error("--context and --piece must be >= 1")
    torch.set_num_threads(1)
    tok = load_tokenizer("bytes")
    text = build_corpus(None, tok).val
    print(f"torch {torch.__version__}; size tiny, float32, one thread; pieces of {args.piece} tokens", flush=True)
    rows = []
    for name in args.models:
        rows += cache_rows(name, text, tok.vocab_size, sorted(set(args.context)), args.piece)
    print()
    print_table(rows, list(rows[0]), left=("model",))


if __name__ == "__main__":
    main()
