"""FaultTolerantAgent: TorchElastic's LocalElasticAgent plus what a long job needs.

TorchElastic's agent (``SimpleElasticAgent._invoke_run``) already has the state machine:
every ``monitor_interval`` it asks ``_monitor_workers`` for the group's state and restarts
the group on FAILED or UNHEALTHY while restarts remain. This subclass only adds to the
hooks of that loop:

- ``_monitor_workers`` also reads the workers' heartbeats (``launcher.contract``) and calls
  the group UNHEALTHY when a rank makes no progress for longer than its phase allows
  (starting, training, loading/saving: ``launcher.policy``); the hung workers are SIGKILLed
  so the restart does not wait on them.
- ``_restart_workers`` waits an exponential backoff when restarts stop making progress, and
  refuses to restart after ``crash_loop_limit`` restarts that made no progress (no newer
  committed checkpoint, no step past the failure before).
- ``_stop_workers`` SIGKILLs a failed group at once: its survivors cannot commit anything
  without the dead rank, so TorchElastic's SIGTERM-and-wait-30-s only delays recovery.
- ``request_stop`` (preemption) writes the stop file the workers poll, so they agree on a
  step, commit it and exit 0; past ``grace_period`` the agent kills them.
- ``persist_memory``: after the last failure, the memory tier's newest snapshot is
  committed to the durable tier (``launcher.persist``).
- Every transition is appended to ``events.jsonl`` in the run directory.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import time

from torch.distributed.elastic.agent.server.api import RunResult, WorkerGroup, WorkerState
from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent

from . import contract
from .policy import Policy
from .proctree import is_running, is_stopped

PAUSE_WAIT = 10.0  # the most a restart for a node that joins waits for the workers' snapshot (s)

log = logging.getLogger("ftlaunch")


class FaultTolerantAgent(LocalElasticAgent):
    def __init__(self, spec, logs_specs, *, run_dir: str, policy: Policy, bootstrapped: bool = False,
                 event_log_handler: str = "null", **kwargs):
        super().__init__(spec, logs_specs, **kwargs)
        self.run_dir = run_dir
        self.policy = policy
        self.bootstrapped = bootstrapped  # workers run through launcher.bootstrap (they beat from their script's start)
        self.event_log_handler = event_log_handler
        self.last_failure: str | None = None  # the newest failure, in words
        self.leaving = False  # this node gives up alone; the rendezvous stays open for the others
        self._start_failures = 0  # generations in a row whose root-cause failure was a local worker at start
        self._generation_started = time.monotonic()
        self._known_committed: int | None = None  # newest committed step any beat reported
        self._committed_at_last_failure: int | None = None
        self._reached_at_last_failure: int | None = None  # the furthest step any failure reached
        self._streak = 0  # failures in a row that made no progress
        self._last_failed = False
        self.stop_requested_at: float | None = None
        self.stop_reason: str | None = None  # why the agent gave up restarting, if it did
        self.attempt = 0  # 0 for the first generation, +1 per restart
        self._beat_cache: dict[int, contract.Beat] = {}
        for path in (contract.stop_path(run_dir), contract.restart_path(run_dir)):
            if os.path.exists(path):
                os.unlink(path)  # left by an earlier launch (preempted, killed)

    # -- helpers ------------------------------------------------------------------------
    def event(self, name: str, **fields) -> None:
        contract.append_event(self.run_dir, name, agent=True, attempt=self.attempt, **fields)

    def _beats(self, worker_group: WorkerGroup) -> dict[int, contract.Beat]:
        """This generation's beats by global rank (a beat from an earlier process is ignored)."""
        beats = {}
        for worker in worker_group.workers:
            beat = contract.Beat.read(contract.heartbeat_path(self.run_dir, worker.global_rank))
            if beat is None or beat.pid != worker.id:
                beat = self._beat_cache.get(worker.global_rank)  # torn read or none yet
            if beat is not None and beat.pid == worker.id:
                beats[worker.global_rank] = self._beat_cache[worker.global_rank] = beat
                if beat.committed is not None:
                    self._known_committed = max(beat.committed, self._known_committed or beat.committed)
        return beats

    def _kill_workers(self) -> None:
        for pid in (self._pcontext.pids().values() if self._pcontext else []):
            try:
                os.kill(pid, signal.SIGKILL)  # also ends a SIGSTOPped process
            except ProcessLookupError:
                pass

    def record_event(self, succeeded: bool) -> None:
        """TorchElastic's own agent event (``--event-log-handler``), as its launch_agent records it."""
        from torch.distributed.elastic import events

        events.record(self.get_event_succeeded() if succeeded else self.get_event_failed(), self.event_log_handler)

    def exhausted_reason(self) -> str:
        restarts = self._worker_group.spec.max_restarts
        return (f"all {restarts} restart{'s' * (restarts != 1)} used (--max-restarts); "
                f"last failure: {self.last_failure or 'unknown'}")

    def _give_up(self, reason: str) -> None:
        """No more restarts: TorchElastic's loop then stops the group and returns FAILED."""
        self.stop_reason = reason
        self._remaining_restarts = 0

    # -- TorchElastic hooks -------------------------------------------------------------
    def _rendezvous(self, worker_group: WorkerGroup) -> None:
        started = time.monotonic()
        super()._rendezvous(worker_group)
        self.event("rendezvous", seconds=round(time.monotonic() - started, 4),
                   world_size=worker_group.workers[0].world_size if worker_group.workers else 0,
                   group_rank=worker_group.group_rank, group_world_size=worker_group.group_world_size)

    def _start_workers(self, worker_group: WorkerGroup):
        shutil.rmtree(contract.heartbeat_dir(self.run_dir), ignore_errors=True)
        os.makedirs(contract.heartbeat_dir(self.run_dir), exist_ok=True)
        pids = super()._start_workers(worker_group)
        self._generation_started = time.monotonic()
        self.event("workers_started", pids={str(k): v for k, v in pids.items()})
        return pids

    def _stop_workers(self, worker_group: WorkerGroup) -> None:
        # A failed group has nothing left to save: kill it now instead of SIGTERM + 30 s.
        self._shutdown(death_sig=signal.SIGKILL, timeout=5)

    def _restart_workers(self, worker_group: WorkerGroup) -> None:
        delay = self.policy.backoff_for(self._streak) if self._last_failed else 0.0
        if not self._last_failed:  # a node joins (TorchElastic restarts a healthy group)
            self._pause_before_restart(worker_group)
        self._stop_workers(worker_group)
        if os.path.exists(contract.restart_path(self.run_dir)):
            os.unlink(contract.restart_path(self.run_dir))
        worker_group.state = WorkerState.STOPPED
        self.attempt += 1
        self.event("restart", backoff_seconds=delay, reason="failure" if self._last_failed else "membership change")
        if delay:
            log.warning("restart %d made no progress before; backing off %.1f s", self.attempt, delay)
            time.sleep(delay)  # the backoff itself, not synchronization
        self._last_failed = False
        self._initialize_workers(worker_group)

    def _pause_before_restart(self, worker_group: WorkerGroup) -> None:
        """Before TorchElastic restarts a healthy group for a node that joins: ask the workers
        to put the step they reached in the memory tier and wait (``StopRequest``'s pause), so
        that the new group resumes from that step and none is run twice. Only workers whose
        beats show a memory tier are asked, and they get at most PAUSE_WAIT s (a kill without
        the pause costs the steps since their last snapshot)."""
        workers = worker_group.workers
        beats = self._beats(worker_group)
        if len(beats) < len(workers) or any(b.snapshot is None for b in beats.values()) or not all(
                is_running(w.id) for w in workers):
            return
        started = time.monotonic()
        with open(contract.restart_path(self.run_dir), "w") as f:
            f.write("a node joins: snapshot the step reached and wait for the restart\n")
        while time.monotonic() - started < PAUSE_WAIT and all(is_running(w.id) for w in workers):
            beats = self._beats(worker_group)
            steps = {b.step for b in beats.values() if b.phase == contract.PAUSED and b.snapshot == b.step}
            if len(steps) == 1 and all(b.phase == contract.PAUSED for b in beats.values()) and len(beats) == len(workers):
                self.event("workers_paused", step=steps.pop(), seconds=round(time.monotonic() - started, 4))
                return
            time.sleep(0.01)  # sleep-ok: polling the beats, with a deadline
        log.warning("the workers did not pause within %.0f s; restarting them anyway (the new group resumes from "
                    "their newest memory snapshots)", PAUSE_WAIT)
        self.event("pause_timeout", seconds=round(time.monotonic() - started, 4))

    def _monitor_workers(self, worker_group: WorkerGroup) -> RunResult:
        result = super()._monitor_workers(worker_group)
        beats = self._beats(worker_group)
        if result.state == WorkerState.FAILED:
            # Root cause first. TorchElastic SIGTERMs the others once one has failed, and a
            # rank whose peer died exits with an error a moment later, after one more step:
            # so SIGTERM last, other signals first, then the rank that got least far.
            def order(item):
                rank, failure = item
                beat = beats.get(rank)
                return (failure.exitcode == -signal.SIGTERM, failure.exitcode > 0,
                        beat.step if beat else -1, failure.timestamp, rank)

            at_start = False
            for i, (rank, failure) in enumerate(sorted(result.failures.items(), key=order)):
                beat = beats.get(rank)
                if i == 0:
                    how = f"signal {failure.signal_name()}" if failure.exitcode < 0 else f"exit code {failure.exitcode}"
                    self.last_failure = f"rank {rank} {how} at step {beat.step if beat else None}"
                    # A worker of this node that died before it ever talked to its peers (no
                    # beat but the bootstrap's "starting": not even "joining", which
                    # launcher.bootstrap writes as it enters init_process_group): the node's
                    # own fault, e.g. a broken device. A worker that failed while joining or
                    # later may have been brought down by a peer (a store or a gloo
                    # connection reset).
                    at_start = failure.exitcode != -signal.SIGTERM and _before_joining(beat)
                self.event("worker_failed", rank=rank, exitcode=failure.exitcode,
                           signal=failure.signal_name() if failure.exitcode < 0 else None,
                           last_step=beat.step if beat else None, phase=beat.phase if beat else self._phase_without_beat())
            self._start_failures = self._start_failures + 1 if at_start else 0
            self._on_failure(beats)
        elif result.state == WorkerState.HEALTHY:
            if any(b.phase == contract.TRAINING for b in beats.values()):
                self._start_failures = 0
            left = self._peer_node_left(worker_group)
            if left:
                self.event("node_left", nodes_now=left[0], nodes_before=left[1],
                           step=max((b.step for b in beats.values()), default=None))
                self.last_failure = f"a node left the job ({left[0]} of {left[1]} nodes remain)"
                log.warning("a node left the job (%d of %d nodes remain); restarting the group without it", *left)
                self._kill_workers()
                self._last_failed = False  # not this node's failure: no backoff, no crash-loop count
                return RunResult(state=WorkerState.UNHEALTHY)
            if self.stop_requested_at is not None and time.monotonic() - self.stop_requested_at > self.policy.grace_period:
                self._kill_workers()
                self.event("grace_expired", grace_period=self.policy.grace_period)
                self._give_up(f"workers did not stop within the {self.policy.grace_period:g} s grace period")
                return RunResult(state=WorkerState.FAILED)
            hung = self._find_hung(worker_group, beats)
            if hung:
                self._kill_workers()
                now = time.time()
                for rank, phase, step, silent in hung:
                    # since: when the rank last made progress (the time the hang cost counts from)
                    self.event("hang_detected", rank=rank, phase=phase, step=step, silent_seconds=round(silent, 2),
                               since=round(now - silent, 4))
                rank, phase, step, silent = hung[0]
                self.last_failure = f"rank {rank} made no progress for {silent:.1f} s (phase {phase}, step {step})"
                log.error("rank %d made no progress for %.1f s (phase %s, step %d); ranks %s hung; restarting",
                          rank, silent, phase, step, [h[0] for h in hung])
                self._on_failure(beats)
                return RunResult(state=WorkerState.UNHEALTHY)
        elif result.state == WorkerState.SUCCEEDED:
            self.event("workers_succeeded", known_committed=self._known_committed)
        return result

    def _find_hung(self, worker_group: WorkerGroup, beats: dict[int, contract.Beat]) -> list[tuple]:
        """(rank, phase, step, seconds silent) of every rank past its phase's limit, root cause
        first: a rank the kernel shows stopped (SIGSTOP), then the one that went quiet first
        (a stopped or stuck rank leaves its peers blocked in a collective, and they go quiet
        a moment after it)."""
        now = time.monotonic()
        hung = []
        for worker in worker_group.workers:
            if not is_running(worker.id):
                continue  # finished already (its peers may still be working)
            beat = beats.get(worker.global_rank)
            if beat:
                phase, since, step, limit = beat.phase, beat.time, beat.step, self.policy.limit_for(beat.phase, beat.source)
            else:  # not at its script yet (a pre-warmed one may wait for the fork server's imports)
                phase, since, step = self._phase_without_beat(), self._generation_started, -1
                limit = self.policy.limit_for(phase)
            silent = now - since
            # A rank the kernel shows stopped (SIGSTOP) does no I/O either: past the hang
            # limit it is hung in any phase. Stopped mid-save, it would otherwise leave itself
            # and its peers (waiting in the save's collectives) under the long I/O limit.
            stopped = beat is not None and 0 < self.policy.hang_timeout < silent and is_stopped(beat.os_pid)
            if stopped or (limit and silent > limit):
                hung.append((not stopped, worker.global_rank, phase, step, silent))
        return [h[1:] for h in sorted(hung, key=lambda h: (h[0], -h[4]))]

    def _phase_without_beat(self) -> str:
        return contract.LAUNCHING if self.bootstrapped else contract.STARTING

    def _peer_node_left(self, worker_group: WorkerGroup) -> tuple[int, int] | None:
        """(nodes now, nodes in this generation) when the rendezvous shows fewer live nodes than
        the generation started with: a node whose agent left or died stopped its keep-alive,
        and the rendezvous dropped it. Its workers would otherwise leave ours waiting in a
        collective (or in init_process_group) until a timeout."""
        holder = getattr(worker_group.spec.rdzv_handler, "_state_holder", None)
        before = worker_group.group_world_size or 1
        if holder is None or before <= 1:
            return None
        state = holder.state  # synced by num_nodes_waiting() after every monitor pass
        if state.complete and 0 < len(state.participants) < before:
            return len(state.participants), before
        return None

    def _elastic(self) -> bool:
        settings = getattr(self._worker_group.spec.rdzv_handler, "settings", None)
        return settings is not None and settings.min_nodes < settings.max_nodes

    def _on_failure(self, beats: dict[int, contract.Beat]) -> None:
        self._last_failed = True
        if self._elastic() and self._start_failures >= max(1, self.policy.crash_loop_limit):
            # A node whose workers fail at start every time (a broken device) must not
            # crash-loop the whole job: it leaves, without closing the rendezvous, and the
            # other nodes go on at the smaller size.
            self.leaving = True
            self.event("node_leaving", start_failures=self._start_failures, last_failure=self.last_failure)
            self._give_up(f"this node's workers failed at start {self._start_failures} times in a row (last: "
                          f"{self.last_failure}); the node leaves the job and the other nodes go on without it")
            return
        # Progress: a newer commit, or a later step reached than at the failure before (with the
        # memory tier a restart resumes where the last one died, and commits may be far apart;
        # a crash at the same step every time is still a loop).
        # Steps of a Reporter only (the bootstrap's count optimizer steps per process, from 0 in
        # every generation), against the furthest any failure before reached.
        reached = max((b.step for b in beats.values() if b.source == contract.REPORTER and b.step >= 0), default=None)
        progressed = (self._known_committed is not None and (
            self._committed_at_last_failure is None or self._known_committed > self._committed_at_last_failure)) or (
            reached is not None and (self._reached_at_last_failure is None or reached > self._reached_at_last_failure))
        self._committed_at_last_failure = self._known_committed
        if reached is not None:
            self._reached_at_last_failure = max(reached, self._reached_at_last_failure or reached)
        self._streak = 0 if progressed else self._streak + 1
        if self.stop_requested_at is not None:
            self._give_up("a worker failed while the job was stopping")
        elif self._streak > self.policy.crash_loop_limit:
            self.event("crash_loop", restarts_without_progress=self._streak - 1, last_committed=self._known_committed)
            self._give_up(f"{self._streak - 1} restarts in a row made no progress: no newer committed checkpoint "
                          f"(newest: {'none' if self._known_committed is None else f'step {self._known_committed}'}), "
                          "no step past the failure before")

    def persist_memory(self) -> None:
        """After the last failure: commit the memory tier's newest snapshot (``persist.py``)."""
        from .persist import persist_memory

        persist_memory(self)

    # -- preemption ---------------------------------------------------------------------
    def request_stop(self, reason: str) -> None:
        """Ask the workers to stop at an agreed step, commit it and exit 0."""
        if self.stop_requested_at is None:
            self.stop_requested_at = time.monotonic()
            with open(contract.stop_path(self.run_dir), "w") as f:
                f.write(reason + "\n")
            self.event("stop_requested", reason=reason, grace_period=self.policy.grace_period)
            log.warning("%s: asking workers to stop at the next step and commit it (grace period %g s)",
                        reason, self.policy.grace_period)


def _before_joining(beat: contract.Beat | None) -> bool:
    """The worker had not begun to join its process group: no beat, or only the bootstrap's
    mark that its script started."""
    return beat is None or (beat.source == contract.BOOTSTRAP and beat.phase == contract.STARTING)
