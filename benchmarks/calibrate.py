"""Calibrate the memories' inner learning rate: for each family, a few settings of what the papers
leave open (the rate's cap ``max_lr``, the stale-step bound, the memory LayerNorm; momentum stays
damped and the gates' initial values stay), each measured four ways, so that a preset's default is
chosen by evidence, the same way for every family (docs/fidelity.md#calibration).

    python benchmarks/calibrate.py --families titans --only before chosen --seeds 0 1
    python benchmarks/calibrate.py --steps 0 --bf16-steps 0 --stream-tokens 0   # write strengths only

Columns, one row per (family, setting, seed):

- ``step`` / ``write``: the op's learning rate and the share of the residual ``v - M(k)`` one write
  closes, at init (:func:`deepmemory.models.write_strength`, tiny, float64, ``--samples`` inputs),
  and ``/gdn``: that share over Gated DeltaNet's (the target is at least 1/3);
- ``recall``: MQAR recall accuracy on a fixed validation batch of 256 rows after ``--steps`` AdamW
  steps at tiny (``--vocab``, ``--seq-len``, ``--pairs``; batch ``--batch``, lr 3e-3 with 50 warm-up
  steps, weight decay 0.1, clipping 1.0), float32; ``loss``: the last training loss;
- ``bf16``: the first non-finite step (``-``: none) and the loss ratio (mean of the last 20 over the
  first) of ``--bf16-steps`` steps on 2 x 32 bytes of real text under bfloat16 autocast, one block
  (the training test's recipe);
- ``stream``: whether ``--stream-tokens`` tokens of real text (the byte corpus, wrapping) read
  through the model at init with the cache carried in pieces of 1024 give finite logits, and the
  largest Frobenius norm of a memory state matrix at the end (``|W|``).

A setting is a dict merged into the preset's memory settings (``build(preset, memory=...)``). One
thread; on a shared machine the columns are measurements, not timings (``s`` is wall seconds).
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch
import torch.nn.functional as F

from deepmemory.bench.measure import print_table
from deepmemory.data import build_corpus, load_tokenizer
from deepmemory.data.tasks import IGNORE_INDEX, MQAR, recall_accuracy
from deepmemory.models import DeepMemoryCache, build
from deepmemory.models.write_strength import write_strength
from deepmemory.tree import tensors

# family -> (preset measured, [(label, memory settings merged into the preset's)]). A label names the
# inner learning-rate cap, the stale-step bound (tau = 1) where it is on, and the memory LayerNorm
# where it is on; momentum stays damped (Titans' and OmegaNet's lr times 1 - momentum). Every setting
# spells out what it varies, so that a row means the same before and after the presets changed;
# "before" is the preset before the calibration, "chosen" the preset after it.
CANDIDATES: dict[str, tuple[str, list[tuple[str, dict]]]] = {
    "gated-deltanet": ("gated-deltanet", [("reference", {})]),
    "titans": (
        "titans-lmm",
        [
            ("before: max_lr .02", dict(layer_norm=False, max_lr=0.02)),
            ("max_lr 1, bound", dict(layer_norm=False, max_lr=1.0, step_bound=1.0)),
            ("max_lr 3, bound", dict(layer_norm=False, max_lr=3.0, step_bound=1.0)),
            ("max_lr 10, bound", dict(layer_norm=False, max_lr=10.0, step_bound=1.0)),
            ("chosen: max_lr .02, LN", dict(layer_norm=True, max_lr=0.02)),
            ("max_lr 10, bound, LN", dict(layer_norm=True, max_lr=10.0, step_bound=1.0)),
        ],
    ),
    "omeganet": (
        "omeganet",
        [
            ("before, chosen: max_lr .02, LN", dict(layer_norm=True, max_lr=0.02)),
            ("max_lr 10, bound", dict(layer_norm=False, max_lr=10.0, step_bound=1.0)),
            ("max_lr 30, bound", dict(layer_norm=False, max_lr=30.0, step_bound=1.0)),
            ("max_lr 30, bound, LN", dict(layer_norm=True, max_lr=30.0, step_bound=1.0)),
        ],
    ),
    "atlas": (
        "atlas",
        [
            ("before, chosen: max_lr 1, LN", dict(layer_norm=True, max_lr=1.0)),
            ("max_lr .3, LN", dict(layer_norm=True, max_lr=0.3)),
            ("max_lr 1", dict(layer_norm=False, max_lr=1.0)),
        ],
    ),
    "dla": (
        "dla",
        [
            ("before: max_lr 1", dict(layer_norm=False, max_lr=1.0)),
            ("max_lr 16", dict(layer_norm=False, max_lr=16.0)),
            ("max_lr 1, LN", dict(layer_norm=True, max_lr=1.0)),
            ("chosen: max_lr .02, LN", dict(layer_norm=True, max_lr=0.02)),
        ],
    ),
    "swla": ("swla", [("before, chosen: max_lr 1", dict(max_lr=1.0))]),
}

TEXT_VOCAB = 257  # the byte tokenizer's: 256 bytes and the end-of-document token


def state_norm(cache) -> float:
    norms = [
        float(t.flatten(-2).norm(dim=-1).max()) for t in tensors(cache.states) if t.dim() == 4 and t.is_floating_point()
    ]
    return max(norms, default=0.0)


def mqar_recall(preset: str, memory: dict, args, seed: int) -> tuple[float, float, str]:
    """(recall accuracy, last training loss, first non-finite step or "-") after ``args.steps``."""
    task = MQAR(vocab_size=args.vocab, seq_len=args.seq_len, num_pairs=args.pairs)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    val_ids, val_labels = task.sample(256, torch.Generator().manual_seed(10_000 + seed))
    model = build(preset, "tiny", vocab_size=task.vocab_size, memory=memory)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    other = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}], lr=3e-3)
    opt.param_groups[0]["betas"] = opt.param_groups[1]["betas"] = (0.9, 0.95)
    loss, bad = float("nan"), "-"
    for step in range(1, args.steps + 1):
        for g in opt.param_groups:
            g["lr"] = 3e-3 * min(1.0, step / 50)
        ids, labels = task.sample(args.batch, gen)
        logits = model(ids).logits
        loss_t = F.cross_entropy(logits.reshape(-1, task.vocab_size), labels.reshape(-1), ignore_index=IGNORE_INDEX)
        opt.zero_grad(set_to_none=True)
        loss_t.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        loss = float(loss_t.detach())
        if not (math.isfinite(loss) and math.isfinite(float(norm))):
            bad = str(step)
            break
        opt.step()
    with torch.no_grad():
        acc = recall_accuracy(model(val_ids).logits, val_labels)
    return acc, loss, bad


def bf16_text(preset: str, memory: dict, text: torch.Tensor, steps: int, seed: int) -> tuple[str, float]:
    """(first non-finite step or "-", loss ratio last-20 / first) of the bf16 training test's recipe."""
    torch.manual_seed(seed)
    model = build(
        preset, "tiny", vocab_size=TEXT_VOCAB, num_hidden_layers=1, attention_window=16, segment_size=16, memory=memory
    ).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for step in range(1, steps + 1):
        starts = torch.randint(0, text.numel() - 33, (2,), generator=gen).tolist()
        ids = torch.stack([text[s : s + 32] for s in starts]).long()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(ids, labels=ids).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        if not (torch.isfinite(loss) and torch.isfinite(norm)):
            return str(step), float("nan")
        opt.step()
        losses.append(float(loss.detach()))
    tail = losses[-20:]
    return "-", sum(tail) / len(tail) / losses[0]


@torch.no_grad()
def stream_text(preset: str, memory: dict, text: torch.Tensor, tokens: int, seed: int) -> tuple[bool, float]:
    """(every logit finite, largest memory state norm at the end) reading ``tokens`` of ``text``."""
    torch.manual_seed(seed)
    model = build(preset, "tiny", vocab_size=TEXT_VOCAB, memory=memory).eval()
    cache = DeepMemoryCache(model.config)
    finite, done = True, 0
    while done < tokens:
        n = min(1024, tokens - done)
        start = done % (text.numel() - n)
        logits = model(text[start : start + n].long()[None], cache=cache).logits
        finite = finite and bool(torch.isfinite(logits).all())
        done += n
    return finite, state_norm(cache)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--families", nargs="+", default=list(CANDIDATES), choices=list(CANDIDATES))
    p.add_argument("--only", nargs="*", default=None, help="run only the settings whose label contains one of these")
    p.add_argument("--preset", default=None, help="measure the families' settings on this preset instead (titans-mac)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--samples", type=int, default=64, help="inputs per memory layer for the write strength")
    p.add_argument("--steps", type=int, default=600, help="MQAR training steps (0: skip)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--vocab", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=32)
    p.add_argument("--pairs", type=int, default=4)
    p.add_argument("--bf16-steps", type=int, default=200, help="bf16 steps on text (0: skip)")
    p.add_argument("--stream-tokens", type=int, default=16384, help="tokens of text streamed at init (0: skip)")
    args = p.parse_args()
    torch.set_num_threads(1)
    tok = load_tokenizer("bytes")
    text = build_corpus(None, tok).train
    gdn = write_strength("gated-deltanet", "tiny", samples=args.samples).init
    print(
        f"torch {torch.__version__}; MQAR vocab {args.vocab}, length {args.seq_len}, {args.pairs} pairs, batch "
        f"{args.batch}, {args.steps} steps; bf16 text {args.bf16_steps} steps; stream {args.stream_tokens:,} tokens; "
        f"gated-deltanet writes {gdn:.2%} at init",
        flush=True,
    )
    rows = []
    for family in args.families:
        preset, settings = CANDIDATES[family]
        preset = args.preset or preset
        for label, memory in settings:
            if args.only and not any(o in label for o in args.only):
                continue
            for seed in args.seeds:
                t0 = time.time()
                ws = write_strength(preset, "tiny", samples=args.samples, seed=seed, memory=memory)
                acc, loss, bad = mqar_recall(preset, memory, args, seed) if args.steps else (float("nan"), 0.0, "")
                bf16_bad, ratio = (
                    bf16_text(preset, memory, text, args.bf16_steps, seed) if args.bf16_steps else ("", 0.0)
                )
                fin, norm = (
                    stream_text(preset, memory, text, args.stream_tokens, seed) if args.stream_tokens else (None, 0.0)
                )
                row = dict(
                    family=family if preset == CANDIDATES[family][0] else f"{family} ({preset})",
                    setting=label,
                    seed=seed,
                    step=f"{ws.step_init:.3g}",
                    write=f"{ws.init:.3%}",
                    **{"/gdn": f"{ws.init / gdn:.2f}"},
                    recall=f"{acc:.3f}" if args.steps else "",
                    loss=f"{loss:.3f}" if args.steps else "",
                    nonfinite=bad,
                    bf16=f"{bf16_bad} {ratio:.2f}" if args.bf16_steps else "",
                    stream="" if fin is None else f"{'finite' if fin else 'NON-FINITE'} |W| {norm:.3g}",
                    s=f"{time.time() - t0:.0f}",
                )
                rows.append(row)
                print(" | ".join(f"{k} {v}" for k, v in row.items()), f"| memory {json.dumps(memory)}", flush=True)
    print()
    print_table(rows, list(rows[0]), left=("family", "setting", "stream")) if rows else None


if __name__ == "__main__":
    main()
