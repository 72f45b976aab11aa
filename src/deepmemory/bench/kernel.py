"""GPU timing of the Triton kernels: one token mixer op's forward+backward against its peers.

    deepmemory bench kernel                       # cuda, bf16, B=2 H=16 d=64, T = 2K .. 64K, every impl
    TRITON_INTERPRET=1 deepmemory bench kernel --device cpu --dtype float32 --seq 64 --batch 1 \\
        --heads 2 --head-dim 16 --repeat 1        # CPU smoke run, the kernels under the interpreter

Implementations (``--impl``), inputs ``[B, T, H, d]`` (SDPA: ``[B, H, T, d]``):

  triton-linear    neural_memory(architecture="linear", optimizer="gd", loss="l2", chunk 64, impl="triton"),
                   per-token lr (beta) and decay (1 - exp(g)): the Gated DeltaNet configuration
  chunk-linear     the same with impl="chunk" (PyTorch)
  fla-gated-delta  flash-linear-attention's chunk_gated_delta_rule (pip install fla-core)
  sdpa             causal scaled_dot_product_attention, flash attention where it is available
  triton-mlp       neural_memory(architecture="mlp", depth 2, expansion 4, momentum, chunk 16, impl="triton"):
                   the Titans LMM configuration
  chunk-mlp        the same with impl="chunk"

Each case runs in its own process (clean peak-memory reading); a case that fails (out of memory,
unsupported on the device, a kernel error) becomes a row saying why.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import platform
from collections.abc import Callable

import torch
import torch.nn.functional as F

from deepmemory.ops import neural_memory

from .measure import bench_main, count_flops, matmul_peak_flops, measure, print_table, run_isolated, save_plot

IMPLS = ("triton-linear", "chunk-linear", "fla-gated-delta", "sdpa", "triton-mlp", "chunk-mlp")
LINEAR_CHUNK, MLP_CHUNK, EXPANSION = 64, 16, 4
# ratio columns: the row's tokens/s over its peer's at the same T
PEERS = (
    ("x fla", "triton-linear", "fla-gated-delta"),
    ("x sdpa", "triton-linear", "sdpa"),
    ("x chunk", "triton-linear", "chunk-linear"),
    ("x chunk", "triton-mlp", "chunk-mlp"),
)
FLA_MISSING = "not installed (pip install fla-core)"


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_impls(device: str) -> list[str]:
    """Every implementation on CUDA; on CPU the PyTorch ones, plus the Triton kernels when the
    interpreter is on (flash-linear-attention does not run under it)."""
    if device.startswith("cuda"):
        return list(IMPLS)
    interpreted = os.environ.get("TRITON_INTERPRET") == "1" and importlib.util.find_spec("triton") is not None
    return [i for i in IMPLS if i in ("chunk-linear", "sdpa", "chunk-mlp") or (interpreted and i.startswith("triton"))]


def _step(
    impl: str, bsz: int, seq: int, nh: int, d: int, device: str, dtype: torch.dtype
) -> tuple[Callable[[], None], str]:
    """One forward+backward of ``impl`` on random inputs, and a note for its row."""

    def rand(*shape, scale=1.0):
        return torch.randn(*shape, device=device) * scale

    def leaf(x, dt=dtype):
        return x.to(dt).requires_grad_()

    if impl == "sdpa":
        q, k, v = (leaf(rand(bsz, nh, seq, d)) for _ in range(3))

        def attend(ctx):
            with ctx():
                o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
                torch.autograd.grad(o.sum(), (q, k, v))

        flash = lambda: torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION)  # noqa: E731
        try:  # flash attention where this device and dtype have it, else whatever SDPA picks
            attend(flash)
            return lambda: attend(flash), "flash attention"
        except RuntimeError as err:
            if "No available kernel" not in str(err):  # out of memory, say: not a reason to change backend
                raise
            return lambda: attend(contextlib.nullcontext), "default SDPA backend"

    q, k = (leaf(F.normalize(rand(bsz, seq, nh, d), dim=-1)) for _ in range(2))
    v = leaf(rand(bsz, seq, nh, d))
    if impl.endswith("-mlp"):
        hidden = EXPANSION * d
        lr, mom, dec = (leaf(torch.rand(bsz, seq, nh, device=device) * s) for s in (0.1, 1.0, 0.1))
        weights = {"w0": leaf(rand(nh, hidden, d, scale=d**-0.5)), "w1": leaf(rand(nh, d, hidden, scale=hidden**-0.5))}
        leaves = (q, k, v, lr, mom, dec, *weights.values())

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
                optimizer="momentum",
                granularity="token",
                chunk_size=MLP_CHUNK,
                impl=impl.split("-")[0],
            )[0]
    else:
        beta = torch.sigmoid(rand(bsz, seq, nh))
        g = F.logsigmoid(rand(bsz, seq, nh) + 4)  # log retention, ~ -0.02: a slowly forgetting memory
        if impl == "fla-gated-delta":
            from fla.ops.gated_delta_rule import chunk_gated_delta_rule

            g, beta = leaf(g, torch.float32), leaf(beta)
            leaves = (q, k, v, g, beta)

            def forward():
                return chunk_gated_delta_rule(q, k, v, g, beta, scale=1.0)[0]
        else:
            lr, decay = leaf(beta), leaf(-torch.expm1(g))
            w0 = torch.zeros(nh, d, d, device=device, dtype=dtype)  # Gated DeltaNet's zero state, not learned
            leaves = (q, k, v, lr, decay)

            def forward():
                return neural_memory(
                    q,
                    k,
                    v,
                    lr,
                    None,
                    decay,
                    {"w0": w0},
                    architecture="linear",
                    optimizer="gd",
                    loss="l2",
                    granularity="token",
                    chunk_size=LINEAR_CHUNK,
                    impl=impl.split("-")[0],
                )[0]

    return lambda: torch.autograd.grad(forward().sum(), leaves), ""


def _device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(device)
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    return platform.processor() or "cpu"


def _case(c: dict) -> dict:
    torch.manual_seed(0)
    torch.set_num_threads(c["threads"])
    device, dtype = c["device"], getattr(torch, c["dtype"])
    if c["impl"] == "calibrate":  # the device's name, its matmul rates and the mlp op's FLOPs
        n = 8192 if device.startswith("cuda") else 2048  # a 2048^2 product is too short to time on a GPU
        out = {
            "device_name": _device_name(device),
            "n": n,
            "peak_flops": matmul_peak_flops(device, dtype, n=n),
            "fp32_flops": None,
            "mlp_flops": None,
            "flops_error": None,
        }
        if dtype != torch.float32:  # the memory ops compute in float32 (or TF32) whatever their inputs
            out["fp32_flops"] = matmul_peak_flops(device, torch.float32, n=n)
        try:  # the table keeps its times if this fails
            out["mlp_flops"] = [
                count_flops(_step("chunk-mlp", c["batch"], seq, c["heads"], c["head_dim"], device, dtype)[0])
                for seq in c["flops_seqs"]
            ]
        except RuntimeError as err:
            out["flops_error"] = str(err).splitlines()[0][:120]
        return out
    step, note = _step(c["impl"], c["batch"], c["seq"], c["heads"], c["head_dim"], device, dtype)
    r = measure(step, warmup=1, repeat=c["repeat"], device=device)
    return {"seconds": r["seconds"], "peak_mib": r["peak_mib"], "note": note}


def _why(err: RuntimeError) -> str:
    """The last line of a failed case's stderr (its exception), shortened for a table cell."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    last = lines[-1] if len(lines) > 1 else "the process died without a message"
    if "out of memory" in last.lower():
        return "out of memory"
    return last if len(last) <= 120 else last[:117] + "..."


def run_cli(args: argparse.Namespace) -> None:
    device = args.device or default_device()
    dtype = args.dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    impls = list(dict.fromkeys(args.impl or default_impls(device)))
    bsz, nh, d = args.batch, args.heads, args.head_dim
    base = dict(batch=bsz, heads=nh, head_dim=d, device=device, dtype=dtype, threads=args.threads)
    # the mlp op's FLOPs are affine in T at a fixed chunk size: counted at two lengths, extrapolated to the others
    seq0 = min(args.seq)
    counted = [seq0] if len(set(args.seq)) == 1 else [seq0, 2 * seq0]
    if not any(i.endswith("-mlp") for i in impls):
        counted = []
    cal = run_isolated("deepmemory.bench.kernel", dict(base, impl="calibrate", flops_seqs=counted))

    def mlp_flops(seq):
        f = cal["mlp_flops"]
        return f[0] if len(f) == 1 else f[0] + (f[1] - f[0]) * (seq - seq0) / seq0

    has_fla = importlib.util.find_spec("fla") is not None

    rows, series, oom = [], {}, {}
    for seq in args.seq:
        at_t = {}
        for impl in impls:
            row = at_t[impl] = {"T": seq, "impl": impl}
            rows.append(row)
            if impl == "fla-gated-delta" and not has_fla:
                row["note"] = FLA_MISSING
                continue
            if impl in oom and seq > oom[impl]:  # a longer sequence would not fit either
                row["note"] = f"skipped: out of memory at T={oom[impl]}"
                continue
            try:
                r = run_isolated("deepmemory.bench.kernel", dict(base, impl=impl, seq=seq, repeat=args.repeat))
            except RuntimeError as err:
                row["note"] = f"failed: {_why(err)}"
                if row["note"] == "failed: out of memory":
                    oom[impl] = seq
                print(f"  T={seq} {impl}: {row['note']}", flush=True)
                continue
            row["_tps"] = bsz * seq / r["seconds"]
            row.update(
                {
                    "tokens/s": f"{row['_tps']:.0f}",
                    "ms": f"{1e3 * r['seconds']:.2f}",
                    "peak MiB": f"{r['peak_mib']:.0f}",
                    "note": r["note"],
                }
            )
            if impl.endswith("-mlp") and cal["mlp_flops"]:
                flops = mlp_flops(seq) / r["seconds"]
                row.update({"TFLOP/s": f"{flops / 1e12:.3g}", "% peak": f"{100 * flops / cal['peak_flops']:.1f}"})
                if cal["fp32_flops"]:
                    row["% fp32 peak"] = f"{100 * flops / cal['fp32_flops']:.1f}"
            series.setdefault(impl, {})[seq] = row["_tps"]
            print(f"  measured T={seq} {impl}", flush=True)
        for col, impl, peer in PEERS:
            if "_tps" in at_t.get(impl, {}) and "_tps" in at_t.get(peer, {}):
                at_t[impl][col] = f"{at_t[impl]['_tps'] / at_t[peer]['_tps']:.3g}"

    print(
        f"\nforward+backward, B={bsz} H={nh} d={d} (B*H = {bsz * nh} programs), {dtype}, {device}: {cal['device_name']}"
    )
    print(
        f"linear: l2, gd, per-token lr and decay, chunk {LINEAR_CHUNK}; mlp: depth 2, hidden {EXPANSION * d}, "
        f"momentum, chunk {MLP_CHUNK}; token granularity"
    )
    peak_mib = "max_memory_allocated" if device.startswith("cuda") else "peak RSS"
    print(
        f"x fla / x sdpa: triton-linear's tokens/s over that peer's; x chunk: triton-X's over chunk-X's "
        f"(same T, same run; > 1 is faster). peak MiB: {peak_mib} growth during the step"
    )
    if cal["flops_error"]:
        print(f"no TFLOP/s: counting the mlp op's FLOPs failed ({cal['flops_error']})")
    if cal["mlp_flops"]:
        scaled = " at T=" + " and ".join(map(str, counted))
        if len(counted) > 1:
            scaled += " and extrapolated (they are affine in T)"
        fp32 = ""
        if cal["fp32_flops"]:
            fp32 = (
                f". The memory impls compute in float32 (or TF32) whatever the input dtype; % fp32 peak: of the "
                f"float32 rate, {cal['fp32_flops'] / 1e12:.3g} TFLOP/s"
            )
        print(
            f"TFLOP/s (mlp rows): the matrix-product FLOPs of impl=chunk (torch's FlopCounterMode cannot see Triton "
            f"kernels; both compute the same products), counted{scaled}; % peak: of the measured {dtype} matmul "
            f"rate, {cal['peak_flops'] / 1e12:.3g} TFLOP/s ({cal['n']}^2 product){fp32}"
        )
    if "fla-gated-delta" in impls:
        print(
            "fla-gated-delta is the cost peer, not the same function: the delta rule takes every token's gradient at "
            "the previous token's state, neural_memory at its chunk's start state; they agree at chunk size 1 "
            "without decay"
        )
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("TRITON_INTERPRET=1: the Triton kernels ran under the interpreter; their times say nothing about a GPU")
    cols = [
        "T",
        "impl",
        "tokens/s",
        "ms",
        "peak MiB",
        "x fla",
        "x sdpa",
        "x chunk",
        "TFLOP/s",
        "% peak",
        "% fp32 peak",
        "note",
    ]
    print_table(rows, [c for c in cols if c in ("T", "impl") or any(r.get(c) for r in rows)], left=("note",))
    if args.plot:
        save_plot(
            args.plot,
            series,
            "sequence length T",
            "tokens/s (forward+backward)",
            f"B={bsz} H={nh} d={d}, {dtype}, {cal['device_name']}",
        )
        print(f"plot: {args.plot}")


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument(
        "--seq",
        type=int,
        nargs="+",
        default=[2048, 4096, 8192, 16384, 32768, 65536],
        help="sequence lengths T to measure; default 2048 4096 8192 16384 32768 65536",
    )
    ap.add_argument(
        "--impl",
        nargs="+",
        choices=IMPLS,
        help="default: every one that runs on the device (Triton on CPU only with TRITON_INTERPRET=1)",
    )
    ap.add_argument("--device", help="default: cuda when available, else cpu")
    ap.add_argument(
        "--dtype", choices=["float32", "bfloat16", "float16"], help="default: bfloat16 on cuda, float32 on cpu"
    )
    ap.add_argument("--batch", type=int, default=2, help="batch size B; default 2")
    ap.add_argument("--heads", type=int, default=16, help="heads H; default 16")
    ap.add_argument("--head-dim", type=int, default=64, help="key/value width per head; default 64")
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
        "--repeat", type=int, default=5, help="timed runs per case (the best counts), after one warm-up; default 5"
    )
    ap.add_argument("--plot", metavar="PNG", help="also draw tokens/s against T into this PNG file; default: no plot")


def main(argv=None) -> None:
    bench_main(__doc__, add_arguments, _case, run_cli, argv)


if __name__ == "__main__":
    main()
