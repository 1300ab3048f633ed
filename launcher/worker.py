"""Worker side of the worker <-> agent contract: what a training process reads from its
environment, how it joins the process group, how it reports progress (``Reporter``) and
how the ranks agree to stop on preemption (``StopRequest``).

TorchElastic sets ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``/``MASTER_PORT``,
``TORCHELASTIC_RESTART_COUNT``, ``TORCHELASTIC_RUN_ID`` and ``TORCHELASTIC_USE_AGENT_STORE``.
Without them (``python train.py``) the worker is a world of one and no process group is made.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from . import contract


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


class Reporter:
    """This worker's side of the agent's watchdog: heartbeats (step + phase) and events.

    Under ftlaunch (``FTLAUNCH_RUN_DIR`` set) every worker rewrites its heartbeat file after
    every step and on every phase change; the agent calls a rank hung when it makes no
    progress for longer than its phase allows. Beats come from the training loop itself,
    never from a background thread, so a rank stuck in a collective or stopped by SIGSTOP
    goes quiet. Outside ftlaunch this does nothing.
    """

    def __init__(self, env: WorkerEnv):
        self.env = env
        self.run_dir = os.environ.get(contract.RUN_DIR_ENV) or None
        self.phase_name = contract.STARTING
        self.step = -1
        self.committed: int | None = None
        self.snapshot: int | None = None  # the newest step this worker put in the memory tier
        self.memory = False  # whether it has a memory tier that is on (it can pause for a restart)
        self._writer = contract.BeatWriter(self.run_dir, env.rank) if self.run_dir else None
        if self._writer is not None:
            from .bootstrap import silence_optimizer_beats

            silence_optimizer_beats()  # our beats carry phases; the optimizer hook's do not
        # The agent knows a pre-warmed worker by its client's pid (see launcher.prewarm).
        self._pid = int(os.environ.get(contract.WORKER_ID_ENV, os.getpid()))
        self._write()

    def beat(self, step: int, committed: int | None = None, snapshot: int | None = None,
             memory: bool = False) -> None:
        """Call after every training step (a 512-byte pwrite). ``snapshot``, ``memory``: the
        newest step in this rank's memory tier and whether the tier is on; a rank that says
        so is asked to pause (``StopRequest``) before a restart for a node that joins."""
        self.step, self.phase_name = step, contract.TRAINING
        if committed is not None:
            self.committed = committed
        self.snapshot, self.memory = snapshot, memory
        self._write()

    def pause(self, snapshot: int | None, timeout: float = 60.0) -> None:
        """The ranks agreed to pause (``StopRequest``): a node joins and the agents are about
        to restart the group. Say that the memory tier holds ``snapshot`` (the step reached;
        None if the tier is off) and wait for the restart, which kills this process. Each
        node's agent restarts its workers once it sees the join (the one that asked first
        may be on another node), so this waits for the kill, not for a file of this node.
        Returns if no restart came within ``timeout`` s: the caller trains on (a peer that
        is gone then fails a collective, and the restart is an ordinary one)."""
        self.snapshot, self.phase_name = snapshot, contract.PAUSED
        self._write()
        time.sleep(timeout)  # sleep-ok: waiting to be killed; the agent acts on the beat above
        self.phase_name = contract.TRAINING
        self._write()

    @contextlib.contextmanager
    def phase(self, name: str):
        """Mark a long non-training phase (loading, saving, stopping): the agent gives those
        its longer I/O timeout instead of the step timeout."""
        if name not in contract.PHASES:
            raise ValueError(f"unknown phase {name!r}; the agent knows {contract.PHASES}")
        previous, self.phase_name = self.phase_name, name
        self._write()
        try:
            yield
        finally:
            self.phase_name = previous
            self._write()

    def finish(self) -> None:
        """Training is over: evaluation, the final save and teardown follow, each of which
        may take longer than a step; the agent gives this phase its I/O timeout."""
        self.phase_name = contract.FINISHING
        self._write()

    def event(self, name: str, **fields) -> None:
        """Append a job-level event; rank 0 speaks for the job so each event appears once."""
        if self.run_dir and self.env.rank == 0:
            contract.append_event(self.run_dir, name, rank=0, generation=self.env.restart_count, **fields)

    def node_event(self, name: str, **fields) -> None:
        """Append an event of this node (its local rank 0 writes it): what the node's agent
        must know, e.g. where this node keeps its memory snapshots."""
        if self.run_dir and self.env.local_rank == 0:
            contract.append_event(self.run_dir, name, rank=self.env.rank, generation=self.env.restart_count, **fields)

    def _write(self) -> None:
        if self._writer is not None:
            self._writer.write(contract.Beat(
                rank=self.env.rank, pid=self._pid, generation=self.env.restart_count, step=self.step,
                phase=self.phase_name, time=time.monotonic(), committed=self.committed,
                os_pid=os.getpid(), snapshot=self.snapshot, memory=self.memory))


class StopRequest:
    """Preemption: stop at a step every rank agrees on; and a pause before a restart.

    A stop is requested by SIGTERM/SIGINT to this worker or by the agent's stop file. The
    ranks combine their flags with a small all_reduce (MAX), so all of them stop after the
    same step even when only one rank, or one node, was told. To cost nothing measurable
    (a per-step all_reduce slows down a model whose steps are short), the
    all_reduce is asynchronous, read at the next check, and checks are spaced about
    ``check_seconds`` apart: each check also carries every rank's proposal for the number
    of steps to the next check, and the MAX of those is what all ranks use, so they stay in
    step. A stop therefore lands within about two check intervals of the request.

    The same all_reduce carries the agent's pause request (its restart file): a node is
    joining, and the agent is about to restart the group. ``agreed()`` then stays False and
    ``pause_agreed`` turns True on all ranks after the same step: they put it in the memory
    tier and wait to be restarted (``Reporter.pause``), so that no step is run twice.
    """

    def __init__(self, env: WorkerEnv, check_seconds: float = 0.1):
        self.run_dir = os.environ.get(contract.RUN_DIR_ENV) or None
        self.requested_by: str | None = None
        self.check_seconds = check_seconds
        self._group = None
        self._pending = None  # (work, tensor[stop flag, steps to next check, pause flag]) in flight
        self.pause_agreed = False
        self._calls = 0
        self._next_check = 1
        self._last_check = (0, time.monotonic())
        if dist.is_initialized() and dist.get_backend() != "gloo":
            self._group = dist.new_group(backend="gloo")  # a CPU tensor needs no device copy
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, _frame) -> None:
        self.requested_by = signal.Signals(signum).name
        # A second signal gets the default behaviour: an impatient Ctrl-C still ends us.
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def agreed(self) -> bool:
        """Call after every step on every rank; True on all ranks after the same step once
        any rank was asked to stop (and ``pause_agreed`` likewise for a pause)."""
        if self.requested_by is None and self.run_dir and os.path.exists(contract.stop_path(self.run_dir)):
            self.requested_by = "ftlaunch"
        self.pause_agreed = False
        if not dist.is_initialized():
            self.pause_agreed = self.requested_by is None and self._pause_asked()
            return self.requested_by is not None
        self._calls += 1
        if self._calls < self._next_check:
            return False
        steps_to_next = 1
        if self._pending is not None:
            work, result = self._pending
            work.wait()
            self._pending = None
            if result[0].item():
                self.requested_by = self.requested_by or "another rank"
                return True
            if result[2].item():
                self.pause_agreed = True
                return False
            steps_to_next = int(result[1].item())
        calls, since = self._last_check
        per_step = (time.monotonic() - since) / max(self._calls - calls, 1)
        proposal = max(1, min(1000, int(self.check_seconds / max(per_step, 1e-6))))
        self._last_check = (self._calls, time.monotonic())
        flag = torch.tensor([1 if self.requested_by else 0, proposal, int(self._pause_asked())])
        self._pending = (dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group, async_op=True), flag)
        self._next_check = self._calls + steps_to_next
        return False

    def _pause_asked(self) -> bool:
        return bool(self.run_dir) and os.path.exists(contract.restart_path(self.run_dir))

    def close(self) -> None:
        """Finish the all_reduce still in flight (every rank issued it), before the group goes."""
        if self._pending is not None:
            self._pending[0].wait()
            self._pending = None
