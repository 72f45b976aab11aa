"""Forward+backward throughput and peak memory of ``neural_memory``: ``chunk`` vs ``reference``.

    python -m deepmemory.bench.op                       # B=2, H=4, dk=dv=64, mlp depth 2 x4, T=1024/4096, chunk 16/64
    python -m deepmemory.bench.op --seq 1024 --chunk 16 --impl chunk

Each case runs in its own process (clean peak-memory reading) with ``--threads`` threads.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from deepmemory.ops import neural_memory

from .measure import (
    add_allocator_argument,
    allocator_note,
    bench_main,
    fmt_mib,
    fmt_threads,
    measure,
    print_table,
    run_isolated,
    saved_for_backward_mib,
)


def _case(c: dict) -> dict:
    torch.manual_seed(0)
    torch.set_num_threads(c["threads"])
    bsz, nh, d, seq, hidden = c["batch"], c["heads"], c["head_dim"], c["seq"], c["expansion"] * c["head_dim"]
    leaf = lambda x: x.requires_grad_()  # noqa: E731
    q = leaf(F.normalize(torch.randn(bsz, seq, nh, d), dim=-1))
    k = leaf(F.normalize(torch.randn(bsz, seq, nh, d), dim=-1))
    v = leaf(torch.randn(bsz, seq, nh, d))
    lr, mom, dec = (leaf(torch.rand(bsz, seq, nh) * s) for s in (0.1, 1.0, 0.1))
    weights = {"w0": leaf(torch.randn(nh, hidden, d) / d**0.5), "w1": leaf(torch.randn(nh, d, hidden) / hidden**0.5)}

    def forward():
        return neural_memory(
            q,
            k,
            v,
            lr,
            mom,
            dec,
            weights,
            architecture="mlp",
            depth=2,
            chunk_size=c["chunk"],
            granularity=c["granularity"],
            optimizer=c["optimizer"],
            impl=c["impl"],
        )[0]

    r = measure(lambda: forward().sum().backward(), warmup=0 if c["impl"] == "reference" else 1, repeat=c["repeat"])
    return {
        "tokens_per_s": bsz * seq / r["seconds"],
        "peak_mib": r["peak_mib"],
        "seconds": r["seconds"],
        "saved_mib": saved_for_backward_mib(forward),
    }


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--seq", type=int, nargs="+", default=[1024, 4096], help="sequence lengths T; default 1024 4096")
    ap.add_argument("--chunk", type=int, nargs="+", default=[16, 64], help="chunk sizes; default 16 64")
    ap.add_argument(
        "--impl",
        nargs="+",
        default=["chunk", "reference"],
        choices=["chunk", "reference"],
        help="implementations to compare; default chunk reference",
    )
    ap.add_argument(
        "--granularity",
        default="token",
        choices=["token", "chunk"],
        help="memory update per token or per chunk; default token",
    )
    ap.add_argument(
        "--optimizer",
        default="momentum",
        choices=["gd", "momentum", "muon"],
        help="the memory's inner optimizer; default momentum",
    )
    ap.add_argument("--batch", type=int, default=2, help="batch size B; default 2")
    ap.add_argument("--heads", type=int, default=4, help="heads H; default 4")
    ap.add_argument("--head-dim", type=int, default=64, help="key/value width per head; default 64")
    ap.add_argument(
        "--expansion", type=int, default=4, help="hidden width of the MLP memory over the head width; default 4"
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
    ap.add_argument(
        "--repeat", type=int, default=2, help="timed runs per case (the best counts), after one warm-up; default 2"
    )
    ap.add_argument(
        "--reference-max-seq",
        type=int,
        default=2048,
        help="longest T for the token-loop reference (its autograd graph grows by ~5 MiB a token); default 2048",
    )
    add_allocator_argument(ap)


def run_cli(args) -> None:
    rows, per_token = [], None
    for seq in args.seq:
        for chunk in args.chunk:
            res = {}
            for impl in args.impl:
                if impl == "reference" and seq > args.reference_max_seq:
                    need = "" if per_token is None else f": ~{per_token * args.batch * seq / 1024:.1f} GiB projected"
                    rows.append({"T": seq, "chunk": chunk, "impl": impl, "tokens/s": f"skipped (memory{need})"})
                    continue
                case = dict(
                    seq=seq,
                    chunk=chunk,
                    impl=impl,
                    granularity=args.granularity,
                    optimizer=args.optimizer,
                    batch=args.batch,
                    heads=args.heads,
                    head_dim=args.head_dim,
                    expansion=args.expansion,
                    threads=args.threads,
                    repeat=1 if impl == "reference" else args.repeat,
                    keep_freed_memory=args.keep_freed_memory,
                )
                res[impl] = run_isolated("deepmemory.bench.op", case)
                if impl == "reference":
                    per_token = res[impl]["saved_mib"] / (args.batch * seq)
                row = {
                    "T": seq,
                    "chunk": chunk,
                    "impl": impl,
                    "tokens/s": f"{res[impl]['tokens_per_s']:.0f}",
                    "peak MiB": f"{res[impl]['peak_mib']:.0f}",
                    "saved MiB": fmt_mib(res[impl]["saved_mib"]),
                }
                if impl != args.impl[0] and args.impl[0] in res:
                    row["speedup of chunk"] = f"{res[args.impl[0]]['tokens_per_s'] / res[impl]['tokens_per_s']:.1f}x"
                rows.append(row)
                print(f"  measured T={seq} chunk={chunk} {impl}", flush=True)
    print(
        f"\nneural_memory fwd+bwd, B={args.batch} H={args.heads} dk=dv={args.head_dim} mlp depth 2 x{args.expansion}, "
        f"{args.granularity} granularity, {args.optimizer}, fp32, {fmt_threads(args.threads)}"
    )
    print(allocator_note(args.keep_freed_memory))
    print(
        "(peak MiB: growth of the process's peak RSS; saved MiB: what autograd keeps for the backward. The reference "
        "keeps a graph per token, so above --reference-max-seq it would not fit in memory)"
    )
    print_table(rows, ["T", "chunk", "impl", "tokens/s", "peak MiB", "saved MiB", "speedup of chunk"])


def main(argv=None) -> None:
    bench_main(__doc__, add_arguments, _case, run_cli, argv)


if __name__ == "__main__":
    main()
