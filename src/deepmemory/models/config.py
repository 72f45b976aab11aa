"""``DeepMemoryConfig``: one causal-LM configuration for every model family of the library."""

from __future__ import annotations

import inspect

from transformers import PretrainedConfig

from ..checks import check_choice, check_positive

from ..layers.feature_maps import FEATURE_MAPS
from ..layers.kernel_memory import KernelMemory
from ..layers.memory_layer import NeuralMemory
from ..ops import ACTIVATIONS, GRANULARITIES, IMPLS, LOSSES, MEMORY_KINDS, OPTIMIZERS

BLOCK_TYPES = ("attn", "swa", "memory", "kernel", "mac", "mag", "mal")
ATTENTION_BLOCKS = ("attn", "swa", "mac", "mag", "mal")
CHOICES = dict(
    memory=MEMORY_KINDS, loss=LOSSES, optimizer=OPTIMIZERS, granularity=GRANULARITIES,
    feature_map=FEATURE_MAPS, activation=ACTIVATIONS, impl=tuple(IMPLS),
)
NON_NEGATIVE = ("ns_steps", "conv_size")


def _settings(cls) -> dict:
    """The keyword settings of a mixer and their defaults (the widths come from the config)."""
    params = inspect.signature(cls).parameters.values()
    return {p.name: p.default for p in params if p.kind is p.KEYWORD_ONLY}


MEMORY_SETTINGS = _settings(NeuralMemory)
KERNEL_SETTINGS = _settings(KernelMemory)


def _int(name: str, value, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int; got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}; got {value}")


class DeepMemoryConfig(PretrainedConfig):
    """Configuration of :class:`DeepMemoryForCausalLM`.

    ``layer_pattern`` picks the block of each layer: a list of ``num_hidden_layers`` names from
    ``attn`` (Transformer++), ``swa`` (sliding window, ``attention_window``), ``memory``
    (``NeuralMemory`` + SwiGLU), ``kernel`` (``KernelMemory`` + SwiGLU: DeepTransformer family),
    ``mac`` / ``mag`` / ``mal`` (Titans hybrids); a single name repeats for every layer.
    ``memory`` and ``kernel`` are keyword settings of the two memory mixers (``NeuralMemory`` /
    ``KernelMemory``; the widths come from here); ``segment_size`` is MAC's segment length,
    ``attention_window`` the window of ``swa``/``mag``/``mal`` and ``num_persistent`` the learned
    persistent tokens of every attention. ``head_dim`` defaults to ``hidden_size // num_heads``,
    ``intermediate_size`` (the SwiGLU width) to ``4 * hidden_size``. ``num_layers`` / ``num_heads``
    are aliases of ``num_hidden_layers`` / ``num_attention_heads``. Every field is checked when the
    config is made: a bad one raises a one-line ``ValueError``/``TypeError`` naming it.
    """

    model_type = "deepmemory"
    keys_to_ignore_at_inference = ["past_key_values"]
    attribute_map = {"num_layers": "num_hidden_layers", "num_heads": "num_attention_heads"}

    vocab_size: int = 32000
    hidden_size: int = 64
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    head_dim: int | None = None
    intermediate_size: int | None = None
    layer_pattern: list | str = "attn"
    memory: dict | None = None
    kernel: dict | None = None
    attention_window: int = 64
    segment_size: int = 64
    num_persistent: int = 0
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    initializer_range: float = 0.02
    tie_word_embeddings: bool = True
    use_cache: bool = True
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None

    def __post_init__(self, **kwargs):
        for alias, name in self.attribute_map.items():
            if alias in kwargs:
                setattr(self, name, kwargs.pop(alias))
        if self.head_dim is None and isinstance(self.num_attention_heads, int) and self.num_attention_heads > 0:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.intermediate_size is None and isinstance(self.hidden_size, int):
            self.intermediate_size = 4 * self.hidden_size
        if isinstance(self.layer_pattern, str):
            self.layer_pattern = [self.layer_pattern] * self.num_hidden_layers
        else:
            self.layer_pattern = list(self.layer_pattern)
        self.memory = dict(self.memory or {})
        self.kernel = dict(self.kernel or {})
        super().__post_init__(**kwargs)
        self.check()

    def check(self) -> None:
        """Raise a one-line ``ValueError``/``TypeError`` for an inconsistent configuration."""
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "head_dim",
                     "intermediate_size", "attention_window", "segment_size"):
            _int(name, getattr(self, name))
        _int("num_persistent", self.num_persistent, minimum=0)
        for name in ("rms_norm_eps", "initializer_range", "rope_theta"):
            check_positive(name, getattr(self, name))
        pattern = self.layer_pattern
        if len(pattern) != self.num_hidden_layers:
            raise ValueError(f"layer_pattern must name {self.num_hidden_layers} blocks (num_hidden_layers); got {len(pattern)}: {pattern}")
        for name in pattern:
            check_choice("layer_pattern entries", name, BLOCK_TYPES)
        # settings are checked even where no block reads them: a typo should not pass silently
        _check_settings("memory", self.memory, MEMORY_SETTINGS)
        if self.memory.get("memory") == "linear" and self.memory.get("residual", False):
            raise ValueError("memory['residual']=True needs an mlp or gated_mlp memory; a linear memory has no residual")
        _check_settings("kernel", self.kernel, KERNEL_SETTINGS)
        if set(pattern) & set(ATTENTION_BLOCKS) and self.head_dim % 2:
            raise ValueError(f"head_dim must be even: attention rotates pairs of channels (RoPE); got {self.head_dim}")


def _check_settings(group: str, settings: dict, defaults: dict) -> None:
    """Every setting is a known keyword of the mixer, with the type of its default."""
    for key, value in settings.items():
        check_choice(f"{group} settings", key, tuple(defaults))
        name, default = f"{group}['{key}']", defaults[key]
        if key in CHOICES:
            check_choice(name, value, CHOICES[key])
        elif isinstance(default, bool):
            if not isinstance(value, bool):
                raise TypeError(f"{name} must be a bool; got {type(value).__name__}")
        elif isinstance(default, int):
            _int(name, value, minimum=0 if key in NON_NEGATIVE else 1)
        elif isinstance(default, float):
            check_positive(name, value)
        elif default is None and value is not None:  # kernel window: None (global) or a length
            _int(name, value)
