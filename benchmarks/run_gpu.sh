#!/usr/bin/env bash
# The GPU kernel table of docs/benchmarks.md ("GPU kernels"). On an otherwise idle CUDA machine, from the repo root:
#   bash benchmarks/run_gpu.sh                          # writes benchmarks/results/gpu_kernel.txt and .png
#   bash benchmarks/run_gpu.sh stability                # atlas's 2000-step training runs (train_stability_atlas_gpu.txt)
#   FLA_WHEEL_DIR=/path/to/wheels bash benchmarks/run_gpu.sh   # first installs fla-core from a wheel there
set -euo pipefail
cd "$(dirname "$0")/.."
out=benchmarks/results
mkdir -p "$out"
python -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else "run_gpu.sh needs a CUDA GPU")'
if [ -n "${FLA_WHEEL_DIR:-}" ]; then
    # --no-deps: fla-core's one requirement is einops; resolving its extras could replace the CUDA torch
    pip install --no-index --find-links "$FLA_WHEEL_DIR" --no-deps fla-core
fi
versions() {
    python - <<'EOF'
import importlib.metadata as md
import torch

def version(name):
    try:
        return f"{name} {md.version(name)}"
    except md.PackageNotFoundError:
        return f"no {name}"

print(f"# {torch.cuda.get_device_name()}, CUDA {torch.version.cuda}, torch {torch.__version__}, "
      f"{version('triton')}, {version('fla-core')}")
EOF
}
run() {  # run NAME COMMAND...: print the command and its output into $out/NAME.txt
    local name=$1; shift
    { echo "\$ $*"; echo "# $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores"; versions; "$@"; } 2>&1 | tee "$out/$name.txt"
}

case "${1:-kernel}" in
    kernel)  # the kernel table
        run gpu_kernel deepmemory bench kernel --plot "$out/gpu_kernel.png" ;;
    stability)  # tiny atlas (Muon per token) trained 2000 steps on MQAR and on bytes under bf16 autocast
        run train_stability_atlas_gpu python benchmarks/train_stability.py --models atlas --task mqar bytes \
            --steps 2000 --batch 16 --log-every 200 --device cuda --precision bf16 ;;
    *) echo "usage: bash benchmarks/run_gpu.sh [kernel|stability]" >&2; exit 2 ;;
esac
