"""What the manager tells its caller: a ``SaveResult`` from every save, and an ``Observer``
whose methods it calls at each phase (override the ones you need; all are no-ops).

A training loop uses the observer for its heartbeat phases and run log, fault injection, and
tests use it to hold a save between its shards and its commit."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

from .manifest import Manifest

COMMITTED = "committed"  # a synchronous save wrote and committed the step
STAGED = "staged"  # an async save copied the state; a background thread writes and commits it
SKIPPED = "skipped"  # an async save was due while one was in flight (if_busy="skip")
ALREADY_COMMITTED = "already committed"  # the step was validly committed before: never written twice
FAILED = "failed"  # a scheduled save failed within config.save_failures_allowed; nothing of it committed


@dataclass(frozen=True)
class SaveResult:
    step: int
    outcome: str  # one of the five above
    stall_seconds: float  # how long save() blocked its caller
    bytes: int  # committed: bytes of every rank's files; staged: bytes this rank copied; else 0
    manifest: Manifest | None = None  # the commit record, when committed


@dataclass
class SaveStats:
    """Running figures for benchmarks and dashboards (this rank's)."""

    last_stall_seconds: float = 0.0  # how long the last save() blocked its caller
    staging_bytes: int = 0  # async: host memory held by the reused staging buffers
    last_background_cpu_seconds: float = 0.0  # async: CPU the writer thread took for the last save


class Observer:
    """Called on every rank. For async saves, ``before_commit`` and ``committed`` run in the
    background writer thread; everything else in the caller's thread."""

    @contextlib.contextmanager
    def blocking(self, what: str, step: int | None) -> Iterator[None]:
        """Around the part of ``save`` (``what="saving"``) or ``load`` (``"loading"``) that
        blocks the caller: checkpoint I/O, not training (a watchdog's longer limit)."""
        yield

    def save_started(self, step: int) -> None:
        """A save of ``step`` begins (every rank, the same step)."""

    def save_returned(self, result: SaveResult) -> None:
        """``save`` is about to return ``result`` to its caller."""

    def save_failed(self, step: int, error: str) -> None:
        """The save of ``step`` failed and training goes on (``save_failures_allowed``); the
        same step on every rank. A failure beyond the allowance raises instead."""

    def before_commit(self, step: int) -> None:
        """The shards of ``step`` are written, the record not yet: a hook for fault injection
        and tests. An exception here fails the save on every rank (nothing is committed)."""

    def committed(self, manifest: Manifest) -> None:
        """``manifest`` was committed. An exception here is logged, never undoes the commit."""

    def mirrored(self, manifest: Manifest, seconds: float) -> None:
        """Rank 0, in the mirror's thread: ``manifest``'s checkpoint is committed on the mirror
        too (``config.mirror``), ``seconds`` after its upload began."""

    def before_load(self, step: int) -> None:
        """Every rank agreed to load ``step``; its data is read next."""
