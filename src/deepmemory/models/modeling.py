"""``DeepMemoryForCausalLM``: embeddings -> blocks (from ``config.layer_pattern``) -> RMSNorm -> LM head.

Every block follows the layer contract ``y, state = block(x, state, return_state=True)``, so one
model class serves every family: the recurrent cache is just the list of block states.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    Cache,
    GenerationMixin,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from ..layers.blocks import MACBlock, MAGBlock, MALBlock, MemoryBlock, TransformerBlock
from ..layers.common import RMSNorm
from ..layers.feature_maps import PolynomialFeatureMap, symmetric_monomials
from ..layers.kernel_memory import KernelMemory
from ..layers.memory_layer import NeuralMemory
from ..ops.varlen import check_cu_seqlens, documents
from ..tree import check_state_fits, map_tensors, tensors
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
        return MemoryBlock(
            NeuralMemory(h, nh, hd, **config.memory), h, mlp, num_persistent=config.num_persistent, eps=eps
        )
    if kind == "kernel":
        return MemoryBlock(
            KernelMemory(h, nh, hd, **config.kernel), h, mlp, num_persistent=config.num_persistent, eps=eps
        )
    hybrid = dict(
        num_persistent=config.num_persistent, memory_kwargs=config.memory, rope_theta=config.rope_theta, eps=eps
    )
    if kind == "mac":
        return MACBlock(h, nh, hd, mlp, segment_size=config.segment_size, **hybrid)
    cls = MAGBlock if kind == "mag" else MALBlock
    return cls(h, nh, hd, mlp, window=config.attention_window, **hybrid)


def _return_dict(return_dict: bool | None, config: DeepMemoryConfig) -> bool:
    return config.return_dict if return_dict is None else return_dict


# The name under which Hugging Face passes the cache to ``forward`` and returns it in outputs:
# ``cache`` from transformers 5.24, ``past_key_values`` before. Read off the public output class, so
# that the model speaks whichever contract the installed release has.
CACHE_NAME = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


class DeepMemoryCacheLayer:
    """The recurrent state of one block, as a layer of :class:`DeepMemoryCache`.

    ``state`` is whatever the block returns (``None`` before the first token): memory weights and
    momentum, conv tails, the Omega window and the unfinished chunk, or attention keys and values.
    Every tensor in it is batch-first, which is all that the batch operations below rely on.
    """

    is_compileable = False
    is_sliding = False
    is_croppable = False
    supports_early_init = False

    def __init__(self) -> None:
        self.state = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(empty={self.state is None})"

    def _map(self, fn: Callable[[Tensor], Tensor]) -> None:
        self.state = map_tensors(self.state, fn)

    def reset(self) -> None:
        self.state = None

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map(lambda t: t[indices.to(t.device)])

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove != 0:
            raise ValueError(
                "a DeepMemoryCache cannot be cropped: a recurrent state cannot forget the tokens it has read"
            )

    def offload(self) -> None:
        self._map(lambda t: t.to("cpu", non_blocking=True))

    def prefetch(self) -> None:  # a layer state moves with the model's device on its next use
        pass

    def get_seq_length(self) -> int:
        raise NotImplementedError("ask the DeepMemoryCache, which counts the tokens of every layer")

    def get_max_length(self) -> int:
        return -1

    get_max_cache_shape = get_max_length  # the name before transformers 5.10


class DeepMemoryCache(Cache):
    """The recurrent state of a model, a Hugging Face :class:`~transformers.Cache`: one
    :class:`DeepMemoryCacheLayer` per block and the number of tokens read (``seen``).

    Memory blocks keep a constant-size state (memory weights, conv tails, the Omega window and the
    unfinished chunk); attention keeps keys and values, limited to its window when it has one;
    kernel blocks (DeepTransformer, SWDT, Dot) keep every token's key and first-layer signal, the
    window's only under ``window_rule="swa"`` (``deepmemory.eval.growing_blocks``). A
    forward pass given the cache (``cache=`` or ``past_key_values=``) updates it in place, so one
    object carries a stream across calls; ``generate`` makes one by itself, or continues the one you
    pass (which must hold the batch the generation runs with, and fewer tokens than the prompt:
    with a cache, the prompt is the whole sequence so far). Beam search and
    ``num_return_sequences`` select and repeat the rows of the cache ``generate`` makes. A call with
    ``use_cache=False`` neither reads nor writes a cache. It cannot be cropped (assisted decoding)
    or compiled.

    Args:
        config: the model's :class:`DeepMemoryConfig`, or the number of layers (an ``int >= 1``).

    Raises:
        TypeError: ``config`` is neither.
    """

    def __init__(self, config: DeepMemoryConfig | int):
        if isinstance(config, PretrainedConfig):
            num_layers = config.num_hidden_layers
        elif isinstance(config, int) and not isinstance(config, bool) and config >= 1:
            num_layers = config
        else:
            raise TypeError(f"DeepMemoryCache takes the model's config or a number of layers >= 1; got {config!r}")
        super().__init__(layers=[DeepMemoryCacheLayer() for _ in range(num_layers)])
        self.seen = 0
        # per-row caches, once a padded batch has been read: rows then hold different numbers of
        # tokens (and chunk phases), so each continues on its own
        self.rows: list[DeepMemoryCache] | None = None

    def split_rows(self, batch: int) -> list[DeepMemoryCache]:
        """Switch to one cache per row of a batch of ``batch`` (what a padded batch needs) and
        return them: each row's cache holds that row of every state and the tokens read so far."""
        if self.rows is None:
            batch = batch if self.batch_size == -1 else self.batch_size
            rows = []
            for r in range(batch):
                row = DeepMemoryCache(len(self.layers))
                for mine, theirs in zip(self.layers, row.layers):
                    theirs.state = map_tensors(mine.state, lambda t, r=r: t[r : r + 1])
                row.seen = self.seen
                rows.append(row)
            for layer in self.layers:
                layer.reset()
            self.rows = rows
        return self.rows

    def _each_row(self, order: list[int]) -> None:
        taken = set()
        rows = []
        for i in order:
            rows.append(self.rows[i] if i not in taken else copy.deepcopy(self.rows[i]))
            taken.add(i)
        self.rows = rows

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.rows is None:
            return super().reorder_cache(beam_idx)
        self._each_row([int(i) for i in beam_idx])

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.rows is None:
            return super().batch_select_indices(indices)
        self._each_row(torch.arange(len(self.rows))[indices.cpu()].tolist())

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.rows is None:
            return super().batch_repeat_interleave(repeats)
        self._each_row([i for i in range(len(self.rows)) for _ in range(repeats)])

    @property
    def states(self) -> list[object]:
        """The block states, one per layer (read-only view; the layers own them)."""
        return [layer.state for layer in self.layers]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens read so far (every layer has read all of them)."""
        return self.seen

    @property
    def batch_size(self) -> int:
        """Sequences the cache holds, or ``-1`` before the first token."""
        if self.rows is not None:
            return len(self.rows)
        for layer in self.layers:
            found = tensors(layer.state)
            if found:
                return found[0].shape[0]
        return -1

    def get_max_length(self, layer_idx: int | None = None) -> int:
        """``-1``: a recurrent state has no maximum length."""
        return -1

    get_max_cache_shape = get_max_length  # the name before transformers 5.10

    def reset(self) -> None:
        """Forget everything: the next forward starts a new sequence."""
        super().reset()
        self.seen = 0
        self.rows = None

    def detach(self) -> DeepMemoryCache:
        """Cut the autograd graph (truncated backpropagation through time); in place."""
        for layer in self.layers:
            layer._map(torch.Tensor.detach)
        for row in self.rows or ():
            row.detach()
        return self

    def nbytes(self) -> int:
        """Bytes held by every state tensor."""
        return sum(t.numel() * t.element_size() for s in self.states for t in tensors(s)) + sum(
            r.nbytes() for r in self.rows or ()
        )


def _check_attention_mask(mask, batch: int, tokens: int, seen: int) -> None:
    """``attention_mask`` may be None or a ``[batch, tokens]`` tensor (``[batch, seen + tokens]``
    when a cache has read ``seen`` tokens, as ``generate`` passes it) of zeros (padding) and ones
    (integers, booleans or floats).
    A one-line ``TypeError``/``ValueError`` otherwise."""
    if mask is None:
        return
    if not isinstance(mask, Tensor):
        raise TypeError(f"attention_mask must be a torch.Tensor; got {type(mask).__name__}")
    lengths = (tokens,) if seen == 0 else (tokens, seen + tokens)
    if mask.dim() != 2 or mask.shape[0] != batch or mask.shape[1] not in lengths:
        expected = " or ".join(f"[{batch}, {n}]" for n in lengths)
        raise ValueError(
            f"attention_mask must be {expected} (batch, tokens{' with the cache' if seen else ''}); "
            f"got shape {list(mask.shape)}"
        )
    if mask.is_complex() or not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError("attention_mask must hold 0 (padding) and 1 (a token)")


def _check_position_ids(position_ids, batch: int, tokens: int) -> Tensor | None:
    """``position_ids`` None or an integer ``[batch, tokens]`` tensor (``[1, tokens]`` is shared by
    the rows), returned as ``[batch, tokens]``; one line otherwise."""
    if position_ids is None:
        return None
    if not isinstance(position_ids, Tensor):
        raise TypeError(f"position_ids must be a torch.Tensor; got {type(position_ids).__name__}")
    if position_ids.is_floating_point() or position_ids.is_complex() or position_ids.dtype == torch.bool:
        raise TypeError(f"position_ids must hold integers; got dtype {position_ids.dtype}")
    if position_ids.dim() != 2 or position_ids.shape[0] not in (1, batch) or position_ids.shape[1] != tokens:
        raise ValueError(
            f"position_ids must be [{batch}, {tokens}] (batch, tokens) or [1, {tokens}]; got shape "
            f"{list(position_ids.shape)}"
        )
    return position_ids.expand(batch, tokens)


def _one_cache(cache, past_key_values) -> DeepMemoryCache | None:
    """The cache, under either of its names; a one-line error for two different ones or a foreign one."""
    if cache is not None and past_key_values is not None and cache is not past_key_values:
        raise ValueError("pass the cache once: cache and past_key_values are the same argument")
    cache = past_key_values if cache is None else cache
    if cache is not None and not isinstance(cache, DeepMemoryCache):
        raise TypeError(
            "the cache must be a DeepMemoryCache (DeepMemoryCache(model.config), or one from a previous output); "
            f"got {type(cache).__name__}"
        )
    return cache


# what transformers' DataCollatorWithFlattening adds besides position_ids (return_flash_attn_kwargs,
# return_seq_idx); the documents are read from position_ids, or else from these
_PACKING_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx")


def _starts_from_packing_kwargs(kwargs: dict, inputs: Tensor | None) -> Tensor | None:
    """Position ids that are 0 where a document begins (``seq_idx [B, T]`` changes, or a
    ``cu_seq_lens_q`` offset of the one packed row), 1 elsewhere; None without either."""
    if inputs is None or not isinstance(inputs, Tensor) or inputs.dim() < 2:
        return None
    bsz, tokens = inputs.shape[:2]
    seq_idx, cu = kwargs.get("seq_idx"), kwargs.get("cu_seq_lens_q")
    if isinstance(seq_idx, Tensor):
        if seq_idx.shape != (bsz, tokens):
            raise ValueError(f"seq_idx must be [{bsz}, {tokens}] (batch, tokens); got shape {list(seq_idx.shape)}")
        starts = F.pad(seq_idx[:, 1:] != seq_idx[:, :-1], (1, 0), value=True)
        return (~starts).long()
    if isinstance(cu, Tensor):
        if bsz != 1:
            raise ValueError(f"cu_seq_lens_q describes one packed row: the batch must be 1; got {bsz}")
        cu = check_cu_seqlens(cu, tokens, inputs.device)
        out = torch.ones(1, tokens, dtype=torch.long, device=inputs.device)
        out[0, cu[:-1]] = 0
        return out
    return None


def _next_token_loss(
    logits: Tensor, labels: Tensor, attention_mask: Tensor | None, position_ids: Tensor | None
) -> Tensor:
    """Mean cross entropy of each scored label given the logits of the token before it.

    ``logits [B, T, V]``, ``labels [B, T]`` (-100: not scored). "Before" is the previous valid
    token of the row (``attention_mask``'s last ``T`` columns; padding is skipped, so after
    padding in the middle of a row the prediction comes from the last token before it); a label
    at padding, at a row's first valid token, or where a document begins (``position_ids == 0``)
    is not scored. Half-precision logits are upcast for the softmax; float64 stays float64."""
    bsz, tokens = labels.shape
    valid = (
        None
        if attention_mask is None
        else attention_mask[:, attention_mask.shape[1] - tokens :].bool().to(labels.device)
    )
    if valid is None or bool(valid.all()):
        pred, targets = logits[:, :-1], labels[:, 1:]
        if position_ids is not None:
            targets = targets.masked_fill(position_ids[:, 1:].to(labels.device) == 0, -100)
    else:
        pos = torch.arange(tokens, device=labels.device).expand(bsz, tokens)
        latest = torch.where(valid, pos, -1).cummax(1).values  # the last valid position at or before t
        before = F.pad(latest[:, :-1], (1, 0), value=-1)  # ... strictly before t
        scored = valid & (before >= 0)
        if position_ids is not None:
            scored = scored & (position_ids.to(labels.device) != 0)
        targets = labels.masked_fill(~scored, -100)
        pred = logits.gather(1, before.clamp(min=0).unsqueeze(-1).expand(-1, -1, logits.shape[-1]))
    pred = pred.flatten(0, 1)
    pred = pred if pred.dtype in (torch.float32, torch.float64) else pred.float()
    return F.cross_entropy(pred, targets.flatten(), ignore_index=-100)


class DeepMemoryPreTrainedModel(PreTrainedModel):
    """The Hugging Face base class of the models: config class, weight init, gradient checkpointing.

    Gradient (activation) checkpointing goes through Hugging Face's public switch,
    ``model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=...)`` (or its newer name
    ``activation_checkpointing_enable``, where the installed release has it). It sets
    ``gradient_checkpointing`` and ``_gradient_checkpointing_func`` on every module carrying the
    flag; while training with gradients on, :class:`DeepMemoryModel` then runs each block under that
    function, which keeps the block's inputs and recomputes its activations in the backward. The
    default (non-reentrant) checkpoint is the one that also carries gradients through a
    recurrent state passed in a cache; ``use_reentrant=True`` does not.
    """

    config_class = DeepMemoryConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    gradient_checkpointing = False  # set per instance by gradient_checkpointing_enable()/_disable()
    _no_split_modules = []
    _is_stateful = True

    def _call_block(self, block: nn.Module, x: Tensor, **kwargs):
        """``block(x, **kwargs)``, under the gradient checkpointing function when it is on, the
        module is training and autograd records (without a backward there is nothing to recompute).
        The block is called through ``__call__``, hooks included (FSDP2's expect that)."""
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return self._gradient_checkpointing_func(lambda h: block(h, **kwargs), x)
        return block(x, **kwargs)

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
                raise ValueError(
                    f"input_ids is empty (shape {list(input_ids.shape)}); pass at least one token per sequence"
                )
            lo, hi = int(input_ids.min()), int(input_ids.max())
            if lo < 0 or hi >= self.config.vocab_size:
                raise ValueError(
                    f"input_ids must lie in [0, {self.config.vocab_size}) (vocab_size); got values in [{lo}, {hi}]"
                )
        else:
            if (
                not isinstance(inputs_embeds, Tensor)
                or inputs_embeds.dim() != 3
                or inputs_embeds.shape[-1] != self.config.hidden_size
            ):
                raise ValueError(
                    f"inputs_embeds must be [batch, seq, {self.config.hidden_size}]; got "
                    f"{getattr(inputs_embeds, 'shape', type(inputs_embeds).__name__)}"
                )
            if inputs_embeds.shape[0] * inputs_embeds.shape[1] == 0:
                raise ValueError(
                    f"inputs_embeds is empty (shape {list(inputs_embeds.shape)}); pass at least one token per sequence"
                )

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        cache: DeepMemoryCache | None = None,
        use_cache: bool | None = None,
        inputs_embeds: Tensor | None = None,
        attention_mask: Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        past_key_values: DeepMemoryCache | None = None,
        position_ids: Tensor | None = None,
    ):
        """``input_ids [B, T]`` (or ``inputs_embeds [B, T, hidden]``) -> ``last_hidden_state [B, T, hidden]``.

        ``cache`` (``past_key_values`` is the same argument under its name before transformers 5.24)
        continues a sequence: it is updated in place and returned when ``use_cache``.

        Variable-length batches (docs/packing.md), in Hugging Face's conventions:

        - ``attention_mask [B, T]`` (``[B, seen + T]`` with a cache), 0 at padding: a padded
          position enters no state, and its hidden state is zeros. Padding may sit anywhere (left
          for ``generate``, right for training); the valid tokens of a row are read in order.
        - ``position_ids [B, T]`` (integers): a valid token whose position id is 0 begins a new
          document (a packed row, as Hugging Face's ``DataCollatorWithFlattening`` makes them);
          each document is read as if alone: memory, momentum, Omega window, chunks, conv,
          attention and RoPE positions restart. Other values are not used (positions are counted
          per document). A row's first token always begins a document.

        Without a cache a padded or packed batch runs as batches of documents, each in a row of
        its own (:mod:`deepmemory.ops.varlen`; a row whose first document fills most of it as it
        lies), at most about twice its tokens; such a call makes no cache unless ``use_cache=True``.
        With a cache, each row of a padded batch continues its own cache from then on (rows hold
        different numbers of tokens), one row after another; a document cannot begin after a
        row's first token there.

        Raises ``TypeError``/``ValueError`` (one line) for malformed inputs, a foreign cache, or a
        document starting inside a cached stream.
        """
        self._check_inputs(input_ids, inputs_embeds, attention_mask)
        cache = _one_cache(cache, past_key_values)
        if use_cache is False:  # a cache is neither read nor written: the call stands alone
            cache = None
        inputs = input_ids if inputs_embeds is None else inputs_embeds
        batch, tokens = inputs.shape[:2]
        _check_attention_mask(attention_mask, batch, tokens, cache.seen if cache is not None else 0)
        position_ids = _check_position_ids(position_ids, batch, tokens)
        valid = None if attention_mask is None else attention_mask[:, -tokens:].bool()
        starts = None if position_ids is None else position_ids == 0
        if use_cache is None:
            # a state costs memory; training steps that do not continue a sequence skip it, and so
            # does a packed or padded batch given no cache (it reads faster without one)
            varlen = (valid is not None and not bool(valid.all())) or (starts is not None and bool(starts[:, 1:].any()))
            use_cache = cache is not None or (self.config.use_cache and not self.training and not varlen)
        if use_cache and cache is None:
            cache = DeepMemoryCache(len(self.layers))
        if cache is not None and len(cache) != len(self.layers):
            raise ValueError(f"the cache holds {len(cache)} layer states; this model has {len(self.layers)} layers")
        if cache is not None and cache.batch_size not in (-1, batch):
            raise ValueError(
                f"the cache holds {cache.batch_size} sequence(s) but the input has a batch of {batch}; "
                "continue a cache with the batch it was made with"
            )
        if cache is not None and cache.rows is None:
            check_state_fits(cache.states, inputs, "cache")

        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        if cache is not None and (cache.rows is not None or (valid is not None and not bool(valid.all()))):
            x, hidden = self._rows(x, cache, valid, starts, output_hidden_states)
        elif cache is not None:
            if starts is not None and bool(starts[:, 1 if cache.seen == 0 else 0 :].any()):
                raise ValueError(self._no_new_document)
            x, hidden = self._blocks(x, cache, output_hidden_states)
        elif valid is None and starts is None:
            x, hidden = self._blocks(x, None, output_hidden_states)
        else:
            x, hidden = self._documents(x, documents(starts, valid), output_hidden_states)
        if cache is not None:
            cache.seen += tokens
        out = BaseModelOutputWithPast(
            last_hidden_state=x,
            hidden_states=tuple(hidden) if hidden is not None else None,
            **{CACHE_NAME: cache if use_cache else None},
        )
        return out if _return_dict(return_dict, self.config) else out.to_tuple()

    _no_new_document = (
        "a document cannot begin inside a cached stream (position_ids is 0 after a row's first token); "
        "read packed documents with use_cache=False, or start a new cache for a new document"
    )

    def _blocks(
        self, x: Tensor, cache: DeepMemoryCache | None, output_hidden_states: bool | None
    ) -> tuple[Tensor, list[Tensor] | None]:
        """Blocks and final norm over ``x [B, T, hidden]``, continuing ``cache`` (its ``seen`` is
        the caller's to advance); the hidden states after the embeddings and each block if asked."""
        hidden = [x] if output_hidden_states else None
        for i, block in enumerate(self.layers):
            if cache is None:
                x = self._call_block(block, x)
            else:
                layer = cache.layers[i]
                x, layer.state = self._call_block(block, x, state=layer.state, return_state=True)
            if hidden is not None:
                hidden.append(x)
        x = self.norm(x)
        if hidden is not None:
            hidden[-1] = x
        return x, hidden

    def _documents(self, x: Tensor, docs, output_hidden_states: bool | None) -> tuple[Tensor, list[Tensor] | None]:
        """A packed or padded batch without a cache, as batches of documents (docs/packing.md).

        A row whose first document begins at its first position and fills more than half of it
        runs as it lies (what follows that document is replaced by zeros before, by selection,
        and its outputs after). Every other document runs in a row of its own, grouped by length
        into powers of two (``(2^(j-1), 2^j]``, one batch each): at most twice its tokens. The
        parts cover disjoint positions and are put together exactly."""
        tokens = x.shape[1]
        keep = docs.in_place() & (docs.lengths * 2 > tokens)
        parts = []
        if bool(keep.any()):
            kept = docs.index[keep, 0] // docs.seq  # rows read as they lie
            inside = (torch.arange(tokens, device=x.device) < docs.lengths[keep][:, None]).unsqueeze(-1)  # [K, T, 1]
            y, hidden = self._blocks(torch.where(inside, x[kept], 0.0), None, output_hidden_states)

            def place(h: Tensor) -> Tensor:
                return h.new_zeros(x.shape[0], tokens, h.shape[-1]).index_put((kept,), torch.where(inside, h, 0.0))

            parts.append([place(h) for h in [y] + (hidden or [])])
        rest = ~keep
        if bool(rest.any()):
            group = torch.ceil(torch.log2(docs.lengths.double())).long()  # length in (2^(j-1), 2^j]
            for j in group[rest].unique().tolist():
                some = docs.subset(rest & (group == j))
                y, hidden = self._blocks(some.to_batch(x), None, output_hidden_states)
                parts.append([some.from_batch(h) for h in [y] + (hidden or [])])
        if not parts:  # nothing but padding
            zeros = x.new_zeros(x.shape[:2] + (self.config.hidden_size,))
            return zeros, ([zeros] * (len(self.layers) + 1) if output_hidden_states else None)
        merged = [sum(hs) for hs in zip(*parts)]
        return merged[0], (merged[1:] if output_hidden_states else None)

    def _rows(
        self,
        x: Tensor,
        cache: DeepMemoryCache,
        valid: Tensor | None,
        starts: Tensor | None,
        output_hidden_states: bool | None,
    ) -> tuple[Tensor, list[Tensor] | None]:
        """A padded batch with a cache: each row's valid tokens continue that row's own cache."""
        batch, tokens = x.shape[:2]
        rows = cache.split_rows(batch)
        where = [
            valid[r].nonzero().squeeze(1) if valid is not None else torch.arange(tokens, device=x.device)
            for r in range(batch)
        ]
        for r, pos in enumerate(where):  # every row checked before any cache moves
            if starts is not None and pos.numel() and bool(starts[r, pos[1 if rows[r].seen == 0 else 0 :]].any()):
                raise ValueError(self._no_new_document)
            if pos.numel():
                check_state_fits(rows[r].states, x[r : r + 1], "cache")
        outs, hiddens = [], []
        for r, pos in enumerate(where):
            if pos.numel():
                y, hidden = self._blocks(x[r : r + 1, pos], rows[r], output_hidden_states)
                rows[r].seen += pos.numel()
            else:  # nothing to read in this row
                y, hidden = (
                    x[r : r + 1, :0],
                    [x[r : r + 1, :0]] * (len(self.layers) + 1) if output_hidden_states else None,
                )
            place = lambda h, pos=pos: h.new_zeros(tokens, h.shape[-1]).index_put((pos,), h[0])  # noqa: E731
            outs.append(place(y))
            if hidden is not None:
                hiddens.append([place(h) for h in hidden])
        hidden = [torch.stack(per) for per in zip(*hiddens)] if output_hidden_states else None
        return torch.stack(outs), hidden


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
        input_ids: torch.LongTensor | None = None,
        labels: torch.LongTensor | None = None,
        cache: DeepMemoryCache | None = None,
        use_cache: bool | None = None,
        inputs_embeds: Tensor | None = None,
        attention_mask: Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int = 0,
        past_key_values: DeepMemoryCache | None = None,
        position_ids: Tensor | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """``input_ids [B, T]`` -> ``logits [B, T, vocab]`` (float, the model's dtype), and ``loss``
        (a scalar) when ``labels [B, T]`` are given.

        ``cache`` / ``past_key_values``: a :class:`DeepMemoryCache` to continue (the two names are
        one argument: ``cache`` from transformers 5.24, ``past_key_values`` before); it is updated
        in place and returned in the output under the installed release's name when ``use_cache``.
        ``logits_to_keep=n`` computes the logits of the last ``n`` positions only.
        ``attention_mask`` (0 at padding) and ``position_ids`` (0 where a packed document begins)
        as in :meth:`DeepMemoryModel.forward`; the loss leaves out every target that is padding
        or begins a document (it cannot be predicted from the tokens before it).

        Raises:
            TypeError: an unknown argument, non-integer ids, or a cache that is not a DeepMemoryCache.
            ValueError: malformed shapes, ids outside the vocabulary, padding, ``output_attentions``.
        """
        unknown = set(kwargs) - {"output_attentions", *_PACKING_KWARGS}
        if unknown:
            raise TypeError(f"forward() got unexpected argument(s) {sorted(unknown)}")
        if position_ids is None:
            position_ids = _starts_from_packing_kwargs(kwargs, input_ids if input_ids is not None else inputs_embeds)
        if kwargs.get("output_attentions"):
            raise ValueError("output_attentions is not supported: memory blocks have no attention matrix")
        out = self.model(
            input_ids=input_ids,
            cache=cache,
            past_key_values=past_key_values,
            use_cache=use_cache,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            output_hidden_states=output_hidden_states,
            return_dict=True,
            position_ids=position_ids,
        )
        h = out.last_hidden_state
        logits = self.lm_head(h if not logits_to_keep else h[:, -logits_to_keep:])
        loss = None
        if labels is not None:
            if labels.shape != h.shape[:2]:
                raise ValueError(
                    f"labels must have the shape of the input [batch, seq] = {list(h.shape[:2])}; got "
                    f"{list(labels.shape)}"
                )
            if logits_to_keep:
                raise ValueError("labels need the logits of every position; leave logits_to_keep at 0")
            loss = _next_token_loss(logits, labels.to(logits.device), attention_mask, position_ids)
        out = CausalLMOutputWithPast(
            loss=loss, logits=logits, hidden_states=out.hidden_states, **{CACHE_NAME: getattr(out, CACHE_NAME)}
        )
        return out if _return_dict(return_dict, self.config) else out.to_tuple()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False

    def generate(self, inputs: Tensor | None = None, *args, **kwargs):
        """Hugging Face's ``generate``. With a cache passed in (``cache=``, ``past_key_values=``
        before transformers 5.24), ``inputs`` is the whole sequence so far and the model reads
        what the cache has not: a recurrent state cannot read a token twice, so a prompt no longer
        than what the cache has read is a one-line ``ValueError``."""
        ids = inputs if inputs is not None else kwargs.get("input_ids")
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if isinstance(cache, DeepMemoryCache) and isinstance(ids, Tensor) and cache.seen >= ids.shape[-1]:
            raise ValueError(
                f"the cache has already read {cache.seen} tokens but the input holds {ids.shape[-1]}; "
                "pass the whole sequence so far plus at least one new token"
            )
        return super().generate(inputs, *args, **kwargs)

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs) -> None:
        # generate() gets our cache from the start so that chunked prefill (prefill_chunk_size)
        # and decoding both continue one recurrent state. Hugging Face has no public way for a model
        # to name its own cache class, so this is the hook its recurrent models override too.
        if model_kwargs.get(CACHE_NAME) is None and generation_config.use_cache is not False:
            model_kwargs[CACHE_NAME] = DeepMemoryCache(self.config)


AutoConfig.register(DeepMemoryConfig.model_type, DeepMemoryConfig, exist_ok=True)
AutoModel.register(DeepMemoryConfig, DeepMemoryModel, exist_ok=True)
AutoModelForCausalLM.register(DeepMemoryConfig, DeepMemoryForCausalLM, exist_ok=True)
