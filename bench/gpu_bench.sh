#!/usr/bin/env bash
# The checkpoint benchmark on a lent GPU machine (one short run; uses the machine's own
# python3/torch, PYTHONPATH points at this checkout). Writes its reports under $OUT.
#   1. bench/gpu_check.sh: CUDA + NCCL trainer (async saves from pinned staging), SIGKILL +
#      restart, bitwise comparison with an uninterrupted run;
#   2. the benchmark with the model on the GPU (1 rank, NCCL): staging is a device->host copy;
#   3. the CPU benchmark (2 ranks, gloo) on this machine's 16 cores: the writer thread has
#      spare cores here, unlike on the 2-core CI machine.
set -uo pipefail
export PYTHONPATH=$PWD OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu-bench}; mkdir -p "$OUT"
filter() { grep -v -E "^W[0-9]{4} |\*\*\*\*\*|OMP_NUM_THREADS" || true; }
echo "== 1. gpu_check"; timeout 120 bash bench/gpu_check.sh 2>&1 | filter | tail -8
echo "== 2. benchmark, model on the GPU"
timeout 230 python3 bench/checkpoint_bench.py --device cuda --ranks 1 --state-mb 1000 --saves 3 --rounds 3 \
    --out "$OUT/cuda" 2>&1 | filter | grep -v -E "UserWarning|local_plan =" | tail -22
echo "== 3. benchmark, CPU, 2 ranks, 16 cores"
timeout 150 python3 bench/checkpoint_bench.py --saves 3 --rounds 4 --out "$OUT/cpu16" 2>&1 | filter \
    | grep -v -E "UserWarning|local_plan =" | tail -22
rm -rf "$OUT"/*/ckpt
