"""Sharded, committed, verified checkpoints on torch.distributed.checkpoint.

    from checkpoint import CheckpointManager
    ckpt = CheckpointManager("runs/x", model=model, optimizer=opt, save_every_steps=100)
    resumed = ckpt.load()           # newest committed + verified checkpoint, or None

This package imports nothing else of this project.
"""

from .errors import CheckpointError, CheckpointMismatchError
from .manager import CheckpointManager
from .manifest import Manifest, find_latest, step_dir_name, verify
from .storage import Storage

__all__ = ["CheckpointManager", "CheckpointError", "CheckpointMismatchError", "Manifest",
           "Storage", "find_latest", "step_dir_name", "verify"]
