"""Compile the Triton kernels for a GPU without having one, and print what they need of it.

    python -m deepmemory.bench.triton_resources             # sm_90 (H100), d=64, hidden 256, chunks 16 and 64
    python -m deepmemory.bench.triton_resources --chunk 16 --window 4 --warps 8 --dtype bf16

Triton ships ptxas, so every kernel compiles to a cubin on any machine. The table gives the shared
memory a program takes (an H100 offers 227 KiB), registers per thread (at most 255) and the bytes
ptxas spilled to local memory. ``--dtype bf16`` means bfloat16 inputs, i.e. TF32 products (the kernels see
float32). Exits
with status 1 when a kernel needs more shared memory than an H100 has.
"""

from __future__ import annotations

import argparse
import inspect
import os
import re
import subprocess
import sys
import tempfile
import warnings

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("unset TRITON_INTERPRET: the interpreter does not compile")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.compiler import get_ptxas  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from deepmemory.ops import triton_chunk as tc  # noqa: E402

# Triton 3.9 warns on every compile that its FMA-contraction default will change; the default is what we compile
warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION")

H100_SHARED_KIB = 227


def _ptxas(arch: int) -> str:
    """The path of the ptxas Triton bundles: newer Triton picks it per arch (``get_ptxas(arch)``),
    Triton 3.5 has one for every arch (``get_ptxas()``)."""
    params = inspect.signature(get_ptxas).parameters
    return (get_ptxas(arch) if params else get_ptxas()).path


def compile_kernel(fn, dims: dict, arch: int, warps: int, pointer: str = "*fp32") -> dict:
    """Shared memory (KiB), registers and spilled bytes of ``fn`` compiled for ``sm_<arch>``."""
    sig = {n: "constexpr" if n in dims else "i32" if n == "NC" else pointer for n in fn.arg_names}
    src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(n),): v for n, v in dims.items()})
    kernel = triton.compile(
        src, target=GPUTarget("cuda", arch, 32), options=dict(num_warps=warps, num_stages=tc._LAUNCH["num_stages"])
    )
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "k.ptx")
        with open(ptx, "w") as f:
            f.write(kernel.asm["ptx"])
        suffix = "a" if arch >= 90 else ""
        # the options Triton itself passes to ptxas
        log = subprocess.run(
            [_ptxas(arch), "-v", "--regAllocOptLevel=2", f"--gpu-name=sm_{arch}{suffix}", ptx, "-o", os.devnull],
            capture_output=True,
            text=True,
            check=True,
        ).stderr
    return {
        "shared KiB": kernel.metadata.shared / 1024,
        "registers": int(re.search(r"Used (\d+) registers", log)[1]),
        "spilled B": int(re.search(r"(\d+) bytes spill stores", log)[1]),
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chunk", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--window", type=int, default=1)
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp64"])
    ap.add_argument("--arch", type=int, default=90, help="compute capability as an integer (90: H100)")
    ap.add_argument("--warps", type=int, default=tc._LAUNCH["num_warps"])
    ap.add_argument("--value-block", type=int, default=tc.V_BLOCK, help="rows of the linear state per program")
    ap.add_argument(
        "--hidden-block",
        type=int,
        default=tc.H_BLOCK,
        help="hidden units per sweep step of the mlp (halved for chunks of more than 32 keys)",
    )
    ap.add_argument("--kernels", nargs="+", default=["linear", "mlp"], choices=["linear", "mlp"])
    args = ap.parse_args(argv)
    tc.V_BLOCK, tc.H_BLOCK = args.value_block, args.hidden_block

    d, prec = args.head_dim, "tf32" if args.dtype == "bf16" else "ieee"
    print(f"sm_{args.arch}, d={d}, hidden {args.hidden}, window {args.window}, {args.dtype} inputs, {args.warps} warps")
    print(f"{'kernel':<26}{'chunk':>6}{'block':>6}{'shared KiB':>12}{'registers':>11}{'spilled B':>11}")
    too_large = False
    for b in args.chunk:
        ne = args.window - 1 + b
        cases = []
        if "linear" in args.kernels:
            for opt, mom in (("momentum", True), ("gd", False)):
                dims = tc.linear_dims(b, ne, d, d, True, mom, prec)
                cases += [
                    (f"linear {opt} forward", tc._linear_fwd_kernel, dims),
                    (f"linear {opt} backward", tc._linear_bwd_kernel, dims),
                ]
        if "mlp" in args.kernels:
            dims = tc.mlp_dims(b, ne, d, d, args.hidden, True, True, prec)
            cases += [("mlp forward", tc._mlp_fwd_kernel, dims), ("mlp backward", tc._mlp_bwd_kernel, dims)]
        for name, fn, dims in cases:
            r = compile_kernel(fn, dims, args.arch, args.warps, "*fp64" if args.dtype == "fp64" else "*fp32")
            flag = "  over an H100's shared memory" if r["shared KiB"] > H100_SHARED_KIB else ""
            too_large |= bool(flag)
            block = dims.get("BH", dims["BV"])  # hidden units (mlp) or state rows (linear) per tile
            print(
                f"{name:<26}{b:>6}{block:>6}{r['shared KiB']:>12.0f}{r['registers']:>11}{r['spilled B']:>11}{flag}",
                flush=True,
            )
    sys.exit(1 if too_large else 0)


if __name__ == "__main__":
    main()
