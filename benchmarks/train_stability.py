"""Train tiny memory models on associative recall (MQAR) and on the byte corpus; report whether
any loss went non-finite, the largest gradient norm, and the memory's state norm over training.

    python benchmarks/train_stability.py --models titans-lmm titans-mac --task mqar --steps 2000

One table row per (model, task): steps run, the first non-finite step (``-`` if none), the
final training loss, recall accuracy (MQAR) or bits per byte (bytes) on a fixed validation
batch, the largest pre-clip gradient norm, and the largest Frobenius norm of any memory state
matrix ``W`` after reading a validation batch (``max |W|``, over the logged steps).
AdamW (lr 3e-3, betas 0.9/0.95, weight decay 0.1), gradient clipping at 1.0, one thread.
``--device cuda`` runs on a GPU, ``--precision bf16`` under bfloat16 autocast (the trainer's
``--precision auto`` on a GPU); data and seeds are the same on every device. ``--memory
KEY=VALUE ...`` merges settings into the presets' memory settings (values in JSON: ``max_lr=1.0
step_bound=null``).
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from deepmemory.bench.measure import print_table
from deepmemory.data import bits_per_byte, build_corpus, load_tokenizer
from deepmemory.data.tasks import IGNORE_INDEX, MQAR, recall_accuracy
from deepmemory.models import DeepMemoryCache, build
from deepmemory.train.command import task_setting
from deepmemory.tree import tensors


def memory_state_norm(model, ids, autocast) -> float:
    """The largest Frobenius norm of a memory matrix in the cache after reading ``ids``."""
    cache = DeepMemoryCache(model.config)
    with torch.no_grad(), autocast():
        model(ids, cache=cache)
    norms = [
        float(t.flatten(-2).norm(dim=-1).max()) for t in tensors(cache.states) if t.dim() == 4 and t.is_floating_point()
    ]
    return max(norms, default=0.0)


def run(
    name: str,
    task: str,
    steps: int,
    batch: int,
    seq_len: int,
    log_every: int,
    seed: int,
    lr: float,
    device: str = "cpu",
    precision: str = "fp32",
    memory: dict | None = None,
):
    dtype = {"fp32": None, "bf16": torch.bfloat16}[precision]

    def autocast():
        return torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype is not None)

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    if task == "mqar":
        mqar = MQAR(vocab_size=128, seq_len=seq_len, num_pairs=8)
        vocab = mqar.vocab_size
        val_ids, val_labels = mqar.sample(64, torch.Generator().manual_seed(seed + 1))

        def sample():
            return mqar.sample(batch, gen)
    else:
        tok = load_tokenizer("bytes")
        corpus = build_corpus(None, tok)
        vocab = tok.vocab_size
        train, val = corpus.train, corpus.val
        tpb = corpus.tokens_per_byte("val")
        starts = torch.randint(0, val.numel() - seq_len - 1, (16,), generator=torch.Generator().manual_seed(seed + 1))
        val_rows = torch.stack([val[s : s + seq_len + 1] for s in starts.tolist()]).long()
        val_ids, val_labels = val_rows[:, :-1], val_rows[:, 1:]

        def sample():
            s = torch.randint(0, train.numel() - seq_len - 1, (batch,), generator=gen)
            rows = torch.stack([train[i : i + seq_len + 1] for i in s.tolist()]).long()
            return rows[:, :-1], rows[:, 1:]

    def next_batch():  # sampled on the CPU, so every device sees the same data
        return tuple(t.to(device) for t in sample())

    val_ids, val_labels = val_ids.to(device), val_labels.to(device)
    model = build(name, size="tiny", vocab_size=vocab, **({"memory": memory} if memory else {})).to(device)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    other = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95)
    )
    first_bad, max_grad, max_state, loss = None, 0.0, 0.0, float("nan")
    log = []
    for step in tqdm(range(1, steps + 1), desc=f"{name} {task}", leave=False):
        ids, labels = next_batch()
        warm = min(1.0, step / 100)
        for g in opt.param_groups:
            g["lr"] = lr * warm
        with autocast():
            logits = model(ids).logits
        loss_t = F.cross_entropy(logits.float().reshape(-1, vocab), labels.reshape(-1), ignore_index=IGNORE_INDEX)
        loss_t.backward()
        grad = float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0))
        loss = float(loss_t.detach())
        if not (math.isfinite(loss) and math.isfinite(grad)):
            first_bad = step
            break
        max_grad = max(max_grad, grad)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % log_every == 0 or step == steps:
            max_state = max(max_state, memory_state_norm(model, val_ids, autocast))
            log.append((step, loss, grad, max_state))
    with torch.no_grad(), autocast():
        val_logits = model(val_ids).logits.float()
    if task == "mqar":
        metric = f"acc {recall_accuracy(val_logits, val_labels):.3f}"
    else:
        vl = float(F.cross_entropy(val_logits.reshape(-1, vocab), val_labels.reshape(-1)))
        metric = f"{bits_per_byte(vl, tpb):.3f} bpb"
    return dict(
        model=name,
        task=task,
        steps=step,
        first_nonfinite="-" if first_bad is None else str(first_bad),
        loss=f"{loss:.4f}",
        metric=metric,
        max_grad=f"{max_grad:.3g}",
        max_state=f"{max_state:.3g}",
    ), log


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--models", nargs="+", default=["titans-lmm", "titans-mac", "omeganet", "atlas"], help="presets (tiny)"
    )
    p.add_argument(
        "--task",
        choices=["mqar", "bytes"],
        nargs="+",
        default=["mqar", "bytes"],
        help="MQAR (128 tokens, 8 pairs) and/or the standard library's bytes",
    )
    p.add_argument("--steps", type=int, default=2000, help="optimizer steps per run")
    p.add_argument("--batch", type=int, default=32, help="rows per step")
    p.add_argument("--seq-len", type=int, default=64, help="tokens per row")
    p.add_argument("--lr", type=float, default=3e-3, help="AdamW's peak learning rate (100 warm-up steps)")
    p.add_argument("--log-every", type=int, default=100, help="steps between logged lines and state-norm probes")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and the data")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cuda")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="bf16: bfloat16 autocast")
    p.add_argument(
        "--memory",
        nargs="+",
        default=[],
        type=task_setting,
        metavar="KEY=VALUE",
        help="memory settings merged into the presets' (JSON values), e.g. max_lr=1.0 step_bound=null",
    )
    args = p.parse_args()
    memory = dict(args.memory)
    torch.set_num_threads(1)
    print(
        f"torch {torch.__version__}; {args.steps} steps, batch {args.batch} x {args.seq_len}, lr {args.lr}, clip 1.0, "
        f"{args.device}, {args.precision}" + (f"; memory {memory}" if memory else ""),
        flush=True,
    )
    rows = []
    for name in args.models:
        for task in args.task:
            t0 = time.time()
            row, log = run(
                name,
                task,
                args.steps,
                args.batch,
                args.seq_len,
                args.log_every,
                args.seed,
                args.lr,
                args.device,
                args.precision,
                memory,
            )
            row["time"] = f"{time.time() - t0:.0f}s"
            rows.append(row)
            for step, loss, grad, state in log:
                print(f"  {name} {task} step {step:5d} loss {loss:.4f} grad {grad:.3g} max|W| {state:.3g}", flush=True)
            print(" | ".join(f"{k} {v}" for k, v in row.items()), flush=True)
    print()
    print_table(rows, list(rows[0]), left=("model", "task"))


if __name__ == "__main__":
    main()
