"""Two ranks save steps 10 and 20; then one byte of one shard file of step 20 is flipped (a
same-size corruption only its crc32 sees) and both ranks load. The ranks check the shards'
crc32s a share each while reading them, so the file may be in either rank's share: every
rank must end on step 10, bitwise, and write what it loaded to ROOT/outcome-RANK.txt.

    torchrun --nproc-per-node=2 corrupt_shard_on_load.py ROOT SHARD_INDEX
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.distributed.checkpoint import FileSystemReader  # noqa: E402

from checkpoint import CheckpointManager  # noqa: E402

root, shard_index = Path(sys.argv[1]), int(sys.argv[2])
dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(0)
model = torch.nn.Sequential(*[torch.nn.Linear(32, 32) for _ in range(4)])
mgr = CheckpointManager(root, model=model)
mgr.save(10)
saved = {k: v.clone() for k, v in model.state_dict().items()}
with torch.no_grad():
    for p in model.parameters():
        p.add_(1.0)
mgr.save(20)
dist.barrier()
if rank == 0:
    step_dir = root / "step-00000020"
    shard = sorted(step_dir.glob("*.distcp"))[shard_index]
    metadata = FileSystemReader(str(step_dir)).read_metadata()  # our own file: plain pickle is fine
    info = next(info for index, info in sorted(metadata.storage_data.items(), key=lambda kv: kv[0].fqn)
                if index.fqn.startswith("model.") and info.relative_path == shard.name)
    data = bytearray(shard.read_bytes())
    data[info.offset + info.length // 2] ^= 0xFF
    shard.write_bytes(data)
dist.barrier()
loaded = mgr.load()
exact = all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())
(root / f"outcome-{rank}.txt").write_text(f"step {loaded.step} exact {exact}")
mgr.close()
dist.destroy_process_group()
