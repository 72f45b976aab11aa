"""``DeepMemoryConfig``: one causal-LM configuration for every model family of the library."""

from __future__ import annotations

from transformers import PretrainedConfig

from ..checks import check_choice, check_int, check_positive
from ..layers.common import default_intermediate_size
from ..layers.kernel_memory import KERNEL_STEP_BOUND, KernelMemory
from ..layers.memory_layer import SETTINGS as MEMORY_SETTINGS
from ..layers.memory_layer import NeuralMemory, default_step_bound
from ..ops import UpdateRule

BLOCK_TYPES = ("attn", "swa", "memory", "kernel", "mac", "mag", "mal")
ATTENTION_BLOCKS = ("attn", "swa", "mac", "mag", "mal")
MEMORY_BLOCKS = ("memory", "mac", "mag", "mal")  # the blocks with a NeuralMemory


class DeepMemoryConfig(PretrainedConfig):
    """Configuration of :class:`DeepMemoryForCausalLM`.

    ``layer_pattern`` picks the block of each layer: a list of ``num_hidden_layers`` names from
    ``attn`` (Transformer++), ``swa`` (sliding window, ``attention_window``), ``memory``
    (``NeuralMemory`` + SwiGLU), ``kernel`` (``KernelMemory`` + SwiGLU: DeepTransformer family),
    ``mac`` / ``mag`` / ``mal`` (Titans hybrids); a single name repeats for every layer.
    ``memory`` and ``kernel`` are keyword settings of the two memory mixers (``NeuralMemory`` /
    ``KernelMemory``; the widths come from here); ``segment_size`` is MAC's segment length,
    ``attention_window`` the window of ``swa``/``mag``/``mal`` and ``num_persistent`` the learned
    persistent tokens of every block (attention's always-visible prefix; what a ``memory`` or
    ``kernel`` block's mixer reads before the sequence, Titans eq. 19). ``head_dim`` defaults to
    ``hidden_size // num_heads``,
    ``intermediate_size`` (the SwiGLU width) to the blocks' default, ``2/3 * 4 * hidden_size``
    rounded up to a multiple of 32 (Transformer++'s 8/3 expansion). ``num_layers`` / ``num_heads``
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
        # the fields later ones are derived from are checked first, so that a bad one is named
        for name in ("hidden_size", "num_hidden_layers", "num_attention_heads"):
            check_int(name, getattr(self, name))
        for name in ("memory", "kernel"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, dict):
                raise TypeError(f"{name} must be a dict of settings (or None); got {type(value).__name__}")
        if not isinstance(self.layer_pattern, (str, list, tuple)):
            raise TypeError(
                f"layer_pattern must be a block name or a list of them; got {type(self.layer_pattern).__name__}"
            )
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.intermediate_size is None:
            self.intermediate_size = default_intermediate_size(self.hidden_size)
        if isinstance(self.layer_pattern, str):
            self.layer_pattern = [self.layer_pattern] * self.num_hidden_layers
        else:
            self.layer_pattern = list(self.layer_pattern)
        self.memory = dict(self.memory or {})
        if "memory" in self.memory and "architecture" not in self.memory:
            # configs saved before the rule field was named ``architecture`` still load
            self.memory["architecture"] = self.memory.pop("memory")
        self.kernel = dict(self.kernel or {})
        if set(self.layer_pattern) & set(MEMORY_BLOCKS) and "step_bound" not in self.memory:
            # recorded, so that a saved config keeps the bound it was made with (see from_dict)
            self.memory["step_bound"] = default_step_bound(self.memory.get("optimizer", MEMORY_SETTINGS["optimizer"]))
        if "kernel" in self.layer_pattern and "step_bound" not in self.kernel:
            self.kernel["step_bound"] = KERNEL_STEP_BOUND  # the same for the kernel memory's bound
        super().__post_init__(**kwargs)
        self.check()

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs):
        """A config from a stored dict (``from_pretrained``, a run's record). A config with memory
        blocks whose ``memory`` settings do not name ``step_bound`` was saved before the memory
        layer bounded stale steps by default: it loads with ``step_bound=None``, the rule it was
        trained with (new configs always record it). The same for ``kernel`` blocks whose
        ``kernel`` settings do not name it (saved before the kernel memory's bound)."""
        memory = config_dict.get("memory")
        pattern = config_dict.get("layer_pattern", "attn")
        blocks = (
            {pattern} if isinstance(pattern, str) else set(pattern) if isinstance(pattern, (list, tuple)) else set()
        )
        if blocks & set(MEMORY_BLOCKS) and (memory is None or isinstance(memory, dict) and "step_bound" not in memory):
            config_dict = dict(config_dict, memory=dict(memory or {}, step_bound=None))
        kernel = config_dict.get("kernel")
        if "kernel" in blocks and (kernel is None or isinstance(kernel, dict) and "step_bound" not in kernel):
            config_dict = dict(config_dict, kernel=dict(kernel or {}, step_bound=None))
        return super().from_dict(config_dict, **kwargs)

    @property
    def rule(self) -> UpdateRule | None:
        """The memory update rule of the ``memory``/``mac``/``mag``/``mal`` blocks: the layer's
        defaults updated by ``memory`` (before a feature map moves the residual out of the op);
        None when the layer pattern has none of them."""
        if not set(self.layer_pattern) & set(MEMORY_BLOCKS):
            return None
        return UpdateRule.from_settings(dict(MEMORY_SETTINGS, **self.memory))

    @classmethod
    def own_fields(cls) -> tuple[str, ...]:
        """The fields :class:`DeepMemoryConfig` declares, and their aliases (``num_layers``,
        ``num_heads``), sorted: what a preset's overrides may set and what their errors list.
        Hugging Face's base fields (``chunk_size_feed_forward``, ``id2label``, ...) are left out:
        no model of the library reads them."""
        return tuple(sorted(set(DeepMemoryConfig.__annotations__) | set(cls.attribute_map)))

    def check(self) -> None:
        """Raise a one-line ``ValueError``/``TypeError`` for an inconsistent configuration."""
        for name in (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "head_dim",
            "intermediate_size",
            "attention_window",
            "segment_size",
        ):
            check_int(name, getattr(self, name))
        check_int("num_persistent", self.num_persistent, minimum=0)
        for name in ("rms_norm_eps", "initializer_range", "rope_theta"):
            check_positive(name, getattr(self, name))
        pattern = self.layer_pattern
        if len(pattern) != self.num_hidden_layers:
            raise ValueError(
                f"layer_pattern must name {self.num_hidden_layers} blocks (num_hidden_layers); got {len(pattern)}: "
                f"{pattern}"
            )
        for name in pattern:
            check_choice("layer_pattern entries", name, BLOCK_TYPES)
        # settings are checked even where no block reads them: a typo should not pass silently
        NeuralMemory.check_settings(self.memory, group="memory")
        if self.memory.get("architecture") == "linear" and self.memory.get("residual", False):
            raise ValueError(
                "memory['residual']=True needs an mlp or gated_mlp memory; a linear memory has no residual"
            )
        KernelMemory.check_settings(self.kernel, group="kernel")
        # and a setting no block reads is refused: it would be saved with the model and do nothing
        for group, blocks in (("memory", MEMORY_BLOCKS), ("kernel", ("kernel",))):
            if getattr(self, group) and not set(pattern) & set(blocks):
                raise ValueError(
                    f"{group} settings {sorted(getattr(self, group))} are unused: layer_pattern {sorted(set(pattern))} "
                    f"has no {'/'.join(blocks)} block"
                )
        if set(pattern) & set(ATTENTION_BLOCKS) and self.head_dim % 2:
            raise ValueError(f"head_dim must be even: attention rotates pairs of channels (RoPE); got {self.head_dim}")
