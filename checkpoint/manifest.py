"""The commit record and discovery of the newest committed, verified checkpoint.

Layout under the checkpoint root::

    step-00000040/            one checkpoint, written by every rank through DCP
        __0_0.distcp          shard files (DCP names them)
        .metadata             DCP's own index, written by rank 0 at the end of the save
        manifest.json         OUR commit record: written last, by rank 0, atomically

A checkpoint is committed iff ``manifest.json`` exists and validates: it parses, its format
version is known, and every file it lists exists with the listed size (and, with
``verify="hash"``, the listed crc32). Nothing else counts: a directory with shards and even
DCP's ``.metadata`` but no record is a save that died before its commit.

The save protocol that produces a commit (``CheckpointManager.save``; every rank calls it at
the same step)::

    rank 0: skip if step is validly committed; else clear what a failed save of it left
    all:    dcp.save -> shard files + DCP .metadata (checksums taken while writing, fsynced)
    all:    observer.before_commit (a hook for fault injection and tests)
    all:    gather sizes + checksums + any error   <- the barrier: nobody commits unless
                                                       every rank reported success
    rank 0: write manifest.json atomically          <- the commit; the outcome is broadcast
                                                       so every rank returns or raises the same
    rank 0: retention (logs its failures, never raises)

Retention deletes the record first, so a half-deleted checkpoint is never one that counts.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

from .safe_load import UnsafeCheckpointError, check_checkpoint, default_item_globals
from .storage import Storage

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
DCP_METADATA_NAME = ".metadata"
VERIFY_MODES = ("size", "hash")
# What discovery checks when the load itself checks the shards' hashes while reading them
# (``CheckpointManager.load``): the sizes, and the hashes of every file but the shards (DCP's
# ``.metadata`` above all: the load plans its reads from it before any shard is read).
SHARDS_LATER = "hash-all-but-shards"
SHARD_SUFFIX = ".distcp"

_UNCOMMITTED = "no commit record, the save did not finish (uncommitted)"


class Rejection(str):
    """Why a checkpoint does not verify: the message (a ``str``, as logged) and its ``kind``:

    - ``"uncommitted"``: no commit record (a save that did not finish);
    - ``"unreadable"``: an ``OSError`` (EIO, EACCES) that may pass: do not judge the files;
    - ``"invalid"``: corrupt, truncated, forged or unsigned: it must never be loaded.
    """

    kind: str

    def __new__(cls, message: str, kind: str = "invalid"):
        rejection = super().__new__(cls, message)
        rejection.kind = kind
        return rejection

_STEP_DIR = re.compile(r"^step-(\d+)$")


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def parse_step_dir(name: str) -> int | None:
    m = _STEP_DIR.match(name)
    return int(m.group(1)) if m else None


@dataclass
class FileRecord:
    size: int
    crc32: str
    sha256: str = ""  # keyed mode only: a cryptographic hash, taken while writing

@dataclass
class Manifest:
    """Everything needed to trust, and to describe, one committed checkpoint."""

    step: int
    world_size: int
    files: dict[str, FileRecord]
    run_id: str = ""
    restart_generation: int = 0
    torch_version: str = ""
    created_unix: float = 0.0
    save_seconds: float = 0.0
    metadata: dict[str, Any] = field(default_factory=dict)  # user data: loss, metrics, config
    format_version: int = FORMAT_VERSION
    signature: str = ""  # keyed mode: HMAC-SHA256 of the record without this field

    @property
    def total_bytes(self) -> int:
        """Bytes of every file the checkpoint holds, all ranks together."""
        return sum(f.size for f in self.files.values())

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), indent=1, sort_keys=True).encode()

    def signed_bytes(self) -> bytes:
        """What the signature covers: the whole record but the signature, canonically."""
        body = asdict(self)
        body.pop("signature")
        return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()

    def sign(self, key: bytes) -> None:
        self.signature = hmac.new(key, self.signed_bytes(), hashlib.sha256).hexdigest()

    def signature_valid(self, key: bytes) -> bool:
        expected = hmac.new(key, self.signed_bytes(), hashlib.sha256).hexdigest()
        return bool(self.signature) and hmac.compare_digest(expected, self.signature)

    @classmethod
    def from_json(cls, raw: bytes) -> "Manifest":
        """Parse a record; raise ``ValueError`` saying what is wrong with it."""
        try:
            data = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"not valid JSON ({e})") from None
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise ValueError(f"format_version {version!r}, this library reads {FORMAT_VERSION}")
        try:
            files = {name: FileRecord(int(rec["size"]), str(rec["crc32"]), str(rec.get("sha256", "")))
                     for name, rec in data["files"].items()}
            data["files"] = files
            manifest = cls(**data)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ValueError(f"malformed record ({type(e).__name__}: {e})") from None
        if DCP_METADATA_NAME not in files:
            raise ValueError(f"record does not list DCP's {DCP_METADATA_NAME}")
        kinds = {"step": int, "world_size": int, "restart_generation": int, "created_unix": (int, float),
                 "save_seconds": (int, float), "metadata": dict, "run_id": str, "torch_version": str, "signature": str}
        wrong = [name for name, kind in kinds.items() if not isinstance(getattr(manifest, name), kind)
                 or isinstance(getattr(manifest, name), bool)]
        if wrong:
            raise ValueError(f"malformed record (wrong type for {', '.join(wrong)})")
        return manifest


def verify(storage: Storage, dirname: str, mode: str, allowed_globals: list | None = None,
           key: bytes | None = None) -> tuple[Manifest | None, Rejection | None]:
    """Check one checkpoint directory. Returns ``(manifest, None)`` or ``(None, rejection)``.

    After the sizes (and, with ``"hash"``, the crc32s), DCP's ``.metadata`` and every
    non-tensor item are read the way loading will read them (``safe_load.check_checkpoint``):
    a file that passes its checksums but asks to run code is refused here, so discovery falls
    back to an older checkpoint. The reason names the bad file so an operator can look at it.
    An ``OSError`` on any file (EIO, EACCES) is a rejection too (kind ``"unreadable"``),
    never an exception.

    With ``key`` (keyed mode) the record must carry a valid HMAC-SHA256 signature made with
    that key, and ``"hash"`` checks every file's SHA-256 instead of its crc32: someone who can
    write the directory but does not hold the key cannot make a checkpoint that passes.
    """
    try:
        manifest, reason = _verify(storage, dirname, mode, allowed_globals, key)
    except OSError as e:
        return None, Rejection(f"{storage.join(dirname)}: cannot read it ({type(e).__name__}: {e})", "unreadable")
    if reason is not None and not isinstance(reason, Rejection):
        reason = Rejection(reason)
    return manifest, reason


def _verify(storage: Storage, dirname: str, mode: str, allowed_globals, key) -> tuple[Manifest | None, str | None]:
    if mode not in VERIFY_MODES + (SHARDS_LATER,):
        raise ValueError(f"verify must be one of {VERIFY_MODES}, not {mode!r}")
    record = storage.join(dirname, MANIFEST_NAME)
    if not storage.exists(record):
        return None, Rejection(f"{record}: {_UNCOMMITTED}", "uncommitted")
    try:
        manifest = Manifest.from_json(storage.read_bytes(record))
    except ValueError as e:
        return None, f"{record}: unreadable commit record: {e}"
    if key is not None and not manifest.signature_valid(key):
        return None, (f"{record}: " + ("not signed" if not manifest.signature else "signature does not match")
                      + " with this job's key (forged, or written without FTLAUNCH_CKPT_KEY / another key)")
    names = sorted(manifest.files)
    for name in names:
        path = storage.join(dirname, name)
        if not storage.exists(path):
            return None, f"{path}: listed in the commit record but missing"
        if storage.is_local and not os.path.isfile(path):  # a FIFO would hang whoever reads it
            return None, f"{path}: listed in the commit record but not a regular file (forged?)"
        size = storage.size(path)
        if size != manifest.files[name].size:
            return None, f"{path}: {size} bytes, the commit record says {manifest.files[name].size} (truncated or rewritten)"
    if mode != "size":
        shards = mode == "hash"
        reason = _hash_mismatch(storage, dirname, manifest, key, [n for n in names if shards or not is_shard(n)])
        if reason is not None:
            return None, reason
    try:
        check_checkpoint(storage.fs, storage.join(dirname),
                         default_item_globals() if allowed_globals is None else allowed_globals)
    except UnsafeCheckpointError as e:
        return None, str(e)
    return manifest, None


def is_shard(name: str) -> bool:
    return name.endswith(SHARD_SUFFIX)


def _hash_mismatch(storage: Storage, dirname: str, manifest: Manifest, key: bytes | None,
                   names: list[str]) -> str | None:
    """Why the crc32 (SHA-256 with ``key``) of one of ``names`` differs from its record, or None."""
    # One thread per file (up to 8): reads overlap each other and the hashing (crc32 and
    # hashlib release the GIL).
    algo = "sha256" if key is not None else "crc32"
    digest = storage.sha256 if key is not None else storage.crc32
    with ThreadPoolExecutor(max_workers=max(1, min(8, len(names)))) as pool:
        found = list(pool.map(lambda n: digest(storage.join(dirname, n)), names))
    return _differs(storage, dirname, manifest, algo, dict(zip(names, found)))


def _differs(storage: Storage, dirname: str, manifest: Manifest, algo: str, values: dict[str, str]) -> str | None:
    for name, value in values.items():
        listed = getattr(manifest.files[name], algo)
        if value != listed:
            return (f"{storage.join(dirname, name)}: {algo} {value[:16]}, the commit record says "
                    f"{listed[:16] or 'none'} (corrupt or replaced)")
    return None


def check_shard_hashes(storage: Storage, dirname: str, manifest: Manifest, shards: list[str],
                       computed: dict[str, str] | None = None) -> Rejection | None:
    """The rest of a ``"hash"`` verification for a checkpoint that passed ``SHARDS_LATER``:
    the crc32s of ``shards`` (each rank checks its share), those in ``computed`` already
    taken from the bytes the load read, the others read here (a thread runs it while an
    object store's files load). Returns why one fails, or None."""
    computed = {name: crc for name, crc in (computed or {}).items() if name in shards}
    reason = _differs(storage, dirname, manifest, "crc32", computed)
    if reason is None:
        try:
            reason = _hash_mismatch(storage, dirname, manifest, None, [n for n in shards if n not in computed])
        except OSError as e:
            return Rejection(f"{storage.join(dirname)}: cannot read it ({type(e).__name__}: {e})", "unreadable")
    return None if reason is None else Rejection(reason)


def list_steps(storage: Storage) -> list[int]:
    """All ``step-N`` directories under the root, committed or not, oldest first."""
    steps = (parse_step_dir(name) for name in storage.list_dirs())
    return sorted(s for s in steps if s is not None)


def is_committed(storage: Storage, step: int) -> bool:
    """Cheap check used before saving and for retention: does the record exist at all?"""
    return storage.exists(storage.join(step_dir_name(step), MANIFEST_NAME))


def find_latest(storage: Storage, mode: str = "hash", allowed_globals: list | None = None,
                rejected: list | None = None, key: bytes | None = None,
                skip: dict | None = None) -> Manifest | None:
    """The newest checkpoint that is committed and verifies, or None.

    Each newer directory that fails gets one warning line naming the bad file, and a
    committed one (it has a record) is appended to ``rejected`` as ``(step, reason)``. Steps
    in ``skip`` (already found bad) are passed over. Call this on one rank only and broadcast
    the answer: ranks listing a directory on their own can disagree while another job writes
    to it.
    """
    for step in reversed(list_steps(storage)):
        if skip and step in skip:
            continue
        manifest, reason = verify(storage, step_dir_name(step), mode, allowed_globals, key)
        if manifest is not None and manifest.step != step:
            manifest, reason = None, Rejection(f"{storage.join(step_dir_name(step), MANIFEST_NAME)}: record says step {manifest.step}")
        if manifest is not None:
            return manifest
        log.warning("skipping checkpoint %s", reason)
        if rejected is not None and reason.kind != "uncommitted":
            rejected.append((step, reason))
    return None
