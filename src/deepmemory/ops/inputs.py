"""The input checks every op of ``deepmemory.ops`` shares: one-line errors naming the argument."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The precision the ops compute in: float64 stays, everything else runs in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_sequence(q, k, v, lr) -> tuple[int, int, int, int, int]:
    """``q, k [B, T, H, dk]``, ``v [B, T, H, dv]``, ``lr [B, T, H]``, all alike (see
    :func:`check_query`); returns ``(B, T, H, dk, dv)``."""
    check_query(q)
    bsz, seq, nh, dk = q.shape
    check_tensor("k", k, (bsz, seq, nh, dk), q)
    check_tensor("v", v, (bsz, seq, nh, None), q)
    check_tensor("lr", lr, (bsz, seq, nh), q)
    return bsz, seq, nh, dk, v.shape[-1]


def check_query(q) -> None:
    """``q`` a 4-dim floating tensor ``[B, T, H, dk]`` with ``T >= 1``."""
    if not isinstance(q, Tensor):
        raise TypeError(f"q must be a torch.Tensor; got {type(q).__name__}")
    if q.dim() != 4:
        raise ValueError(f"q must have 4 dims [B, T, H, dk]; got shape {list(q.shape)}")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise TypeError(f"q must be float16, bfloat16, float32 or float64; got {q.dtype}")
    if q.shape[1] < 1:
        raise ValueError("q must hold at least one token (T >= 1)")


def check_tensor(name: str, x, shape: tuple, like: Tensor) -> None:
    """``x`` a tensor of ``len(shape)`` dims, ``shape`` (None = any), on q's device, in q's dtype."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(x).__name__}")
    if x.dim() != len(shape):
        raise ValueError(f"{name} must have {len(shape)} dims {list(shape)} (None = any); got shape {list(x.shape)}")
    if x.device != like.device:
        raise ValueError(f"{name} is on {x.device} but q is on {like.device}")
    if x.dtype != like.dtype:
        raise TypeError(f"{name} has dtype {x.dtype} but q has {like.dtype}")
    for i, (got, want) in enumerate(zip(x.shape, shape)):
        if want is not None and got != want:
            raise ValueError(f"{name} must have shape {list(shape)} (None = any); got {list(x.shape)} (dim {i})")


def check_weights(weights, names: Sequence[str], what: str, bsz: int, nh: int, q: Tensor, arg: str = "weights") -> None:
    """``weights`` a dict holding exactly ``names``, each a floating ``[H, rows, cols]`` or
    ``[B, H, rows, cols]`` tensor on q's device (``what`` names the memory in the error, ``arg``
    the argument)."""
    if not isinstance(weights, dict):
        raise TypeError(f"{arg} must be a dict of tensors; got {type(weights).__name__}")
    missing = [n for n in names if n not in weights]
    extra = [n for n in weights if n not in names]
    if missing or extra:
        raise ValueError(f"{arg} for {what} must be exactly {list(names)}; missing {missing}, unexpected {extra}")
    for n in names:
        w = weights[n]
        if not isinstance(w, Tensor):
            raise TypeError(f"{arg}[{n!r}] must be a torch.Tensor; got {type(w).__name__}")
        if w.dim() not in (3, 4):
            raise ValueError(f"{arg}[{n!r}] must be [H, rows, cols] or [B, H, rows, cols]; got shape {list(w.shape)}")
        if w.device != q.device:
            raise ValueError(f"{arg}[{n!r}] is on {w.device} but q is on {q.device}")
        if not w.is_floating_point():
            raise TypeError(f"{arg}[{n!r}] must be floating point; got {w.dtype}")
        if w.shape[-3] != nh or (w.dim() == 4 and w.shape[0] != bsz):
            raise ValueError(f"{arg}[{n!r}] has shape {list(w.shape)}; expected leading dims [{nh}] or [{bsz}, {nh}]")


def check_weight_shapes(
    weights: dict[str, Tensor], shapes: dict[str, tuple[int, int]], sizes: str, arg: str = "weights"
) -> None:
    """Each ``weights[name]`` ends in ``shapes[name]`` (``sizes`` says which widths they follow)."""
    for n, (rows, cols) in shapes.items():
        if tuple(weights[n].shape[-2:]) != (rows, cols):
            raise ValueError(f"{arg}[{n!r}] must be [..., {rows}, {cols}] for {sizes}; got {list(weights[n].shape)}")


# ``(name, tensor, low, high)``: ``tensor`` must lie in ``[low, high]`` (``None``: unbounded that side)
Range = tuple[str, Tensor | None, float | None, float | None]
GATE_DIMS = ("batch", "token", "head")


def check_range(
    name: str, x: Tensor | None, low: float | None, high: float | None, dims: Sequence[str] = GATE_DIMS
) -> None:
    """``x`` in ``[low, high]`` (``None``: unbounded that side); see :func:`check_ranges`."""
    check_ranges([(name, x, low, high)], dims)


def check_ranges(ranges: Sequence[Range], dims: Sequence[str] = GATE_DIMS) -> None:
    """Each ``(name, x, low, high)`` of ``ranges`` (``x`` None: skipped; ``low``/``high`` None:
    unbounded that side) has every element in ``[low, high]``, else a one-line ``ValueError``
    naming the first offender, its value and position, e.g. ``lr must be >= 0; got -0.3 at
    [batch 0, token 5, head 1]`` (``dims`` names the dimensions).

    - NaN passes: the test is ``(x < low) | (x > high)``, False for NaN, so a NaN gate is not a
      range error: it reaches the op, which is to propagate it causally (to the outputs at and
      after its token) rather than fail the whole call. ``inf`` passes where the side is unbounded.
    - Cost: one fused reduction and one host sync per call (a device sync on GPU), whatever the
      number of tensors: the out-of-range masks of tensors of one shape are or-ed together
      (others are reduced each and stacked) and ``.any()`` is read once; only when it is True is
      the culprit located.
    - Skipped while ``torch.compile`` traces (``torch.compiler.is_compiling()``: a data-dependent
      branch would break the graph) and on the meta device (no values): compiled and traced code
      runs unchecked.
    """
    live = [(n, x, lo, hi) for n, x, lo, hi in ranges if x is not None and (lo is not None or hi is not None)]
    if not live or torch.compiler.is_compiling() or any(x.device.type == "meta" for _, x, _, _ in live):
        return
    masks = [_outside(x, lo, hi) for _, x, lo, hi in live]
    if all(m.shape == masks[0].shape for m in masks):
        fused = masks[0]
        for m in masks[1:]:
            fused = fused | m
        bad = fused.any()
    else:
        bad = torch.stack([m.any() for m in masks]).any()
    if not bad.item():
        return
    for (name, x, lo, hi), m in zip(live, masks):
        hits = m.nonzero()
        if hits.shape[0]:
            idx = tuple(hits[0].tolist())
            at = ", ".join(f"{d} {i}" for d, i in zip(dims, idx)) if len(dims) == len(idx) else ", ".join(map(str, idx))
            if lo is not None and hi is not None:
                want = f"in [{lo:g}, {hi:g}]"
            else:
                want = f">= {lo:g}" if lo is not None else f"<= {hi:g}"
            raise ValueError(f"{name} must be {want}; got {_shortest(x[idx].item(), x.dtype)} at [{at}]")


def _outside(x: Tensor, low: float | None, high: float | None) -> Tensor:
    if low is not None and high is not None:
        return (x < low) | (x > high)
    if low is not None:
        return x < low
    assert high is not None  # the caller passes only ranges bounded on some side
    return x > high


def _shortest(value: float, dtype: torch.dtype) -> str:
    """``value`` with the fewest digits that give it back in ``dtype`` (``-0.3``, not float32's
    ``-0.30000001192092896``)."""
    for digits in range(1, 18):
        text = f"{value:.{digits}g}"
        if torch.tensor(float(text), dtype=dtype).item() == value:
            return text
    return repr(value)


def rule_mismatch(was, now) -> str:
    """The one-line error for a state made under another rule: the fields that differ."""
    a, b = was.to_dict(), now.to_dict()
    diff = [k for k in b if a[k] != b[k]]
    return (
        "initial_state was made with settings "
        + ", ".join(f"{k}={a[k]!r}" for k in diff)
        + ", not "
        + ", ".join(f"{k}={b[k]!r}" for k in diff)
    )
