"""Worker for bench/restart_reliability.py: join the group (stock or ours), run collectives,
and in generation 0 let rank 1 SIGKILL itself mid-way, so torchrun must restart the group."""

import os
import signal
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

if os.environ["INIT_MODE"] == "stock":
    dist.init_process_group("gloo")
else:
    from launcher.worker import init_process_group

    init_process_group("gloo")
generation = int(os.environ["TORCHELASTIC_RESTART_COUNT"])
x = torch.ones(1000)
for i in range(200):
    dist.all_reduce(x)
    if generation == 0 and dist.get_rank() == 1 and i == 50:
        os.kill(os.getpid(), signal.SIGKILL)
print(f"generation {generation} rank {dist.get_rank()} finished", flush=True)
dist.destroy_process_group()
