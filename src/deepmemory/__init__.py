"""deepmemory: test-time memorization sequence models (Titans, ATLAS) in PyTorch.

``import deepmemory`` is cheap (no torch): it registers the ``deepmemory`` model type with
``AutoConfig`` and ``AutoModelForCausalLM`` when transformers' Auto classes load, so
``AutoModelForCausalLM.from_pretrained(run_dir)`` works after it (``deepmemory._auto``).
"""

__version__ = "0.1.0"

from . import _auto

_auto.install()
