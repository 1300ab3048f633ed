"""The async half of a save: stage the state in the caller's thread, then write and commit it
in one background thread, at most one save in flight.

The blocking part copies the state into reused staging buffers (``staging.Stager``; after the
first save, only the tensors DCP had this rank write, and any new ones). The background
thread then runs the whole synchronous save protocol (``manifest.py`` describes it) on the
staged copy, on a process group of its own, so its collectives never interleave with
training's. A background failure never commits: the thread logs it the moment it happens
(rank 0; the error names the ranks that failed), and the next save (or ``wait``) raises it on
every rank at the same step, since every rank learnt of it through the save's own
collectives (``CheckpointManager`` counts it against ``save_failures_allowed`` and goes on, or
raises it). ``poll()`` reports commits only, for the same reason.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable

import torch

from . import _dist
from .manifest import Manifest
from .observer import SaveStats
from .staging import Stager
from .writer import WriteRecord

log = logging.getLogger("checkpoint")

# (step, state, metrics, started, process group) -> the committed record and what this rank
# wrote, or (None, None) when the step was committed before and nothing was written
WriteAndCommit = Callable[[int, dict, object, float, object], "tuple[Manifest | None, WriteRecord | None]"]


class BackgroundSaver:
    def __init__(self, write_and_commit: WriteAndCommit, stats: SaveStats):
        self._write_and_commit = write_and_commit
        self._stats = stats
        self._stager = Stager()
        self._group = _dist.private_group()
        # The CUDA device is per thread: without this, DCP's copies in the writer thread
        # would create a context on GPU 0 for every local rank.
        device = torch.cuda.current_device() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="checkpoint-save",
                                            initializer=_start_writer_thread, initargs=(device,))
        self._inflight: Future | None = None
        self._others_write: Callable[[str], bool] | None = None  # tensors another rank writes
        self.staged_step: int | None = None  # the newest step staged

    def submit(self, step: int, state: dict, metrics, started: float) -> int:
        """Stage ``state`` (the blocking copy) and hand it to the writer thread; returns the
        bytes staged. The caller has waited for the previous save."""
        staged = self._stager.stage(state, self._others_write)
        self._stats.staging_bytes = self._stager.nbytes
        self._inflight = self._executor.submit(self._run, step, staged, metrics, started,
                                               frozenset(self._stager.tensor_fqns))
        self.staged_step = step
        return self._stager.nbytes

    @property
    def in_flight(self) -> bool:
        """Whether a save is still being written or committed."""
        return self._inflight is not None and not self._inflight.done()

    def poll(self) -> Manifest | None:
        """Non-blocking: the record of a save committed since the last call, or None. A failed
        save is left for the next ``wait`` (the next save's), so that every rank learns of
        it at the same step."""
        if self._inflight is None or not self._inflight.done() or self._inflight.exception() is not None:
            return None
        return self.wait()

    def wait(self) -> Manifest | None:
        """Block until the save in flight (if any) is committed; return its record, or raise
        ``CheckpointError`` if it failed (nothing was committed)."""
        inflight = self._inflight
        if inflight is None:
            return None
        try:
            return inflight.result()
        finally:
            if inflight.done():  # not when interrupted (a signal): the write goes on, still tracked
                self._inflight = None

    def close(self) -> None:
        """Wait for the save in flight, then stop the writer thread."""
        try:
            self.wait()
        finally:
            self._executor.shutdown(wait=True)

    def _run(self, step: int, staged: dict, metrics, started: float, known: frozenset) -> Manifest:
        cpu = time.thread_time()
        try:
            manifest, written = self._write_and_commit(step, staged, metrics, started, self._group)
            if written is not None:  # None: the step was committed already, nothing written
                # From now on, stage only what this rank writes, and tensors not seen in this save.
                mine = frozenset(written.tensor_keys)
                self._others_write = lambda key: key in known and key not in mine
            return manifest
        except BaseException as e:
            # Also logged here: a process that exits without wait() still says what happened.
            (log.error if _dist.rank() == 0 else log.info)(
                "background save of step %d failed (nothing of it committed; the previous commit stays): %s", step, e)
            raise
        finally:
            # CPU the writer thread took from this process: what training competes with when
            # no core is spare.
            self._stats.last_background_cpu_seconds = time.thread_time() - cpu


def _start_writer_thread(device: int | None) -> None:
    if device is not None:
        torch.cuda.set_device(device)
