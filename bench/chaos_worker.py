"""A DDP training script that uses only the checkpoint library (no launcher.worker, no
trainer), as a user who read the README would write it: dropout, AdamW, LambdaLR, a data
cursor in a plain dict, saves every N steps. The chaos campaign runs it under ftlaunch.

    chaos_worker.py CKPT_DIR STEPS SAVE_EVERY STEP_LOG

Each finished step appends ``{"gen", "pid", "step", "t"}`` to STEP_LOG (one file per rank:
STEP_LOG.rank<R>), which the campaign reads to measure what a fault cost, independently of
ftlaunch's own summary.
"""

import json
import os
import sys
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from checkpoint import CheckpointManager

ckpt_dir, total, save_every, step_log = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Dropout(0.1), torch.nn.Linear(64, 1))
ddp = DDP(model)
optimizer = torch.optim.AdamW(ddp.parameters(), lr=1e-3)
scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1 + s / 100))
data = {"position": 0}  # global sample position: the data cursor
torch.manual_seed(1000 + rank)  # per-rank stream (dropout), saved with the checkpoint
ckpt = CheckpointManager(ckpt_dir, model=ddp, optimizer=optimizer, scheduler=scheduler, state={"data": data},
                         save_every_steps=save_every, keep_last=0)
resumed = ckpt.load()
generator = torch.Generator().manual_seed(7)
inputs, targets = torch.randn(4096, 16, generator=generator), torch.randn(4096, 1, generator=generator)
log = open(f"{step_log}.rank{rank}", "a")
generation = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))
for step in range((resumed.step if resumed else 0) + 1, total + 1):
    start = (data["position"] + rank * 16) % 4096
    x, y = inputs[start:start + 16], targets[start:start + 16]
    loss = torch.nn.functional.mse_loss(ddp(x), y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    scheduler.step()
    data["position"] = (data["position"] + 16 * world) % 4096
    log.write(json.dumps({"gen": generation, "pid": os.getpid(), "step": step, "t": time.time()}) + "\n")
    log.flush()
    ckpt.maybe_save(step, {"loss": loss.item()})
    time.sleep(0.02)  # sleep-ok: a step of realistic length, so faults land mid-run
ckpt.save(total)
ckpt.close()
dist.destroy_process_group()
