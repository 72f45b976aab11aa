"""Reading a long prompt through the recurrent cache in chunks, then greedy decoding.

A model's :class:`~deepmemory.models.DeepMemoryCache` carries everything it has read (memory
weights and momentum, conv tails, the unfinished chunk; attention keys and values, within the
window when there is one), and feeding a sequence in pieces through it gives the logits of one
pass. So a prompt of any length is read ``chunk_size`` tokens at a time: a model whose blocks keep
a bounded state (the memory models, sliding-window attention) holds the same memory at 1M tokens
as at 1K. Blocks whose state grows with the context — full attention (``attn``) and the kernel
memories of the DeepTransformer family (``kernel``: DeepTransformer, SWDT and Dot keep every token's
key, the Omega window included; only ``window_rule="swa"`` retires tokens) — are listed by
:func:`growing_blocks`; the evaluator refuses them past ``MAX_GROWING_CONTEXT`` tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

MAX_GROWING_CONTEXT = 65536  # tokens: the longest prompt read by a model whose cache grows with the context


def growing_blocks(config) -> list[str]:
    """The names (``"attn"``, ``"kernel"``) of the blocks of ``config`` (a ``DeepMemoryConfig``)
    whose cache grows with the context, one per block, in layer order: full attention, and a
    kernel memory unless it retires tokens (``window`` set and ``window_rule="swa"``): the
    DeepTransformer, SWDT and Dot keep every token's key and first-layer signal, because their
    first layer acts on ``exp``'s infinite feature map and is held as those (docs/models/deep-transformer.md).
    Empty for a model of bounded state."""
    kernel = getattr(config, "kernel", None) or {}
    retires = kernel.get("window") is not None and kernel.get("window_rule", "omega") == "swa"
    return [b for b in config.layer_pattern if b == "attn" or (b == "kernel" and not retires)]


def _step(model: nn.Module, ids: Tensor, cache) -> Tensor:
    """The logits ``[B, V]`` (float32; float64 for a float64 model) after reading ``ids [B, n]`` through ``cache``."""
    logits = model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
    return logits if logits.dtype == torch.float64 else logits.float()


# inference mode rather than no_grad: nothing read here is ever differentiated, and each of the many
# small operations of a decoded token dispatches faster without autograd's version counters
@torch.inference_mode()
def read_prompt(
    model: nn.Module, prompts: Tensor, cache, chunk_size: int, progress: Callable[[int], None] | None = None
) -> Tensor:
    """Read ``prompts`` (``[B, T]`` int64, on the model's device) into ``cache`` (a fresh
    ``DeepMemoryCache`` of the model), ``chunk_size`` tokens per forward call; return the logits
    of the next token, ``[B, V]`` float32 (float64 for a float64 model). ``progress(n)`` is called
    after each chunk with the tokens it read (per row). Any ``chunk_size`` gives the logits of one
    pass over the prompt (to rounding: float64 1e-12); the cost is the model's over the prompt
    plus a forward call per chunk, so large chunks (the evaluator's 2048) leave only the first.

    Raises:
        ValueError: ``prompts`` is not a non-empty ``[B, T]`` tensor, or ``chunk_size`` < 1.
    """
    if prompts.dim() != 2 or prompts.numel() == 0:
        raise ValueError(f"prompts must be a non-empty [batch, tokens] tensor; got shape {list(prompts.shape)}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1; got {chunk_size}")
    logits = None
    for start in range(0, prompts.shape[1], chunk_size):
        piece = prompts[:, start : start + chunk_size]
        logits = _step(model, piece, cache)
        if progress is not None:
            progress(piece.shape[1])
    return logits


@torch.inference_mode()
def greedy_decode(
    model: nn.Module,
    logits: Tensor,
    cache,
    max_new_tokens: int,
    stop: Callable[[list[int]], bool] | None = None,
    eos_id: int | None = None,
) -> list[list[int]]:
    """Greedy continuation of the sequences in ``cache`` whose next-token logits are ``logits``
    (``[B, V]``, from :func:`read_prompt`): at most ``max_new_tokens`` tokens per row, a row
    ending early at ``eos_id`` (kept out of its output) or once ``stop(tokens so far)`` is true
    (its last token kept). Returns the generated ids of each row.

    Raises:
        ValueError: ``max_new_tokens`` < 1.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1; got {max_new_tokens}")
    rows = logits.shape[0]
    out: list[list[int]] = [[] for _ in range(rows)]
    done = [False] * rows
    for i in range(max_new_tokens):
        nxt = logits.argmax(-1)
        for b, token in enumerate(nxt.tolist()):
            if done[b]:
                continue
            if eos_id is not None and token == eos_id:
                done[b] = True
                continue
            out[b].append(token)
            if stop is not None and stop(out[b]):
                done[b] = True
        if all(done) or i == max_new_tokens - 1:
            break
        logits = _step(model, nxt[:, None], cache)
    return out


def answer_batch(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    chunk_size: int,
    device: torch.device,
    stop: Callable[[list[int]], bool] | None = None,
    eos_id: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> list[list[int]]:
    """Greedy answers to ``prompts`` (lists of token ids, all of one length), read together as one
    batch through a fresh cache (:func:`read_prompt`, then :func:`greedy_decode`).

    Raises:
        ValueError: the prompts are empty or of different lengths.
    """
    from ..models import DeepMemoryCache

    if not prompts or len({len(p) for p in prompts}) != 1:
        raise ValueError(f"answer_batch reads prompts of one length; got lengths {sorted({len(p) for p in prompts})}")
    ids = torch.tensor([list(p) for p in prompts], dtype=torch.long, device=device)
    cache = DeepMemoryCache(model.config)
    logits = read_prompt(model, ids, cache, chunk_size, progress=progress)
    del ids
    return greedy_decode(model, logits, cache, max_new_tokens, stop=stop, eos_id=eos_id)
