"""CPU threads: ``deepmemory.set_threads`` and the default the command line applies.

The memory models run many small kernels per chunk (tens of microseconds each at the tiny size),
and PyTorch's intra-op threads meet at a barrier after every kernel. On a quiet machine a second
thread buys little on such kernels; on a machine whose cores are shared with other jobs it costs a
great deal, because every kernel then waits for a thread the operating system has descheduled
(measured on a shared 2-core machine: a training step of titans-mac, tiny, 0.42 s with one thread
and 3.8 s with two; two threads fell to about 100 tokens/s whenever another process ran).

The commands (``deepmemory train``, ``eval``, ``generate``, ``bench``) therefore run one thread
unless ``--threads`` or ``OMP_NUM_THREADS`` says otherwise. Importing the library changes nothing:
a program that builds a model itself keeps PyTorch's default (one thread per core) until it calls
:func:`set_threads`, which applies the same rule as the commands.

    >>> import deepmemory
    >>> deepmemory.set_threads()  # doctest: +SKIP
    1
"""

from __future__ import annotations

import os

from .checks import MAX_THREADS, check_int


def default_threads() -> int | None:
    """The command line's default: None (keep PyTorch's, which ``OMP_NUM_THREADS`` sets) when the
    environment sets ``OMP_NUM_THREADS``, else 1."""
    return None if "OMP_NUM_THREADS" in os.environ else 1


def set_threads(threads: int | None = None) -> int:
    """Set PyTorch's intra-op CPU threads for this process and return the count now in effect.

    ``threads``: an int in ``[1, 1024]``; None (the default) applies the commands' rule: keep the
    count ``OMP_NUM_THREADS`` gave PyTorch when the environment sets it, else one thread (see the
    module docstring for why one). Affects CPU kernels only (CUDA work does not use these threads);
    call it once, early, before the first forward pass.

    Raises:
        TypeError: ``threads`` is not an int (or is a bool).
        ValueError: ``threads`` is outside ``[1, 1024]``.
    """
    if threads is not None:
        check_int("threads", threads, 1, MAX_THREADS)
    import torch  # (importing deepmemory does not import torch)

    count = default_threads() if threads is None else threads
    if count is not None and count != torch.get_num_threads():
        torch.set_num_threads(count)
    return torch.get_num_threads()
