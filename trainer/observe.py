"""What the checkpoint manager's phases mean to ftlaunch and to fault injection: heartbeat
phases (checkpoint I/O gets the agent's I/O timeout, not the step timeout), run-log events,
and the fault hooks of ``--inject``."""

from __future__ import annotations

import contextlib

from checkpoint.observer import STAGED, Observer, SaveResult
from launcher import contract
from launcher.faults import FaultInjector
from launcher.worker import Reporter


class TrainingObserver(Observer):
    def __init__(self, reporter: Reporter, injector: FaultInjector):
        self.reporter, self.injector = reporter, injector

    def blocking(self, what: str, step: int | None):
        # All of it is checkpoint I/O: rank 0's preparation of a sync save (re-verifying a committed step,
        # deleting what a failed save left), the first async staging (allocating a buffer
        # for the whole state), waiting for the previous save, loading. A save on a stop
        # request stays in the stopping phase.
        if self.reporter.phase_name == contract.STOPPING:
            return contextlib.nullcontext()
        return self.reporter.phase({"saving": contract.SAVING, "loading": contract.LOADING}[what])

    def save_started(self, step: int) -> None:
        self.reporter.event("save_begin", step=step)
        self.injector.before_save(step)

    def save_returned(self, result: SaveResult) -> None:
        if result.outcome == STAGED:
            self.reporter.event("save_staged", step=result.step, stall_seconds=round(result.stall_seconds, 4))
        self.injector.after_save(result.step)

    def save_failed(self, step: int, error: str) -> None:
        self.reporter.event("save_failed", step=step, error=error)

    def before_commit(self, step: int) -> None:
        self.injector.before_commit(step)

    def committed(self, manifest) -> None:  # in the background thread for async saves
        self.reporter.event("save_commit", step=manifest.step, seconds=manifest.save_seconds,
                            bytes=manifest.total_bytes)

    def mirrored(self, manifest, seconds: float) -> None:  # rank 0, in the mirror's thread
        self.reporter.event("mirror_commit", step=manifest.step, seconds=round(seconds, 4), bytes=manifest.total_bytes)

    def before_load(self, step: int) -> None:
        self.injector.before_load(step)
