#!/usr/bin/env bash
# The CPU benchmark tables of docs/benchmarks.md (two threads, as recorded). Run on an otherwise idle machine:
#   bash benchmarks/run_cpu.sh            # writes benchmarks/results/*.txt and *.png
set -euo pipefail
cd "$(dirname "$0")/.."
out=benchmarks/results
mkdir -p "$out"
run() {  # run NAME COMMAND...: print the command and its output into $out/NAME.txt
    local name=$1; shift
    { echo "\$ $*"; echo "# $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores, torch $(python -c 'import torch; print(torch.__version__)')"; "$@"; } 2>&1 | tee "$out/$name.txt"
}

run mixer_vs_titans deepmemory bench mixer --threads 2 --seq 1024 4096 --chunk 16 64 --plot "$out/mixer_vs_titans.png"
run mixer_vs_titans_rounds deepmemory bench mixer --threads 2 --seq 4096 --chunk 16 64 \
    --mixers memory-token memory-chunk titans-pytorch --no-flops --plot "" --rounds 3
run mixer_scaling deepmemory bench mixer --threads 2 --seq 1024 4096 16384 32768 --chunk 16 \
    --mixers memory-token memory-chunk gated-deltanet attention --repeat 1 --plot "$out/mixer_scaling.png"
run model deepmemory bench model --threads 2 --size tiny --seq 1024
run decode deepmemory bench decode --threads 2 --size tiny --context 1024 16384 131072 1048576 --plot "$out/decode.png"
run op deepmemory bench op --threads 2 --seq 1024 4096 --chunk 16 64
# flat scaling: round-robin rounds and medians, because this machine's throughput drifts within minutes
run flat_scaling_rounds deepmemory bench mixer --threads 2 --seq 1024 32768 --chunk 16 64 --mixers memory-token --no-flops \
    --plot "" --rounds 3
# the same with freed memory kept in the process (no page faults after the warm-up step)
run flat_scaling_kept deepmemory bench mixer --threads 2 --seq 1024 32768 --chunk 16 64 --mixers memory-token --no-flops \
    --plot "" --rounds 3 --keep-freed-memory
# the Triton kernels compiled for an H100 (sm_90) without one: shared memory, registers, spills
run triton_resources python -m deepmemory.bench.triton_resources --dtype bf16 --chunk 16 32 64
