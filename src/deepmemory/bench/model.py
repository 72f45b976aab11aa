"""A preset's full training step (forward, backward, AdamW) and its decoding, side by side.

    python -m deepmemory.bench.model --models transformer gated-deltanet titans-lmm titans-mac --size tiny
    python -m deepmemory.bench.model --decode --models titans-lmm gated-deltanet transformer \\
        --context 1024 16384 1048576
    python -m deepmemory.bench.model --models titans-mac gated-deltanet --documents 5 --seq 512 --batch 2

Training: tokens/s and peak memory of one optimizer step at ``--seq`` (each case in a fresh
process). With ``--documents K`` each model is measured twice at the same shape: every row one
document (no ``position_ids``), and every row ``K`` documents of uneven lengths packed with
boundaries (``position_ids`` restarting at each, the targets that begin one at ``-100``; the
model reads each document alone, docs/training.md "Documents and packing"). Decoding: the model
reads ``--context`` tokens (chunked prefill, no gradients), then decodes ``--steps`` tokens one at
a time; prints the mean per-token latency and the size of the recurrent state. Memory-only models
keep a constant state; attention's KV cache and the DeepTransformer family's stored keys grow with
the context (up to ``--max-attention-context``).
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from .measure import bench_main, fmt_threads, measure, print_table, run_isolated, save_plot


def _train_case(c: dict) -> dict:
    from deepmemory.models import build

    torch.manual_seed(0)
    torch.set_num_threads(c["threads"])
    model = build(c["model"], c["size"]).to(c["device"])
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    ids = torch.randint(0, model.config.vocab_size, (c["batch"], c["seq"]), device=c["device"])
    inputs = {"input_ids": ids, "labels": ids}
    if c.get("documents"):
        from deepmemory.data import packed_labels, packed_position_ids

        starts = document_starts(c["batch"], c["seq"], c["documents"]).to(c["device"])
        inputs = {"input_ids": ids, "labels": packed_labels(ids, starts), "position_ids": packed_position_ids(starts)}

    def step():
        opt.zero_grad(set_to_none=True)
        model(**inputs).loss.backward()
        opt.step()

    r = measure(step, warmup=1, repeat=c["repeat"], device=c["device"])
    n_params = sum(p.numel() for p in model.parameters())
    return {"tokens_per_s": c["batch"] * c["seq"] / r["seconds"], "peak_mib": r["peak_mib"], "params": n_params}


def document_starts(batch: int, seq: int, documents: int, seed: int = 0) -> torch.Tensor:
    """``starts [batch, seq]`` (bool): each row cut into ``documents`` documents of uneven lengths
    (``documents - 1`` distinct cut points drawn at random per row, ``seed`` fixed; the row's first
    token begins the first). ``ValueError`` unless ``1 <= documents <= seq``."""
    if not 1 <= documents <= seq:
        raise ValueError(f"--documents must be in [1, --seq {seq}] (each document holds a token); got {documents}")
    g = torch.Generator().manual_seed(seed)
    starts = torch.zeros(batch, seq, dtype=torch.bool)
    starts[:, 0] = True
    for b in range(batch):
        starts[b, 1 + torch.randperm(seq - 1, generator=g)[: documents - 1]] = True
    return starts


@torch.no_grad()
def _decode_case(c: dict) -> dict:
    from deepmemory.models import build

    torch.manual_seed(0)
    torch.set_num_threads(c["threads"])
    model = build(c["model"], c["size"]).to(c["device"]).eval()
    vocab = model.config.vocab_size
    cache, left = None, c["context"]
    t0 = time.perf_counter()
    while left > 0:  # chunked prefill: constant working memory for the memory models
        n = min(left, c["prefill_chunk"])
        ids = torch.randint(0, vocab, (1, n), device=c["device"])
        cache = model(input_ids=ids, past_key_values=cache, use_cache=True).past_key_values
        left -= n
    prefill = time.perf_counter() - t0
    tok = torch.randint(0, vocab, (1, 1), device=c["device"])
    model(input_ids=tok, past_key_values=cache, use_cache=True)  # warm-up step
    times = []
    for _ in range(c["steps"]):
        t = time.perf_counter()
        out = model(input_ids=tok, past_key_values=cache, use_cache=True)
        times.append(time.perf_counter() - t)
        tok = out.logits[:, -1:].argmax(-1)
    return {
        "latency_ms": 1e3 * sum(times) / len(times),
        "state_kib": cache.nbytes() / 1024,
        "prefill_tokens_per_s": c["context"] / prefill,
    }


def run_train(models: list[str], size: str, *, seq=1024, batch=2, threads=1, repeat=2, device="cpu") -> list[dict]:
    rows, res = [], {}
    for name in models:
        case = dict(model=name, size=size, seq=seq, batch=batch, threads=threads, repeat=repeat, device=device)
        res[name] = run_isolated("deepmemory.bench.model", case)
        print(f"  measured {name}", flush=True)
    base = res[models[0]]["tokens_per_s"]
    for name, r in res.items():
        rows.append(
            {
                "model": name,
                "params": f"{r['params'] / 1e6:.2f}M",
                "tokens/s": f"{r['tokens_per_s']:.0f}",
                f"x {models[0]}": f"{r['tokens_per_s'] / base:.2f}",
                "peak MiB": f"{r['peak_mib']:.0f}",
            }
        )
    print(
        f"\ntraining step (forward+backward+AdamW), size {size}, B={batch} T={seq}, fp32, {fmt_threads(threads)}, "
        f"{device}"
    )
    print_table(rows, ["model", "params", "tokens/s", f"x {models[0]}", "peak MiB"])
    return rows


def run_packing(
    models: list[str], size: str, documents: int, *, seq=1024, batch=2, threads=1, repeat=2, device="cpu"
) -> list[dict]:
    """Each model's training step on ``batch x seq`` tokens twice: every row one document, and every
    row ``documents`` documents packed with boundaries (:func:`document_starts`); prints both rows
    and the packed one's ratios to the unpacked (tokens/s, peak memory)."""
    starts = document_starts(batch, seq, documents)  # (checked before anything is measured)
    lengths = [
        "+".join(str(int(n)) for n in torch.diff(torch.cat([r.nonzero().squeeze(1), torch.tensor([seq])])))
        for r in starts[:4]
    ]
    rows = []
    for name in models:
        case = dict(model=name, size=size, seq=seq, batch=batch, threads=threads, repeat=repeat, device=device)
        one = run_isolated("deepmemory.bench.model", case)
        packed = run_isolated("deepmemory.bench.model", dict(case, documents=documents))
        print(f"  measured {name}", flush=True)
        rows.append(
            {
                "model": name,
                "params": f"{one['params'] / 1e6:.2f}M",
                "documents/row": "1",
                "tokens/s": f"{one['tokens_per_s']:.0f}",
                "x 1 doc": "1.00",
                "peak MiB": f"{one['peak_mib']:.0f}",
                "x peak": "1.00",
            }
        )
        rows.append(
            {
                "model": name,
                "params": f"{packed['params'] / 1e6:.2f}M",
                "documents/row": str(documents),
                "tokens/s": f"{packed['tokens_per_s']:.0f}",
                "x 1 doc": f"{packed['tokens_per_s'] / one['tokens_per_s']:.2f}",
                "peak MiB": f"{packed['peak_mib']:.0f}",
                "x peak": f"{packed['peak_mib'] / one['peak_mib']:.2f}" if one["peak_mib"] > 0 else "n/a",
            }
        )
    print(
        f"\ntraining step (forward+backward+AdamW), size {size}, B={batch} T={seq}, fp32, {fmt_threads(threads)}, "
        f"{device}; "
        f"packed rows: {documents} documents each by position_ids, lengths "
        f"{', '.join(lengths)}{', ...' if batch > 4 else ''}"
    )
    print_table(rows, ["model", "params", "documents/row", "tokens/s", "x 1 doc", "peak MiB", "x peak"])
    return rows


def run_decode(
    models: list[str],
    size: str,
    contexts: list[int],
    *,
    steps=64,
    threads=1,
    device="cpu",
    prefill_chunk=4096,
    max_attention_context=65536,
    plot=None,
) -> list[dict]:
    from deepmemory.eval.decode import growing_blocks
    from deepmemory.models import preset_config

    rows, series = [], {}
    for name in models:
        first = None
        for ctx in contexts:
            if ctx > max_attention_context and (name == "titans-mac" or growing_blocks(preset_config(name, size))):
                continue  # a KV cache (full attention, the DeepTransformer family's keys) grows with the context
            case = dict(
                model=name,
                size=size,
                context=ctx,
                steps=steps,
                threads=threads,
                device=device,
                prefill_chunk=prefill_chunk,
            )
            r = run_isolated("deepmemory.bench.model", dict(case, decode=True))
            first = first or r
            rows.append(
                {
                    "model": name,
                    "context": ctx,
                    "ms/token": f"{r['latency_ms']:.2f}",
                    "x latency at first": f"{r['latency_ms'] / first['latency_ms']:.2f}",
                    "state KiB": f"{r['state_kib']:.0f}",
                    "x state at first": f"{r['state_kib'] / first['state_kib']:.2f}",
                    "prefill tok/s": f"{r['prefill_tokens_per_s']:.0f}",
                }
            )
            series.setdefault(name, {})[ctx] = r["latency_ms"]
            print(f"  measured {name} context={ctx}", flush=True)
    print(f"\ndecoding after a context (batch 1, size {size}, mean of {steps} steps, {fmt_threads(threads)}, {device})")
    print_table(
        rows, ["model", "context", "ms/token", "x latency at first", "state KiB", "x state at first", "prefill tok/s"]
    )
    if plot:
        save_plot(plot, series, "context length (tokens)", "ms per decoded token", f"decoding, size {size}")
        print(f"plot: {plot}")
    return rows


TRAIN_MODELS = ["transformer", "gated-deltanet", "titans-lmm", "titans-mac", "atlas"]  # bench model
PACKING_MODELS = ["titans-mac", "gated-deltanet"]  # bench model --documents
DECODE_MODELS = ["titans-lmm", "gated-deltanet", "atlas", "transformer"]  # bench decode
CONTEXTS = [1024, 16384, 131072, 1048576]  # bench decode --context


def add_arguments(ap: argparse.ArgumentParser, mode: str | None = None) -> None:
    """The options of ``deepmemory bench model`` (``mode="model"``: training steps), of ``bench
    decode`` (``"decode"``) or, with ``None``, of both (``python -m deepmemory.bench.model``, where
    ``--decode`` picks); each help line states the default."""
    train, decode = mode in (None, "model"), mode in (None, "decode")
    both = mode is None  # (the module's own command line: say which mode reads an option)

    def tag(text: str, which: str) -> str:
        return f"{which}: {text}" if both else text

    models = []
    if train:
        models.append(
            tag(
                f"default {' '.join(TRAIN_MODELS)}; with --documents {' '.join(PACKING_MODELS)}",
                "training",
            )
        )
    if decode:
        models.append(tag(f"default {' '.join(DECODE_MODELS)}", "decoding"))
    ap.add_argument("--models", nargs="+", default=None, help="presets to measure; " + "; ".join(models))
    ap.add_argument("--size", default="tiny", help="preset size (see `deepmemory models`); default tiny")
    if train:
        ap.add_argument("--seq", type=int, default=1024, help=tag("sequence length; default 1024", "training"))
        ap.add_argument("--batch", type=int, default=2, help=tag("batch size; default 2", "training"))
    if decode:
        ap.add_argument(
            "--context",
            type=int,
            nargs="+",
            default=CONTEXTS,
            help=tag(f"context lengths read before decoding; default {' '.join(map(str, CONTEXTS))}", "decoding"),
        )
        ap.add_argument(
            "--steps",
            type=int,
            default=64,
            help=tag("tokens decoded per context (the mean counts); default 64", "decoding"),
        )
        ap.add_argument(
            "--max-attention-context",
            type=int,
            default=65536,
            help=tag(
                "longest context for titans-mac and the models whose cache grows with it (full attention, "
                "deep-transformer, swdt, dot: deepmemory.eval.growing_blocks); default 65536",
                "decoding",
            ),
        )
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help=(
            "intra-op CPU threads per case; default 1 (the benchmarks are measured single-threaded, and a shared "
            "machine stays usable; raise it to measure multi-core scaling)"
        ),
    )
    if train:
        ap.add_argument(
            "--documents",
            type=int,
            default=None,
            metavar="K",
            help=tag(
                "also measure each model with every row packed with K documents of uneven lengths "
                "(position_ids restarting at each), against one document per row at the same shape; default off",
                "training",
            ),
        )
        ap.add_argument(
            "--repeat",
            type=int,
            default=2,
            help=tag("timed steps per model (the best counts), after one warm-up; default 2", "training"),
        )
    ap.add_argument("--device", default="cpu", help="cpu or cuda; default cpu")
    if decode:
        ap.add_argument(
            "--plot",
            metavar="PNG",
            default=None,
            help=tag("also draw ms/token against the context into this PNG file; default: no plot", "decoding"),
        )


def _case(c: dict) -> dict:
    return _decode_case(c) if c.get("decode") else _train_case(c)


def _module_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--decode", action="store_true", help="measure decoding instead of training")
    add_arguments(ap)


def main(argv=None) -> None:
    bench_main(__doc__, _module_arguments, _case, lambda a: run_cli(a, a.decode), argv)


def _usage_error(prog: str, line: str) -> None:
    """One line on stderr and exit code 2, as a malformed option."""
    print(f"{prog}: error: {line}", file=sys.stderr)
    raise SystemExit(2)


def run_cli(args, decode: bool) -> None:
    documents = getattr(args, "documents", None)
    if documents is not None:
        if decode:
            _usage_error("deepmemory bench decode", "--documents measures training steps; leave it out of decoding")
        if documents > args.seq:
            _usage_error(
                "deepmemory bench model",
                f"--documents {documents} exceeds --seq {args.seq} (each document holds a token)",
            )
        run_packing(
            args.models or PACKING_MODELS,
            args.size,
            documents,
            seq=args.seq,
            batch=args.batch,
            threads=args.threads,
            repeat=args.repeat,
            device=args.device,
        )
        return
    if decode:
        models = args.models or DECODE_MODELS
        run_decode(
            models,
            args.size,
            args.context,
            steps=args.steps,
            threads=args.threads,
            device=args.device,
            max_attention_context=args.max_attention_context,
            plot=args.plot or None,
        )
    else:
        models = args.models or TRAIN_MODELS
        run_train(
            models,
            args.size,
            seq=args.seq,
            batch=args.batch,
            threads=args.threads,
            repeat=args.repeat,
            device=args.device,
        )


if __name__ == "__main__":
    main()
