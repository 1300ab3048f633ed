"""A torchrun-compatible script that knows nothing of this project: plain
init_process_group, some all_reduces, and in generations 0..K-1 one rank SIGKILLs itself.
Used to show that ftlaunch's restarts work for any script, not only ours."""

import os
import signal
import sys

import torch
import torch.distributed as dist

kills = int(sys.argv[1])
generation = int(os.environ["TORCHELASTIC_RESTART_COUNT"])
dist.init_process_group("gloo")
rank = dist.get_rank()
x = torch.ones(1000)
for i in range(100):
    dist.all_reduce(x)
    if generation < kills and rank == generation % dist.get_world_size() and i == 20:
        os.kill(os.getpid(), signal.SIGKILL)
print(f"generation {generation} rank {rank} finished", flush=True)
dist.destroy_process_group()
