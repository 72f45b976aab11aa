"""``nan_check``: find where a non-finite value first appears in a forward pass.

Every op and layer of the library is causal for any input (a NaN at token ``t`` reaches no output
before ``t``), so the earliest non-finite position in the first module that produces one points at
the token, and the module, where the trouble starts::

    with nan_check(model):
        model(ids)   # FloatingPointError: non-finite output in model.layers.3.memory (NeuralMemory) at ...

It needs nothing of :class:`~deepmemory.models.DeepMemoryConfig`: it works on any ``nn.Module`` that
holds the library's blocks or mixers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from ..layers.attention import Attention
from ..layers.blocks import _Block
from ..layers.memory_layer import QKVMixer

# the modules watched: every block, every mixer (attention, neural and kernel memories) and the
# token embeddings; the LM head is added when the model has one (get_output_embeddings)
WATCHED = (_Block, Attention, QKVMixer, nn.Embedding)


def _first_tensor(value) -> Tensor | None:
    """The tensor a module returned or was given first: itself, the first of a tuple or list
    (``(y, state)``), or ``logits`` / ``last_hidden_state`` of a model output."""
    if isinstance(value, Tensor):
        return value
    if isinstance(value, dict):
        for key in ("logits", "last_hidden_state"):
            if isinstance(value.get(key), Tensor):
                return value[key]
        return None
    if isinstance(value, (tuple, list)):
        for v in value:
            if isinstance(v, Tensor):
                return v
    return None


def _first_nonfinite(t: Tensor | None) -> tuple[int, int, int] | None:
    """``(batch, position, count)`` of the earliest non-finite position of ``t [B, T, ...]`` (the
    lowest batch index holding it; ``count``: that sequence's non-finite positions), or None."""
    if t is None or not t.is_floating_point() or t.dim() < 2:
        return None
    bad = ~torch.isfinite(t.detach())
    if not bool(bad.any()):
        return None
    rows = bad.flatten(2).any(-1) if bad.dim() > 2 else bad  # [B, T]
    pos = int(rows.any(0).nonzero()[0, 0])
    b = int(rows[:, pos].nonzero()[0, 0])
    return b, pos, int(rows[b].sum())


def _input_tensor(args, kwargs) -> Tensor | None:
    """The input ``x`` of a block or mixer call (the first floating tensor argument)."""
    for v in (*args, *kwargs.values()):
        if isinstance(v, Tensor) and v.is_floating_point():
            return v
    return None


def _raise(what: str, name: str, module: nn.Module, found: tuple[int, int, int]) -> None:
    b, pos, count = found
    raise FloatingPointError(
        f"non-finite {what} {name} ({type(module).__name__}) at batch {b}, position {pos} (first of {count} positions)"
    )


@contextlib.contextmanager
def nan_check(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, every forward pass of ``model`` checks the input and the output of each
    block, mixer and embedding (and of the LM head), and raises at the first one found non-finite.

    Raises:
        FloatingPointError: one line, ``non-finite input to <name> (<class>) ...`` when a module
            receives a non-finite tensor (the model's input, or a module not watched), or
            ``non-finite output in <name> (<class>) ...`` when a module with finite input produces
            one, ``... at batch b, position t (first of n positions)``: the earliest non-finite
            position (dim 1 of the tensor) over the batch, the lowest batch index holding it, and
            how many positions of that sequence are non-finite. Names are those of
            ``model.named_modules()``; positions count within that call's tensor (a MAC block's
            memory reads one segment per call, MAG's and MAL's memory read the persistent tokens first).
        TypeError: ``model`` is not an ``nn.Module``.

    Every check synchronises with the device: it is a debugging aid, not for training runs. The
    hooks are removed when the block ends.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"nan_check needs an nn.Module; got {type(model).__name__}")
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    handles = []

    def watch(name: str, module: nn.Module) -> None:
        def before(mod, args, kwargs):
            found = _first_nonfinite(_input_tensor(args, kwargs))
            if found is not None:
                _raise("input to", name, mod, found)

        def after(mod, args, kwargs, output):
            found = _first_nonfinite(_first_tensor(output))
            if found is not None:
                _raise("output in", name, mod, found)

        handles.append(module.register_forward_pre_hook(before, with_kwargs=True))
        handles.append(module.register_forward_hook(after, with_kwargs=True))

    try:
        for name, module in model.named_modules():
            if isinstance(module, WATCHED) or (module is head and head is not None):
                watch(name or type(module).__name__, module)
        yield model
    finally:
        for h in handles:
            h.remove()
