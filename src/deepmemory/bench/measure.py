"""Timing and peak-memory measurement shared by the benchmarks.

CPU peak memory is the growth of the process's peak resident set while the measured function
runs, so every measurement runs in a fresh subprocess (``run_isolated``); on CUDA it is
``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from typing import Callable, Dict, List

import torch


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


def measure(step: Callable[[], None], *, warmup: int = 1, repeat: int = 3, device: str = "cpu") -> Dict[str, float]:
    """Best-of-``repeat`` seconds of ``step()`` and the peak memory (MiB) it added."""
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _peak_rss_mib()
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeat):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if cuda else _peak_rss_mib() - base
    return {"seconds": min(times), "peak_mib": peak}


def run_isolated(module: str, case: Dict) -> Dict:
    """Run ``python -m module --case JSON`` and parse the JSON line it prints last."""
    out = subprocess.run(
        [sys.executable, "-m", module, "--case", json.dumps(case)], capture_output=True, text=True, check=False
    )
    if out.returncode != 0:
        raise RuntimeError(f"benchmark case {case} failed:\n{out.stderr.strip()[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def print_table(rows: List[Dict], columns: List[str]) -> str:
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in columns}
    lines = ["  ".join(c.rjust(widths[c]) for c in columns), "  ".join("-" * widths[c] for c in columns)]
    lines += ["  ".join(str(r.get(c, "")).rjust(widths[c]) for c in columns) for r in rows]
    text = "\n".join(lines)
    print(text, flush=True)
    return text
