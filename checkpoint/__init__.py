"""Sharded, committed, verified checkpoints on torch.distributed.checkpoint.

    from checkpoint import CheckpointManager
    ckpt = CheckpointManager("runs/x", model=model, optimizer=opt, save_every_steps=100)
    resumed = ckpt.load()           # newest committed + verified checkpoint, or None
    for step in ...:
        ...
        ckpt.maybe_save(step)       # a SaveResult when due: committed, staged, skipped...

Where to read: ``manager.py`` (save and load), ``manifest.py`` (the commit record and the save
protocol), ``commit.py`` (one save), ``background.py`` (async saves), ``config.py`` (the
options), ``observer.py`` (what a save reports), ``retention.py``, ``safe_load.py`` (loading
never runs code), ``memory.py``, ``memory_format.py`` and ``memory_tier.py`` (snapshots in shared memory).

This package imports nothing else of this project.
"""

from .config import CheckpointConfig
from .errors import CheckpointError, CheckpointMismatchError, SaveFailuresExceeded
from .manager import CheckpointManager
from .manifest import Manifest, find_latest, step_dir_name, verify
from .observer import ALREADY_COMMITTED, COMMITTED, FAILED, SKIPPED, STAGED, Observer, SaveResult, SaveStats
from .storage import Storage

__all__ = ["CheckpointManager", "CheckpointConfig", "CheckpointError", "CheckpointMismatchError", "SaveFailuresExceeded", "Manifest",
           "Observer", "SaveResult", "SaveStats", "COMMITTED", "STAGED", "SKIPPED", "ALREADY_COMMITTED", "FAILED",
           "Storage", "find_latest", "step_dir_name", "verify"]
