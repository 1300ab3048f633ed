"""Killing a process and everything under it, knowing a process by more than its pid, and
its state.

TorchElastic starts each worker in a session of its own, and a pre-warmed worker is a
grandchild of the fork server, so neither a process-group kill nor a kill of one pid reaches
a whole launch. ``kill_tree`` walks the tree with psutil instead. ``ProcessId`` pairs a pid
with its start time, so a pid file left by a dead process never makes us kill a stranger
that happens to have the same pid now. ``is_running`` and ``is_stopped`` read a process's
state (the agent's watchdog).
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass

import psutil


def kill_tree(pid: int, *, spare: int | None = None, timeout: float = 10.0) -> None:
    """SIGKILL ``pid`` and every descendant (except ``spare``, e.g. the caller itself), then
    the process group ``pid`` leads, if any; wait up to ``timeout`` s for them to go. The root
    goes first: a live parent (an agent) would react to its children's deaths by starting more."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    procs = [p for p in procs if p.pid != spare]
    for proc in procs:
        try:
            proc.kill()  # also ends a SIGSTOPped process
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=timeout)
    if spare is None:
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


@dataclass(frozen=True)
class ProcessId:
    """A pid and the process's start time: the same pair never names two processes."""

    pid: int
    started: float

    @classmethod
    def of(cls, pid: int) -> "ProcessId":
        return cls(pid, psutil.Process(pid).create_time())

    def to_text(self) -> str:
        return f"{self.pid} {self.started!r}"

    @classmethod
    def from_text(cls, text: str) -> "ProcessId":
        pid, started = text.split()
        return cls(int(pid), float(started))

    def alive(self) -> bool:
        """True while this very process runs (not a zombie, not a newer process with its pid)."""
        try:
            proc = psutil.Process(self.pid)
            return proc.create_time() == self.started and proc.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False


def is_running(pid: int | None) -> bool:
    """``pid`` exists and is not a zombie (it has not exited)."""
    try:
        return pid is not None and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def is_stopped(pid: int) -> bool:
    """``pid`` is stopped (SIGSTOP): the kernel, not its heartbeat, says it cannot progress."""
    try:
        return pid > 0 and psutil.Process(pid).status() == psutil.STATUS_STOPPED
    except psutil.NoSuchProcess:
        return False
