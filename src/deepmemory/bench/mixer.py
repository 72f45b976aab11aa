"""One token mixer's forward+backward throughput and peak memory, competitors side by side.

    python -m deepmemory.bench.mixer --seq 1024 4096 --chunk 16 64

Competitors, each ``[B, T, hidden] -> [B, T, hidden]`` with the same width (hidden 256, 4 heads x 64,
MLP memory depth 2 expansion 4 by default): this library's ``NeuralMemory`` at token and chunk
granularity; its Gated DeltaNet (the ``gated-deltanet`` preset's layer: the gated delta rule exactly
online, in the WY form; no chunk size), the same delta rule with gradients at each chunk's start and
the decay after them (``delta-chunk-start``, the preset before it was exact) and the token loop of
Gated DeltaNet (``gated-deltanet-loop``, ``impl="reference"``; not in the default list, it is slow);
SDPA attention; the ``swdt`` preset's ``KernelMemory`` (the Omega rule of ATLAS eq. 27, window 16)
and the same with tokens retired when they leave the window (``swdt-swa``); the ``atlas`` preset's
memory rule (Muon, Omega window 16, memory LayerNorm) on the same MLP memory with identity features,
at token granularity (``atlas-token``, the preset's: a Newton-Schulz run per token; not in the
default list, it is slow) and at chunk granularity (``atlas-chunk``, the ablation); and
``titans_pytorch.NeuralMemory`` when that package is installed (``pip install "deepmemory[bench]"``),
configured with ``batch_size = chunk_size`` so its gradients, like ours, are taken at each chunk's
start weights. Every case runs in a fresh process (clean peak-memory reading).
"""

from __future__ import annotations

import argparse
import importlib.util

import torch

from .measure import (
    add_allocator_argument,
    allocator_note,
    bench_main,
    count_flops,
    fmt_mib,
    fmt_threads,
    matmul_peak_flops,
    measure,
    print_table,
    run_isolated,
    save_plot,
    saved_for_backward_mib,
)

MIXERS = (
    "memory-token",
    "memory-token-bound",
    "memory-chunk",
    "gated-deltanet",
    "delta-chunk-start",
    "gated-deltanet-loop",
    "attention",
    "swdt",
    "swdt-swa",
    "atlas-token",
    "atlas-chunk",
    "titans-pytorch",
)
SLOW_MIXERS = ("gated-deltanet-loop", "atlas-token")  # not in the default list
# the mixers without a chunk size: measured once per length, whatever --chunk lists
CHUNKLESS = ("attention", "gated-deltanet", "gated-deltanet-loop")


def make_mixer(name: str, hidden: int, heads: int, head_dim: int, chunk: int) -> torch.nn.Module:
    from deepmemory.layers import Attention, NeuralMemory
    from deepmemory.models.presets import GATED_DELTANET

    # Titans' rule as the papers write it (the presets' step_bound=None); memory-token-bound adds the
    # layer's default stale-step bound, to measure what it costs
    mem = dict(chunk_size=chunk, architecture="mlp", depth=2, expansion=4, optimizer="momentum", step_bound=None)
    if name == "memory-token":
        return NeuralMemory(hidden, heads, head_dim, granularity="token", **mem)
    if name == "memory-token-bound":
        return NeuralMemory(hidden, heads, head_dim, granularity="token", **dict(mem, step_bound=1.0))
    if name == "memory-chunk":
        return NeuralMemory(hidden, heads, head_dim, granularity="chunk", **mem)
    if name in ("gated-deltanet", "gated-deltanet-loop"):
        rule, layer = GATED_DELTANET
        return NeuralMemory(
            hidden, heads, head_dim, rule=rule, impl="chunk" if name == "gated-deltanet" else "reference", **layer
        )
    if name == "delta-chunk-start":
        return NeuralMemory(
            hidden, heads, head_dim, chunk_size=chunk, architecture="linear", optimizer="gd", loss="l2", step_bound=None
        )
    if name == "attention":
        return Attention(hidden, heads, head_dim)
    if name in ("atlas-token", "atlas-chunk"):  # the atlas preset's rule; identity features at this width
        from deepmemory.models.presets import ATLAS

        rule, layer = ATLAS
        layer = {k: v for k, v in layer.items() if not k.startswith("poly")}
        return NeuralMemory(
            hidden,
            heads,
            head_dim,
            rule=rule.replace(chunk_size=chunk, granularity=name[len("atlas-") :]),
            **dict(layer, feature_map="identity"),
        )
    if name in ("swdt", "swdt-swa"):  # the swdt preset's kernel memory, and the same retiring tokens
        from deepmemory.layers import KernelMemory
        from deepmemory.models.presets import SWDT

        return KernelMemory(
            hidden, heads, head_dim, **dict(SWDT, chunk_size=chunk, window_rule="omega" if name == "swdt" else "swa")
        )
    from titans_pytorch import NeuralMemory as TitansMemory

    class _Titans(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.mem = TitansMemory(
                dim=hidden,
                chunk_size=chunk,
                batch_size=chunk,
                dim_head=head_dim,
                heads=heads,
                default_model_kwargs=dict(depth=2, expansion_factor=4.0),
            )

        def forward(self, x):
            return self.mem(x)[0]

    return _Titans()


def available(names: list[str]) -> list[str]:
    has_titans = importlib.util.find_spec("titans_pytorch") is not None
    return [n for n in names if n != "titans-pytorch" or has_titans]


def _case(c: dict) -> dict:
    torch.manual_seed(0)
    torch.set_num_threads(c["threads"])
    device = c["device"]
    mixer = make_mixer(c["mixer"], c["hidden"], c["heads"], c["head_dim"], c["chunk"]).to(device)
    x = torch.randn(c["batch"], c["seq"], c["hidden"], device=device, requires_grad=True)

    def step():
        mixer(x).sum().backward()

    r = measure(step, warmup=1, repeat=c["repeat"], device=device)
    flops = count_flops(step) if c["flops"] else 0
    tokens = c["batch"] * c["seq"]
    return {
        "tokens_per_s": tokens / r["seconds"],
        "peak_mib": r["peak_mib"],
        "user_us": 1e6 * r["cpu_user_s"] / tokens,
        "sys_us": 1e6 * r["cpu_sys_s"] / tokens,
        "saved_mib": saved_for_backward_mib(lambda: mixer(x)),
        "flops_per_s": flops / r["seconds"],
    }


def run(
    seqs,
    chunks,
    mixers,
    *,
    batch=2,
    hidden=256,
    heads=4,
    head_dim=64,
    threads=1,
    repeat=2,
    rounds=1,
    device="cpu",
    flops=True,
    plot=None,
    peer="titans-pytorch",
    keep_freed_memory=False,
) -> list[dict]:
    """``rounds`` > 1 measures every case that many times, round-robin over the cases, and reports
    the median: on a shared machine, cases measured minutes apart otherwise see different loads."""
    mixers = available(list(mixers))
    peak = matmul_peak_flops(device) if flops else 0.0
    cases = [
        (chunk, seq, name)
        for chunk in chunks
        for seq in seqs
        for name in mixers
        if not (name in CHUNKLESS and len(chunks) > 1 and chunk != chunks[0])
    ]
    runs: dict[tuple, list[dict]] = {key: [] for key in cases}
    for r in range(rounds):
        for chunk, seq, name in cases:
            case = dict(
                mixer=name,
                seq=seq,
                chunk=chunk,
                batch=batch,
                hidden=hidden,
                heads=heads,
                head_dim=head_dim,
                threads=threads,
                repeat=repeat,
                device=device,
                flops=flops and r == 0,
                keep_freed_memory=keep_freed_memory,
            )
            try:
                runs[(chunk, seq, name)].append(run_isolated("deepmemory.bench.mixer", case))
            except RuntimeError as err:
                print(f"  {name} T={seq} chunk={chunk}: failed ({str(err).splitlines()[-1]})", flush=True)
                continue
            print(
                f"  measured {name} T={seq} chunk={chunk}" + (f" (round {r + 1}/{rounds})" if rounds > 1 else ""),
                flush=True,
            )
    rows, series = [], {}
    for chunk in chunks:
        for seq in seqs:
            res = {}
            for name in mixers:
                got = runs.get((chunk, seq, name))
                if got:
                    by_rate = sorted(got, key=lambda g: g["tokens_per_s"])
                    mid = by_rate[len(by_rate) // 2]  # the median round, with its CPU times
                    # FLOPs are counted in the first round only; a step's FLOPs are fixed, so the rate scales
                    # with tokens/s
                    res[name] = dict(
                        mid,
                        spread=(by_rate[0]["tokens_per_s"], by_rate[-1]["tokens_per_s"]),
                        flops_per_s=got[0]["flops_per_s"] * mid["tokens_per_s"] / got[0]["tokens_per_s"],
                        peak_mib=max(g["peak_mib"] for g in got),
                    )
            for name, r in res.items():
                row = {
                    "mixer": name,
                    "chunk": chunk if name not in CHUNKLESS else "-",
                    "T": seq,
                    "tokens/s": f"{r['tokens_per_s']:.0f}",
                    "peak MiB": f"{r['peak_mib']:.0f}",
                    "saved MiB": fmt_mib(r["saved_mib"]),
                }
                if rounds > 1:
                    row["min-max"] = f"{r['spread'][0]:.0f}-{r['spread'][1]:.0f}"
                if device == "cpu":
                    row["user us/tok"], row["sys us/tok"] = f"{r['user_us']:.0f}", f"{r['sys_us']:.0f}"
                if peer in res:
                    row[f"x {peer}"] = f"{r['tokens_per_s'] / res[peer]['tokens_per_s']:.2f}"
                if flops:
                    row["GFLOP/s"] = f"{r['flops_per_s'] / 1e9:.1f}"
                    row["% of matmul peak"] = f"{100 * r['flops_per_s'] / peak:.1f}"
                rows.append(row)
                label = name if name in CHUNKLESS else f"{name} (chunk {chunk})"
                series.setdefault(label, {})[seq] = r["tokens_per_s"]
    print(
        "(peak MiB: growth of the process's peak RSS (CPU) or max allocated (CUDA) during the step; "
        "saved MiB: what autograd keeps for the backward"
        + (
            "; user/sys us/tok: the process's CPU time per token "
            "in its own code and in the kernel (page faults), summed over threads"
            if device == "cpu"
            else ""
        )
        + ")"
    )
    print(
        f"\nmixer forward+backward, B={batch} hidden={hidden} heads={heads}x{head_dim}, fp32, {fmt_threads(threads)}, "
        f"{device}" + (f"; measured matmul peak {peak / 1e9:.1f} GFLOP/s" if flops else "")
    )
    print(allocator_note(keep_freed_memory))
    if rounds > 1:
        print(
            f"tokens/s: median of {rounds} rounds (each the best of {repeat} steps in a fresh process); min-max over "
            "rounds"
        )
    cols = (
        ["mixer", "chunk", "T", "tokens/s"]
        + (["min-max"] if rounds > 1 else [])
        + ["peak MiB", "saved MiB"]
        + (["user us/tok", "sys us/tok"] if device == "cpu" else [])
        + ([f"x {peer}"] if any(f"x {peer}" in r for r in rows) else [])
        + (["GFLOP/s", "% of matmul peak"] if flops else [])
    )
    print_table(rows, cols)
    if plot:
        save_plot(plot, series, "sequence length T", "tokens/s (forward+backward)", "token mixers")
        print(f"plot: {plot}")
    return rows


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--seq", type=int, nargs="+", default=[1024, 4096], help="sequence lengths T; default 1024 4096")
    ap.add_argument("--chunk", type=int, nargs="+", default=[16, 64], help="memory chunk sizes; default 16 64")
    ap.add_argument(
        "--mixers",
        nargs="+",
        default=[m for m in MIXERS if m not in SLOW_MIXERS],
        choices=MIXERS,
        help="token mixers to compare; default all but gated-deltanet-loop (the token loop) and atlas-token "
        "(a Newton-Schulz run per token), which are slow",
    )
    ap.add_argument("--batch", type=int, default=2, help="batch size; default 2")
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
        "--repeat", type=int, default=2, help="timed steps per case (the best counts), after one warm-up; default 2"
    )
    ap.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="measure every case this many times, round-robin; report the median; default 1",
    )
    ap.add_argument("--device", default="cpu", help="cpu or cuda; default cpu")
    ap.add_argument("--no-flops", action="store_true", help="skip the FLOP count")
    ap.add_argument(
        "--plot", metavar="PNG", default=None, help="also draw tokens/s against T into this PNG file; default: no plot"
    )
    add_allocator_argument(ap)


def run_cli(args: argparse.Namespace) -> None:
    run(
        args.seq,
        args.chunk,
        args.mixers,
        batch=args.batch,
        threads=args.threads,
        repeat=args.repeat,
        rounds=args.rounds,
        device=args.device,
        flops=not args.no_flops,
        plot=args.plot or None,
        keep_freed_memory=args.keep_freed_memory,
    )


def main(argv=None) -> None:
    bench_main(__doc__, add_arguments, _case, run_cli, argv)


if __name__ == "__main__":
    main()
