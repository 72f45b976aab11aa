"""Where a preset's training step spends its time: one forward, backward and AdamW step, split by part.

    python benchmarks/profile_step.py --models titans-lmm titans-mac --size tiny --seq 1024 --batch 2
    python benchmarks/profile_step.py --models titans-lmm --hidden 256 --seq 2048 --batch 1

Each model runs in a fresh process on one thread. First the step is timed without the profiler
(best of ``--repeat`` after a warm-up): wall seconds, the process's CPU seconds (user and system,
so a busy machine shows in wall time but hardly in CPU time) and the page faults it took. Then one
step runs under ``torch.profiler``, with every module and the memory op wrapped in a labelled
region, and each operator's own time is given to the innermost region it ran in. Backward
operators go to the region of the forward operator that recorded them (autograd's sequence number),
so "memory op" holds the op's forward and its backward, checkpoint recomputation included.

Parts: embedding; norms (every RMSNorm); SwiGLU MLP; attention projections (q, k, v, o) and
attention core (RoPE, masks, SDPA); memory projections (q, k, v, gate, output) and convs (the short
causal convolutions); feature map; gates (the learning-rate, momentum, decay, window and channel
projections); memory op (``neural_memory`` / ``kernel_memory``, forward and backward); memory read
(MAC's retrievals); layer glue (what a mixer does between its modules: L2 norms, sigmoids, casts);
block glue (residuals, MAG/MAC gating, MAC's segment loop, concatenations); head and loss;
optimizer (AdamW and zero_grad); backward bookkeeping (gradient accumulation, operators no forward
region recorded).

Columns: *ms* is operator time (the profiler's self time of the part's operators, forward and
backward), *python ms* is the time inside the part's regions but in no operator (Python, the
dispatcher's way in, and the profiler's own cost, which grows with the number of operators), *ops*
the operators dispatched from Python or autograd (nested calls not counted again), *us/op* ms per
op. The share is of the profiled step. The profiler slows a step of many small operators by
about a third; the unprofiled seconds above each table are the ones to compare.

``--hidden H`` builds the ``--size`` preset with ``hidden_size=H`` (``--heads`` heads, head width
``H / heads``; Gated DeltaNet's keys are ``0.75 H`` wide as in its presets, polynomial feature maps
use heads of 32 as at the paper sizes) and ``--window`` / ``--segment`` for the attention window and
MAC's segments.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import subprocess
import sys
import time
from collections import defaultdict

import torch

PARTS = [
    "embedding",
    "norms",
    "SwiGLU MLP",
    "attention projections",
    "attention core",
    "memory projections",
    "memory convs",
    "feature map",
    "gates",
    "memory op",
    "memory read",
    "layer glue",
    "block glue",
    "head and loss",
    "optimizer",
    "backward bookkeeping",
]

GATE_NAMES = ("lr_proj", "momentum_proj", "decay_proj", "gamma_proj", "channel_proj")
MIXER_PROJ_NAMES = ("q_proj", "k_proj", "v_proj", "g_proj", "o_proj")


def model_config(args_or_case: dict):
    from deepmemory.models import preset_config
    from deepmemory.models.presets import GATED_DELTANET, POLY_HEAD_DIM, PRESETS

    c = args_or_case
    over: dict = {}
    if c.get("hidden"):
        h, heads = c["hidden"], c["heads"]
        over = dict(hidden_size=h, num_attention_heads=heads, head_dim=h // heads, intermediate_size=None)
        memory = PRESETS[c["model"]][1]
        if memory is GATED_DELTANET:
            over.update(head_dim=3 * h // 4 // heads)
        elif memory is not None and memory[1].get("feature_map") == "polynomial":
            over.update(num_attention_heads=h // POLY_HEAD_DIM, head_dim=POLY_HEAD_DIM)
        from deepmemory.layers.common import default_intermediate_size

        over["intermediate_size"] = default_intermediate_size(h)
    if c.get("window"):
        over["attention_window"] = c["window"]
    if c.get("segment"):
        over["segment_size"] = c["segment"]
    if c.get("layers"):
        over["num_hidden_layers"] = c["layers"]
    return preset_config(c["model"], c["size"], **over)


def _label_modules(model) -> list:
    """Forward pre/post hooks that open and close a labelled profiler region around each module."""
    from deepmemory.layers.attention import Attention
    from deepmemory.layers.blocks import _Block
    from deepmemory.layers.common import RMSNorm, ShortConv, SwiGLU
    from deepmemory.layers.memory_layer import QKVMixer

    labels: dict[torch.nn.Module, str] = {}
    for mod in model.modules():
        if isinstance(mod, _Block):
            labels[mod] = "block glue"
            for name in ("retrieve_q", "retrieve_o"):
                if hasattr(mod, name):
                    labels[getattr(mod, name)] = "memory read"
        elif isinstance(mod, Attention):
            labels[mod] = "attention core"
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                labels[getattr(mod, name)] = "attention projections"
        elif isinstance(mod, QKVMixer):
            labels[mod] = "layer glue"
            for name in MIXER_PROJ_NAMES:
                if isinstance(getattr(mod, name, None), torch.nn.Module):
                    labels[getattr(mod, name)] = "memory projections"
            for name in GATE_NAMES:
                if isinstance(getattr(mod, name, None), torch.nn.Module):
                    labels[getattr(mod, name)] = "gates"
            if isinstance(getattr(mod, "phi", None), torch.nn.Module):
                labels[mod.phi] = "feature map"
        elif isinstance(mod, ShortConv):
            labels[mod] = "memory convs"
        elif isinstance(mod, SwiGLU):
            labels[mod] = "SwiGLU MLP"
        elif isinstance(mod, RMSNorm):
            labels[mod] = "norms"
    labels[model.model.embed_tokens] = "embedding"
    labels[model] = "head and loss"
    handles, stack = [], []

    def pre(mod, *_):
        rf = torch.autograd.profiler.record_function("part:" + labels[mod])
        rf.__enter__()
        stack.append(rf)

    def post(mod, *_):
        stack.pop().__exit__(None, None, None)

    for mod in labels:
        handles.append(mod.register_forward_pre_hook(pre))
        handles.append(mod.register_forward_hook(post))
    return handles


@contextlib.contextmanager
def _label_functions():
    """The memory op and MAC's memory read, wrapped in labelled regions where the layers call them."""
    from deepmemory.layers import kernel_memory, memory_layer

    saved = []

    def wrap(module, name, label):
        fn = getattr(module, name)

        def wrapped(*a, **k):
            with torch.autograd.profiler.record_function("part:" + label):
                return fn(*a, **k)

        saved.append((module, name, fn))
        setattr(module, name, wrapped)

    from deepmemory.layers.attention import Attention

    for name in ("keys_values", "attend", "attend_window"):  # (MAC calls them without the module's forward)
        if hasattr(Attention, name):
            wrap(Attention, name, "attention core")
    wrap(memory_layer, "neural_memory", "memory op")
    wrap(memory_layer, "memory_read", "memory read")
    for name in ("kernel_memory",):
        if hasattr(kernel_memory, name):
            wrap(kernel_memory, name, "memory op")
    try:
        yield
    finally:
        for module, name, fn in saved:
            setattr(module, name, fn)


def _region(ev) -> str | None:
    e = ev
    while e is not None:
        if e.name.startswith("part:"):
            return e.name[5:]
        if e.name.startswith("Optimizer.") or e.name.startswith("Optimizer.zero_grad"):
            return "optimizer"
        e = e.cpu_parent
    return None


def _attribute(events) -> tuple[dict, dict, dict, float]:
    """Operator ms, Python ms and dispatched ops per part."""
    seq_part: dict[int, str] = {}
    for e in events:  # forward operators that recorded an autograd node
        if e.sequence_nr < 0 or "Backward" in e.name or e.name.startswith("autograd::"):
            continue
        part = _region(e)
        if part is not None:
            seq_part.setdefault(e.sequence_nr, part)
    op_ms: dict[str, float] = defaultdict(float)
    py_ms: dict[str, float] = defaultdict(float)
    ops: dict[str, int] = defaultdict(int)
    total = 0.0

    def backward_root(e):
        while e is not None:
            if e.name.startswith("autograd::engine::evaluate_function:"):
                return e
            e = e.cpu_parent
        return None

    for e in events:
        ms = e.self_cpu_time_total / 1e3
        total += ms
        root = backward_root(e)
        if root is not None:
            part = seq_part.get(root.sequence_nr, "backward bookkeeping")
        else:
            part = _region(e) or "head and loss"
        if e.name.startswith("part:"):
            py_ms[part] += ms
            continue
        op_ms[part] += ms
        parent = e.cpu_parent
        if e.name.startswith("aten::") and (parent is None or not parent.name.startswith("aten::")):
            ops[part] += 1
    return op_ms, py_ms, ops, total


def _case(c: dict) -> dict:
    from deepmemory.models import DeepMemoryForCausalLM

    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = DeepMemoryForCausalLM(model_config(c))
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    ids = torch.randint(0, model.config.vocab_size, (c["batch"], c["seq"]))

    run = model
    if c.get("compile"):
        if c["compile"] == "around-op":  # the memory ops run eagerly, between compiled graphs
            from deepmemory.layers import kernel_memory, memory_layer

            for module, name in (
                (memory_layer, "neural_memory"),
                (memory_layer, "memory_read"),
                (kernel_memory, "kernel_memory"),
            ):
                if hasattr(module, name):
                    setattr(module, name, torch.compiler.disable(getattr(module, name)))
        run = torch.compile(model)

    def step():
        opt.zero_grad(set_to_none=True)
        run(input_ids=ids, labels=ids).loss.backward()
        opt.step()

    t0 = time.perf_counter()
    step()
    first = time.perf_counter() - t0
    best = None
    for _ in range(c["repeat"]):
        r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        step()
        wall, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
        cpu = (r1.ru_utime - r0.ru_utime, r1.ru_stime - r0.ru_stime, r1.ru_minflt - r0.ru_minflt)
        if best is None or sum(cpu[:2]) < sum(best[1][:2]):
            best = (wall, cpu)
    out = {
        "wall_s": best[0],
        "user_s": best[1][0],
        "sys_s": best[1][1],
        "faults": best[1][2],
        "params": sum(p.numel() for p in model.parameters()),
        "tokens": c["batch"] * c["seq"],
        "first_s": first,
    }
    if c.get("no_profile"):
        return out
    from torch.profiler import ProfilerActivity, profile

    handles = _label_modules(model)
    with _label_functions(), profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        step()
        out["profiled_wall_s"] = time.perf_counter() - t0
    for h in handles:
        h.remove()
    op_ms, py_ms, ops, total = _attribute(prof.events())
    out.update(op_ms=op_ms, py_ms=py_ms, ops=ops, profiled_ms=total)
    return out


def _dispatch_us() -> float:
    """Microseconds per dispatched operator on this machine: an 8-element multiply that records an
    autograd node (what a forward operator of a training step costs beyond its arithmetic)."""
    torch.set_num_threads(1)
    x = torch.randn(8, requires_grad=True)
    best = float("inf")
    for _ in range(7):
        t0 = time.process_time()
        for _ in range(1000):
            x.mul(1.0)
        best = min(best, (time.process_time() - t0) / 1000)
    return best * 1e6


def run(args) -> None:
    print(
        f"# {time.strftime('%Y-%m-%dT%H:%MZ', time.gmtime())}, torch {torch.__version__}, 1 thread, "
        f"machine load (1 min) {open('/proc/loadavg').read().split()[0]}"
    )
    dispatch = json.loads(
        subprocess.run([sys.executable, __file__, "--dispatch"], capture_output=True, text=True, check=True)
        .stdout.strip()
        .splitlines()[-1]
    )
    if not args.time_only:
        print(f"# a small operator that records an autograd node costs {dispatch:.1f} us of CPU time")
    timed = []
    for name in args.models:
        case = dict(
            model=name,
            size=args.size,
            seq=args.seq,
            batch=args.batch,
            repeat=args.repeat,
            hidden=args.hidden,
            heads=args.heads,
            window=args.window,
            segment=args.segment,
            layers=args.layers,
            no_profile=args.time_only,
            compile=args.compile,
        )
        proc = subprocess.run([sys.executable, __file__, "--case", json.dumps(case)], capture_output=True, text=True)
        if proc.returncode:
            print(f"{name}: failed\n{proc.stderr[-2000:]}")
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        if args.time_only:
            timed.append((name, r))
            continue
        cfg = model_config(case)
        tok = r["tokens"]
        cpu = r["user_s"] + r["sys_s"]
        total_ops = sum(r["ops"].values())
        print(
            f"\n{name}: hidden {cfg.hidden_size}, {cfg.num_hidden_layers} blocks, {cfg.num_attention_heads} heads of "
            f"{cfg.head_dim}, {r['params'] / 1e6:.2f}M parameters, B={args.batch} T={args.seq}\n"
            f"unprofiled step: {r['wall_s'] * 1e3:.0f} ms wall ({tok / r['wall_s']:.0f} tok/s), "
            f"CPU {cpu * 1e3:.0f} ms ({tok / cpu:.0f} tok/CPU-s; system {r['sys_s'] * 1e3:.0f} ms, "
            f"{r['faults']} page faults); {total_ops} ops, at {dispatch:.1f} us each "
            f"{total_ops * dispatch / 1e3:.0f} ms = {100 * total_ops * dispatch / 1e6 / cpu:.0f}% of the CPU time; "
            f"profiled {r['profiled_wall_s'] * 1e3:.0f} ms"
        )
        rows = []
        whole = r["profiled_ms"]
        for part in PARTS:
            ms, py, n = r["op_ms"].get(part, 0.0), r["py_ms"].get(part, 0.0), r["ops"].get(part, 0)
            if ms + py == 0 and n == 0:
                continue
            rows.append(
                {
                    "part": part,
                    "ms": f"{ms:.1f}",
                    "python ms": f"{py:.1f}",
                    "share": f"{100 * (ms + py) / whole:.1f}%",
                    "ops": str(n),
                    "us/op": f"{1e3 * ms / n:.1f}" if n else "-",
                }
            )
        rest = r["profiled_wall_s"] * 1e3 - whole
        rows.append(
            {
                "part": "outside the profiler's events",
                "ms": f"{rest:.1f}",
                "python ms": "",
                "share": "",
                "ops": "",
                "us/op": "",
            }
        )
        _table(rows, ["part", "ms", "python ms", "share", "ops", "us/op"])
    if timed:
        first = timed[0][1]
        cpu = lambda r: r["user_s"] + r["sys_s"]  # noqa: E731
        rows = [
            {
                "model": name,
                "tok/s": f"{r['tokens'] / r['wall_s']:.0f}",
                f"x {timed[0][0]}": f"{first['wall_s'] / r['wall_s']:.2f}",
                "tok/CPU-s": f"{r['tokens'] / cpu(r):.0f}",
                f"CPU x {timed[0][0]}": f"{cpu(first) / cpu(r):.2f}",
                "sys ms": f"{1e3 * r['sys_s']:.0f}",
                "first step s": f"{r['first_s']:.1f}",
            }
            for name, r in timed
        ]
        _table(rows, list(rows[0]))


def _table(rows, cols) -> None:
    widths = [max(len(c), *(len(r[c]) for r in rows)) for c in cols]
    print("  ".join(c.rjust(w) for c, w in zip(cols, widths)))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print("  ".join(r[c].rjust(w) for c, w in zip(cols, widths)))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", help=argparse.SUPPRESS)
    ap.add_argument("--dispatch", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--models", nargs="+", default=["transformer", "gated-deltanet", "titans-lmm", "titans-mac"])
    ap.add_argument("--size", default="tiny", help="preset size; default tiny")
    ap.add_argument("--seq", type=int, default=1024, help="sequence length; default 1024")
    ap.add_argument("--batch", type=int, default=2, help="batch size; default 2")
    ap.add_argument(
        "--repeat", type=int, default=3, help="unprofiled timed steps (the least CPU time counts); default 3"
    )
    ap.add_argument(
        "--time-only",
        action="store_true",
        help="no profile: each model's tokens per second of wall and of CPU time, and ratios to the first",
    )
    ap.add_argument(
        "--compile",
        choices=["model", "around-op"],
        default=None,
        help="with --time-only: torch.compile the model (around-op: the memory ops excluded, run eagerly); the "
        "first step (compilation included) is shown; default eager",
    )
    ap.add_argument("--hidden", type=int, default=None, help="hidden size instead of the size's; default the size's")
    ap.add_argument("--heads", type=int, default=4, help="heads with --hidden; default 4")
    ap.add_argument("--layers", type=int, default=None, help="number of blocks; default the size's")
    ap.add_argument("--window", type=int, default=None, help="attention window; default the size's")
    ap.add_argument("--segment", type=int, default=None, help="MAC segment size; default the size's")
    args = ap.parse_args(argv)
    if args.compile and not args.time_only:
        ap.error("--compile measures with --time-only")
    if args.dispatch:
        print(json.dumps(_dispatch_us()))
        return
    if args.case:
        print(json.dumps(_case(json.loads(args.case))))
        return
    run(args)


if __name__ == "__main__":
    main()
