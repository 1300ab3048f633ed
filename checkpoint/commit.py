"""One save, run by every rank: the commit protocol that ``manifest.py`` describes (shards
through DCP, checksums taken while writing, the gather that is the barrier, rank 0's record
written last), then retention. ``CheckpointManager`` runs it in the caller's thread, or
``background.py`` runs it in the writer thread."""

from __future__ import annotations

import logging
import os
import shutil
import time

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from . import _dist, retention
from .config import OBJECT_STORE_IO_THREADS, CheckpointConfig
from .errors import CheckpointError, one_line
from .lease import Lease
from .manifest import DCP_METADATA_NAME, MANIFEST_NAME, FileRecord, Manifest, is_committed, step_dir_name, verify
from .observer import Observer
from .storage import Storage
from .writer import WriteRecord, checksumming_writer

log = logging.getLogger("checkpoint")


class Committer:
    def __init__(self, storage: Storage, config: CheckpointConfig, observer: Observer, metadata: dict,
                 hmac_key: bytes | None, safe_globals: list, rank: int, world_size: int):
        self.storage, self.config, self.observer, self.metadata = storage, config, observer, metadata
        self.hmac_key, self.safe_globals = hmac_key, safe_globals
        self.rank, self.world_size = rank, world_size
        self.lease: Lease | None = None  # rank 0's hold on a local root: checked before every commit
        self.mirror = None  # rank 0: a mirror.Mirror that each commit is copied to (config.mirror)
        self._verified = retention.VerifiedCache()
        self._last_bytes: int | None = None  # the size of the last checkpoint committed, for make_room

    def write_and_commit(self, step: int, state: dict, metrics, started: float, group) -> tuple[Manifest, WriteRecord]:
        """Write ``state`` as checkpoint ``step`` and commit it; every collective on ``group``.
        Returns the record and what this rank's writer wrote."""
        dirname = step_dir_name(step)
        path = self.storage.url_of(dirname)  # what the user gave: s3://... keeps its protocol
        io_threads = self.config.io_threads or (OBJECT_STORE_IO_THREADS if self.storage.is_object_store else 1)
        try:
            writer, written = checksumming_writer(self.storage.url_of(dirname), local=self.storage.is_local,
                                                  io_threads=io_threads, sha256=self.hmac_key is not None,
                                                  storage_options=self.storage.options)
            dcp.save(state, storage_writer=writer, process_group=group, no_dist=not _dist.initialized())
        except (Exception, CheckpointException) as e:  # DCP gathers every rank's failure into one
            hint = self._disk_full_hint(one_line(e))
            if self.rank == 0 and self.storage.is_local:
                self._remove_partial(step)
            raise CheckpointError(f"writing checkpoint {path} failed: {one_line(e)}{hint}; "
                                  "the previous committed checkpoint stays") from e
        written_at = time.monotonic()

        # Each rank reports the files it wrote (checksummed while writing) and runs the hook;
        # the gather is the barrier: rank 0 commits only if every rank got this far.
        error = None
        try:
            self.observer.before_commit(step)
        except Exception as e:
            error = f"rank {self.rank} could not finish checkpoint {path}: {one_line(e)}"
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
            if self.lease is not None:
                self.lease.check()  # another job took the root over (we were frozen): never commit into it
            if self.hmac_key is not None:
                manifest.sign(self.hmac_key)
            self.storage.sync_parent(self.storage.join(dirname))  # its directory's entry (prepare left it)
            self.storage.write_atomic(self.storage.join(dirname, MANIFEST_NAME), manifest.to_json())

        _dist.on_rank0(self.rank, commit, f"committing checkpoint {path} failed; the previous committed checkpoint stays",
                       group)
        log.info("committed checkpoint step %d: %.1f MiB in %.3f s (write %.3f s, commit %.3f s)", step,
                 manifest.total_bytes / 2**20, time.monotonic() - started, written_at - started,
                 time.monotonic() - written_at)
        try:  # the commit happened; a failing observer on one rank must not say otherwise
            self.observer.committed(manifest)
        except Exception as e:
            log.warning("the observer's committed() failed for step %d: %s", step, one_line(e))
        if self.rank == 0:  # after the commit, and never raises: no collective needed
            if self.mirror is not None:
                self.mirror.submit(step)
            self._verified.remember_good(self.storage, dirname, manifest)
            self._last_bytes = manifest.total_bytes
            retention.apply(self.storage, self._verified, step, keep_last=self.config.keep_last,
                            keep_every=self.config.keep_every, mode=self.config.verify,
                            allowed_globals=self.safe_globals, key=self.hmac_key)
        return manifest, written

    def _remove_partial(self, step: int) -> None:
        """Delete what a failed save wrote (never loadable: no commit record): on a full disk
        its blocks would make every later save fail too. Best effort: DCP has gathered every
        rank's outcome, but a rank that timed out or a writer's helper thread may still be
        writing (what is left, the next retention sweeps). Never a committed checkpoint, and
        never after another job took the root over (it may be saving this step)."""
        dirname = step_dir_name(step)
        try:
            if self.lease is not None:
                self.lease.check()
            if not is_committed(self.storage, step):
                self.storage.remove_tree(self.storage.join(dirname))
        except Exception as e:
            log.warning("left the failed save's files in %s: %s", self.storage.url_of(dirname), one_line(e))

    def _disk_full_hint(self, error: str) -> str:
        """A full local disk fails torch.save's zip writer with "unexpected pos N vs M", which
        does not say so: name it when the error is one a full disk gives and this rank's disk
        has less room left than a checkpoint."""
        if not self.storage.is_local or not ("No space left" in error or "unexpected pos" in error):
            return ""
        try:
            free = shutil.disk_usage(self.storage.root).free
        except OSError:
            return ""
        if free >= max(self._last_bytes or 0, 64 << 20):
            return ""
        # No free-space figure: it differs from rank to rank (rank 0 removes the partial save
        # meanwhile), and every rank must report the same line.
        return f" (the disk holding {self.storage.root} is full; free space or keep fewer checkpoints)"

    def prepare(self, step: int, failed_load: str | None = None) -> bool:
        """Rank 0, before a save: True if ``step`` is validly committed already; otherwise
        clear whatever a failed earlier save of this step left and make its directory.
        ``failed_load``: why this step's checkpoint failed while this job loaded it (in what
        verifying does not read, e.g. a tensor's record): it is quarantined, not deleted (the
        refusal may be this environment's, e.g. another torch), and saved again."""
        dirname = step_dir_name(step)
        if failed_load and is_committed(self.storage, step):
            log.warning("re-saving step %d: its checkpoint failed while this job loaded it: %s", step, failed_load)
            retention.quarantine(self.storage, step, f"failed while loading: {failed_load}")
        if is_committed(self.storage, step):  # (still there if it could not be quarantined: then replaced)
            reason = failed_load or verify(self.storage, dirname, self.config.verify, self.safe_globals, self.hmac_key)[1]
            if reason is None:
                return True
            # Its record does not validate, so it was never a usable commit: replace it.
            log.warning("re-saving step %d over a checkpoint that fails verification: %s", step, reason)
            self.storage.fs.rm(self.storage.join(dirname, MANIFEST_NAME))
        self.storage.remove_tree(self.storage.join(dirname))
        if self.storage.is_local:
            retention.make_room(self.storage.root, self._last_bytes)
        # Its entry in the root is made durable at the commit, not here: an fsync right after
        # retention deleted files waits for the disk to discard their blocks (ext4 with
        # -o discard: 20-70 ms for 100 MB here), and here that wait delays the whole save.
        # (Retention's deletion thread fsyncs the root itself, so that by the time this save
        # fsyncs its files the discard is usually done.)
        self.storage.makedirs(self.storage.join(dirname), durable=False)
        return False
