"""Where one decoded token goes, per preset: the parts of the step, its operations, and its top kernels.

    python benchmarks/decode_profile.py --models transformer titans-lmm titans-mac atlas --context 1024 --steps 32
    python benchmarks/decode_profile.py --models titans-lmm --chunk-path   # the memory op's chunk form for the token

For each preset (tiny, one thread, no gradients): read ``--context`` tokens through the cache, then
decode ``--steps`` tokens one at a time, three times over: once timing the parts (the CPU time of
this thread inside each wrapped function; a part's own time excludes the parts inside it), once
counting the ATen operations each part dispatches (views included), once under ``torch.profiler``
for the operations that take the most CPU time. ``--chunk-path`` makes ``neural_memory`` read the
token through its chunk form (the path before the decode step of ``deepmemory.ops.recurrent``).

Parts: ``model`` (embedding, cache checks, final norm, LM head, Hugging Face outputs), ``block``
(pre-norms, residuals, MAC's segment bookkeeping), ``mlp`` (the SwiGLU with its norm), ``attention``
(projections, RoPE, SDPA), ``mac retrieve`` (MAC's read of the memory at its segment start),
``memory layer`` (q/k/v projections and convs, feature map, gates, output gate and projection),
``memory op checks`` (``neural_memory``'s argument checks and layout) and ``memory op`` (the decode
step, or the chunk form).
"""

from __future__ import annotations

import argparse
import collections
import functools
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import deepmemory.layers.attention as attention
import deepmemory.layers.blocks as blocks
import deepmemory.layers.memory_layer as memory_layer
import deepmemory.ops.api as api
from deepmemory.models import build, modeling

# (owner, attribute, part): the functions timed, outermost first; a part nested in itself counts once
PARTS = [
    (modeling.DeepMemoryForCausalLM, "forward", "model"),
    (modeling.DeepMemoryModel, "_call_block", "block"),
    (blocks._Block, "finish", "mlp"),
    (attention.Attention, "forward", "attention"),
    (attention.Attention, "attend", "attention"),
    (attention.Attention, "attend_queries", "attention"),
    (attention.Attention, "queries", "attention"),
    (attention.Attention, "keys_values", "attention"),
    (blocks.MACBlock, "retrieve", "mac retrieve"),
    (memory_layer.NeuralMemory, "forward", "memory layer"),
    (memory_layer, "neural_memory", "memory op checks"),
    (api, "memory_step", "memory op"),
    (api.IMPLS, "chunk", "memory op"),
]
ORDER = ["model", "block", "mlp", "attention", "mac retrieve", "memory layer", "memory op checks", "memory op"]


class Parts:
    """Own CPU time (``time.thread_time``) and ATen operations per part, through wrapped functions."""

    def __init__(self) -> None:
        self.stack: list[str] = []
        self.own: collections.Counter = collections.Counter()
        self.ops: collections.Counter = collections.Counter()
        self.t = time.thread_time()

    def _switch(self, to: str | None) -> None:
        now = time.thread_time()
        if self.stack:
            self.own[self.stack[-1]] += now - self.t
        self.t = now

    def wrap(self, fn, part: str):
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            nested = bool(self.stack) and self.stack[-1] == part
            if not nested:
                self._switch(part)
                self.stack.append(part)
            try:
                return fn(*args, **kwargs)
            finally:
                if not nested:
                    self._switch(None)
                    self.stack.pop()

        return timed

    def install(self) -> list:
        undo = []
        for owner, name, part in PARTS:
            if not (name in owner if isinstance(owner, dict) else hasattr(owner, name)):
                continue  # (a function this version of the library does not have)
            if isinstance(owner, dict):
                fn = owner[name]
                owner[name] = self.wrap(fn, part)
                undo.append(lambda owner=owner, name=name, fn=fn: owner.__setitem__(name, fn))
            else:
                fn = getattr(owner, name)
                setattr(owner, name, self.wrap(fn, part))
                undo.append(lambda owner=owner, name=name, fn=fn: setattr(owner, name, fn))
        return undo


class Count(TorchDispatchMode):
    def __init__(self, parts: Parts) -> None:
        super().__init__()
        self.parts = parts

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.parts.ops[self.parts.stack[-1] if self.parts.stack else "model"] += 1
        return func(*args, **(kwargs or {}))


def profile(name: str, context: int, steps: int, chunk_path: bool, top: int) -> None:
    torch.manual_seed(0)
    model = build(name, "tiny").eval()
    vocab = model.config.vocab_size
    supported = getattr(api, "step_supported", None)  # (None: a version without the decode step)
    if chunk_path and supported is not None:
        api.step_supported = lambda rule: False
    try:
        with torch.no_grad():
            cache = None
            for lo in range(0, context, 4096):
                ids = torch.randint(0, vocab, (1, min(4096, context - lo)))
                cache = model(input_ids=ids, past_key_values=cache, use_cache=True).past_key_values
            tok = torch.randint(0, vocab, (1, 1))

            def decode(n: int) -> None:
                for _ in range(n):
                    model(input_ids=tok, past_key_values=cache, use_cache=True)

            decode(4)  # warm-up
            t0 = time.thread_time()
            decode(steps)
            plain = (time.thread_time() - t0) / steps * 1e3
            parts = Parts()
            undo = parts.install()
            try:
                decode(steps)
                own = collections.Counter(parts.own)
                with Count(parts):
                    decode(steps)
            finally:
                for u in undo:
                    u()
            from torch.profiler import ProfilerActivity
            from torch.profiler import profile as torch_profile

            with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
                decode(steps)
    finally:
        if supported is not None:
            api.step_supported = supported
    path = "chunk form" if chunk_path or supported is None else "decode step"
    total_ops = sum(parts.ops.values()) / steps
    print(f"\n{name}, context {context}, memory op: {path}: {plain:.2f} ms/token (CPU), {total_ops:.0f} ATen ops/token")
    timed = sum(own.values())
    print(f"{'part':>18}  {'ms/token':>8}  {'share':>6}  {'ATen ops/token':>14}")
    for part in ORDER:
        if own[part] or parts.ops[part]:
            print(
                f"{part:>18}  {own[part] / steps * 1e3:8.3f}  {own[part] / timed:6.1%}  {parts.ops[part] / steps:14.0f}"
            )
    print(f"top {top} ATen operations by self CPU time (torch.profiler, {steps} tokens):")
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top)
    print("\n".join(line for line in table.splitlines() if line.strip()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["transformer", "titans-lmm", "titans-mac", "atlas"])
    ap.add_argument("--context", type=int, default=1024, help="tokens read before decoding; default 1024")
    ap.add_argument("--steps", type=int, default=32, help="tokens decoded per measurement; default 32")
    ap.add_argument("--chunk-path", action="store_true", help="read the token through the memory op's chunk form")
    ap.add_argument("--top", type=int, default=12, help="rows of the torch.profiler table; default 12")
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(f"# {time.strftime('%Y-%m-%d')}, torch {torch.__version__}, one thread, tiny, batch 1, no gradients")
    for name in args.models:
        profile(name, args.context, args.steps, args.chunk_path, args.top)


if __name__ == "__main__":
    main()
