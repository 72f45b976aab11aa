"""Does ``torch.compile`` pay for the decode step on a CPU? The arithmetic of one token of Titans' memory
(tiny: 4 heads of 16, MLP memory of width 64), eager against compiled, and what compiling costs.

    python benchmarks/decode_compile.py

The compiled function is the decode step's arithmetic for window 1 (``deepmemory.ops.recurrent``:
the gradients at the chunk-start weights, the momentum step, the read), with fixed shapes, so it
compiles once (inductor's C++ kernels); the state's bookkeeping (the window, the pending gates) stays
eager. Prints microseconds per call of each, the compile time and the tokens a process must decode
(two memory layers a token) before compiling has paid for itself.
"""

from __future__ import annotations

import time

import torch

from deepmemory.ops.memory import MemorySpec, dense_apply, memory_forward, token_gradients

SPEC = MemorySpec("mlp", 2, "gelu", True, False)


def core(w0, w1, s0, s1, ws0, ws1, k, v, q, lr, mom, dec):
    w, s, ws = {"w0": w0, "w1": w1}, {"w0": s0, "w1": s1}, {"w0": ws0, "w1": ws1}
    grads = token_gradients(SPEC, ws, k, v, "l2")
    retain, rate, keep = (1 - dec).unsqueeze(-1), lr.unsqueeze(-1), mom.unsqueeze(-1)
    s_new = {n: torch.addcmul(-(rate * grads[n][0].mT * grads[n][1]), keep, s[n]) for n in w}
    w_new = {n: torch.addcmul(s_new[n], retain, w[n]) for n in w}
    o = memory_forward(SPEC, dense_apply(w_new), q)
    return o, w_new["w0"], w_new["w1"], s_new["w0"], s_new["w1"]


def per_call(fn, args, n: int = 2000) -> float:
    for _ in range(20):
        fn(*args)
    t = time.process_time()
    for _ in range(n):
        fn(*args)
    return (time.process_time() - t) / n * 1e6


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    b, h, dk, hidden = 1, 4, 16, 64
    mats = [torch.randn(b, h, hidden, dk) / dk**0.5, torch.randn(b, h, dk, hidden) / hidden**0.5]
    args = [*mats, *(0.01 * m for m in mats), *mats]
    args += [torch.nn.functional.normalize(torch.randn(b, h, 1, dk), dim=-1) for _ in range(3)]
    args += [0.02 * torch.rand(b, h, 1), torch.rand(b, h, 1), 0.01 * torch.rand(b, h, 1)]
    with torch.no_grad():
        eager = per_call(core, args)
        t = time.perf_counter()
        compiled_fn = torch.compile(core, dynamic=False, fullgraph=True)
        compiled_fn(*args)
        compile_s = time.perf_counter() - t
        compiled = per_call(compiled_fn, args)
        diff = max((a - c).abs().max().item() for a, c in zip(core(*args), compiled_fn(*args)))
    saved_ms = 2 * (eager - compiled) / 1e3  # two memory layers a token at tiny
    print(f"# {time.strftime('%Y-%m-%d')}, torch {torch.__version__}, one thread, float32")
    print(f"eager:    {eager:7.1f} us/call")
    print(f"compiled: {compiled:7.1f} us/call (largest difference {diff:.1e})")
    print(f"compile:  {compile_s:7.1f} s (inductor, first call)")
    if saved_ms > 0:
        print(f"break-even: {compile_s * 1e3 / saved_ms:,.0f} decoded tokens ({saved_ms:.2f} ms saved a token)")


if __name__ == "__main__":
    main()
