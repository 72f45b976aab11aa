"""``DeepMemoryConfig``: one causal-LM configuration for every model family of the library."""

from __future__ import annotations

from transformers import PretrainedConfig

BLOCK_TYPES = ("attn", "swa", "memory", "kernel", "mac", "mag", "mal")
MEMORY_BLOCKS = ("memory", "mac", "mag", "mal")  # blocks built on NeuralMemory
WINDOWED_BLOCKS = ("swa", "mag", "mal")  # blocks with sliding-window attention

# Settings of ``NeuralMemory`` / ``KernelMemory`` that a config may set (the widths come from
# the config itself). Checked here so that a typo fails at construction, not mid-forward.
MEMORY_KEYS = (
    "chunk_size", "memory", "depth", "expansion", "activation", "residual", "loss", "optimizer",
    "ns_steps", "window", "window_gate", "granularity", "feature_map", "poly_degree", "max_lr",
    "conv_size", "use_decay", "impl",
)
KERNEL_KEYS = ("window", "loss", "depth", "expansion", "activation", "residual", "normalized", "chunk_size", "max_lr", "conv_size")


def _int(name: str, value, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int; got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}; got {value}")


def _positive(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name} must be a positive number; got {value!r}")


def _choice(name: str, value, options) -> None:
    if value not in options:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, options))}; got {value!r}")


class DeepMemoryConfig(PretrainedConfig):
    """Configuration of :class:`DeepMemoryForCausalLM`.

    ``layer_pattern`` picks the block of each layer: a list of ``num_hidden_layers`` names from
    ``attn`` (Transformer++), ``swa`` (sliding window, ``attention_window``), ``memory``
    (``NeuralMemory`` + SwiGLU), ``kernel`` (``KernelMemory`` + SwiGLU: DeepTransformer family),
    ``mac`` / ``mag`` / ``mal`` (Titans hybrids); a single name repeats for every layer.
    ``memory`` and ``kernel`` are keyword settings of the two memory mixers; ``segment_size`` is
    MAC's segment length and ``num_persistent`` the persistent tokens of the hybrids.
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
            _positive(name, getattr(self, name))
        pattern = self.layer_pattern
        if len(pattern) != self.num_hidden_layers:
            raise ValueError(f"layer_pattern must name {self.num_hidden_layers} blocks (num_hidden_layers); got {len(pattern)}: {pattern}")
        for name in pattern:
            _choice("layer_pattern entries", name, BLOCK_TYPES)
        for key in self.memory:
            _choice("memory settings", key, MEMORY_KEYS)
        for key in self.kernel:
            _choice("kernel settings", key, KERNEL_KEYS)
        used = set(pattern)
        if used & set(MEMORY_BLOCKS):
            self._check_memory()
        if "kernel" in used:
            self._check_kernel()
        if used & {"attn", "swa", "mac", "mag", "mal"} and self.head_dim % 2:
            raise ValueError(f"head_dim must be even: attention rotates pairs of channels (RoPE); got {self.head_dim}")

    def _check_memory(self) -> None:
        m = self.memory
        _choice("memory['memory']", m.get("memory", "mlp"), ("linear", "mlp", "gated_mlp"))
        _choice("memory['loss']", m.get("loss", "l2"), ("l2", "dot"))
        _choice("memory['optimizer']", m.get("optimizer", "momentum"), ("gd", "momentum", "muon"))
        _choice("memory['granularity']", m.get("granularity", "token"), ("token", "chunk"))
        _choice("memory['feature_map']", m.get("feature_map", "identity"), ("identity", "polynomial"))
        _choice("memory['activation']", m.get("activation", "gelu"), ("gelu", "silu", "relu", "tanh"))
        _choice("memory['impl']", m.get("impl", "chunk"), ("chunk", "reference"))
        for key in ("chunk_size", "depth", "expansion", "window", "poly_degree"):
            if key in m:
                _int(f"memory['{key}']", m[key])
        if "conv_size" in m:
            _int("memory['conv_size']", m["conv_size"], minimum=0)
        if "ns_steps" in m:
            _int("memory['ns_steps']", m["ns_steps"], minimum=0)
        for key in ("residual", "window_gate", "use_decay"):
            if key in m and not isinstance(m[key], bool):
                raise TypeError(f"memory['{key}'] must be a bool; got {type(m[key]).__name__}")
        if m.get("memory") == "linear" and m.get("residual", False):
            raise ValueError("memory['residual']=True needs an mlp or gated_mlp memory; a linear memory has no residual")
        _positive("memory['max_lr']", m.get("max_lr", 1.0))

    def _check_kernel(self) -> None:
        k = self.kernel
        _choice("kernel['loss']", k.get("loss", "dot"), ("l2", "dot"))
        window = k.get("window")
        if window is not None:
            _int("kernel['window']", window)
        _choice("kernel['activation']", k.get("activation", "gelu"), ("gelu", "silu", "relu", "tanh"))
        for key in ("depth", "expansion", "chunk_size"):
            if key in k:
                _int(f"kernel['{key}']", k[key])
        if "conv_size" in k:
            _int("kernel['conv_size']", k["conv_size"], minimum=0)
        for key in ("residual", "normalized"):
            if key in k and not isinstance(k[key], bool):
                raise TypeError(f"kernel['{key}'] must be a bool; got {type(k[key]).__name__}")
        _positive("kernel['max_lr']", k.get("max_lr", 1.0))
