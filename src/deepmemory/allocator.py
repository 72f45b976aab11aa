"""Keep freed memory in the process: the CPU setting for training on long sequences.

A training step on a long sequence allocates gigabytes (the saved chunk states and activations)
and frees them all at the end of the backward. glibc's ``malloc`` hands such memory back to the
operating system (large blocks are ``mmap``-ed and unmapped on ``free``, the heap top is
trimmed), so the next step takes a page fault for every 4 KiB page again and the kernel zeroes
it. On the 2-core virtual machine of ``docs/benchmarks.md`` a memory layer's step at T=32K took
1.4 million faults and up to a fifth of its time in the kernel; the arithmetic per token is
the same as at T=1K.

``keep_freed_memory()`` tells glibc to serve every allocation from its heap and never to
shrink it (``mallopt(M_MMAP_MAX, 0)``, ``mallopt(M_TRIM_THRESHOLD, -1)``, see ``man mallopt``):
freed memory is reused by later steps (the first one or two still fault while the heap settles),
and the process's resident memory stays at its peak.
It is the same trade as swapping in jemalloc or tcmalloc with ``LD_PRELOAD``, as PyTorch's own
CPU launcher (``python -m torch.backends.xeon.run_cpu``) does, without a library to install.
It changes the whole process, so it is never applied on import: call it once at the start of a
training script (or pass ``--keep-freed-memory`` to ``deepmemory bench``). The equivalent from
the shell: ``GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=...``.

    >>> import deepmemory.allocator
    >>> deepmemory.allocator.keep_freed_memory()   # doctest: +SKIP
    True
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse instead of returning it to the OS.

    Returns True when applied, False where the C library is not glibc (macOS, Windows, musl):
    there the call changes nothing. CUDA memory is unaffected (PyTorch caches it already).
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    # mallopt returns 1 on success; -1 as the trim threshold disables trimming altogether
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, -1))
