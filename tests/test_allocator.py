"""keep_freed_memory: memory freed by one step is reused by the next without page faults."""

import platform
import subprocess
import sys

import pytest

# A step's worth of buffers, a few large ones among many small ones, all freed at the end; the
# page faults of each of four steps. glibc's default unmaps the large ones on free.
SCRIPT = """
import resource, sys, torch
from deepmemory.allocator import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else False
def step():
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    bufs = []
    for _ in range(4):
        bufs.append(torch.empty(40 * 2**20 // 4).fill_(1.0))
        bufs += [torch.empty(25_000).fill_(1.0) for _ in range(50)]
    del bufs
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
print(applied, *[step() for _ in range(4)])
"""
LARGE_PAGES = 4 * 40 * 2**20 // 4096


def _faults(mode: str):
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True)
    applied, *faults = out.stdout.split()
    return applied == "True", [int(f) for f in faults]


@pytest.mark.slow
@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_kept_memory_is_reused_without_faults():
    applied, faults = _faults("keep")
    # the first step maps the memory; by the third, every buffer lands in memory the process kept
    assert applied and faults[0] > LARGE_PAGES and max(faults[2:]) < LARGE_PAGES // 100
    applied, faults = _faults("default")
    assert not applied and min(faults[2:]) > LARGE_PAGES // 2
