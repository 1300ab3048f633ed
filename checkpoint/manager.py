"""CheckpointManager: scheduled, sharded, committed, verified checkpoints.

``save`` runs the commit protocol described in ``manifest.py`` (``commit.py``: every rank
writes its shards through DCP; rank 0 writes the commit record only after every rank reported
success), either in the caller's thread (``async_mode="off"``) or, after a blocking copy of
the state, in a background thread (``"thread"``, ``background.py``). ``maybe_save`` also takes
the memory tier's snapshots (``memory_tier.py``). ``load`` resumes from the memory tier when
it holds a step at least as new as the durable one; otherwise it finds the newest committed
checkpoint that verifies (rank 0, broadcast) and every rank loads that one step (DCP reshards
when the world size changed); with verify="hash" the shards' crc32s are checked while they
load (``_hashes_while_loading``), and a failing one makes way for the one before it.

Every step that only rank 0 does goes through ``_on_rank0``, which shares its result or its
error with all ranks: a failure on one rank never leaves the others waiting in a collective.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pickle
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Mapping

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint._traverse import traverse_state_dict  # the walk DCP's planner does

from . import _dist
from . import retention
from .background import BackgroundSaver
from .commit import Committer
from .config import CheckpointConfig
from .errors import CheckpointError, SaveFailuresExceeded, one_line
from .lease import Lease, LeaseHeldError
from .mirror import Mirror
from .manifest import (DCP_METADATA_NAME, MANIFEST_NAME, SHARDS_LATER, Manifest, Rejection, check_shard_hashes,
                       is_shard, list_steps, step_dir_name)
from .memory_tier import MemoryTier, MemoryTierUnavailable
from .observer import ALREADY_COMMITTED, COMMITTED, FAILED, SKIPPED, STAGED, Observer, SaveResult, SaveStats
from .reader import ReadAhead, reader_for
from .safe_load import SafeLoadPlanner, UnsafeCheckpointError, default_item_globals, unpickling_reason
from .state import TrainingState, incompatibility
from .storage import Storage
from .writer import WriteRecord

log = logging.getLogger("checkpoint")


class CheckpointManager:
    """Save and resume one training job's state under ``root``.

    Args:
        root: a directory or an fsspec URL (``memory://...``, ``s3://...``).
        model, optimizer, scheduler: the live objects; a DDP-wrapped model is fine.
        state: more things to save by name: Stateful objects (``state_dict``/``load_state_dict``)
            or plain dicts, e.g. ``{"progress": progress, "data": sampler}``.
        config: schedule, retention, verification and async saving (``CheckpointConfig``);
            its fields may also be given one by one as keywords (``save_every_steps=100``).
        observer: told of every phase (``observer.Observer``): a training loop's heartbeat
            phases and run log, fault injection, tests.
        metadata: user data written into every commit record (config, run name, ...).
        safe_globals: types of your own that non-tensor items of your state may hold, added to
            the allow-list of ``torch.load(weights_only=True)`` (loading never runs code from
            a checkpoint file: ``checkpoint.safe_load``).
        hmac_key: keyed mode (bytes or str): every file gets a SHA-256 taken while writing, and
            the record an HMAC-SHA256 signature; only checkpoints signed with this key load or
            count for retention, so someone who can write the directory but does not hold the
            key cannot forge one that passes (``verify="hash"`` then checks the SHA-256s).
        storage_options: fsspec's options for a remote root, e.g. ``{"endpoint_url": ...}`` for
            S3 (the standard AWS variables, ``AWS_ENDPOINT_URL`` among them, need none).
    """

    def __init__(self, root: str | os.PathLike, *, model=None, optimizer=None, scheduler=None,
                 state: Mapping[str, Any] | None = None, config: CheckpointConfig | None = None,
                 observer: Observer | None = None, metadata: Mapping[str, Any] | None = None,
                 safe_globals: list | tuple = (), hmac_key: bytes | str | None = None,
                 storage_options: Mapping[str, Any] | None = None, **options):
        unknown = sorted(set(options) - {f.name for f in dataclasses.fields(CheckpointConfig)})
        if unknown:
            raise TypeError(f"CheckpointManager got unknown option(s) {', '.join(unknown)}; the options are "
                            f"CheckpointConfig's fields: {', '.join(f.name for f in dataclasses.fields(CheckpointConfig))}"
                            "; hooks (before_commit, committed, before_load...) are methods of a "
                            "checkpoint.Observer passed as observer=")
        config = config.checkpoint_config() if config is not None else CheckpointConfig()
        self.config = dataclasses.replace(config, **options)  # validated again
        self.storage = Storage(root, dict(storage_options or {}))
        self.training = TrainingState(model, optimizer, scheduler, state)
        self.observer = observer or Observer()
        self.metadata = dict(metadata or {})
        self.safe_globals = [*default_item_globals(), *safe_globals]
        self.hmac_key = hmac_key.encode() if isinstance(hmac_key, str) else hmac_key
        if self.hmac_key is not None and len(self.hmac_key) < 16:
            raise ValueError("hmac_key must be at least 16 bytes (a random secret, e.g. secrets.token_hex(32))")
        self.rank = _dist.rank()
        self.world_size = _dist.world_size()
        self._group = _dist.control_group()
        self._last_save_time = time.monotonic()
        self.last_committed: int | None = None
        self._failed_loads: dict[int, str] = {}  # steps of this root that failed while loading: saved again
        self.stats = SaveStats()
        self._background = (BackgroundSaver(self._prepare_write_and_commit, self.stats)
                            if self.config.async_mode == "thread" else None)
        self.resumed_from_memory = False  # whether the last load() came from the memory tier
        self._save_owed = False
        self._failures_in_row = 0  # scheduled saves that failed since the last commit
        self._scheduled = False  # inside maybe_save: a failure past the allowance raises
        self._memory: MemoryTier | None = None
        self._committer = Committer(self.storage, self.config, self.observer, self.metadata, self.hmac_key,
                                    self.safe_globals, self.rank, self.world_size)

        # Fail before any training happens when the root cannot be written, or is another
        # live job's (rank 0 holds the root's lease while it may commit).
        self._on_rank0(self.storage.check_writable, "")
        self._mirror: Mirror | None = None
        self.mirror_storage = Storage(self.config.mirror, dict(storage_options or {})) if self.config.mirror else None
        if self.mirror_storage is not None:
            if self.mirror_storage.url == self.storage.url:
                raise CheckpointError(f"mirror {self.config.mirror!r} is the checkpoint root itself; give another place")
            self._on_rank0(self.mirror_storage.check_writable, "")
            if self.rank == 0:
                self._mirror = self._committer.mirror = Mirror(self.storage, self.mirror_storage, self.config.keep_last,
                                                               self.config.keep_every, self.observer,
                                                               self.safe_globals, self.hmac_key)
        self._lease: Lease | None = None
        if self.storage.is_local:
            self._on_rank0(self._take_lease, "")
        if self.config.memory_every:
            try:
                self._memory = MemoryTier(self.config, self.storage, self.training, self.rank, self.world_size,
                                          self._group, self.safe_globals)
            except MemoryTierUnavailable as e:
                if self.config.memory_every != "auto":  # asked for by number: the user must know
                    raise
                if self.rank == 0:  # "auto" (the trainer's default) goes without, saying so
                    log.warning("the memory tier is off: %s", e)

    @property
    def memory_dir(self) -> str | None:
        """This job's snapshot directory in the memory tier (None when the tier is off): what
        a launcher cleans up, or persists from, after the job ends for good."""
        return self._memory.snapshots.run_dir if self._memory is not None else None

    @property
    def last_snapshot(self) -> int | None:
        """The newest step this process put in the memory tier (None: none, or the tier is off)."""
        return self._memory.last_step if self.memory_on else None

    @property
    def memory_on(self) -> bool:
        """Whether this rank's memory tier is on (it turns off for good if shared memory fills up)."""
        return self._memory is not None and not self._memory.off

    def snapshot_now(self, step: int) -> int | None:
        """Put ``step`` in the memory tier now, whatever its interval (no collective), e.g. the
        step reached before a planned restart; ``step``, or None when the tier is off."""
        if self._memory is not None:
            self._memory.snapshot(step)
        return step if self.last_snapshot == step else None

    def _on_rank0(self, fn: Callable[[], Any], what: str, group: Any = None) -> Any:
        return _dist.on_rank0(self.rank, fn, what, self._group if group is None else group)

    def _take_lease(self) -> None:
        self._lease = self._committer.lease = Lease(self.storage.root).acquire()

    # -- schedule --------------------------------------------------------------------------
    def should_save(self, step: int) -> bool:
        """Whether ``step`` is a save step; the same answer on every rank."""
        every = self.config.save_every_steps
        due = (every > 0 and step % every == 0) or self._save_owed  # owed: after a memory resume
        if self.config.save_every_seconds > 0:
            # Clocks differ between ranks: rank 0 decides, everyone follows.
            late = time.monotonic() - self._last_save_time >= self.config.save_every_seconds
            due = bool(_dist.broadcast(due or late, self._group))
        return due

    def maybe_save(self, step: int, metrics: Mapping[str, Any] | None = None) -> SaveResult | None:
        """Call every step with the same ``step`` on every rank: takes the memory snapshot when
        due, then saves when due (None when not)."""
        if self._memory is not None:
            self._memory.maybe_snapshot(step)
        if not self.should_save(step):
            return None
        self._save_owed = False
        started = time.monotonic()
        self._scheduled = True
        try:
            return self.save(step, metrics, skip_if_busy=self.config.if_busy == "skip")
        except (SaveFailuresExceeded, LeaseHeldError):
            raise  # past the allowance; or another job owns the root now: never go on writing into it
        except CheckpointError as e:
            self._last_save_time = time.monotonic()  # the next try waits a whole interval, time-based too
            self._save_failed(step, e, logged=False)  # raises beyond the allowance
            return SaveResult(step, FAILED, time.monotonic() - started, 0)
        finally:
            self._scheduled = False

    def _save_failed(self, step: int, error: CheckpointError, logged: bool, may_raise: bool = True) -> None:
        """A save failed on every rank (its collectives carry one rank's failure to all): go on
        without it, or raise once ``save_failures_allowed`` in a row have failed. ``logged``:
        the background writer already said what failed, when it failed. ``may_raise``: False
        for the previous save's failure learnt by an explicit save, which still gets its own
        try (a final save, one on a stop: storage may be back)."""
        if isinstance(error, LeaseHeldError):
            raise error
        self._failures_in_row += 1
        allowed = self.config.save_failures_allowed
        if self._failures_in_row > allowed and may_raise:
            raise SaveFailuresExceeded(f"{error} ({self._failures_in_row} saves in a row failed; "
                                       f"save_failures_allowed is {allowed})") from error
        if self.rank == 0:
            (log.info if logged else log.error)(
                "the save of step %d failed; training goes on (%d more failed save(s) in a row allowed)%s",
                step, max(0, allowed - self._failures_in_row), "" if logged else f": {error}")
        try:  # a hook failing on one rank must not make the ranks disagree
            self.observer.save_failed(step, str(error))
        except Exception as e:
            log.warning("the observer's save_failed() failed for step %d: %s", step, one_line(e))

    # -- save ------------------------------------------------------------------------------
    def save(self, step: int, metrics: Mapping[str, Any] | None = None, *,
             skip_if_busy: bool = False, wait: bool = False) -> SaveResult:
        """Save ``step`` on every rank (all ranks call it at the same step); the result says
        what happened: committed (sync), staged (async: ``observer.committed``, ``wait`` and
        ``poll`` see the commit), skipped, or already committed (a committed checkpoint is
        never written again). An async save waits for the one in flight, unless
        ``skip_if_busy`` (what ``maybe_save`` passes for ``if_busy="skip"``): then it is
        skipped while one is in flight. An explicit final save is never skipped. ``wait``:
        also block until an async save is committed (a final save, one on preemption); the
        result still says what the hand-off did."""
        self.observer.save_started(step)
        started = time.monotonic()
        with self.observer.blocking("saving", step):
            result = self._save(step, metrics, skip_if_busy, started)
            if wait:
                self.wait()
        if result.outcome in (COMMITTED, STAGED):
            self.stats.last_stall_seconds = result.stall_seconds
        self.observer.save_returned(result)
        return result

    def _save(self, step: int, metrics, skip_if_busy: bool, started: float) -> SaveResult:
        def result(outcome: str, nbytes: int = 0, manifest: Manifest | None = None) -> SaveResult:
            return SaveResult(step, outcome, time.monotonic() - started, nbytes, manifest)

        if self._background is not None:
            # Rank 0 decides for all (asked at every save: whether a rank's poll() already
            # collected a finished save differs between ranks).
            if skip_if_busy and self._on_rank0(lambda: self.in_flight, ""):
                log.warning("skipping the save of step %d: step %d is still being written (if_busy='skip')",
                            step, self._background.staged_step)
                return result(SKIPPED)
            try:
                self.wait()  # back-pressure
            except CheckpointError as e:  # the previous save failed: counted, then this one goes ahead
                self._save_failed(self._background.staged_step, e, logged=True, may_raise=self._scheduled)
        if self._background is None:
            if self._prepare(step, self._group):
                self._last_save_time = time.monotonic()
                return result(ALREADY_COMMITTED)
            manifest, _ = self._write_and_commit(step, self.training.state_dict(self.rank), metrics, started,
                                                 self._group)
            self._committed(manifest)
            self._last_save_time = time.monotonic()
            return result(COMMITTED, manifest.total_bytes, manifest)
        nbytes = self._background.submit(step, self.training.state_dict(self.rank), metrics, started)
        self._last_save_time = time.monotonic()
        staged = result(STAGED, nbytes)
        log.info("step %d staged in %.3f s (%.2f MiB); writing it in the background",
                 step, staged.stall_seconds, nbytes / 2**20)
        return staged

    @property
    def in_flight(self) -> bool:
        """Whether a background save is still being written or committed."""
        return self._background is not None and self._background.in_flight

    def poll(self) -> Manifest | None:
        """Non-blocking: the record of a background save committed since the last call, or
        None. No collective: ranks may learn of a commit a step apart. A failed save is left
        for the next save (or ``wait``), which reports it on every rank at the same step."""
        return self._committed(self._background.poll() if self._background is not None else None)

    def wait(self) -> Manifest | None:
        """Block until the save in flight (if any) is committed; return its record, or raise
        ``CheckpointError`` if it failed (nothing was committed)."""
        return self._committed(self._background.wait() if self._background is not None else None)

    def _committed(self, manifest: Manifest | None) -> Manifest | None:
        if manifest is not None:
            self._failures_in_row = 0
        return manifest

    def close(self) -> None:
        """Wait for the save in flight, stop the background thread, give the root's lease up.
        The memory snapshots go too: a job that closes its manager is done, or stopped with
        its state committed."""
        try:
            if self._background is not None:
                self._background.close()
            if self._mirror is not None:  # the last commit gets to the mirror before the job ends
                self._mirror.close()
            if self._memory is not None:
                self._memory.close()
        finally:
            retention.finish_deletions()  # what retention set aside is gone when the job ends
            if self._lease is not None:
                self._lease.release()

    def _prepare(self, step: int, group) -> bool:
        """Rank 0 clears what a failed earlier save of ``step`` left, for every rank; True
        if ``step`` is validly committed already (then it is not written again)."""
        path = self.storage.url_of(step_dir_name(step))
        if self._on_rank0(lambda: self._committer.prepare(step, self._failed_loads.get(step)), f"cannot prepare {path}",
                          group):
            log.info("step %d is already committed in %s; not saving it again", step, self.storage.url)
            return True
        return False

    def _write_and_commit(self, step: int, state: dict, metrics, started: float, group) -> tuple[Manifest, WriteRecord]:
        manifest, written = self._committer.write_and_commit(step, state, metrics, started, group)
        self.last_committed = step
        self._failed_loads.pop(step, None)
        return manifest, written

    def _prepare_write_and_commit(self, step: int, state: dict, metrics, started: float, group):
        """The writer thread's whole save. Preparing is done here, not in the training
        thread: on an object store it is a few requests (0.1-0.3 s), which training need not
        wait for. A step already committed is not written again: (None, None)."""
        if self._prepare(step, group):
            return None, None
        return self._write_and_commit(step, state, metrics, started, group)

    # -- load ------------------------------------------------------------------------------
    def load(self, memory_only: bool = False) -> Manifest | None:
        """Load the newest committed, verified checkpoint into the live objects (or the memory
        tier's newest snapshot, when it is at least as new).

        Returns its record (``.step``, ``.metadata``...), or None when there is none, in
        which case nothing is changed. Every rank gets the same answer. ``memory_only``: only
        the memory tier, never the disk (None when it holds nothing loadable).
        """
        with self.observer.blocking("loading", None):
            return self._load(memory_only)

    def _load(self, memory_only: bool = False) -> Manifest | None:
        self.wait()  # a save in flight must not race the search
        started = time.monotonic()
        if self._memory is not None:
            resumed, newest_durable = self._memory.resume(started)
            if resumed is not None:
                self.resumed_from_memory = True
                self.last_committed = newest_durable
                # The durable schedule goes on as if there had been no failure: a save due at or
                # before the resumed step that never committed is owed now, and the clock of
                # time-based saves keeps running from the last one.
                every = self.config.save_every_steps
                last_due = resumed.step - resumed.step % every if every else 0
                self._save_owed = last_due > (newest_durable or 0)
                return resumed
        if memory_only:
            return None

        read_ahead = ReadAhead(lambda: _newest_committed_files(self.storage)) if self._reads_ahead() else None
        try:
            return self._load_newest(started, read_ahead)
        finally:
            if read_ahead is not None:
                read_ahead.close()
                log.debug("read %.1f MB ahead of the load", read_ahead.bytes_read / 1e6)

    def _reads_ahead(self) -> bool:
        """Whether this rank reads the newest checkpoint ahead of the load (``ReadAhead``): on
        a local disk, one rank per node (its local rank 0; the node's other ranks read behind
        it, from the page cache), and only for a model whose parameters are plain tensors,
        where each rank loads all of it (DDP, one process). A node of a sharded model (DTensor,
        FSDP's flat parameters) needs only its ranks' share: reading all of it would take the
        disk from the reads it needs. (A pipeline stage or hand-made tensor parallelism with
        plain parameters loads a part too; its node then reads more than it needs, at most
        while its load lasts.)"""
        model = self.training.model
        return (self.storage.is_local and os.environ.get("LOCAL_RANK", str(self.rank)) == "0"
                and (model is None or all(type(p) in (torch.Tensor, torch.nn.Parameter) for p in model.parameters())))

    def _load_newest(self, started: float, read_ahead: ReadAhead | None) -> Manifest | None:
        failed: dict[tuple[str, int], Rejection] = {}  # (root url, step): found bad while loading
        self._failed_loads = {}  # this search's, not an earlier one's
        while True:
            found, from_mirror = self._on_rank0(lambda: self._discover(failed), "")
            if found is None:
                if failed:  # the live state holds part of a bad checkpoint: not a fresh start
                    raise CheckpointError(
                        f"no checkpoint could be loaded: {'; '.join(failed.values())}. The model and optimizer "
                        "were partly overwritten by it, so this process cannot start fresh; start it again")
                log.info("no committed checkpoint in %s%s; starting from scratch", self.storage.url,
                         f" or its mirror {self.mirror_storage.url}" if self.mirror_storage is not None else "")
                return None
            manifest = Manifest.from_json(found)
            source = self.mirror_storage if from_mirror else self.storage
            if read_ahead is not None:  # reading another checkpoint ahead would only take the disk from this one
                if from_mirror:
                    read_ahead.close()
                else:
                    read_ahead.keep_only(self.storage.join(step_dir_name(manifest.step)))
            state, rejection = self._load_step(manifest, source)
            if rejection is None:
                break
            failed[(source.url, manifest.step)] = rejection
            if source is self.storage:
                self._failed_loads[manifest.step] = rejection
            log.warning("checkpoint step %d failed verification while loading; trying the one before: %s",
                        manifest.step, rejection)
            if self.rank == 0 and rejection.kind != "unreadable":  # out of the next start's way
                retention.quarantine(source, manifest.step, rejection)
        self.training.apply(state, self.rank)
        self.resumed_from_memory = False
        self.last_committed = manifest.step
        self._last_save_time = time.monotonic()
        where = source.url_of(step_dir_name(manifest.step))
        log.info("loaded checkpoint step %d from %s in %.3f s (saved at world size %d, now %d)",
                 manifest.step, where, time.monotonic() - started, manifest.world_size, self.world_size)
        return manifest

    def _hashes_while_loading(self, storage: Storage) -> bool:
        """With verify="hash", discovery checks the sizes, the crc32 of every file but the
        shards (DCP's ``.metadata``: the load plans its reads from it) and what loading
        unpickles, and the ranks check the shards' crc32s, a share each, from the bytes the
        load reads (local CPU tensors) or while it reads them: their bytes come from the disk
        once. A checkpoint that fails then has been partly read into the live state; the one
        before it overwrites all of it. Not in keyed mode, where every byte is authenticated
        before it is used; and only where two readers of a file get a stream each (fsspec's
        memory:// hands both the same one)."""
        return (self.config.verify == "hash" and self.hmac_key is None
                and (storage.is_local or storage.is_object_store))

    def _discover(self, failed: dict) -> tuple[bytes | None, bool]:
        """Rank 0: the record of the checkpoint to load, and whether it is the mirror's.
        With a mirror: the newer of the two (a fresh node's local root is empty). The refusal
        of a fresh start over checkpoints of which none verifies stays the local root's; the
        mirror's bad ones are skipped with their warnings."""
        def newest(storage: Storage, allow_fresh_start: bool) -> Manifest | None:
            mode = SHARDS_LATER if self._hashes_while_loading(storage) else self.config.verify
            skip = {step: why for (url, step), why in failed.items() if url == storage.url}
            return retention.find_loadable(storage, mode, self.safe_globals, self.hmac_key, allow_fresh_start, skip)

        manifest = newest(self.storage, self.config.allow_fresh_start or self.mirror_storage is not None)
        mirrored = None if self.mirror_storage is None else newest(self.mirror_storage, True)
        if mirrored is not None and (manifest is None or mirrored.step > manifest.step):
            return mirrored.to_json(), True
        return (None, False) if manifest is None else (manifest.to_json(), False)

    def _load_step(self, manifest: Manifest, source: Storage) -> tuple[dict, Rejection | None]:
        """Every rank: read checkpoint ``manifest.step`` into the live state's tensors; returns
        that state (for ``training.apply``) and why the files' hashes, checked by the ranks
        meanwhile (``_hashes_while_loading``), fail (the same on every rank), or None."""
        deferred = self._hashes_while_loading(source)
        dirname = step_dir_name(manifest.step)
        where = source.url_of(dirname)
        # Ranks beyond the saved world size have no RNG state of their own to restore.
        state = self.training.state_dict(self.rank, with_rng=self.rank < manifest.world_size)
        # Each rank checks a share of the shards: under DDP every rank reads all of them, and
        # one rank checking them all would read twice what the others do. On a local disk the
        # reader takes their crc32s from the bytes it reads; elsewhere a thread reads them.
        shards = sorted(name for name in manifest.files if is_shard(name))[self.rank::self.world_size]
        # Only when every tensor is a plain CPU one: others go through DCP's own path, which
        # would read them after the checksum had (the thread reads alongside instead).
        inline = deferred and source.is_local and _plain_cpu_tensors_only(state)
        reader = reader_for(source, dirname, checksum=shards if inline else ())
        error = incompatibility(state, reader, where)
        errors = [e for e in _dist.all_gather(error, self._group, usual=None) if e]
        if errors:  # the same error on every rank, before any rank reads
            kind, message = errors[0]
            raise kind(message)
        self.observer.before_load(manifest.step)
        hashing = check = None
        if deferred and shards and not inline:
            hashing = ThreadPoolExecutor(1, thread_name_prefix="ckpt-verify")
            check = hashing.submit(check_shard_hashes, source, dirname, manifest, shards)
        try:
            failure = self._read_into(state, reader, where)
        except BaseException:  # KeyboardInterrupt, SystemExit: do not wait for the hashing
            if hashing is not None:
                hashing.shutdown(wait=False)
            raise
        hashes = (None, None)  # this rank's (rejection, (error type, text) while hashing)
        try:
            if hashing is not None:
                hashing.shutdown()
                hashes = (check.result(), None)
            elif inline and shards:  # what the read did not cover (a failed read, another plan) is read here
                hashes = (check_shard_hashes(source, dirname, manifest, shards, reader.crc32s), None)
        except Exception as e:
            hashes = (None, (type(e), str(e)) if isinstance(e, CheckpointError) else (CheckpointError, one_line(e)))
        if (hashes == (None, None) and self.hmac_key is None
                and isinstance(failure, (pickle.UnpicklingError, UnsafeCheckpointError))):
            # A record that does not unpickle safely: forged (its checksum rewritten), or an
            # environment that lacks what the saver had (another torch, a type not allowed
            # here). Skipped for this load as discovery skips such small items, not judged:
            # nothing is quarantined, and when no checkpoint loads the job fails naming each.
            # (Keyed mode authenticated every byte first: a refusal there fails the load.)
            hashes = (Rejection(f"{where}: a record was not loaded on rank {self.rank}: {unpickling_reason(failure)}",
                                "unreadable"), None)
        read_error = None if failure is None else f"rank {self.rank}: " + (
            f"UnpicklingError: {unpickling_reason(failure)}" if isinstance(failure, pickle.UnpicklingError)
            else one_line(failure))
        outcomes = _dist.all_gather((hashes, read_error), self._group, usual=((None, None), None))
        for (_, hash_error), _ in outcomes:
            if hash_error:
                kind, text = hash_error
                raise kind(text)
        # A file that fails its checksum outranks one a rank could not read: only the first
        # makes the checkpoint bad (quarantined); the second may be that rank's disk.
        rejections = sorted((r for (r, _), _ in outcomes if r is not None), key=lambda r: r.kind == "unreadable")
        rejection = rejections[0] if rejections else None
        errors = [error for _, error in outcomes if error]
        # A corrupt file may be why a read failed: the hashes decide first.
        if rejection is None and errors:
            raise CheckpointError(f"loading checkpoint {where} failed: {errors[0]}") from failure
        return state, rejection

    def _read_into(self, state: dict, reader, where: str) -> BaseException | None:
        """Read the checkpoint into ``state``'s tensors; this rank's failure, or None. Each rank
        plans and reads alone (no_dist): DCP's default load plan involves no coordination (its
        global step returns the local plans unchanged), so the two collectives it would spend
        on planning and on gathering errors (0.02 s of the bench's 101 MB load) buy nothing;
        the ranks agree on the outcome afterwards."""
        try:
            dcp.load(state, storage_reader=reader, planner=SafeLoadPlanner(self.safe_globals, where), no_dist=True)
            return None
        except (Exception, CheckpointException) as e:
            failure = e
            if isinstance(e, CheckpointException) and e.failures:  # no_dist: its one entry, keyed "rank 0"
                failure = next(iter(e.failures.values()))[0]
        if isinstance(failure, (KeyboardInterrupt, SystemExit)):  # DCP wraps those too
            raise failure
        return failure


def _newest_committed_files(storage: Storage) -> list[str]:
    """The files of the newest checkpoint with a record under a local root, in the order the
    load reads them (record, DCP's ``.metadata``, shards by name); [] when there is none.
    Not verified: the load that follows finds the checkpoint to load; this is what it most
    likely reads."""
    for step in reversed(list_steps(storage)):
        directory = storage.join(step_dir_name(step))
        names = set(os.listdir(directory))
        if MANIFEST_NAME in names:
            ordered = [MANIFEST_NAME, DCP_METADATA_NAME, *sorted(name for name in names if is_shard(name))]
            return [os.path.join(directory, name) for name in ordered if name in names]
    return []


def _plain_cpu_tensors_only(state: dict) -> bool:
    """Whether every tensor DCP finds in ``state`` (its own walk: a Mapping of any kind) is a
    plain CPU tensor or Parameter, which the direct reader reads in file order."""
    others = []

    def visit(_path, value) -> None:
        if isinstance(value, torch.Tensor) and (type(value) not in (torch.Tensor, torch.nn.Parameter)
                                                or value.device.type != "cpu"):
            others.append(type(value))

    traverse_state_dict(state, visit)
    return not others


# Without a process group DCP warns on every call that it assumes one process; we ask for
# exactly that (``no_dist``), so the warning is noise. A filter for that one message (a
# ``catch_warnings`` block would not be thread-safe in the writer thread).
warnings.filterwarnings("ignore", message="torch.distributed is (disabled|unavailable)")
