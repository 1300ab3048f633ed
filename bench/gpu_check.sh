#!/usr/bin/env bash
# One short script for a lent GPU machine (CUDA + NCCL path of the trainer and checkpoints).
# Runs with the machine's own python3/torch: PYTHONPATH points at this checkout.
set -uo pipefail
export PYTHONPATH=$PWD OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu-check}; mkdir -p "$OUT"; W=$(mktemp -d)
nvidia-smi -L; python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
ARGS="--epochs 4 --save-every-steps 10 --log-every 30"
echo "== straight run, 1 GPU, nccl"; python3 -m torch.distributed.run --standalone --nproc-per-node=1 train.py --ckpt-dir $W/a $ARGS 2>&1 | tail -4
echo "== SIGKILL at step 35, restart"; python3 -m torch.distributed.run --standalone --nproc-per-node=1 --max-restarts=1 --monitor-interval=0.1 train.py --ckpt-dir $W/b $ARGS --inject kill:rank=0:step=35 2>&1 | grep -E "fault|exitcode|resumed|final|Error" | head
echo "== no process group (python train.py) on the GPU"; python3 train.py --ckpt-dir $W/c $ARGS 2>&1 | tail -2
python3 - "$W" <<'PY'
import sys, torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
w = sys.argv[1]
def load(d):
    dcp_to_torch_save(f"{w}/{d}/step-00000092", f"{w}/{d}.pt"); return torch.load(f"{w}/{d}.pt", weights_only=False)
a, b, c = load("a"), load("b"), load("c")
def flat(x, p=""):
    if isinstance(x, dict):
        for k, v in x.items(): yield from flat(v, f"{p}{k}.")
    elif isinstance(x, torch.Tensor): yield p, x
ta = dict(flat({"model": a["model"], "optim": a["optim"]})); tb = dict(flat({"model": b["model"], "optim": b["optim"]}))
print("kill+resume bitwise equal to straight run on GPU:", ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta), len(ta), "tensors")
print("cuda rng saved:", "cuda" in a["rng"]["rank_0"], "| device of saved tensors:", next(iter(ta.values())).device)
PY
