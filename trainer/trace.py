"""The sample trace: every sample index each rank trains on, one JSON line per step, in
``RUN_DIR/samples/rank<R>.jsonl`` (``--trace-samples``). Tests replay it to check that every
sample of every epoch was trained exactly once across failures and restarts."""

from __future__ import annotations

import json
import os
import time

import torch.distributed as dist


class SampleTrace:
    def __init__(self, run_dir: str, rank: int, resumed_from: int):
        os.makedirs(os.path.join(run_dir, "samples"), exist_ok=True)
        self.file = open(os.path.join(run_dir, "samples", f"rank{rank}.jsonl"), "a")
        self.resumed_from = resumed_from
        # One token per generation (rank 0's clock, shared): a later generation that redoes
        # steps lost to a failure has a larger token, whatever its restart count says.
        launch = [time.time()]
        if dist.is_initialized():
            dist.broadcast_object_list(launch, src=0)
        self.launch = launch[0]

    def record(self, step: int, epoch: int, idx) -> None:
        self.file.write(json.dumps({"step": step, "epoch": epoch, "launch": self.launch,
                                    "resumed_from": self.resumed_from, "idx": idx.tolist()}) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


class NoTrace:
    def record(self, step: int, epoch: int, idx) -> None:
        pass

    def close(self) -> None:
        pass
