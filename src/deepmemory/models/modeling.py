"""``DeepMemoryForCausalLM``: embeddings -> blocks (from ``config.layer_pattern``) -> RMSNorm -> LM head.

Every block follows the layer contract ``y, state = block(x, state, return_state=True)``, so one
model class serves every family: the recurrent cache is just the list of block states.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from ..layers.blocks import MACBlock, MAGBlock, MALBlock, MemoryBlock, TransformerBlock
from ..layers.common import RMSNorm
from ..layers.feature_maps import PolynomialFeatureMap, symmetric_monomials
from ..layers.kernel_memory import KernelMemory
from ..layers.memory_layer import NeuralMemory
from .config import DeepMemoryConfig


def _build_block(config: DeepMemoryConfig, kind: str) -> nn.Module:
    h, nh, hd, mlp = config.hidden_size, config.num_attention_heads, config.head_dim, config.intermediate_size
    eps = config.rms_norm_eps
    if kind in ("attn", "swa"):
        window = config.attention_window if kind == "swa" else None
        return TransformerBlock(
            h, nh, hd, mlp, window=window, num_persistent=config.num_persistent, rope_theta=config.rope_theta, eps=eps
        )
    if kind == "memory":
        return MemoryBlock(NeuralMemory(h, nh, hd, **config.memory), h, mlp, eps=eps)
    if kind == "kernel":
        return MemoryBlock(KernelMemory(h, nh, hd, **config.kernel), h, mlp, eps=eps)
    hybrid = dict(num_persistent=config.num_persistent, memory_kwargs=config.memory, rope_theta=config.rope_theta, eps=eps)
    if kind == "mac":
        return MACBlock(h, nh, hd, mlp, segment_size=config.segment_size, **hybrid)
    cls = MAGBlock if kind == "mag" else MALBlock
    return cls(h, nh, hd, mlp, window=config.attention_window, **hybrid)


def _return_dict(return_dict: Optional[bool], config: DeepMemoryConfig) -> bool:
    return config.return_dict if return_dict is None else return_dict


def map_state(state, fn: Callable[[Tensor], Tensor]):
    """Apply ``fn`` to every tensor of a (nested) block state: dataclasses, dicts, lists, tuples."""
    if isinstance(state, Tensor):
        return fn(state)
    if isinstance(state, dict):
        return {k: map_state(v, fn) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(map_state(v, fn) for v in state)
    if dataclasses.is_dataclass(state) and not isinstance(state, type):
        return dataclasses.replace(state, **{f.name: map_state(getattr(state, f.name), fn) for f in dataclasses.fields(state) if f.init})
    return state


def _tensors(state) -> List[Tensor]:
    found: List[Tensor] = []
    map_state(state, lambda t: found.append(t) or t)
    return found


class DeepMemoryCache:
    """The recurrent state of a model: one block state per layer and the number of tokens read.

    Memory blocks keep a constant-size state (memory weights, conv tails, the Omega window and the
    unfinished chunk); attention keeps keys and values, limited to its window when it has one.
    """

    is_compileable = False
    is_croppable = False

    def __init__(self, num_layers: int):
        self.states: List[object] = [None] * num_layers
        self.seen = 0

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen

    def detach(self) -> "DeepMemoryCache":
        """Cut the autograd graph (truncated backpropagation through time); in place."""
        self.states = [map_state(s, torch.Tensor.detach) for s in self.states]
        return self

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Select batch rows (beam search); every state tensor is batch-first."""
        self.states = [map_state(s, lambda t: t.index_select(0, beam_idx.to(t.device))) for s in self.states]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for s in self.states for t in _tensors(s))

    def __len__(self) -> int:
        return len(self.states)


class DeepMemoryPreTrainedModel(PreTrainedModel):
    config_class = DeepMemoryConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = False
    _no_split_modules = []
    _is_stateful = True

    def _init_weights(self, module: nn.Module) -> None:
        # Blocks initialise their own parameters (gates, initial memories, feature-map
        # coefficients); only the embeddings and the LM head are set here. Loading builds the
        # model on the meta device, so buffers derived from the constructor arguments (kept out
        # of checkpoints) are recomputed here too.
        std = self.config.initializer_range
        if isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, DeepMemoryForCausalLM):
            init.normal_(module.lm_head.weight, mean=0.0, std=std)
        elif isinstance(module, PolynomialFeatureMap):
            for i in range(1, module.degree + 1):
                idx, mult = symmetric_monomials(module.head_dim, i)
                init.copy_(getattr(module, f"idx{i}"), idx)
                init.copy_(getattr(module, f"mult{i}"), mult)


class DeepMemoryModel(DeepMemoryPreTrainedModel):
    """The backbone: ``h = norm(blocks(embed(ids)))``, ``ids [B, T] -> h [B, T, hidden]``."""

    def __init__(self, config: DeepMemoryConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(_build_block(config, kind) for kind in config.layer_pattern)
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def _check_inputs(self, input_ids, inputs_embeds, attention_mask) -> None:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if input_ids is not None:
            if not isinstance(input_ids, Tensor):
                raise TypeError(f"input_ids must be a torch.Tensor; got {type(input_ids).__name__}")
            if input_ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
                raise TypeError(f"input_ids must hold integer token ids; got dtype {input_ids.dtype}")
            if input_ids.dim() != 2:
                raise ValueError(f"input_ids must be [batch, seq]; got shape {list(input_ids.shape)}")
            if input_ids.numel() == 0:
                raise ValueError(f"input_ids is empty (shape {list(input_ids.shape)}); pass at least one token per sequence")
            lo, hi = int(input_ids.min()), int(input_ids.max())
            if lo < 0 or hi >= self.config.vocab_size:
                raise ValueError(f"input_ids must lie in [0, {self.config.vocab_size}) (vocab_size); got values in [{lo}, {hi}]")
        else:
            if not isinstance(inputs_embeds, Tensor) or inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != self.config.hidden_size:
                raise ValueError(f"inputs_embeds must be [batch, seq, {self.config.hidden_size}]; got {getattr(inputs_embeds, 'shape', type(inputs_embeds).__name__)}")
            if inputs_embeds.shape[0] * inputs_embeds.shape[1] == 0:
                raise ValueError(f"inputs_embeds is empty (shape {list(inputs_embeds.shape)}); pass at least one token per sequence")
        if attention_mask is not None and not bool(attention_mask.bool().all()):
            raise ValueError("attention_mask with padding is not supported: the models read sequences left to right; pass unpadded sequences")

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        past_key_values: Optional[DeepMemoryCache] = None,
        use_cache: Optional[bool] = None,
        inputs_embeds: Optional[Tensor] = None,
        attention_mask: Optional[Tensor] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
    ):
        self._check_inputs(input_ids, inputs_embeds, attention_mask)
        cache = past_key_values
        if cache is not None and not isinstance(cache, DeepMemoryCache):
            raise TypeError(f"past_key_values must be a DeepMemoryCache (from a previous output); got {type(cache).__name__}")
        if use_cache is None:
            # a state costs memory; training steps that do not continue a sequence skip it
            use_cache = cache is not None or (self.config.use_cache and not self.training)
        if use_cache and cache is None:
            cache = DeepMemoryCache(len(self.layers))
        if cache is not None and len(cache) != len(self.layers):
            raise ValueError(f"past_key_values holds {len(cache)} layer states; this model has {len(self.layers)} layers")

        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        hidden = [x] if output_hidden_states else None
        for i, block in enumerate(self.layers):
            if cache is None:
                x = block(x)
            else:
                x, cache.states[i] = block(x, state=cache.states[i], return_state=True)
            if hidden is not None:
                hidden.append(x)
        x = self.norm(x)
        if cache is not None:
            cache.seen += x.shape[1]
        if hidden is not None:
            hidden[-1] = x
        out = BaseModelOutputWithPast(
            last_hidden_state=x,
            past_key_values=cache if use_cache else None,
            hidden_states=tuple(hidden) if hidden is not None else None,
        )
        return out if _return_dict(return_dict, self.config) else out.to_tuple()


class DeepMemoryForCausalLM(DeepMemoryPreTrainedModel, GenerationMixin):
    """Causal LM over any block pattern; ``loss`` is next-token cross entropy (shifted inside,
    ``-100`` ignored). ``past_key_values`` is a :class:`DeepMemoryCache`: feeding a sequence in
    pieces with it gives the logits of one pass, which is how ``generate`` decodes."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: DeepMemoryConfig):
        super().__init__(config)
        self.model = DeepMemoryModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        labels: Optional[torch.LongTensor] = None,
        past_key_values: Optional[DeepMemoryCache] = None,
        use_cache: Optional[bool] = None,
        inputs_embeds: Optional[Tensor] = None,
        attention_mask: Optional[Tensor] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        logits_to_keep: int = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        unknown = set(kwargs) - {"output_attentions"}
        if unknown:
            raise TypeError(f"forward() got unexpected argument(s) {sorted(unknown)}")
        if kwargs.get("output_attentions"):
            raise ValueError("output_attentions is not supported: memory blocks have no attention matrix")
        out = self.model(
            input_ids=input_ids, past_key_values=past_key_values, use_cache=use_cache, inputs_embeds=inputs_embeds,
            attention_mask=attention_mask, output_hidden_states=output_hidden_states, return_dict=True,
        )
        h = out.last_hidden_state
        logits = self.lm_head(h if not logits_to_keep else h[:, -logits_to_keep:])
        loss = None
        if labels is not None:
            if labels.shape != h.shape[:2]:
                raise ValueError(f"labels must have the shape of the input [batch, seq] = {list(h.shape[:2])}; got {list(labels.shape)}")
            if logits_to_keep:
                raise ValueError("labels need the logits of every position; leave logits_to_keep at 0")
            # half-precision logits are upcast for the softmax; float64 stays float64
            shifted = logits[:, :-1].flatten(0, 1)
            shifted = shifted if shifted.dtype in (torch.float32, torch.float64) else shifted.float()
            loss = F.cross_entropy(shifted, labels[:, 1:].flatten().to(logits.device), ignore_index=-100)
        out = CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=out.past_key_values, hidden_states=out.hidden_states)
        return out if _return_dict(return_dict, self.config) else out.to_tuple()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs) -> None:
        # generate() gets our cache from the start so that chunked prefill (prefill_chunk_size)
        # and decoding both continue one recurrent state
        if model_kwargs.get("past_key_values") is None and generation_config.use_cache is not False:
            model_kwargs["past_key_values"] = DeepMemoryCache(self.config.num_hidden_layers)


AutoConfig.register(DeepMemoryConfig.model_type, DeepMemoryConfig, exist_ok=True)
AutoModel.register(DeepMemoryConfig, DeepMemoryModel, exist_ok=True)
AutoModelForCausalLM.register(DeepMemoryConfig, DeepMemoryForCausalLM, exist_ok=True)
