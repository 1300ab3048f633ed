"""Worker side of the worker <-> agent contract: what a training process reads from its
environment and how it joins the process group.

TorchElastic sets ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``/``MASTER_PORT``,
``TORCHELASTIC_RESTART_COUNT``, ``TORCHELASTIC_RUN_ID`` and ``TORCHELASTIC_USE_AGENT_STORE``.
Without them (``python train.py``) the worker is a world of one and no process group is made.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class WorkerEnv:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    restart_count: int = 0
    run_id: str = ""
    launched: bool = False  # True under torchrun / ftlaunch

    @classmethod
    def from_environ(cls, env=os.environ) -> "WorkerEnv":
        if "WORLD_SIZE" not in env:
            return cls()
        return cls(rank=int(env["RANK"]), local_rank=int(env.get("LOCAL_RANK", 0)),
                   world_size=int(env["WORLD_SIZE"]),
                   restart_count=int(env.get("TORCHELASTIC_RESTART_COUNT", 0)),
                   run_id=env.get("TORCHELASTIC_RUN_ID", ""), launched=True)


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_process_group(backend: str | None = None, timeout_s: float = 300.0) -> WorkerEnv:
    """Join the job's process group (when launched) and return this worker's environment.

    Why not plain ``dist.init_process_group(backend)``: under c10d rendezvous the agent shares
    its rendezvous TCPStore with the workers (``TORCHELASTIC_USE_AGENT_STORE=True``), and that
    store outlives a restart. torch 2.14's ``_create_c10d_store`` connects to it *without*
    the per-attempt key prefix older releases used ("We create a new TCPStore for every
    retry", which is not true of the shared store), so a restarted group reads the keys the
    crashed group left (gloo's ``rank_N`` addresses) and dials dead ports ("connectFullMesh
    ... Connection refused") or waits on stale counters. We connect to the same store
    ourselves under ``/worker/attempt_<restart count>``, which each generation owns alone.
    """
    env = WorkerEnv.from_environ()
    if not env.launched:
        return env
    backend = backend or default_backend()
    if backend == "nccl":
        torch.cuda.set_device(env.local_rank)
    timeout = timedelta(seconds=timeout_s)
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true":
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                              env.world_size, is_master=False, timeout=timeout)
        store = dist.PrefixStore(f"/worker/attempt_{env.restart_count}", store)
        dist.init_process_group(backend, store=store, rank=env.rank, world_size=env.world_size,
                                timeout=timeout)
    else:
        dist.init_process_group(backend, timeout=timeout)
    return env
