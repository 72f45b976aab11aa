"""Stream a million tokens through tiny models' recurrent path; report finiteness, the memory's
state norm and the process's memory as the stream grows.

    python benchmarks/stream_stability.py --models titans-lmm titans-mac atlas --tokens 1000000

The stream is the Python standard library's source as bytes (real text, wrapping around), fed
in pieces of ``--piece`` tokens with the model's cache carried from piece to piece (the same
state a token-by-token decode carries; pieces only make it faster). A preset name means random
weights as built (``size="tiny"``); a run directory of ``deepmemory train`` means its trained
weights. Float32, no gradients, one thread. Columns at each checkpoint:
tokens read, whether every logit so far was finite, the largest Frobenius norm of a memory
matrix in the cache, the resident set size now and its peak (MiB, from /proc/self/status).
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from transformers import AutoModelForCausalLM

from deepmemory.bench.measure import print_table
from deepmemory.data import build_corpus, load_tokenizer
from deepmemory.models import DeepMemoryCache, build
from deepmemory.tree import tensors


def rss_mib():
    """(current, peak) resident set size in MiB, or (nan, nan) where /proc is missing."""
    now = peak = float("nan")
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    now = int(line.split()[1]) / 1024
                elif line.startswith("VmHWM:"):
                    peak = int(line.split()[1]) / 1024
    except OSError:
        pass
    return now, peak


def state_norm(cache) -> float:
    return max(
        (
            float(t.flatten(-2).norm(dim=-1).max())
            for t in tensors(cache.states)
            if t.dim() == 4 and t.is_floating_point()
        ),
        default=0.0,
    )


def stream(name: str, text: torch.Tensor, vocab: int, total: int, piece: int, marks, seed: int):
    """``name``: a preset (random weights, ``size="tiny"``) or a run directory (trained weights)."""
    torch.manual_seed(seed)
    if os.path.isdir(name):
        model = AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32).eval()
    else:
        model = build(name, size="tiny", vocab_size=vocab).eval()
    cache = DeepMemoryCache(model.config)
    finite, seen, rows, t0 = True, 0, [], time.time()
    marks = sorted(marks)
    with torch.no_grad():
        while seen < total:
            n = min(piece, total - seen)
            idx = torch.arange(seen, seen + n) % text.numel()
            logits = model(text[idx][None].long(), cache=cache).logits
            finite = finite and bool(torch.isfinite(logits).all())
            seen += n
            if marks and seen >= marks[0]:
                marks.pop(0)
                now, peak = rss_mib()
                rows.append(
                    dict(
                        model=name,
                        tokens=f"{seen:,}",
                        finite=finite,
                        max_state=f"{state_norm(cache):.3g}",
                        rss_mib=f"{now:.0f}",
                        peak_rss_mib=f"{peak:.0f}",
                        seconds=f"{time.time() - t0:.0f}",
                    )
                )
                print(" | ".join(f"{k} {v}" for k, v in rows[-1].items()), flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--models",
        nargs="+",
        default=["titans-lmm", "titans-mac", "atlas"],
        help="presets (random weights, tiny) or run directories of deepmemory train (trained weights)",
    )
    p.add_argument("--tokens", type=int, default=1_000_000, help="tokens to stream per model")
    p.add_argument("--piece", type=int, default=1024, help="tokens per forward call (the cache carries the rest)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random-weight models")
    args = p.parse_args()
    torch.set_num_threads(1)
    tok = load_tokenizer("bytes")
    text = build_corpus(None, tok).val
    marks = [m for m in (4096, 65536, 262144, 1_000_000) if m < args.tokens] + [args.tokens]
    print(
        f"torch {torch.__version__}; {args.tokens:,} tokens in pieces of {args.piece}; text: {text.numel():,} "
        "tokens, wrapping",
        flush=True,
    )
    rows = []
    for name in args.models:
        rows += stream(name, text, tok.vocab_size, args.tokens, args.piece, marks, args.seed)
    print()
    print_table(rows, list(rows[0]), left=("model", "task"))


if __name__ == "__main__":
    main()
