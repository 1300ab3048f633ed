"""DCP storage writers that checksum every byte as it is written.

The commit record lists each file's size and crc32. Reading the files back after DCP wrote
them costs a second pass over every byte (and, on a cold page cache, a second trip to the
disk); here the crc32 is folded into the write itself: each stream DCP opens is wrapped, and
the wrapper updates the file's crc32 on every ``write`` (ISA-L's crc32, or zlib's, releases
the GIL on large buffers, so writer threads still run in parallel).

DCP's FileSystemWriter already does the rest of a fast durable write: one file per writer
thread (``io_threads`` files per rank, written in parallel), large sequential writes of whole
tensors, and one fsync per file. Local files are written with O_DIRECT, past the page cache,
on the file systems ``direct_io.py`` lists; elsewhere through the page cache with write-behind
(``_ChecksumStream``).

DCP stores each tensor with ``torch.save``, which computes a crc32 of its own for the zip
entry; nothing checks it on load (``torch.load`` does not), and it costs more than our crc32
(measured: a 384 MiB save 1.66 s with it, 0.52 s without). Our streams switch it off while
they are open; our crc32 of the whole file covers the same bytes. In torch 2.14 the setting
is a context variable, so only the writer thread holding the stream is affected, never the
user's own ``torch.save`` calls in other threads. Where a torch release keeps it
process-wide, it is switched only with one writer thread (two threads saving and restoring
one global could leave it off for good).
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import errno
import hashlib
import os
import sys
import threading
from typing import Any, Iterator

import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.planner import WriteItemType
import torch.utils.serialization.config as serialization_config

from . import direct_io
from .manifest import FileRecord
from .storage import crc32, is_object_store


def _load_sync_file_range():
    if not sys.platform.startswith("linux"):  # plain writes elsewhere: the final fsync does it all
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    return fn


_sync_file_range = _load_sync_file_range()
WRITE_BEHIND = os.environ.get("FTCKPT_WRITE_BEHIND", "1") != "0"  # 0: off (for measuring it against plain writes)
_SYNC_WRITE, _SYNC_WAIT_ALL = 2, 1 | 2 | 4  # SYNC_FILE_RANGE_WRITE; WAIT_BEFORE | WRITE | WAIT_AFTER
WRITE_BEHIND_BYTES = 64 << 20


class _ChecksumStream:
    """A write-only stream that forwards to ``raw`` and keeps a running crc32 and size (and a
    SHA-256 in keyed mode).

    ``write_behind`` (a local file): every 64 MiB written, the kernel is told to start writing
    them to disk, and the 64 MiB before them, written by now, are dropped from the page cache;
    at close (after DCP's fsync) the rest go too. A checkpoint is written once and read only
    after a failure, so its bytes have no business in the page cache: there they pile up as
    dirty pages until the kernel throttles the writer, and push out what training uses. The
    final fsync still makes the file durable; this only starts the work earlier."""

    def __init__(self, raw, sha256: bool = False, write_behind: bool = False):
        self.raw = raw
        self.crc = 0
        self.size = 0
        self.sha = hashlib.sha256() if sha256 else None
        self._fd = raw.fileno() if write_behind and _sync_file_range is not None else None
        self._started = 0  # bytes whose writeback was started
        self._dropped = 0  # bytes written back and dropped from the page cache

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        self.crc = crc32(view, self.crc)
        if self.sha is not None:
            self.sha.update(view)
        if self._fd is None:
            written = self.raw.write(view)
            self.size += len(view)
            return len(view) if written is None else written
        # torch.save hands over a whole tensor in one write: pass it on in windows, so a
        # large tensor does not sit in the page cache whole before its writeback starts.
        for start in range(0, len(view), WRITE_BEHIND_BYTES):
            piece = view[start:start + WRITE_BEHIND_BYTES]
            written = self.raw.write(piece)
            if written is not None and written != len(piece):
                raise OSError(f"short write: {written} of {len(piece)} bytes")
            self.size += len(piece)
            if self._fd is not None and self.size - self._started >= WRITE_BEHIND_BYTES:
                self._write_behind()
        return len(view)

    def _sync(self, offset: int, nbytes: int, flags: int) -> bool:
        """sync_file_range; False where the file cannot do it (then fsync does it all). An I/O
        error is raised: waiting on writeback consumes the file's error, so the fsync after
        it would no longer report it."""
        if _sync_file_range(self._fd, offset, nbytes, flags) == 0:
            return True
        err = ctypes.get_errno()
        if err in (errno.EINVAL, errno.ENOSYS, errno.ESPIPE, errno.EOPNOTSUPP):
            self._fd = None
            return False
        raise OSError(err, f"writing the checkpoint file failed: {os.strerror(err)}")

    def _write_behind(self) -> None:
        self.raw.flush()  # Python's buffer into the kernel's
        if self._started > self._dropped:  # the previous window: wait for it, then drop it
            if not self._sync(self._dropped, self._started - self._dropped, _SYNC_WAIT_ALL):
                return
            os.posix_fadvise(self._fd, self._dropped, self._started - self._dropped, os.POSIX_FADV_DONTNEED)
            self._dropped = self._started
        if self._sync(self._started, self.size - self._started, _SYNC_WRITE):
            self._started = self.size

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        self.raw.flush()

    def fileno(self) -> int:
        return self.raw.fileno()

    def close(self) -> None:
        if self._fd is not None and not self.raw.closed:
            self.raw.flush()
            try:
                os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_DONTNEED)  # clean after DCP's fsync: dropped
            except OSError:
                pass  # advice only
        self.raw.close()

    @property
    def closed(self) -> bool:
        return self.raw.closed

    def writable(self) -> bool:
        return True


def _crc32_setting_is_per_thread() -> bool:
    entry = getattr(serialization_config, "_config", {}).get("save.compute_crc32")
    return isinstance(getattr(entry, "user_override", None), contextvars.ContextVar)


_PER_THREAD = _crc32_setting_is_per_thread()


class _ChecksummingFileSystem:
    """Wraps a DCP ``FileSystemBase``: every stream opened for writing is checksummed, and
    the result is kept under the file's final name (DCP writes ``.metadata.tmp`` and
    renames it)."""

    def __init__(self, fs: Any, io_threads: int, sha256: bool = False, local: bool = False):
        self._fs = fs
        self._sha256 = sha256
        self._local = local
        self._lock = threading.Lock()
        self._skip_torch_crc32 = _PER_THREAD or io_threads == 1
        self.files: dict[str, FileRecord] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._fs, name)

    @contextlib.contextmanager
    def create_stream(self, path, mode: str) -> Iterator[Any]:
        if "w" not in mode:
            with self._fs.create_stream(path, mode) as stream:
                yield stream
            return
        torch_crc32 = serialization_config.save.compute_crc32
        if self._skip_torch_crc32:
            serialization_config.save.compute_crc32 = False
        try:
            direct = direct_io.open_direct(path) if self._local and direct_io.ENABLED else None
            if direct is not None:
                try:
                    stream = _ChecksumStream(direct, self._sha256)
                    yield stream
                except BaseException:
                    direct.abort()
                    raise
                direct.close()
            else:
                with self._fs.create_stream(path, mode) as raw:
                    stream = _ChecksumStream(raw, self._sha256, self._local and WRITE_BEHIND)
                    yield stream
        finally:
            if self._skip_torch_crc32:
                serialization_config.save.compute_crc32 = torch_crc32
        with self._lock:
            self.files[_basename(path)] = FileRecord(stream.size, f"{stream.crc & 0xffffffff:08x}",
                                                     stream.sha.hexdigest() if stream.sha is not None else "")

    def mkdir(self, path) -> None:
        if getattr(self._fs, "fs", None) is not None and is_object_store(self._fs.fs):  # fsspec-backed
            return  # prefixes need no making, and s3fs would create a missing bucket
        self._fs.mkdir(path)

    def rename(self, path, new_path) -> None:
        self._fs.rename(path, new_path)
        with self._lock:
            record = self.files.pop(_basename(path), None)
            if record is not None:
                self.files[_basename(new_path)] = record


def _basename(path) -> str:
    return os.fspath(path).rstrip("/").rsplit("/", 1)[-1]


class WriteRecord:
    """What one rank's writer wrote, filled in while ``dcp.save`` runs."""

    def __init__(self, files: dict[str, FileRecord]):
        self.files = files  # {file name: FileRecord}, checksummed while written
        self.tensor_keys: set[str] = set()  # DCP keys of the tensors this rank wrote


def checksumming_writer(url: str, *, local: bool, io_threads: int, sha256: bool = False,
                        storage_options: dict | None = None) -> tuple[Any, WriteRecord]:
    """A DCP storage writer for the checkpoint directory ``url``, and the record of what it
    wrote (complete once ``dcp.save`` returns); ``sha256`` adds a SHA-256 per file (keyed mode);
    ``storage_options``: fsspec's, for a remote root (``Storage.options``)."""
    if local:
        cls = dcp.FileSystemWriter
        kwargs = {"sync_files": True}
    else:
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter as cls
        kwargs = {"sync_files": False, **(storage_options or {})}  # object stores have no fsync; a finished PUT is durable

    class Writer(cls):
        def write_data(self, plan, planner):
            # ``plan`` is this rank's final plan, after DCP gave each replicated tensor to one rank.
            record.tensor_keys.update(item.index.fqn for item in plan.items if item.type != WriteItemType.BYTE_IO)
            return super().write_data(plan, planner)

    writer = Writer(url, thread_count=io_threads, **kwargs)
    fs = _ChecksummingFileSystem(writer.fs, io_threads, sha256, local=local)
    writer.fs = fs
    record = WriteRecord(fs.files)
    return writer, record
