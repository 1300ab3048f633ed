"""What a CheckpointManager does and when: one dataclass, a docstring per field, validated on
creation. Every option is checked here (the verification modes themselves are defined where
verification happens, ``manifest.VERIFY_MODES``); ``trainer.config.TrainConfig`` inherits these
fields (and their help), so ``train.py``'s flags cannot drift from them."""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field, fields

from .manifest import VERIFY_MODES

ASYNC_MODES = ("off", "thread")
# One S3 stream uploads its parts one after another; parallel files are what fill the
# bandwidth (bench/s3_bench.py: 101 MB in 4.2 s with 1 thread, 2.6 s with 4, 2.2 s with 8, on
# loopback). Each open upload buffers up to a 50 MiB part, so 4 keeps that memory modest.
OBJECT_STORE_IO_THREADS = 4
IF_BUSY = ("wait", "skip")


@dataclass
class CheckpointConfig:
    save_every_steps: int = field(default=0, metadata={
        "help": "commit a checkpoint every N steps (0: off)"})
    save_every_seconds: float = field(default=0.0, metadata={
        "help": "also commit a checkpoint when T seconds passed since the last (rank 0's clock decides for "
                "every rank; 0: off)"})
    keep_last: int = field(default=3, metadata={
        "help": "committed checkpoints to keep (0: keep all); the newest is always kept"})
    keep_every: int = field(default=0, metadata={
        "help": "also keep every checkpoint whose step is a multiple of M (0: off)"})
    verify: str = field(default="hash", metadata={
        "help": "how a checkpoint is checked before loading and before retention counts it: size (cheap) "
                "or hash (crc32 of every file; SHA-256 in keyed mode)"})
    async_mode: str = field(default="off", metadata={
        "help": "off: each save returns once committed; thread: a save returns once the state is copied "
                "into reused buffers, a background thread writes and commits it"})
    if_busy: str = field(default="wait", metadata={
        "help": "async only: when a scheduled save is due while the previous one is still being written, "
                "wait for it, or skip this save (logged; rank 0 decides for all)"})
    io_threads: int = field(default=0, metadata={
        "help": "files each rank writes in parallel per checkpoint (DCP's thread_count); 0: automatic, 1 on a "
                f"filesystem, {OBJECT_STORE_IO_THREADS} on an object store "
                "(parallel uploads, each file in 50 MiB parts)"})
    memory_every: int | str = field(default=0, metadata={
        "help": "memory tier: snapshot the training state into node-local shared memory every N steps, or "
                "auto (every step, or every N steps where a snapshot would take more than --memory-overhead of "
                "a step; measured over the first steps, the same N on every rank); 0: off. A restarted group "
                "resumes from the newest step every rank holds, without reading the disk (two slots per rank, "
                "each the size of the rank's state)"})
    memory_overhead: float = field(default=0.05, metadata={
        "help": "memory tier, auto interval only: the share of training time snapshots may take"})
    memory_dir: str = field(default="/dev/shm", metadata={
        "help": "memory tier: the tmpfs directory the snapshots live in (they outlive the worker, not the node)"})
    mirror: str = field(default="", metadata={
        "help": "a second root (s3://bucket/prefix, any fsspec URL, or a directory) that every commit is copied "
                "to in the background, its record last, with the same retention; loading takes the newer of the "
                "two, so a node with an empty local root resumes from the mirror"})
    save_failures_allowed: int = field(default=3, metadata={
        "help": "scheduled saves that may fail in a row (a storage outage, a full disk): each is logged in one "
                "line, nothing of it is committed, the previous commit stays and training goes on; one more "
                "raises. A save you call yourself (the final one, one on a stop) raises if it fails itself"})
    allow_fresh_start: bool = field(default=False, metadata={
        "help": "start from scratch even when the root holds committed checkpoints of which none verifies "
                "(by default that is refused, naming them)"})

    def __post_init__(self) -> None:
        for f in fields(CheckpointConfig):  # a numpy int is fine, 2.5 steps or "3" are not
            value = getattr(self, f.name)
            if f.type == "int" and (isinstance(value, bool) or not isinstance(value, numbers.Integral)):
                self._invalid(f.name, "must be an integer")
            elif f.type == "float" and (isinstance(value, bool) or not isinstance(value, numbers.Real)):
                self._invalid(f.name, "must be a number")
            elif f.type in ("bool", "str") and not isinstance(value, {"bool": bool, "str": str}[f.type]):
                self._invalid(f.name, f"must be a {f.type}")
            setattr(self, f.name, {"int": int, "float": float}.get(f.type, lambda v: v)(value))
        for name in ("save_every_steps", "save_every_seconds", "keep_last", "keep_every", "save_failures_allowed"):
            if getattr(self, name) < 0:
                self._invalid(name, "must be >= 0")
        every = self.memory_every
        if isinstance(every, str) and every.strip().isdigit():  # "3" from a config file or a flag
            every = self.memory_every = int(every)
        if every != "auto" and (isinstance(every, bool) or not isinstance(every, numbers.Integral) or every < 0):
            self._invalid("memory_every", "must be auto or an integer >= 0")
        if every != "auto":
            self.memory_every = int(every)
        if not 0 < self.memory_overhead < 1:
            self._invalid("memory_overhead", "must be between 0 and 1 (a share of the step time, e.g. 0.05)")
        for name, allowed in (("verify", VERIFY_MODES), ("async_mode", ASYNC_MODES), ("if_busy", IF_BUSY)):
            if getattr(self, name) not in allowed:
                self._invalid(name, f"must be {' or '.join(allowed)}")
        if self.io_threads < 0:
            self._invalid("io_threads", "must be >= 0 (0: automatic)")

    def _invalid(self, name: str, rule: str):
        """Raise the error for one field (a subclass names its own flags and error type)."""
        raise ValueError(f"{name} {rule}, got {getattr(self, name)!r}")

    def checkpoint_config(self) -> "CheckpointConfig":
        """Just these fields (from a subclass that adds its own)."""
        return CheckpointConfig(**{name: getattr(self, name) for name in self.__dataclass_fields__
                                   if name in CheckpointConfig.__dataclass_fields__})
