"""Retention: which checkpoints to keep, which to delete, and which to set aside as corrupt.

Only checkpoints that verify at the configured level count towards ``keep_last``: a
bit-flipped checkpoint that still passes the size check must not take the slot of a good one
(and then be the only one left). Verifying by hash after every commit would re-read every
kept checkpoint each time, so results are cached by each file's name, size and mtime; the
checkpoint this process just committed is known good without reading it back (its crc32s
were taken while writing).

A committed checkpoint that fails verification is *quarantined*: moved under
``ROOT/quarantine/`` (logged once, never deleted, never loaded), so an operator can look at it
and retention does not count it. One that cannot be read (an ``OSError``: EIO, EACCES, which
may pass) is neither counted nor touched.

A local checkpoint that retention deletes is renamed aside (``ROOT/.deleting-step-N-<hex>``)
and its files are deleted by a background thread: deleting gigabytes can take seconds, which
the saving thread need not wait for. The next save waits for it only where the disk lacks the
room for another checkpoint (``make_room``).

``find_loadable`` is the rule load follows: the newest checkpoint that verifies, and never a
silent fresh start over committed or quarantined checkpoints of which none verifies.
"""

from __future__ import annotations

import atexit
import logging
import os
import re
import shutil
import threading
import time
import uuid

from .errors import CheckpointError, one_line
from .manifest import MANIFEST_NAME, Manifest, Rejection, find_latest, list_steps, step_dir_name, verify
from .storage import Storage, fsync_dir

log = logging.getLogger("checkpoint")

QUARANTINE_DIR = "quarantine"
DELETING_PREFIX = ".deleting-"  # a local checkpoint set aside to be deleted in the background
_SET_ASIDE = re.compile(r"^\.deleting-step-\d+-[0-9a-f]{8}$")


def steps_to_delete(verified: list[int], newest: int, keep_last: int, keep_every: int) -> set[int]:
    """Of the ``verified`` committed steps, the ones retention deletes: all but the last
    ``keep_last`` (0 = keep all), the multiples of ``keep_every`` and ``newest`` (the commit
    just made, always kept). Steps newer than ``newest`` are left alone (another commit we
    fell back from is not ours to judge by age)."""
    keep = {newest}
    keep.update(verified if keep_last == 0 else sorted(verified)[-keep_last:])
    if keep_every:
        keep.update(s for s in verified if s % keep_every == 0)
    return {s for s in verified if s not in keep and s < newest}


def stale_uncommitted(uncommitted: list[int], newest: int) -> set[int]:
    """Directories without a commit record older than the newest commit: saves that died.
    Newer ones may be a save in flight."""
    return {s for s in uncommitted if s < newest}


class VerifiedCache:
    """``verify`` results by checkpoint directory, valid while its files keep their names,
    sizes and mtimes."""

    def __init__(self) -> None:
        self._results: dict[str, tuple[tuple, Manifest | None, str | None]] = {}

    @staticmethod
    def _signature(storage: Storage, path: str) -> tuple:
        entries = storage.fs.ls(path, detail=True)
        return tuple(sorted((e["name"], e.get("size"), e.get("mtime") or e.get("LastModified") or e.get("created"))
                            for e in entries))

    def verify(self, storage: Storage, dirname: str, mode: str, allowed_globals=None,
               key: bytes | None = None) -> tuple[Manifest | None, str | None]:
        path = storage.join(dirname)
        try:
            signature = self._signature(storage, path)
        except OSError as e:
            return None, Rejection(f"{path}: cannot list it ({type(e).__name__}: {e})", "unreadable")
        cached = self._results.get(path)
        if cached is not None and cached[0] == signature:
            return cached[1], cached[2]
        manifest, reason = verify(storage, dirname, mode, allowed_globals, key)
        if reason is None or reason.kind != "unreadable":  # an I/O error may pass: ask again next time
            self._results[path] = (signature, manifest, reason)
        return manifest, reason

    def remember_good(self, storage: Storage, dirname: str, manifest: Manifest, check_sizes: bool = False) -> None:
        """A checkpoint this process just wrote and committed: good without reading it back.
        ``check_sizes``: only if the listing shows every file of the record at its size (a
        copy this process made of a checked one)."""
        path = storage.join(dirname)
        try:
            signature = self._signature(storage, path)
        except OSError:
            return
        if check_sizes:
            sizes = {name.rstrip("/").rsplit("/", 1)[-1]: size for name, size, _ in signature}
            if any(sizes.get(name) != record.size for name, record in manifest.files.items()):
                return  # verification will say what is wrong
        self._results[path] = (signature, manifest, None)


def quarantine(storage: Storage, step: int, reason: str) -> str | None:
    """Move a committed checkpoint that fails verification out of discovery's way; returns
    where it went (None if it could not be moved, which is logged)."""
    source = storage.join(step_dir_name(step))
    target = storage.join(QUARANTINE_DIR, f"{step_dir_name(step)}.{time.strftime('%Y%m%dT%H%M%S')}")
    try:
        storage.makedirs(storage.join(QUARANTINE_DIR))
        storage.fs.mv(source, target, recursive=True)
    except Exception as e:
        log.warning("checkpoint %s fails verification (%s) and could not be quarantined: %s", source, reason, e)
        return None
    # Durable: a power cut must not bring the bad checkpoint back (a re-save of its step
    # fsyncs the root only at its commit).
    try:
        storage.sync_parent(source)
        storage.sync_parent(target)
    except OSError as e:
        log.warning("quarantined checkpoint step %d, but could not make the move durable: %s", step, e)
    log.warning("quarantined checkpoint step %d to %s: %s", step, target, reason)
    return target


def quarantined(storage: Storage) -> list[str]:
    """Names of the checkpoints set aside under ``ROOT/quarantine/``."""
    path = storage.join(QUARANTINE_DIR)
    try:
        if not storage.exists(path):
            return []
        return sorted(e["name"].rstrip("/").rsplit("/", 1)[-1] for e in storage.fs.ls(path, detail=True))
    except OSError:
        return []


def apply(storage: Storage, cache: VerifiedCache, newest: int, *, keep_last: int, keep_every: int, mode: str,
          allowed_globals=None, key: bytes | None = None) -> None:
    """Rank 0, after committing ``newest``: quarantine committed checkpoints that fail
    verification, delete what ``steps_to_delete`` and ``stale_uncommitted`` name. Logs its
    failures, never raises: the commit already happened."""
    try:
        steps = list_steps(storage)
    except Exception as e:
        log.warning("retention skipped: cannot list %s: %s", storage.url, e)
        return
    verified, uncommitted = [], []
    for step in steps:
        dirname = step_dir_name(step)
        try:
            committed = storage.exists(storage.join(dirname, MANIFEST_NAME))
        except OSError:
            committed = True  # unreadable: verify says why
        if not committed:
            uncommitted.append(step)
            continue
        manifest, reason = cache.verify(storage, dirname, mode, allowed_globals, key)
        if manifest is not None and manifest.step == step:
            verified.append(step)
        elif step != newest and reason is not None and reason.kind == "unreadable":
            # EIO or EACCES may be passing (a flaky disk, NFS): neither counted nor touched.
            log.warning("retention leaves checkpoint step %d alone: %s", step, reason)
        elif step != newest:
            quarantine(storage, step, reason or f"its record says step {manifest.step}")
    for step in sorted(steps_to_delete(verified, newest, keep_last, keep_every) | stale_uncommitted(uncommitted, newest)):
        path = storage.join(step_dir_name(step))
        try:
            record = storage.join(step_dir_name(step), MANIFEST_NAME)
            if storage.exists(record):
                storage.fs.rm(record)  # uncommit first: a half-deleted dir is never loaded
            _remove(storage, path)
            log.info("retention removed %s", path)
        except Exception as e:
            log.warning("retention could not remove %s: %s", path, e)
    if storage.is_local:  # what a process that died while deleting left set aside
        try:
            leftovers = [name for name in os.listdir(storage.root) if _SET_ASIDE.match(name)]
        except OSError as e:
            log.warning("retention could not list %s: %s", storage.root, e)
            leftovers = []
        for name in leftovers:
            _delete_in_background(os.path.join(storage.root, name))


# Deleting a checkpoint's files is slow on some disks (3.2 GB took 1.2 s on the bench's), and
# retention runs in the thread that saved: a sync save's caller would wait for it. On a local
# disk the directory is renamed aside (atomic: gone from the root at once) and deleted by a
# background thread; ``finish_deletions`` waits for them (the manager's ``close``), and the
# next retention sweeps up what a process that died meanwhile left.
_deleting: dict[str, threading.Thread] = {}  # path set aside -> the thread deleting it
_lock = threading.Lock()


def _remove(storage: Storage, path: str) -> None:
    if not storage.is_local:
        storage.remove_tree(path)
        return
    aside = os.path.join(os.path.dirname(path), f"{DELETING_PREFIX}{os.path.basename(path)}-{uuid.uuid4().hex[:8]}")
    os.rename(path, aside)
    _delete_in_background(aside)


def _delete_in_background(path: str) -> None:

    def delete() -> None:
        shutil.rmtree(path, ignore_errors=True)
        try:
            # Committing the unlinks to the journal is where ext4 (-o discard) discards their
            # blocks (20-70 ms for 100 MB here): forced now, in this thread, rather than by the
            # next save's first fsync, which would wait for it.
            fsync_dir(os.path.dirname(path))
        except OSError:
            pass  # the deletion needs no durability: the next retention sweeps up a leftover
        if os.path.exists(path):
            log.warning("retention could not delete %s; the next retention tries again", path)
        with _lock:
            _deleting.pop(path, None)

    with _lock:
        if path in _deleting:  # already on its way out
            return
        thread = threading.Thread(target=delete, name="ckpt-delete", daemon=True)
        thread.start()  # under the lock, registered once started: finish_deletions joins only started threads
        _deleting[path] = thread  # before the thread's own pop, which waits for the lock


def make_room(root: str, needed: int | None) -> None:
    """Before a save into local ``root``: wait for the deletions still running when the disk
    has less than ``needed`` bytes free (the last checkpoint's size; None: unknown). On a disk
    sized for ``keep_last`` + 1 checkpoints the next save must not fill it while the one
    retention deleted still holds its blocks; elsewhere it does not wait."""
    with _lock:  # only this root's: another root's deletion frees nothing here
        pending = [thread for path, thread in _deleting.items() if os.path.dirname(path) == root]
    if not pending:
        return
    try:
        free = shutil.disk_usage(root).free
    except OSError:  # the root is gone: the save says so
        return
    if needed is not None and free >= needed:
        return
    log.info("waiting for retention to finish deleting before the next save: %d MB free in %s, "
             "the last checkpoint took %s MB", free // 10**6, root, "?" if needed is None else needed // 10**6)
    for thread in pending:
        thread.join()


@atexit.register  # a process that ends without close() (its last async save's retention ran at exit)
def finish_deletions() -> None:
    """Wait until the checkpoints retention set aside are deleted."""
    with _lock:
        pending = list(_deleting.values())
    for thread in pending:
        thread.join()


def find_loadable(storage: Storage, mode: str, allowed_globals, key: bytes | None,
                  allow_fresh_start: bool, skip: dict | None = None) -> Manifest | None:
    """Rank 0, for ``load``: the newest committed checkpoint that verifies, or None for a
    fresh start. When committed (or quarantined) checkpoints exist but none verifies, a
    fresh start would silently throw that training away: refused, naming each, unless
    ``allow_fresh_start``. ``skip``: ``{step: reason}`` of those a load already found bad."""
    rejected: list = []
    try:
        manifest = find_latest(storage, mode, allowed_globals, rejected, key, skip)
    except OSError as e:
        raise CheckpointError(f"cannot search {storage.url} for checkpoints: {one_line(e)}") from e
    if manifest is not None:
        return manifest
    bad = [f"{step_dir_name(step)} ({reason})" for step, reason in rejected]
    bad += [f"{step_dir_name(step)} ({reason})" for step, reason in (skip or {}).items()]
    bad += [f"{QUARANTINE_DIR}/{name}" for name in quarantined(storage)]
    if bad and not allow_fresh_start:
        raise CheckpointError(
            f"{storage.url} holds committed checkpoints but none verifies: {'; '.join(bad)}. "
            "Not starting from scratch over them: repair or move them away, or allow a fresh start "
            "(allow_fresh_start=True; train.py --allow-fresh-start)")
    return None
