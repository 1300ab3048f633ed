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

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import time

from torch.distributed.elastic.agent.server.api import RunResult, WorkerGroup, WorkerState
from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent
from torch.distributed.elastic.rendezvous import dynamic_rendezvous

from . import contract
from .policy import Policy
from .proctree import is_running, is_stopped

PAUSE_WAIT = 10.0  # a restart for a node that joins waits for the workers' snapshot at most this, or 3 steps (s)
STOP_CHECK_AFTER = 0.5  # a rank silent this long is looked at: is the kernel showing it stopped? (s)
_torch_delay = dynamic_rendezvous._delay


def _fixed_delays_only(seconds) -> None:
    """The rendezvous' ``_delay`` without its random start-up skew (a (low, high) range); its
    fixed delays (1 s between polls while waiting for other nodes) stay."""
    if not isinstance(seconds, tuple):
        _torch_delay(seconds)


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
        self._survivors_killed: set[int] = set()  # global ranks this agent SIGKILLed after a peer failed
        self._step_seconds = 0.0  # the latest seconds per step seen in the beats
        self._stopped_since: dict[int, float] = {}  # os pid -> when the kernel was first seen showing it stopped
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
                before = self._beat_cache.get(worker.global_rank)
                if (before is not None and before.pid == beat.pid and beat.step > before.step >= 0
                        and before.phase == beat.phase == contract.TRAINING):
                    self._step_seconds = (beat.time - before.time) / (beat.step - before.step)
                beats[worker.global_rank] = self._beat_cache[worker.global_rank] = beat
                if beat.committed is not None:
                    self._known_committed = max(beat.committed, self._known_committed or beat.committed)
        return beats

    def _kill_workers(self) -> None:
        for pid in (self._pcontext.pids().values() if self._pcontext else []):
            # Its process group, as TorchElastic's own close does (each worker leads a session
            # of its own): a --no-python wrapper's trainer, a script's children go too.
            for kill in (lambda: os.killpg(pid, signal.SIGKILL), lambda: os.kill(pid, signal.SIGKILL)):
                try:
                    kill()  # also ends a SIGSTOPped process
                    break
                except (ProcessLookupError, PermissionError):
                    continue

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
        # TorchElastic's c10d handler sleeps a random 0-0.3 s before a node's first round, to
        # skew the nodes' first joins; its round counter is still 0 at the first restart,
        # which paid it too (measured: 0.02-0.28 s of a 0.7 s recovery). Restarts skip it.
        dynamic_rendezvous._delay = _torch_delay if self.attempt == 0 else _fixed_delays_only
        try:
            super()._rendezvous(worker_group)
        finally:
            dynamic_rendezvous._delay = _torch_delay
        self.event("rendezvous", seconds=round(time.monotonic() - started, 4),
                   world_size=worker_group.workers[0].world_size if worker_group.workers else 0,
                   group_rank=worker_group.group_rank, group_world_size=worker_group.group_world_size)

    def _start_workers(self, worker_group: WorkerGroup):
        shutil.rmtree(contract.heartbeat_dir(self.run_dir), ignore_errors=True)
        os.makedirs(contract.heartbeat_dir(self.run_dir), exist_ok=True)
        self._survivors_killed, self._stopped_since = set(), {}
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
        that the new group resumes from that step and none is run twice. Only when every
        worker of this node has a memory tier (the flag then reaches every rank of every node
        through the stop request's all_reduce), and for at most PAUSE_WAIT s or three steps,
        whichever is longer (the ranks see the request at their next check, a step or more
        apart); a restart without the pause costs the steps since the last snapshot."""
        workers = worker_group.workers
        beats = self._beats(worker_group)
        if (worker_group.state != WorkerState.HEALTHY or not self._node_joins(worker_group) or len(beats) < len(workers)
                or not all(b.memory for b in beats.values()) or not all(is_running(w.id) for w in workers)):
            return
        started = time.monotonic()
        wait = max(PAUSE_WAIT, 3 * self._step_seconds)
        with open(contract.restart_path(self.run_dir), "w") as f:
            f.write("a node joins: snapshot the step reached and wait for the restart\n")
        while True:
            beats = self._beats(worker_group)
            if len(beats) == len(workers) and all(b.phase == contract.PAUSED for b in beats.values()):
                steps = sorted({b.snapshot for b in beats.values()}, key=lambda s: -1 if s is None else s)
                self.event("workers_paused", step=steps[0] if len(steps) == 1 else None, snapshots=steps,
                           seconds=round(time.monotonic() - started, 4))
                if len(steps) > 1:
                    log.warning("the workers paused with different snapshots (%s); the new group resumes from the "
                                "newest step they all hold", steps)
                return
            exited = [w.global_rank for w in workers if not is_running(w.id)]
            why = (f"rank(s) {exited} exited while pausing" if exited else
                   "the job is being stopped" if self.stop_requested_at is not None else
                   f"the workers did not pause within {wait:.0f} s" if time.monotonic() - started > wait else None)
            if why:
                log.warning("%s; restarting the group now (it resumes from the newest memory snapshots)", why)
                self.event("pause_failed", reason=why, seconds=round(time.monotonic() - started, 4))
                return
            time.sleep(0.01)  # sleep-ok: polling the beats, with a deadline

    @staticmethod
    def _rdzv_state(worker_group: WorkerGroup):
        """The c10d/etcd-v2 rendezvous' state as last synced (by the ``num_nodes_waiting()``
        TorchElastic calls after every monitor pass); None for other backends."""
        holder = getattr(worker_group.spec.rdzv_handler, "_state_holder", None)
        return holder.state if holder is not None else None

    def _node_joins(self, worker_group: WorkerGroup) -> bool:
        """The rendezvous shows a node waiting to join while every node of this generation is
        still in it (another node that restarts after a failure also waits, but left first)."""
        state = self._rdzv_state(worker_group)
        if state is None:
            return True  # another rendezvous backend: TorchElastic restarts a healthy group only for a join
        return state.complete and len(state.participants) == (worker_group.group_world_size or 1) and bool(state.wait_list)

    def _kill_survivors_of_a_failure(self, worker_group: WorkerGroup) -> None:
        """A worker exited with an error: SIGKILL the others before TorchElastic's poll sees
        it. That poll SIGTERMs them and waits for each to exit (up to 30 s), and a survivor
        blocked in a collective with the dead rank exits only when the collective fails
        (0.26 s here under gloo; under NCCL, its timeout). ``_stop_workers`` SIGKILLs them
        next anyway; all this can cost is a durable commit in its last milliseconds (rank 0
        writing the record, atomically: the step is then not committed). Not while the job
        is stopping: the stop's commit may still be in flight."""
        handlers = getattr(self._pcontext, "subprocess_handlers", None)
        if not handlers or self.stop_requested_at is not None:
            return
        codes = {local_rank: handler.proc.poll() for local_rank, handler in handlers.items()}
        if any(code not in (None, 0) for code in codes.values()) and None in codes.values():
            self._survivors_killed = {worker_group.workers[r].global_rank for r, code in codes.items() if code is None}
            self._kill_workers()
            deadline = time.monotonic() + 2
            for local_rank, code in codes.items():  # gone in a moment: TorchElastic's poll, next, sees them all
                if code is None:
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        handlers[local_rank].proc.wait(timeout=max(0.01, deadline - time.monotonic()))
            # Its close() then stops the console tails of their output one after the other, each
            # waiting out its thread's 0.1 s poll; told now, they finish together (each reads
            # its file to the end first; a line a dying process writes after that stays in its
            # log file under the run directory, only the console misses it).
            for tail in getattr(self._pcontext, "_tail_logs", ()):
                for finished in getattr(tail, "_finished_events", {}).values():
                    finished.set()

    def _monitor_workers(self, worker_group: WorkerGroup) -> RunResult:
        self._kill_survivors_of_a_failure(worker_group)
        result = super()._monitor_workers(worker_group)
        beats = self._beats(worker_group)
        if result.state == WorkerState.FAILED:
            # Root cause first. The others are SIGKILLed by us (or SIGTERMed by TorchElastic)
            # once one has failed, and a rank whose peer died exits with an error a moment
            # later, after one more step: so those last, other signals first, then the rank
            # that got least far.
            def order(item):
                rank, failure = item
                beat = beats.get(rank)
                return (rank in self._survivors_killed or failure.exitcode == -signal.SIGTERM, failure.exitcode > 0,
                        beat.step if beat else -1, failure.timestamp, rank)

            at_start = False
            for i, (rank, failure) in enumerate(sorted(result.failures.items(), key=order)):
                beat = beats.get(rank)
                if i == 0:
                    how = f"signal {failure.signal_name()}" if failure.exitcode < 0 else f"exit code {failure.exitcode}"
                    self.last_failure = f"rank {rank} {how} {_at_step(beat.step if beat else -1)}"
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
            if left and beats and all(b.phase == contract.PAUSED for b in beats.values()) and \
                    self._rdzv_state(worker_group).wait_list:
                # Our workers paused for a node that joins, and another node's agent, which
                # saw the join first, restarted its own and left the round: not a lost node.
                # TorchElastic sees the nodes waiting and restarts ours (no restart used).
                return result
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
                self.last_failure = f"rank {rank} made no progress for {silent:.1f} s (phase {phase}, {_at_step(step)})"
                log.error("rank %d made no progress for %.1f s (phase %s, %s); ranks %s hung; restarting",
                          rank, silent, phase, _at_step(step), [h[0] for h in hung])
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
            # A rank the kernel shows stopped (SIGSTOP) does no I/O either: stopped for longer
            # than the hang limit, it is hung in any phase. Stopped mid-save, it would otherwise
            # leave itself and its peers (waiting in the save's collectives) under the long I/O
            # limit. Counted from when it was first seen stopped, so a stop and continue (an
            # operator's, a scheduler's) during a long save or evaluation is not a hang.
            stopped_for = 0.0
            if beat is not None:
                if silent > STOP_CHECK_AFTER and is_stopped(beat.os_pid):
                    stopped_for = now - self._stopped_since.setdefault(beat.os_pid, now)
                else:  # it beat since, or runs: a later stop counts afresh
                    self._stopped_since.pop(beat.os_pid, None)
            stopped = beat is not None and beat.os_pid in self._stopped_since
            if (limit and silent > limit) or 0 < self.policy.hang_timeout < stopped_for:
                hung.append((not stopped, worker.global_rank, phase, step, silent))
        return [h[1:] for h in sorted(hung, key=lambda h: (h[0], -h[4]))]

    def _phase_without_beat(self) -> str:
        return contract.LAUNCHING if self.bootstrapped else contract.STARTING

    def _peer_node_left(self, worker_group: WorkerGroup) -> tuple[int, int] | None:
        """(nodes now, nodes in this generation) when the rendezvous shows fewer live nodes than
        the generation started with: a node whose agent left or died stopped its keep-alive,
        and the rendezvous dropped it. Its workers would otherwise leave ours waiting in a
        collective (or in init_process_group) until a timeout."""
        state = self._rdzv_state(worker_group)
        before = worker_group.group_world_size or 1
        if state is None or before <= 1:
            return None
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


def _at_step(step: int | None) -> str:
    """Where a rank was, for a failure's line: heartbeats say -1 until a step is reported (a
    script without Reporter or optimizer.step, or one still starting)."""
    return f"at step {step}" if step is not None and step >= 0 else "before any step it reported"
