"""One walker for every recurrent state of the library.

A state is a dataclass (a :class:`State`) whose fields are tensors, other states, dicts, lists or
tuples of them, or plain values (ints, settings), which are kept as they are. ``map_tensors``
applies a function to every tensor in it and returns a new state of the same structure; the
layers' states, the model cache and the op's ``MemoryState`` all move, detach and select batch
rows through it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor


class State:
    """Mixin of a state dataclass: ``map(fn)`` and ``detach()`` through :func:`map_tensors`."""

    def map(self, fn: Callable[[Tensor], Tensor]):
        """A copy with ``fn`` applied to every tensor (detach, move, select batch rows)."""
        return map_tensors(self, fn)

    def detach(self):
        """A copy cut from the autograd graph (truncated backpropagation through time)."""
        return self.map(torch.Tensor.detach)


def map_tensors(state: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    """``state`` with ``fn`` applied to every tensor in it: in :class:`State` dataclasses, dicts,
    lists and tuples, recursively; anything else (None, ints, settings) is returned as it is."""
    if isinstance(state, Tensor):
        return fn(state)
    if isinstance(state, dict):
        return {k: map_tensors(v, fn) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(map_tensors(v, fn) for v in state)
    if isinstance(state, State) and dataclasses.is_dataclass(state):
        fields = [f.name for f in dataclasses.fields(state) if f.init]
        return dataclasses.replace(state, **{name: map_tensors(getattr(state, name), fn) for name in fields})
    return state


def check_state_fits(state: Any, x: Tensor, name: str = "state") -> None:
    """Raise a one-line ``ValueError`` unless every tensor in ``state`` (all batch-first) has the
    batch size ``x.shape[0]`` and the device of the input ``x``: a state continues the sequences it
    was made with, on their device (``state.map(lambda t: t.to(device))`` moves one)."""
    for t in tensors(state):
        if t.device != x.device:
            raise ValueError(
                f"the {name} is on {t.device} but the input is on {x.device}; move it with "
                f"{name}.map(lambda t: t.to(device)) or start a new one"
            )
        if t.dim() == 0 or t.shape[0] != x.shape[0]:
            raise ValueError(
                f"the {name} holds {t.shape[0] if t.dim() else 0} sequence(s) but the input has a batch of "
                f"{x.shape[0]}; continue a {name} with the batch it was made with"
            )


def tensors(state: Any) -> list[Tensor]:
    """Every tensor in ``state``, in the order :func:`map_tensors` visits them (a walk that reads the
    state without rebuilding it: the cache checks every layer's state at each decoded token)."""
    found: list[Tensor] = []
    _collect(state, found)
    return found


def _collect(state: Any, found: list[Tensor]) -> None:
    if isinstance(state, Tensor):
        found.append(state)
    elif isinstance(state, State):
        for name in _init_fields(type(state)):
            _collect(getattr(state, name), found)
    elif isinstance(state, dict):
        for v in state.values():
            _collect(v, found)
    elif isinstance(state, (list, tuple)):
        for v in state:
            _collect(v, found)


_FIELDS: dict[type, tuple[str, ...]] = {}


def _init_fields(cls: type) -> tuple[str, ...]:
    """The fields :func:`map_tensors` visits of a :class:`State` class (none if it is no dataclass)."""
    names = _FIELDS.get(cls)
    if names is None:
        names = tuple(f.name for f in dataclasses.fields(cls) if f.init) if dataclasses.is_dataclass(cls) else ()
        _FIELDS[cls] = names
    return names
