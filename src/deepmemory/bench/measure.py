"""Timing and peak-memory measurement shared by the benchmarks.

CPU peak memory is the growth of the process's peak resident set while the measured function
runs, so every measurement runs in a fresh subprocess (``run_isolated``); on CUDA it is
``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Sequence

import torch


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


def measure(step: Callable[[], None], *, warmup: int = 1, repeat: int = 3, device: str = "cpu") -> dict[str, float]:
    """Best-of-``repeat`` seconds of ``step()``, the process's CPU seconds in that step (user, and
    system: the kernel's share, page faults above all) and the peak memory (MiB) it added."""
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _peak_rss_mib()
    for _ in range(warmup):
        step()
    steps = []
    for _ in range(repeat):
        if cuda:
            torch.cuda.synchronize()
        t0, c0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
        step()
        if cuda:
            torch.cuda.synchronize()
        c1 = resource.getrusage(resource.RUSAGE_SELF)
        steps.append((time.perf_counter() - t0, c1.ru_utime - c0.ru_utime, c1.ru_stime - c0.ru_stime))
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if cuda else _peak_rss_mib() - base
    seconds, user, system = min(steps)
    return {"seconds": seconds, "cpu_user_s": user, "cpu_sys_s": system, "peak_mib": peak}


def bench_main(doc: str, add_arguments: Callable, case: Callable[[dict], dict], run_cli: Callable, argv=None) -> None:
    """A benchmark module's ``main``: ``--case JSON`` measures one case in this process and prints
    its JSON result (what ``run_isolated`` reads); anything else runs the whole table."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", help=argparse.SUPPRESS)
    add_arguments(ap)
    args = ap.parse_args(argv)
    if args.case:
        c = json.loads(args.case)
        if c.get("keep_freed_memory"):
            from deepmemory.allocator import keep_freed_memory

            keep_freed_memory()
        print(json.dumps(case(c)))
        return
    run_cli(args)


def add_allocator_argument(ap: argparse.ArgumentParser) -> None:
    ap.add_argument(
        "--keep-freed-memory",
        action="store_true",
        help="every case's process keeps freed memory for reuse instead of returning it to the OS "
        "(deepmemory.allocator.keep_freed_memory; glibc only)",
    )


def allocator_note(keep: bool) -> str:
    return (
        "allocator: freed memory kept for reuse (deepmemory.allocator.keep_freed_memory)"
        if keep
        else "allocator: the C library's default"
    )


class CaseError(RuntimeError):
    """A benchmark case whose process failed. The message holds the tail of its stderr; ``line``
    is one line for the user: the case and the last line of that stderr (its exception)."""

    def __init__(self, case: dict, stderr: str):
        super().__init__(f"benchmark case {case} failed:\n{stderr.strip()[-2000:]}")
        lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
        why = lines[-1][:300] if lines else "the process died without a message"
        self.line = f"benchmark case {json.dumps(case)} failed: {why}"


def run_isolated(module: str, case: dict) -> dict:
    """Run ``python -m module --case JSON`` and parse the JSON line it prints last; ``CaseError``
    (a ``RuntimeError``) when the process fails."""
    out = subprocess.run(
        [sys.executable, "-m", module, "--case", json.dumps(case)], capture_output=True, text=True, check=False
    )
    if out.returncode != 0:
        raise CaseError(case, out.stderr)
    return json.loads(out.stdout.strip().splitlines()[-1])


def saved_for_backward_mib(forward: Callable[[], torch.Tensor]) -> float | None:
    """MiB of distinct tensor storage that autograd keeps for the backward of ``forward()``, or None
    where it cannot be observed (``torch.func`` transforms refuse saved-tensor hooks).

    This is the training memory that grows with T (activations and saved states), measured
    exactly and independently of allocator caching or other processes.
    """
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        storages[st.data_ptr()] = st.nbytes()
        return t

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            forward()
    except RuntimeError:
        return None
    return sum(storages.values()) / 2**20


def fmt_mib(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f}"


def fmt_threads(n: int) -> str:
    """``"1 thread"``, ``"4 threads"``: the thread count of a table's heading."""
    return f"{n} thread" if n == 1 else f"{n} threads"


def count_flops(step: Callable[[], None]) -> int:
    """FLOPs of one ``step()`` (matrix products, forward and backward), by PyTorch's flop counter."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def matmul_peak_flops(device: str = "cpu", dtype: torch.dtype = torch.float32, n: int = 2048, repeat: int = 5) -> float:
    """The machine's measured dense matmul rate (FLOP/s): best of ``repeat`` ``n x n`` products."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    r = measure(lambda: a @ b, warmup=1, repeat=repeat, device=device)
    return 2 * n**3 / r["seconds"]


def save_plot(path: str, series: dict[str, dict[int, float]], xlabel: str, ylabel: str, title: str) -> None:
    """A log-x line plot, one line per series ``{label: {x: y}}`` (matplotlib, Agg), written
    atomically: drawn into a hidden file beside ``path`` and renamed over it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, points in series.items():
        xs = sorted(points)
        ax.plot(xs, [points[x] for x in xs], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    folder, name = os.path.split(os.path.abspath(path))
    tmp = os.path.join(folder, f".{name}.tmp")
    try:
        fig.savefig(tmp, dpi=120, format=os.path.splitext(name)[1].lstrip(".").lower() or "png")
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.remove(tmp)


def print_table(rows: list[dict], columns: list[str], left: Sequence[str] = ()) -> str:
    """Columns right-aligned, except those in ``left`` (text such as notes)."""
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in columns}

    def cell(c, value):
        return str(value).ljust(widths[c]) if c in left else str(value).rjust(widths[c])

    lines = ["  ".join(cell(c, c) for c in columns), "  ".join("-" * widths[c] for c in columns)]
    lines += ["  ".join(cell(c, r.get(c, "")) for c in columns) for r in rows]
    text = "\n".join(line.rstrip() for line in lines)
    print(text, flush=True)
    return text
