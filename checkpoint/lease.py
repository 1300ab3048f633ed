"""One writer per checkpoint root: a lease file that rank 0 holds while a job may commit.

Two live jobs (or two generations of one job) committing into one root would run retention
over each other's checkpoints and interleave steps from different trajectories. So rank 0
takes ``ROOT/lease.json`` before the first save, renews it every few seconds from a daemon
thread, checks it still holds it right before every commit, and deletes it on ``close``.

A lease whose holder is gone is taken over, so a crashed or SIGKILLed job never locks its
root: the holder runs on this host and its process (pid *and* start time) is dead; or the
holder is an earlier generation of the same TorchElastic run (the agent has stopped it); or
the lease was not renewed for ``ttl`` seconds (its host is gone, or it is frozen: a frozen
holder that wakes up finds the lease taken and refuses to commit). Anything else gets one
line naming the holder.

Only local roots are leased: an object store has no atomic create-if-absent that fsspec
exposes everywhere (the remote-storage issue adds conditional writes).
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import socket
import threading
import time
import uuid

import psutil

from .errors import CheckpointError
from .storage import fsync_dir

log = logging.getLogger("checkpoint")

LEASE_NAME = "lease.json"
DEFAULT_TTL = 30.0


class LeaseHeldError(CheckpointError):
    """Another live job holds the checkpoint root."""


def _me() -> dict:
    pid = os.getpid()
    return {"host": socket.gethostname(), "pid": pid, "started": psutil.Process(pid).create_time(),
            "run_id": os.environ.get("TORCHELASTIC_RUN_ID", ""),
            "generation": int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)}


def _process_alive(pid: int, started: float) -> bool:
    try:
        proc = psutil.Process(pid)
        return proc.create_time() == started and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


class Lease:
    def __init__(self, root: str, ttl: float = DEFAULT_TTL):
        self.root = root
        self.path = os.path.join(root, LEASE_NAME)
        self.ttl = ttl
        self.record = {**_me(), "token": uuid.uuid4().hex, "since": time.time()}
        self.lost: str | None = None
        self._renewed = 0.0  # when we last wrote the lease (time.time(), as its readers compare)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- taking it ---------------------------------------------------------------------
    def acquire(self) -> "Lease":
        """Take the lease or raise ``LeaseHeldError`` naming its live holder."""
        for _ in range(3):  # a holder may appear or vanish between our steps
            if self._create():
                break
            holder = self._read()
            if holder is None:
                continue  # gone since, or torn: try again
            why = self._takeover_reason(holder)
            if why is None:
                since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("since", 0)))
                raise LeaseHeldError(
                    f"checkpoint directory {self.root} is in use by another job: pid {holder.get('pid')} on host "
                    f"{holder.get('host')} since {since} (run id {holder.get('run_id') or '-'}, generation "
                    f"{holder.get('generation')}). Stop that job, or give this one another checkpoint directory")
            if self._replace(holder):
                log.info("took over the lease on %s from pid %s on %s (%s)", self.root, holder.get("pid"),
                         holder.get("host"), why)
                break
        else:
            raise LeaseHeldError(f"could not take the lease on {self.root}: it changed hands three times")
        self._thread = threading.Thread(target=self._renew_loop, name="checkpoint-lease", daemon=True)
        self._thread.start()
        atexit.register(self.release)  # a process that ends without close() frees the root too
        return self

    def _takeover_reason(self, holder: dict) -> str | None:
        me = self.record
        if holder.get("host") == me["host"]:
            if holder.get("pid") == me["pid"] and holder.get("started") == me["started"]:
                return "this process"
            if not _process_alive(int(holder.get("pid", 0)), float(holder.get("started", 0))):
                return "its process is gone"
        if me["run_id"] and holder.get("run_id") == me["run_id"] and int(holder.get("generation", 0)) < me["generation"]:
            return f"generation {holder.get('generation')} of this run was stopped by the agent"
        if time.time() - float(holder.get("renewed", holder.get("since", 0))) > self.ttl:
            return f"not renewed for over {self.ttl:g} s"
        return None

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        renewed = time.time()
        with os.fdopen(fd, "w") as f:
            f.write(self._text(renewed))
            f.flush()
            os.fsync(f.fileno())
        fsync_dir(self.root)
        self._renewed = renewed
        return True

    def _replace(self, holder: dict) -> bool:
        """Swap the dead holder's lease for ours, unless it changed since we read it."""
        aside = f"{self.path}.{self.record['token']}.old"
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return False
        try:
            with open(aside) as f:
                moved = json.load(f)
        except (OSError, ValueError):
            moved = None
        if moved is None or moved.get("token") != holder.get("token"):  # someone else's fresh lease: put it back
            if not os.path.exists(self.path):
                os.rename(aside, self.path)
            return False
        os.unlink(aside)
        return self._create()

    # -- holding it --------------------------------------------------------------------
    def check(self) -> None:
        """Raise unless we still hold the lease (called right before every commit)."""
        holder = self._read()
        if self.lost is None and (holder is None or holder.get("token") != self.record["token"]):
            self.lost = (f"pid {holder.get('pid')} on host {holder.get('host')} took it over" if holder
                         else "its file is gone")
        if self.lost:
            raise LeaseHeldError(f"this job no longer holds the lease on {self.root} ({self.lost}); "
                                 "not committing over another job's checkpoints")

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl / 6):
            try:
                self.check()
                self._write_renewed()
            except LeaseHeldError as e:
                log.error("%s", e)
                return
            except OSError as e:
                log.warning("could not renew the lease on %s: %s", self.root, e)

    def _write_renewed(self) -> None:
        # Late (this process was stopped or starved near the TTL): another job may have taken
        # the lease between our check and our write, and writing now would clobber its record.
        # Give it up instead; the next commit refuses with this reason.
        late = time.time() - self._renewed
        if late > self.ttl * 0.8:
            self.lost = f"this process did not renew it for {late:.0f} s (stopped or starved; the TTL is {self.ttl:g} s)"
            self.check()  # raises
        tmp = f"{self.path}.{self.record['token']}.tmp"
        renewed = time.time()
        with open(tmp, "w") as f:
            f.write(self._text(renewed))
        os.rename(tmp, self.path)
        self._renewed = renewed

    def release(self) -> None:
        self._stop.set()
        try:
            holder = self._read()
            if holder is not None and holder.get("token") == self.record["token"]:
                os.unlink(self.path)
        except OSError:
            pass

    # -- helpers -----------------------------------------------------------------------
    def _text(self, renewed: float) -> str:
        return json.dumps({**self.record, "renewed": renewed})

    def _read(self) -> dict | None:
        try:
            with open(self.path) as f:
                return json.load(f)
        except (FileNotFoundError, ValueError):
            return None
