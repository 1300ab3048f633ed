"""The worker <-> agent contract: one small module that both sides import.

Beyond TorchElastic's own variables (``RANK``, ``TORCHELASTIC_RESTART_COUNT``, ...) the
agent exports ``FTLAUNCH_RUN_DIR``, a directory on the node's local disk holding:

    events.jsonl             one JSON object per line, appended by the agent and by rank 0
    heartbeat/rank<R>.json   each worker's latest progress, rewritten in place every step
    stop                     exists once the agent asks the workers to stop (preemption)
    restart                  exists while the agent asks the workers to snapshot the step they
                             reached into the memory tier and wait: it is about to restart the
                             group for a node that joins (``StopRequest``)
    logs/                    TorchElastic's per-attempt, per-rank stdout/stderr

A script run by plain torchrun has no ``FTLAUNCH_RUN_DIR``: the worker side then does nothing.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass

RUN_DIR_ENV = "FTLAUNCH_RUN_DIR"
WORKER_ID_ENV = "FTLAUNCH_WORKER_ID"  # set by the pre-warm client: the pid TorchElastic knows
PERSIST_ENV = "FTLAUNCH_PERSIST_MEMORY"  # set by ftlaunch for the last generation of a failed job: move the memory snapshot to disk, exit
AGENT_PID_ENV = "FTLAUNCH_AGENT_PID"  # set by ftlaunch: its agent's pid (workers die with it; a node kill starts there)

STARTING = "starting"  # launcher.bootstrap: the script begins (torch imported); Reporter: it exists
LOADING, TRAINING, SAVING, STOPPING = "loading", "training", "saving", "stopping"
PAUSED = "paused"  # a snapshot of the step reached is taken; waiting for the agent's restart (a node joins)
FINISHING = "finishing"  # training is over (Reporter.finish, bootstrap at destroy_process_group): eval, final save, exit
PHASES = (STARTING, LOADING, TRAINING, SAVING, STOPPING, PAUSED, FINISHING)  # a Reporter's phases
JOINING = "joining"  # written by launcher.bootstrap as a worker enters init_process_group
LAUNCHING = "launching"  # no beat yet from a bootstrapped worker: its interpreter (or the fork server) imports torch
BOOTSTRAP, OPTIMIZER, REPORTER = "bootstrap", "optimizer", "reporter"  # who wrote a beat (Beat.source)


def events_path(run_dir: str) -> str:
    return os.path.join(run_dir, "events.jsonl")


def heartbeat_dir(run_dir: str) -> str:
    return os.path.join(run_dir, "heartbeat")


def heartbeat_path(run_dir: str, rank: int) -> str:
    return os.path.join(heartbeat_dir(run_dir), f"rank{rank}.json")


def stop_path(run_dir: str) -> str:
    return os.path.join(run_dir, "stop")


def restart_path(run_dir: str) -> str:
    return os.path.join(run_dir, "restart")


@dataclass
class Beat:
    """One worker's latest progress. ``time`` is ``time.monotonic()`` (CLOCK_MONOTONIC, one
    clock for every process of the node, and a wall-clock step cannot make a rank look
    hung); the agent compares it with its own monotonic clock on the same node.

    ``source`` says who wrote it: ``"reporter"`` (the script's own ``Reporter``: steps and
    phases), ``"optimizer"`` (``launcher.bootstrap``: every ``optimizer.step()`` of any
    script) or ``"bootstrap"`` (``launcher.bootstrap``'s marks: the script is ``starting``,
    ``joining`` its process group, or ``finishing``)."""

    rank: int
    pid: int
    generation: int
    step: int
    phase: str
    time: float
    committed: int | None = None  # newest committed checkpoint step this worker knows of
    source: str = REPORTER
    os_pid: int = 0  # the process that trains (a pre-warmed worker's pid differs from ``pid``)
    snapshot: int | None = None  # the newest step this worker put in the memory tier (None: none yet)
    memory: bool = False  # the worker has a memory tier that is on: it can pause for a restart (a node joins)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def read(cls, path: str) -> "Beat | None":
        """The beat in ``path``, or None if there is none or it is torn mid-write."""
        try:
            with open(path, "rb") as f:
                return cls(**json.loads(f.read()))
        except (FileNotFoundError, ValueError, TypeError):
            return None


BEAT_BYTES = 512  # a beat is rewritten in place, padded to this size


class BeatWriter:
    """Rewrites one rank's heartbeat file in place with a single pwrite, cheap enough for
    every step (a tmp file + rename per beat costs several system calls more). The agent
    reads a torn beat as unparsable and keeps the previous one."""

    def __init__(self, run_dir: str, rank: int):
        os.makedirs(heartbeat_dir(run_dir), exist_ok=True)
        # No O_TRUNC: every beat is padded to the same size and overwrites the whole file.
        self._fd = os.open(heartbeat_path(run_dir, rank), os.O_RDWR | os.O_CREAT, 0o644)

    def write(self, beat: Beat) -> None:
        os.pwrite(self._fd, beat.to_json().encode().ljust(BEAT_BYTES), 0)


def append_event(run_dir: str, event: str, **fields) -> None:
    """Append one event line. O_APPEND writes of one short line do not interleave on a
    local filesystem, so the agent and rank 0 can share the file."""
    line = json.dumps({"time": round(time.time(), 4), "event": event, **fields}) + "\n"
    fd = os.open(events_path(run_dir), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def read_events(run_dir: str) -> list[dict]:
    try:
        with open(events_path(run_dir)) as f:
            return [json.loads(line) for line in f if line.strip()]
    except FileNotFoundError:
        return []
