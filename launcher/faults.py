"""Fault injection for tests and demos: ``--inject kill:rank=1:step=40``.

Kinds:
    kill                 SIGKILL this worker right after it finishes step N
    kill-before-commit   SIGKILL after the shards of step N are written, before the commit record
    kill-while-writing   SIGKILL the moment a save of step N returns (scheduled, final or on
                         stop): an async one has handed its write to the background thread,
                         so it is in flight, never committed (the fault's marker is written
                         before the save, so nothing delays the kill)
    kill-load            SIGKILL while loading the checkpoint of step N
    kill-node            SIGKILL this worker's whole node (its ftlaunch agent and every process
                         under it) right after it finishes step N
    kill-node-before-commit  the same, after the shards of step N are written
    hang                 SIGSTOP this worker after step N (it stays alive, silent: a hang)
    hang-before-commit   SIGSTOP after the shards of step N are written, before the commit
                         record (a hang in the middle of a save, its peers waiting in it)
    raise                raise RuntimeError after step N
    fail-at-start        a broken device: the worker whose LOCAL rank is R fails at start, before
                         it joins the process group, in every generation (no marker; step is
                         ignored). Give it to one node's ftlaunch to simulate a failed GPU there.

Faults come from ``--inject`` flags or from ``FTLAUNCH_INJECT`` (specs separated by commas),
which ``ftlaunch --inject`` sets for its workers.

Each fault fires once per run: before firing, the worker creates a marker file in the run's
fault directory with O_EXCL, so the restarted generation sees it and does not fire again.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass

KINDS = ("kill", "kill-node", "kill-before-commit", "kill-node-before-commit", "kill-while-writing", "kill-load", "hang",
         "hang-before-commit", "raise", "fail-at-start")
INJECT_ENV = "FTLAUNCH_INJECT"


@dataclass(frozen=True)
class Fault:
    kind: str
    rank: int
    step: int

    @property
    def marker_name(self) -> str:
        return f"{self.kind}.rank{self.rank}.step{self.step}.fired"


def parse_fault(spec: str) -> Fault:
    """``KIND:rank=R:step=N`` -> Fault; ``ValueError`` with a readable message otherwise."""
    kind, *fields = spec.strip().split(":")
    if kind not in KINDS:
        raise ValueError(f"fault {spec!r}: unknown kind {kind!r}; expected one of {', '.join(KINDS)}")
    values = {}
    for field in fields:
        key, sep, value = field.partition("=")
        if not sep or key not in ("rank", "step") or not value.isdigit():
            raise ValueError(f"fault {spec!r}: bad field {field!r}; expected rank=R and step=N (integers)")
        values[key] = int(value)
    if set(values) != {"rank", "step"}:
        raise ValueError(f"fault {spec!r}: needs both rank=R and step=N, e.g. kill:rank=1:step=40")
    return Fault(kind, values["rank"], values["step"])


def faults_from_env(env=os.environ) -> list[Fault]:
    return [parse_fault(spec) for spec in env.get(INJECT_ENV, "").split(",") if spec.strip()]


def fail_at_start(faults: list[Fault], local_rank: int) -> None:
    """Raise as a worker on a broken device would, every generation (``fail-at-start``)."""
    for fault in faults:
        if fault.kind == "fail-at-start" and fault.rank == local_rank:
            print(f"[fault] local rank {local_rank}: injecting fail-at-start (a broken device)", flush=True)
            raise RuntimeError(f"injected device failure on local rank {local_rank} (fail-at-start)")


class FaultInjector:
    def __init__(self, faults: list[Fault], rank: int, marker_dir: str):
        self.faults = [f for f in faults if f.rank == rank]
        self.marker_dir = marker_dir
        self._kill_after_save: int | None = None

    def after_step(self, step: int) -> None:
        for fault in self.faults:
            if fault.step == step and fault.kind in ("kill", "kill-node", "hang", "raise"):
                self._fire(fault)

    def before_load(self, step: int) -> None:
        for fault in self.faults:
            if fault.step == step and fault.kind == "kill-load":
                self._fire(fault)

    def before_commit(self, step: int) -> None:
        for fault in self.faults:
            if fault.step == step and fault.kind in ("kill-before-commit", "kill-node-before-commit", "hang-before-commit"):
                self._fire(fault)

    def before_save(self, step: int) -> None:
        """A save of ``step`` begins: claim a ``kill-while-writing`` fault now, so that
        ``after_save`` kills at once (no marker write between the hand-off and the kill)."""
        for fault in self.faults:
            if fault.step == step and fault.kind == "kill-while-writing" and self._claim(fault):
                self._kill_after_save = step

    def after_save(self, step: int) -> None:
        """``save`` of ``step`` returned (an async one has handed its write to the background)."""
        if self._kill_after_save == step:
            os.kill(os.getpid(), signal.SIGKILL)

    def _claim(self, fault: Fault) -> bool:
        """Create the fault's marker; False if an earlier generation of this run fired it."""
        os.makedirs(self.marker_dir, exist_ok=True)
        try:
            fd = os.open(os.path.join(self.marker_dir, fault.marker_name), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return False
        os.close(fd)  # no fsync: the next generation reads it from the page cache, and the kill follows at once
        print(f"[fault] rank {fault.rank}: injecting {fault.kind} at step {fault.step}", flush=True)
        return True

    def _fire(self, fault: Fault) -> None:
        if not self._claim(fault):
            return
        if fault.kind == "raise":
            raise RuntimeError(f"injected fault at step {fault.step}")
        if fault.kind in ("kill-node", "kill-node-before-commit"):
            _kill_node(fault.kind)
        os.kill(os.getpid(), signal.SIGSTOP if fault.kind.startswith("hang") else signal.SIGKILL)


def _kill_node(kind: str = "kill-node") -> None:
    """SIGKILL the ftlaunch agent and every process under it (TorchElastic puts workers in
    sessions of their own, so a process-group kill would miss them), this worker last."""
    from .bootstrap import outlive_parent
    from .contract import AGENT_PID_ENV
    from .proctree import kill_tree

    agent_pid = os.environ.get(AGENT_PID_ENV)
    if not agent_pid:
        raise RuntimeError(f"{kind} needs ftlaunch (FTLAUNCH_AGENT_PID is not set)")
    outlive_parent()  # else the kernel kills this worker with its parent, before the agent is hit
    kill_tree(int(agent_pid), spare=os.getpid(), timeout=0)
