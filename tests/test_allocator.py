"""keep_freed_memory: after it, memory freed by one step is reused by the next without page faults."""

import platform
import subprocess
import sys

import pytest

SCRIPT = """
import resource, sys, torch
from deepmemory.allocator import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else False
def faults_of_a_fresh_buffer():
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.empty(64 * 2**20 // 4).fill_(1.0)  # 64 MiB, written, freed
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
faults_of_a_fresh_buffer()
print(applied, faults_of_a_fresh_buffer())
"""


def _second_buffer_faults(mode: str):
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True)
    applied, faults = out.stdout.split()
    return applied == "True", int(faults)


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_kept_memory_is_reused_without_faults():
    pages = 64 * 2**20 // 4096
    applied, faults = _second_buffer_faults("keep")
    assert applied and faults < pages // 10
    # the control: glibc's default unmaps a 64 MiB block on free, so every page faults again
    applied, faults = _second_buffer_faults("default")
    assert not applied and faults > pages // 2
