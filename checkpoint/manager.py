"""CheckpointManager: scheduled, sharded, committed, verified checkpoints.

Save (every rank calls it at the same step)::

    rank 0: skip if step is validly committed; else clear what a failed save of it left
    all:    dcp.save -> shard files + DCP .metadata (crc32 computed while writing, fsynced)
    all:    the before_commit hook
    all:    gather sizes + checksums + any error   <- the barrier: nobody commits unless
                                                       every rank reported success
    rank 0: write manifest.json atomically          <- the commit; the outcome is broadcast
                                                       so every rank returns or raises the same
    rank 0: retention (logs its failures, never raises)

Every step that only rank 0 does goes through ``_on_rank0``, which shares its result or its
error with all ranks: a failure on one rank never leaves the others waiting in a collective.

Async saves (``async_mode="thread"``) split ``save`` in two. The blocking part (the caller's
thread) prepares the directory and copies the state into reused staging buffers (after the
first save, only the tensors DCP had this rank write, and any new ones); a background
thread then runs everything from ``dcp.save`` to the commit above, unchanged, on a process
group of its own (so its collectives never interleave with training's). At most one save is
in flight: the next one waits for it (``if_busy="wait"``) or is skipped (``"skip"``; rank 0
decides, so every rank skips the same step). A background failure never commits. Every rank
logs it the moment it happens, and the next save (or ``wait``) raises it on every rank at the
same step: the failure was shared through the save's own collectives, so all ranks hold the
same error. ``poll()`` raises it sooner, on the calling rank alone.

Load: rank 0 finds the newest committed checkpoint that verifies and broadcasts it; every
rank then loads that one step (DCP reshards when the world size changed).
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Mapping

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from . import _dist
from .errors import CheckpointError, CheckpointMismatchError
from .manifest import (DCP_METADATA_NAME, MANIFEST_NAME, VERIFY_MODES, FileRecord, Manifest,
                       find_latest, is_committed, step_dir_name, verify)
from . import retention
from .lease import Lease
from .reader import DirectFileSystemReader
from .safe_load import SafeLoadPlanner, default_item_globals, fsspec_reader
from .staging import Stager
from .state import TrainingState, check_compatible
from .storage import Storage
from .writer import WriteRecord, checksumming_writer

ASYNC_MODES = ("off", "thread")
IF_BUSY = ("wait", "skip")

log = logging.getLogger("checkpoint")


class CheckpointManager:
    """Save and resume one training job's state under ``root``.

    Args:
        root: a directory or an fsspec URL (``memory://...``, ``s3://...``).
        model, optimizer, scheduler: the live objects; a DDP-wrapped model is fine.
        state: more things to save by name: Stateful objects (``state_dict``/``load_state_dict``)
            or plain dicts, e.g. ``{"progress": progress, "data": sampler}``.
        save_every_steps: save when ``step % N == 0`` (0 = off).
        save_every_seconds: save when rank 0's clock says T seconds passed since the last
            save; rank 0's decision is broadcast, so every rank saves the same step (0 = off).
        keep_last: committed checkpoints to keep (0 = keep all). The newest is always kept.
        keep_every: also keep every checkpoint whose step is a multiple of M (0 = off).
        verify: how ``load`` checks a candidate: ``"size"`` (cheap) or ``"hash"`` (crc32 of
            every file; thorough).
        metadata: user data written into every commit record (config, run name, ...).
        before_commit: called on every rank with the step after the shards are written and
            before the record is; a hook for fault injection and tests.
        before_load: called on every rank with the chosen step before its data is read.
        on_commit: called on every rank with the record once a save is committed (in the
            background thread for async saves).
        async_mode: ``"off"``: ``save`` returns once the checkpoint is committed.
            ``"thread"``: ``save`` returns once the state is staged; a background thread
            writes and commits it.
        if_busy: async only: when a scheduled save (``maybe_save``) is due while the previous
            one is still being written, ``"wait"`` for it (back-pressure) or ``"skip"`` this
            save (logged; rank 0 decides for all).
        io_threads: files each rank writes in parallel (DCP's ``thread_count``).
        allow_fresh_start: when committed checkpoints exist (or were quarantined) but none
            verifies, ``load`` raises instead of starting from scratch, unless this is True.
        safe_globals: types of your own that non-tensor items of your state may hold, added to
            the allow-list of ``torch.load(weights_only=True)`` (loading never runs code from
            a checkpoint file: ``checkpoint.safe_load``).
        hmac_key: keyed mode (bytes or str): every file gets a SHA-256 taken while writing, and
            the record an HMAC-SHA256 signature; only checkpoints signed with this key load or
            count for retention, so someone who can write the directory but does not hold the
            key cannot forge one that passes (``verify="hash"`` then checks the SHA-256s).
    """

    def __init__(self, root: str | os.PathLike, *, model=None, optimizer=None, scheduler=None,
                 state: Mapping[str, Any] | None = None, save_every_steps: int = 0,
                 save_every_seconds: float = 0.0, keep_last: int = 3, keep_every: int = 0,
                 verify: str = "hash", metadata: Mapping[str, Any] | None = None,
                 before_commit: Callable[[int], None] | None = None,
                 before_load: Callable[[int], None] | None = None,
                 on_commit: Callable[[Manifest], None] | None = None,
                 async_mode: str = "off", if_busy: str = "wait", io_threads: int = 1,
                 allow_fresh_start: bool = False, safe_globals: list | tuple = (),
                 hmac_key: bytes | str | None = None):
        for name, value in (("save_every_steps", save_every_steps), ("save_every_seconds", save_every_seconds),
                            ("keep_last", keep_last), ("keep_every", keep_every)):
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        if verify not in VERIFY_MODES:
            raise ValueError(f"verify must be one of {VERIFY_MODES}, got {verify!r}")
        if async_mode not in ASYNC_MODES:
            raise ValueError(f"async_mode must be one of {ASYNC_MODES}, got {async_mode!r}")
        if if_busy not in IF_BUSY:
            raise ValueError(f"if_busy must be one of {IF_BUSY}, got {if_busy!r}")
        if io_threads < 1:
            raise ValueError(f"io_threads must be >= 1, got {io_threads}")
        self.storage = Storage(root)
        self.training = TrainingState(model, optimizer, scheduler, state)
        self.save_every_steps = int(save_every_steps)
        self.save_every_seconds = float(save_every_seconds)
        self.keep_last = int(keep_last)
        self.keep_every = int(keep_every)
        self.verify = verify
        self.metadata = dict(metadata or {})
        self.before_commit = before_commit
        self.before_load = before_load
        self.on_commit = on_commit
        self.async_mode = async_mode
        self.if_busy = if_busy
        self.io_threads = int(io_threads)
        self.allow_fresh_start = bool(allow_fresh_start)
        self.safe_globals = [*default_item_globals(), *safe_globals]
        self.hmac_key = hmac_key.encode() if isinstance(hmac_key, str) else hmac_key
        if self.hmac_key is not None and len(self.hmac_key) < 16:
            raise ValueError("hmac_key must be at least 16 bytes (a random secret, e.g. secrets.token_hex(32))")
        self._verified = retention.VerifiedCache()
        self.rank = _dist.rank()
        self.world_size = _dist.world_size()
        self._group = _dist.control_group()
        self._last_save_time = time.monotonic()
        self.last_committed: int | None = None
        self.last_stall_seconds = 0.0  # how long the last save() blocked its caller
        self.last_background_cpu_seconds = 0.0
        if async_mode == "thread":
            self._stager = Stager()
            self._background_group = _dist.private_group()
            # The CUDA device is per thread: without this, DCP's copies in the writer thread
            # would create a context on GPU 0 for every local rank.
            device = torch.cuda.current_device() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="checkpoint-save",
                                                initializer=_start_writer_thread, initargs=(device,))
        self._inflight: Future | None = None
        self._others_write: Callable[[str], bool] | None = None  # async: tensors another rank writes
        self.last_staged_step: int | None = None  # the newest step an async save() staged

        # Fail before any training happens when the root cannot be written, or is another
        # live job's (rank 0 holds the root's lease while it may commit).
        self._on_rank0(self.storage.check_writable, "")
        self._lease: Lease | None = None
        if self.storage.is_local:
            self._on_rank0(self._take_lease, "")

    def _take_lease(self) -> None:
        self._lease = Lease(self.storage.root).acquire()

    # -- schedule --------------------------------------------------------------------------
    def should_save(self, step: int) -> bool:
        """Whether ``step`` is a save step; the same answer on every rank."""
        due = self.save_every_steps > 0 and step % self.save_every_steps == 0
        if self.save_every_seconds > 0:
            # Clocks differ between ranks: rank 0 decides, everyone follows.
            late = time.monotonic() - self._last_save_time >= self.save_every_seconds
            due = bool(_dist.broadcast(due or late, self._group))
        return due

    def maybe_save(self, step: int, metrics: Mapping[str, Any] | None = None) -> Manifest | None:
        """Call every step with the same ``step`` on every rank: saves when due."""
        return self.save(step, metrics, skip_if_busy=self.if_busy == "skip") if self.should_save(step) else None

    # -- save ------------------------------------------------------------------------------
    def save(self, step: int, metrics: Mapping[str, Any] | None = None, *,
             skip_if_busy: bool = False) -> Manifest | None:
        """Save ``step`` on every rank (all ranks call it at the same step).

        Sync: returns the committed record, or None if the step was already committed (a
        committed checkpoint is never written again). Async: returns None once the state is
        staged; ``on_commit``/``wait()`` see the record. An async save waits for the one in
        flight, unless ``skip_if_busy`` (what ``maybe_save`` passes for ``if_busy="skip"``):
        then it is skipped while one is in flight. An explicit final save is never skipped.
        """
        started = time.monotonic()
        if self.async_mode != "off":
            # Rank 0 decides for all (asked at every save: whether a rank's poll() already
            # collected a finished save differs between ranks).
            if skip_if_busy and self._on_rank0(lambda: self.in_flight, ""):
                log.warning("skipping the save of step %d: step %d is still being written (if_busy='skip')",
                            step, self.last_staged_step)
                return None
            self.wait()  # back-pressure; raises the previous save's error
        path = self.storage.join(step_dir_name(step))
        if self._on_rank0(lambda: self._prepare(step), f"cannot prepare {path}"):
            log.info("step %d is already committed in %s; not saving it again", step, self.storage.url)
            self._last_save_time = time.monotonic()
            return None

        state = self.training.state_dict(self.rank)
        if self.async_mode == "off":
            manifest, _ = self._write_and_commit(step, state, metrics, started, self._group)
            self._last_save_time = time.monotonic()
            self.last_stall_seconds = time.monotonic() - started
            return manifest
        staged = self._stager.stage(state, self._others_write)
        self._inflight = self._executor.submit(self._background_save, step, staged, metrics, started,
                                               frozenset(self._stager.tensor_fqns))
        self.last_staged_step = step
        self._last_save_time = time.monotonic()
        self.last_stall_seconds = time.monotonic() - started
        log.info("step %d staged in %.3f s (%.2f MiB); writing it in the background",
                 step, self.last_stall_seconds, self._stager.nbytes / 2**20)
        return None

    @property
    def in_flight(self) -> bool:
        """Whether a background save is still being written or committed."""
        return self._inflight is not None and not self._inflight.done()

    def poll(self) -> Manifest | None:
        """Non-blocking: the record of a background save that finished since the last call, or
        None; raises ``CheckpointError`` if it failed. No collective: ranks may learn of a
        finished save a step apart, so under several ranks prefer the next save (or
        ``wait``), which raises a failure on every rank at the same step."""
        if self._inflight is None or not self._inflight.done():
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
        """Wait for the save in flight and stop the background thread."""
        try:
            self.wait()
        finally:
            if self.async_mode != "off":
                self._executor.shutdown(wait=True)
            if self._lease is not None:
                self._lease.release()

    def _background_save(self, step: int, staged: dict, metrics, started: float, known: frozenset) -> Manifest:
        cpu = time.thread_time()
        try:
            manifest, written = self._write_and_commit(step, staged, metrics, started, self._background_group)
            # From now on, stage only what this rank writes, and tensors not seen in this save.
            mine = frozenset(written.tensor_keys)
            self._others_write = lambda key: key in known and key not in mine
            return manifest
        except BaseException as e:
            # Also logged here: a process that exits without wait() still says what happened.
            log.error("background save of step %d failed (nothing committed; raised at the next save): %s",
                      step, e)
            raise
        finally:
            # CPU the writer thread took from this process (what training competes with when
            # no core is spare); the benchmark reports it.
            self.last_background_cpu_seconds = time.thread_time() - cpu

    def _write_and_commit(self, step: int, state: dict, metrics, started: float, group) -> tuple[Manifest, WriteRecord]:
        """Write ``state`` as checkpoint ``step`` and commit it; every collective on ``group``.
        Returns the record and what this rank's writer wrote."""
        dirname = step_dir_name(step)
        path = self.storage.join(dirname)
        try:
            writer, written = checksumming_writer(self.storage.url_of(dirname), local=self.storage.is_local,
                                                  io_threads=self.io_threads, sha256=self.hmac_key is not None)
            dcp.save(state, storage_writer=writer, process_group=group, no_dist=not _dist.initialized())
        except (Exception, CheckpointException) as e:  # DCP gathers every rank's failure into one
            raise CheckpointError(f"writing checkpoint {path} failed: {_short(e)}; "
                                  "the previous committed checkpoint stays") from e
        written_at = time.monotonic()

        # Each rank reports the files it wrote (checksummed while writing) and runs the hook;
        # the gather is the barrier: rank 0 commits only if every rank got this far.
        error = None
        try:
            if self.before_commit is not None:
                self.before_commit(step)
        except Exception as e:
            error = f"rank {self.rank} could not finish checkpoint {path}: {_short(e)}"
        files: dict[str, FileRecord] = {}
        for part in _dist.gather_or_raise(dict(written.files), error, group):
            files.update(part)

        manifest = Manifest(
            step=step, world_size=self.world_size, files=files,
            run_id=os.environ.get("TORCHELASTIC_RUN_ID", ""),
            restart_generation=int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")),
            torch_version=torch.__version__, created_unix=time.time(),
            save_seconds=round(time.monotonic() - started, 4),
            metadata={**self.metadata, **dict(metrics or {})},
        )

        def commit():
            if DCP_METADATA_NAME not in files:
                raise CheckpointError(f"DCP wrote no {DCP_METADATA_NAME}")
            if self._lease is not None:
                self._lease.check()  # another job took the root over (we were frozen): never commit into it
            if self.hmac_key is not None:
                manifest.sign(self.hmac_key)
            self.storage.write_atomic(self.storage.join(dirname, MANIFEST_NAME), manifest.to_json())

        self._on_rank0(commit, f"committing checkpoint {path} failed; the previous committed checkpoint stays",
                       group)
        self.last_committed = step
        total = sum(f.size for f in files.values())
        log.info("committed checkpoint step %d: %.1f MiB in %.3f s (write %.3f s, commit %.3f s)",
                 step, total / 2**20, time.monotonic() - started, written_at - started, time.monotonic() - written_at)
        if self.on_commit is not None:
            try:  # the commit happened; a failing callback on one rank must not say otherwise
                self.on_commit(manifest)
            except Exception as e:
                log.warning("on_commit callback failed for step %d: %s", step, _short(e))
        if self.rank == 0:  # after the commit, and never raises: no collective needed
            self._verified.remember_good(self.storage, dirname, manifest)
            retention.apply(self.storage, self._verified, step, keep_last=self.keep_last, keep_every=self.keep_every,
                            mode=self.verify, allowed_globals=self.safe_globals, key=self.hmac_key)
        return manifest, written

    def _prepare(self, step: int) -> bool:
        """Rank 0, before a save: True if ``step`` is validly committed already; otherwise
        clear whatever a failed earlier save of this step left and make its directory."""
        dirname = step_dir_name(step)
        if is_committed(self.storage, step):
            _, reason = verify(self.storage, dirname, self.verify, self.safe_globals, self.hmac_key)
            if reason is None:
                return True
            # Its record does not validate, so it was never a usable commit: replace it.
            log.warning("re-saving step %d over a checkpoint that fails verification: %s", step, reason)
            self.storage.fs.rm(self.storage.join(dirname, MANIFEST_NAME))
        self.storage.remove_tree(self.storage.join(dirname))
        self.storage.makedirs(self.storage.join(dirname))
        return False

    def _reader(self, dirname: str):
        if self.storage.is_local:
            return DirectFileSystemReader(self.storage.join(dirname))
        return fsspec_reader(self.storage.url_of(dirname))

    def _on_rank0(self, fn: Callable[[], Any], what: str, group: Any = None) -> Any:
        """Run ``fn`` on rank 0 alone; every rank returns its result or raises the same
        ``CheckpointError``, so no rank is left waiting in a collective."""
        result, error = None, None
        if self.rank == 0:
            try:
                result = fn()
            except Exception as e:  # any backend's error type: fsspec, S3, OSError...
                detail = str(e) if isinstance(e, CheckpointError) else _short(e)
                error = f"{what}: {detail}" if what else detail
        result, error = _dist.broadcast((result, error), self._group if group is None else group)
        if error:
            raise CheckpointError(error)
        return result

    # -- load ------------------------------------------------------------------------------
    def load(self) -> Manifest | None:
        """Load the newest committed, verified checkpoint into the live objects.

        Returns its record (``.step``, ``.metadata``...), or None when there is none, in
        which case nothing is changed. Every rank gets the same answer.
        """
        self.wait()  # a save in flight must not race the search
        started = time.monotonic()

        def discover():
            rejected: list = []
            try:
                manifest = find_latest(self.storage, self.verify, self.safe_globals, rejected, self.hmac_key)
            except OSError as e:
                raise CheckpointError(f"cannot search {self.storage.url} for checkpoints: {_short(e)}") from e
            if manifest is not None:
                return manifest.to_json()
            bad = [f"{step_dir_name(step)} ({reason})" for step, reason in rejected]
            bad += [f"{retention.QUARANTINE_DIR}/{name}" for name in retention.quarantined(self.storage)]
            if bad and not self.allow_fresh_start:
                raise CheckpointError(
                    f"{self.storage.url} holds committed checkpoints but none verifies: {'; '.join(bad)}. "
                    "Not starting from scratch over them: repair or move them away, or allow a fresh start "
                    "(allow_fresh_start=True; train.py --allow-fresh-start)")
            return None

        found = self._on_rank0(discover, "")
        if found is None:
            log.info("no committed checkpoint in %s; starting from scratch", self.storage.url)
            return None
        manifest = Manifest.from_json(found)
        dirname = step_dir_name(manifest.step)
        where = self.storage.url_of(dirname)

        # Ranks beyond the saved world size have no RNG state of their own to restore.
        state = self.training.state_dict(self.rank, with_rng=self.rank < manifest.world_size)
        reader = self._reader(dirname)
        error = None  # (error class, message): the kind travels with the message
        try:
            saved = {k: v.size for k, v in reader.read_metadata().state_dict_metadata.items() if hasattr(v, "size")}
            check_compatible(state, saved, where)
        except CheckpointMismatchError as e:
            error = (CheckpointMismatchError, str(e))
        except Exception as e:
            error = (CheckpointError, f"cannot read {where}/{DCP_METADATA_NAME}: {_short(e)}")
        errors = [e for e in _dist.all_gather(error, self._group) if e]
        if errors:  # the same error on every rank, before any rank enters DCP's collectives
            kind, message = errors[0]
            raise kind(message)
        if self.before_load is not None:
            self.before_load(manifest.step)
        try:
            dcp.load(state, storage_reader=reader, planner=SafeLoadPlanner(self.safe_globals, where),
                     no_dist=not _dist.initialized())
        except (Exception, CheckpointException) as e:
            raise CheckpointError(f"loading checkpoint {where} failed: {_short(e)}") from e
        self.training.apply(state, self.rank)
        self.last_committed = manifest.step
        self._last_save_time = time.monotonic()
        log.info("loaded checkpoint step %d from %s in %.3f s (saved at world size %d, now %d)",
                 manifest.step, where, time.monotonic() - started, manifest.world_size, self.world_size)
        return manifest


def _start_writer_thread(device: int | None) -> None:
    if device is not None:
        torch.cuda.set_device(device)


# Without a process group DCP warns on every call that it assumes one process; we ask for
# exactly that (``no_dist``), so the warning is noise. A filter for that one message (a
# ``catch_warnings`` block would not be thread-safe in the writer thread).
warnings.filterwarnings("ignore", message="torch.distributed is (disabled|unavailable)")


def _short(e: BaseException) -> str:
    """One line for an exception. DCP's CheckpointException (a BaseException) carries each
    failed rank's own exception; the first one is the useful part."""
    if isinstance(e, CheckpointException) and e.failures:
        rank, (inner, _trace) = next(iter(sorted(e.failures.items(), key=lambda kv: kv[0])))
        return f"rank {rank}: {_short(inner)}"
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"
