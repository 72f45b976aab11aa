"""Peak memory of `deepmemory eval` as the context grows: one S-NIAH sample per length, read
through a tiny memory model's recurrent cache in chunks, each length in its own process.

    python benchmarks/eval_long_context.py --lengths 4k,64k,1m
    python benchmarks/eval_long_context.py --checkpoint RUN --task s-niah-1 --lengths 64k,1m

Without ``--checkpoint`` the model is ``--preset`` (default titans-lmm) at size tiny with random
weights and the byte tokenizer, saved to a temporary folder (what ``deepmemory export`` writes):
memory, not accuracy, is measured. Each length runs ``deepmemory eval TASK --lengths N --samples 1
--batch-size 1`` in a fresh process, so the peak resident set size it reports (``VmHWM``, stored
per cell in results.json as ``peak_rss_mib``) belongs to that length alone. A model of bounded
state keeps it flat from 4K to 1M tokens; the prompt itself (a list of token ids) is the only
part that grows, about 8 bytes per token.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from deepmemory.bench.measure import print_table


def save_random_model(preset: str, folder: str) -> str:
    import torch

    from deepmemory.models import build

    torch.manual_seed(0)
    model = build(preset, size="tiny", vocab_size=257)  # 257: the byte tokenizer (bytes + end of document)
    model.save_pretrained(folder)
    return folder


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", help="a run directory or exported folder; default: --preset with random weights")
    p.add_argument(
        "--preset", default="titans-lmm", help="the tiny preset used without --checkpoint; default titans-lmm"
    )
    p.add_argument("--task", default="s-niah-1", help="default s-niah-1")
    p.add_argument("--lengths", default="4k,64k,1m", help="comma-separated, k = 1024, m = 1024^2; default 4k,64k,1m")
    p.add_argument("--depth", default="0.5", help="needle depth; default 0.5")
    p.add_argument("--chunk-size", default="2048", help="prompt tokens per forward call; default 2048")
    args = p.parse_args()
    from deepmemory.eval import parse_lengths

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = args.checkpoint or save_random_model(args.preset, os.path.join(tmp, args.preset))
        for length in parse_lengths(args.lengths):
            out = os.path.join(tmp, f"eval-{length}")
            command = [
                sys.executable,
                "-m",
                "deepmemory",
                "eval",
                args.task,
                "--checkpoint",
                checkpoint,
                "--lengths",
                str(length),
                "--samples",
                "1",
                "--batch-size",
                "1",
                "--depths",
                args.depth,
                "--chunk-size",
                args.chunk_size,
                "--threads",
                "1",
                "--no-progress",
                "--out",
                out,
            ]
            started = time.time()
            subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
            with open(os.path.join(out, "results.json")) as f:
                cell = json.load(f)["cells"][0]
            rows.append(
                {
                    "model": args.checkpoint or f"{args.preset} (random)",
                    "task": args.task,
                    "tokens": f"{length:,}",
                    "correct": cell["correct"][0],
                    "answer": ascii(cell["outputs"][0])[:20],
                    "peak_rss_mib": f"{cell['peak_rss_mib']:.0f}",
                    "seconds": f"{time.time() - started:.0f}",
                }
            )
            print(" | ".join(f"{k} {v}" for k, v in rows[-1].items()), flush=True)
    print()
    print_table(rows, list(rows[0]), left=("model", "task", "answer"))


if __name__ == "__main__":
    main()
