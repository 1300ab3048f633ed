"""A second, durable copy of every commit: ``--ckpt-dir`` local (fast) and ``--mirror
s3://...`` (outlives the node).

Rank 0 commits each checkpoint under the local root as always; then a background thread of
its own uploads the committed directory to the mirror, every file first and the commit
record last, so the mirror's commit protocol is the local one: a checkpoint there is
committed iff its record is. Training never waits for the mirror (``close`` does, so the last
commit gets there), and a failed upload is logged and left behind: the next commit is
mirrored whole. At most one upload runs and one waits; a newer commit replaces the waiting
one. After each upload, retention runs on the mirror with the same rules.

Loading looks at both roots and takes the newer verified checkpoint, so a fresh node whose
local directory is empty resumes from the mirror (read straight from it through DCP).

Rank 0 uploads what its local root holds: every rank's files must be there, as they must for
any commit (one node, or a root on a filesystem the nodes share). A node-local root on
several nodes misses the other nodes' shards, and each upload fails with a warning naming
the missing file.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

from . import retention
from .errors import one_line
from .manifest import MANIFEST_NAME, Manifest, step_dir_name
from .storage import Storage

log = logging.getLogger("checkpoint")

MIRROR_FILES_AT_ONCE = 4


class Mirror:
    def __init__(self, local: Storage, remote: Storage, keep_last: int, keep_every: int, observer=None,
                 allowed_globals: list | None = None, key: bytes | None = None):
        self.local, self.remote = local, remote
        self.keep_last, self.keep_every = keep_last, keep_every
        self.observer = observer
        self.allowed_globals, self.key = allowed_globals, key  # judged by loading's rule, as locally
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckpt-mirror")
        self._lock = threading.Lock()
        self._waiting: int | None = None  # the newest commit not yet started
        self._running: Future | None = None
        self._verified = retention.VerifiedCache()

    def submit(self, step: int) -> None:
        """Rank 0, after committing ``step`` locally: upload it when the one in flight is done."""
        with self._lock:
            queued = self._waiting is not None  # a task that will take the newest is already queued
            self._waiting = step
            if not queued:
                self._running = self._executor.submit(self._next)

    def _next(self) -> None:
        with self._lock:
            step, self._waiting = self._waiting, None
        if step is not None:
            self._upload(step)

    def _upload(self, step: int) -> None:
        dirname = step_dir_name(step)
        started = time.monotonic()
        try:
            record = self.local.read_bytes(self.local.join(dirname, MANIFEST_NAME))
            manifest = Manifest.from_json(record)
            names = sorted(manifest.files)
            for name in names:  # a file changed since its commit is not sent as that commit
                size = self.local.size(self.local.join(dirname, name))
                if size != manifest.files[name].size:
                    raise OSError(f"{self.local.join(dirname, name)} is {size} bytes, its commit record says "
                                  f"{manifest.files[name].size}")
            # The shards and DCP's index, then the record. On an object store s3fs uploads 4
            # files at once (each read whole, or a large one in 50 MiB parts at once): memory
            # stays bounded on rank 0, whatever the number of ranks.
            self.remote.makedirs(self.remote.join(dirname))  # a directory mirror; nothing on an object store
            self.remote.fs.put([self.local.join(dirname, name) for name in names],
                               [self.remote.join(dirname, name) for name in names],
                               **({"batch_size": MIRROR_FILES_AT_ONCE} if self.remote.is_object_store else {}))
            self.remote.write_atomic(self.remote.join(dirname, MANIFEST_NAME), record)
            # Its bytes are the local commit's (sizes checked above, crc32s taken when they
            # were written): good without reading it back, if the mirror holds them whole.
            # The cache notices any later change of its files.
            self._verified.remember_good(self.remote, dirname, manifest, check_sizes=True)
        except Exception as e:  # never training's problem: the next commit is mirrored whole
            log.warning("mirroring checkpoint step %d to %s failed (%s); the next commit will be mirrored",
                        step, self.remote.url_of(dirname), one_line(e))
            return
        seconds = time.monotonic() - started
        log.info("mirrored checkpoint step %d to %s: %.1f MiB in %.2f s (%.0f MB/s)", step, self.remote.url,
                 manifest.total_bytes / 2**20, seconds, manifest.total_bytes / max(seconds, 1e-9) / 1e6)
        if self.observer is not None:
            try:
                self.observer.mirrored(manifest, seconds)
            except Exception as e:
                log.warning("the observer's mirrored() failed for step %d: %s", step, one_line(e))
        retention.apply(self.remote, self._verified, step, keep_last=self.keep_last, keep_every=self.keep_every,
                        mode="size", allowed_globals=self.allowed_globals, key=self.key)

    def wait(self) -> None:
        """Until every commit submitted so far is mirrored or given up (``close`` calls it).
        The executor runs its tasks in order, so the newest task is the last to finish."""
        with self._lock:
            newest = self._running
        if newest is not None:
            newest.result()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._executor.shutdown(wait=True)

