"""A torchrun script that never imports this project: DDP, SGD, all_reduce, nothing else.

    plain_ddp.py STEPS [--optimizer] [--stop-rank R --stop-step N]

Trains (``--optimizer``) or only all_reduces for STEPS steps of at least 10 ms each. With ``--stop-rank``, that rank
SIGSTOPs itself after step N in generation 0 (a frozen worker, to be found by the hang
detector from its optimizer steps alone)."""

import argparse
import os
import signal
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

parser = argparse.ArgumentParser()
parser.add_argument("steps", type=int)
parser.add_argument("--optimizer", action="store_true")
parser.add_argument("--stop-rank", type=int, default=-1)
parser.add_argument("--stop-step", type=int, default=0)
args = parser.parse_args()

dist.init_process_group("gloo")
rank, generation = dist.get_rank(), int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))
torch.manual_seed(0)
model = DDP(torch.nn.Linear(8, 1))
opt = torch.optim.SGD(model.parameters(), lr=0.01)
step = 0
while step < args.steps:
    if args.optimizer:
        opt.zero_grad()
        model(torch.randn(4, 8)).sum().backward()
        opt.step()
    else:
        dist.all_reduce(torch.ones(4))
    step += 1
    if generation == 0 and rank == args.stop_rank and step == args.stop_step:
        os.kill(os.getpid(), signal.SIGSTOP)
    time.sleep(0.01)  # sleep-ok: paces a toy training step
print(f"plain done rank {rank} generation {generation} steps {step}", flush=True)
dist.destroy_process_group()
