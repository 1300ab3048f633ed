"""Two ranks load a checkpoint; a read fails on one rank only (an injected OSError, as a
bad disk sector on one node would give). Every rank must raise the same CheckpointError
naming that rank (written to ROOT/outcome-RANK.txt), and none may return as if loaded: each rank reads alone, so the ranks'
agreement on the outcome is all that keeps rank 0 from training on.

    torchrun --nproc-per-node=2 load_fails_on_one_rank.py ROOT FAILING_RANK
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from checkpoint import CheckpointError, CheckpointManager  # noqa: E402
from checkpoint.reader import DirectFileSystemReader  # noqa: E402

root, failing = sys.argv[1], int(sys.argv[2])
dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(0)
model = torch.nn.Linear(64, 64)
mgr = CheckpointManager(root, model=model)
mgr.save(10)
if rank == failing:
    def broken(self, *args):
        raise OSError(f"injected read error on rank {rank}")
    DirectFileSystemReader._read_into_target = broken
try:
    mgr.load()
    outcome = "loaded"
except CheckpointError as e:
    outcome = f"CheckpointError: {e}"
Path(root, f"outcome-{rank}.txt").write_text(outcome)
mgr.close()
dist.destroy_process_group()
