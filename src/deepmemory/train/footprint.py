"""The least memory a training run needs, and the most a device has: what lets ``deepmemory train``
refuse a ``--batch-size`` or ``--seq-len`` that cannot fit before it reads data or allocates a batch.

The estimate is a lower bound, not a forecast (docs/security.md): a run refused by it cannot fit,
while a run it lets through may still run out of memory (the command line then exits with its
one line, code 4). Per process:

* weights, gradients and AdamW's two moments in float32: ``16`` bytes per parameter (divided
  over the processes under FSDP);
* activations: at least one bfloat16 value per token, channel and layer (a block's input, what
  gradient checkpointing keeps) plus the float32 logits, ``micro x seq_len x (2 x hidden x layers
  + 4 x vocab)`` bytes for the ``micro`` sequences of one micro-step; the presets keep 10 to 700
  times the first term without checkpointing (``saved_for_backward_mib`` in deepmemory.bench);
* the global batch of int64 token ids, which every process draws whole: ``8 x batch x (seq_len + 1)``.

The device has its total memory: the host's RAM and swap (capped by a cgroup limit) for the CPU,
``total_memory`` for a CUDA device.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

BYTES_PER_PARAMETER = 16  # float32 weight + gradient + AdamW's exp_avg and exp_avg_sq
ACTIVATION_BYTES = 2  # per token, channel and layer: one bfloat16 value (a block's input)
LOGIT_BYTES = 4  # per token and vocabulary entry: the float32 logits of the loss
TOKEN_ID_BYTES = 8  # int64


@dataclass(frozen=True)
class Footprint:
    """A training run's least memory per process, in bytes, by part (all ``int >= 0``)."""

    state: int  # weights, gradients, optimizer moments
    activations: int  # one micro-step's activations and logits
    token_ids: int  # the global batch of token ids

    @property
    def total(self) -> int:
        return self.state + self.activations + self.token_ids


def training_footprint(
    parameters: int,
    hidden_size: int,
    num_layers: int,
    vocab_size: int,
    micro_batch: int,
    seq_len: int,
    global_batch: int,
    shards: int = 1,
) -> Footprint:
    """The lower bound of the module docstring for one process.

    Args:
        parameters: the model's parameter count (``int >= 0``).
        hidden_size, num_layers, vocab_size: the model's width, depth and vocabulary (``int >= 1``).
        micro_batch: sequences this process runs per micro-step (``int >= 1``).
        seq_len: tokens per sequence (``int >= 1``).
        global_batch: sequences per optimizer step over all processes (``int >= 1``).
        shards: processes the weights and optimizer state are divided over (FSDP), else 1.

    Returns:
        a :class:`Footprint` (exact Python ints: no overflow for any request).
    """
    return Footprint(
        state=BYTES_PER_PARAMETER * parameters // max(1, shards),
        activations=micro_batch * seq_len * (ACTIVATION_BYTES * hidden_size * num_layers + LOGIT_BYTES * vocab_size),
        token_ids=TOKEN_ID_BYTES * global_batch * (seq_len + 1),
    )


def least_parameters(fields: dict[str, Any]) -> int:
    """A lower bound on the parameter count of a model config with these fields (a
    ``DeepMemoryConfig``'s, or a preset's size fields merged with overrides), computed without
    building anything: a config asking for more than memory holds is refused before its layer
    list or its modules are made. Every block has two norms, a SwiGLU (``3 x hidden x
    intermediate``) and query, key and value projections (``3 x hidden x heads x head_dim``); the
    model an embedding (``vocab x hidden``) and persistent tokens. A field that is missing or not a
    positive int counts as 1."""

    def get(*names: str) -> int:
        for name in names:
            value = fields.get(name)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
        return 1

    hidden, layers = get("hidden_size"), get("num_hidden_layers", "num_layers")
    heads = get("num_attention_heads", "num_heads")
    head_dim = get("head_dim") if "head_dim" in fields and fields["head_dim"] is not None else max(1, hidden // heads)
    per_layer = 2 * hidden + 3 * hidden * get("intermediate_size") + 3 * hidden * heads * head_dim
    persistent = get("num_persistent") if fields.get("num_persistent") else 0
    return get("vocab_size") * hidden + layers * per_layer + persistent * hidden


def check_weights_fit(parameters: int, what: str, error: type) -> None:
    """Raise ``error`` (one line) when ``parameters`` float32 weights exceed this machine's memory
    (:func:`host_memory`): the model could not even be built. ``what`` names the request."""
    have = host_memory()
    if have is not None and 4 * parameters > have:
        raise error(
            f"{what} describes at least {parameters:,} parameters, {gib(4 * parameters)} of float32 weights: "
            f"more than this machine's {gib(have)}"
        )


def _cgroup_limit() -> int | None:
    """The memory limit of this process's cgroup (v2 or v1), or None when there is none."""
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path) as f:
                text = f.read().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 2**62:  # v1 writes a huge number for "no limit"
            return int(text)
    return None


def host_memory() -> int | None:
    """Bytes of RAM plus swap of this machine (``/proc/meminfo``, else ``sysconf``), capped by the
    cgroup limit; None where neither can be read."""
    total = None
    try:
        with open("/proc/meminfo") as f:
            fields = {line.split(":")[0]: line.split()[1] for line in f if ":" in line}
        total = 1024 * (int(fields["MemTotal"]) + int(fields.get("SwapTotal", 0)))
    except (OSError, KeyError, ValueError, IndexError):
        try:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (AttributeError, ValueError, OSError):
            pass
    limit = _cgroup_limit()
    if total is None:
        return limit
    return min(total, limit) if limit is not None else total


def device_memory(device: torch.device) -> int | None:
    """Total bytes of ``device``: :func:`host_memory` for the CPU, ``total_memory`` for CUDA;
    None when unknown (then nothing is refused)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    if device.type == "cpu":
        return host_memory()
    return None


def gib(n: int) -> str:
    """Bytes as ``12.3 GiB`` (or ``MiB`` below one GiB; ``PiB`` above a thousand TiB: a request may be absurd)."""
    for unit, scale in (("PiB", 2**50), ("TiB", 2**40), ("GiB", 2**30)):
        if n >= scale:
            return f"{n / scale:,.1f} {unit}"
    return f"{n / 2**20:.1f} MiB"


def check_fits(
    need: Footprint,
    device: torch.device,
    batch_size: int,
    seq_len: int,
    parameters: int,
    micro_batch: int,
    have: int | None = None,
) -> None:
    """``ConfigError`` (one line, with the numbers) when ``need`` exceeds the memory of ``device``
    (``have`` bytes; default :func:`device_memory`). ``batch_size``, ``seq_len``, ``parameters``
    and ``micro_batch`` are what the message names."""
    from .config import ConfigError

    have = device_memory(device) if have is None else have
    if have is None or need.total <= have:
        return
    raise ConfigError(
        f"--batch-size {batch_size} x --seq-len {seq_len} cannot fit: the run needs at least {gib(need.total)} per "
        "process "
        f"({gib(need.state)} of weights, gradients and AdamW moments for {parameters:,} parameters, "
        f"{gib(need.activations)} "
        f"of activations for {micro_batch:,} sequences per micro-step, {gib(need.token_ids)} of token ids for the "
        "global "
        f"batch) and {device.type} has {gib(have)}; lower --batch-size or --seq-len, or raise --grad-accum "
        "(docs/security.md: a lower bound)"
    )
