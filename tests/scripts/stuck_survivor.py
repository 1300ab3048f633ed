"""Generation 0: rank 1 exits 1 right after joining the group, while rank 0 ignores SIGTERM
and blocks, like a rank stuck in an NCCL collective with a dead peer. Generation 1: both
finish. TorchElastic alone SIGTERMs rank 0 and waits 30 s before its SIGKILL."""
import os
import signal
import sys

import torch.distributed as dist

generation = int(os.environ["TORCHELASTIC_RESTART_COUNT"])
rank = int(os.environ["RANK"])
if generation == 0 and rank == 0:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # before joining: rank 1 exits only after both joined
dist.init_process_group("gloo")
if generation == 0:
    if rank == 1:
        sys.exit(1)
    signal.pause()  # no signal it handles ever comes: only a SIGKILL ends it
print(f"stuck_survivor: generation {generation} rank {rank} done", flush=True)
dist.destroy_process_group()
