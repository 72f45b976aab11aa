"""deepmemory: test-time memorization sequence models (Titans, ATLAS) in PyTorch.

``import deepmemory`` is cheap (no torch): it registers the ``deepmemory`` model type with
``AutoConfig`` and ``AutoModelForCausalLM`` when transformers' Auto classes load, so
``AutoModelForCausalLM.from_pretrained(run_dir)`` works after it (``deepmemory._auto``).
It leaves PyTorch's CPU threads alone: ``deepmemory.set_threads()`` applies the commands' default
of one thread (``OMP_NUM_THREADS`` when set; ``deepmemory.threads``).
"""

__version__ = "0.1.0"

from . import _auto
from .threads import set_threads

__all__ = ["set_threads"]

_auto.install()
