"""Process-group plumbing for ``torchrun``: DDP, FSDP2, rank-0 logging.

Launched by ``torchrun`` the environment has ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``; without it
the run is a single process and nothing here talks to ``torch.distributed``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn


@dataclass
class Env:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def setup(device: str) -> Env:
    """Pick the device (``auto``: CUDA when present) and join the process group under torchrun."""
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Env(device=torch.device("cuda" if use_cuda else "cpu"))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return Env(
        rank=rank,
        world=world,
        local_rank=local_rank,
        device=torch.device("cuda", local_rank) if use_cuda else torch.device("cpu"),
    )


def teardown(env: Env) -> None:
    if env.distributed and dist.is_initialized():
        dist.destroy_process_group()


def barrier(env: Env) -> None:
    if env.distributed:
        dist.barrier()


def all_sum(env: Env, values: list[float]) -> list[float]:
    """Sum a few float64 numbers over ranks."""
    if not env.distributed:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=env.device)
    dist.all_reduce(t)
    return t.tolist()


def broadcast_str(env: Env, text: str | None) -> str:
    """Rank 0's ``text`` on every rank (the run directory name, for one)."""
    if not env.distributed:
        return text
    box = [text]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def first_error(env: Env, message: str | None) -> str | None:
    """The first rank's error message, on every rank, so that all ranks stop together."""
    if not env.distributed:
        return message
    boxes = [None] * env.world
    dist.all_gather_object(boxes, message)
    return next((m for m in boxes if m), None)


def blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a model: the entries of its first ``nn.ModuleList``."""
    for module in model.modules():
        if isinstance(module, nn.ModuleList):
            return list(module)
    return []


def unused_parameters(model: nn.Module, seq_len: int, device: torch.device) -> list[str]:
    """Names of the trainable parameters of a causal LM ``model`` that get no gradient from one
    training forward and backward of a sequence of ``seq_len`` tokens (random ids below
    ``model.config.vocab_size``, the same on every rank): what DDP must be told of. A memory that
    updates once per chunk (``granularity="chunk"``) never updates on a sequence shorter than a
    chunk, which leaves its key, value and step-size projections unused, for one. The global RNG
    state and the gradients are left as they were (none)."""
    ids = torch.randint(0, model.config.vocab_size, (1, seq_len), generator=torch.Generator().manual_seed(0)).to(device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        model(input_ids=ids, use_cache=False).logits.float().sum().backward()
    names = [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]
    model.zero_grad(set_to_none=True)
    return names


def wrap(model: nn.Module, env: Env, fsdp: bool, find_unused: bool = False) -> nn.Module:
    """DDP, or FSDP2 (``fully_shard`` per block, then the root) when ``fsdp``. ``find_unused``:
    DDP looks for parameters without gradient at every step (``find_unused_parameters``; see
    :func:`unused_parameters`).

    FSDP2 shards in place and returns the same module; DDP returns a wrapper whose ``.module``
    is the model.
    """
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        for block in blocks(model):
            fully_shard(block)
        fully_shard(model)
        return model
    if env.distributed:
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(
            model,
            device_ids=[env.local_rank] if env.device.type == "cuda" else None,
            find_unused_parameters=find_unused,
        )
    return model


def gather_model_state(model: nn.Module) -> dict:
    """A full, CPU state dict (a collective under FSDP: every rank must call it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def gather_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


def unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)


def grad_norm_clip(parameters, max_norm: float) -> Tensor:
    norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm
