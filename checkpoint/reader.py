"""DCP's file reader, reading whole tensors straight into the live ones.

DCP's ``FileSystemReader`` loads each tensor by ``torch.load``-ing its slice of the shard file
into a new tensor and then copying that into the live one: a fresh allocation (page faults)
and a second copy of every byte. Most reads of a resume are whole tensors into contiguous
CPU tensors of the same shape and dtype (DDP, same or another world size), and for those the
bytes on disk are exactly the bytes the live tensor needs: ``torch.save`` stores an
uncompressed, contiguous storage record. Those are read with one ``readinto`` into the live
tensor's memory. Everything else (partial chunks when resharding, GPU tensors, views,
non-tensor items) goes through DCP's own code, unchanged.

Each tensor's slice of the shard is a ``torch.save`` zip archive whose directory sits at its
end, after the tensor's bytes. Opening it as a zip (``torch._C.PyTorchFileReader``) reads that
tail first and then jumps back: on a cold page cache that defeats the kernel's readahead and
cost a third of a 403 MB load. ``_tensor_records`` instead walks the zip's local headers from
the front (the pickle, then the tensor's bytes), so every slice is read front to back.

Each whole tensor's layout (dtype, shape, strides, storage offset) is read from the small
pickle ``torch.save`` wrote beside its bytes. ``torch.load`` of it costs about a millisecond
(its weights-only unpickler is pure Python): a second per thousand tensors, most of a warm
load. ``_saved_layout`` reads it with the C unpickler instead, with globals restricted to
functions of its own that only describe the tensor (nothing of torch's runs), after
``check_c_unpickle`` has refused what such globals alone do not; anything else in that pickle
sends the tensor to DCP's path.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import functools
import io
import math
import mmap
import os
import pickle
import stat
import struct
import sys
import threading
from typing import Callable

import psutil
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.planner import LoadItemType
from torch.futures import Future

from .safe_load import SafeMetadataReader, check_c_unpickle, fsspec_reader, unpickling_reason
from .storage import crc32

_STORAGE_RECORD = "data/0"  # a torch.save of one tensor holds exactly one storage
_HEAD_BYTES = 8192  # a slice's records before the tensor's bytes: the pickle (at most 4 KiB), headers, padding
_READ_SLICE = 2 << 20  # within the kernel's readahead window (8 MiB on the machine measured), so the disk works on while the crc32 runs
_LAYOUT_MAX_BYTES = 4096  # the pickle describing one plain tensor: about 160 bytes, more with many dims


class DirectFileSystemReader(SafeMetadataReader, dcp.FileSystemReader):
    """DCP's FileSystemReader with direct reads of whole tensors, and ``.metadata`` read
    through the restricted unpickler (``checkpoint.safe_load``).

    The files named in ``checksum`` get their crc32 taken from the bytes this read brings in,
    as it reads them (the gaps between, with ``os.pread``), into ``crc32s``: no second pass
    over the files. Taken right after each read, before any other read could overwrite the
    same memory (tied tensors)."""

    def __init__(self, path, checksum=(), **kwargs):
        super().__init__(path, **kwargs)
        self.checksum = set(checksum)
        self.crc32s: dict[str, str] = {}

    def read_data(self, plan, planner) -> Future:
        rest = []
        per_file: dict[str, list] = {}
        for req in plan.items:
            per_file.setdefault(self.storage_data[req.storage_index].relative_path, []).append(req)
        for relative_path, reqs in sorted(per_file.items()):  # the order ReadAhead reads them in
            path = self.fs.concat_path(self.path, relative_path)
            with self.fs.create_stream(path, "rb") as stream:
                crc = _FileCrc32(stream.fileno(), path) if relative_path in self.checksum else _NO_CRC
                for req in sorted(reqs, key=lambda r: self.storage_data[r.storage_index].offset):
                    if not self._read_into_target(stream, req, planner, crc):
                        rest.append(req)
                if crc is not _NO_CRC:
                    self.crc32s[relative_path] = crc.finish()
        if rest:
            super().read_data(dataclasses.replace(plan, items=rest), planner).wait()
        done: Future = Future()
        done.set_result(None)
        return done

    def _read_into_target(self, stream, req, planner, crc) -> bool:
        """Read ``req`` straight into its target if it is a whole tensor stored contiguously,
        or hand a non-tensor item's bytes to the planner as DCP does (DCP's path reopens each
        file for them: 2 ms of a 101 MB load); False when DCP's general path must handle it
        (which then reads it over whatever this read may have put into the target)."""
        info = self.storage_data[req.storage_index]
        if info.transform_descriptors:
            return False
        if req.type == LoadItemType.BYTE_IO:  # a non-tensor item: its bytes as DCP would hand them over
            stream.seek(info.offset)
            data = stream.read(info.length)
            if len(data) != info.length:
                raise EOFError(f"{info.relative_path}: ended {info.length - len(data)} bytes early in {req.storage_index.fqn!r}")
            crc.add(info.offset, data)
            planner.load_bytes(req, io.BytesIO(data))
            return True
        target = planner.resolve_tensor(req).detach()
        if target.device.type != "cpu" or not target.is_contiguous() or type(target) is not torch.Tensor:
            return False
        if any(o != 0 for o in req.storage_offsets) or list(req.lengths) != list(target.shape):
            return False  # a part of the saved tensor (resharding)
        nbytes = target.numel() * target.element_size()
        stream.seek(info.offset)
        head = stream.read(min(info.length, _HEAD_BYTES))
        crc.add(info.offset, head)
        found = _tensor_records(head)
        if found is None:
            return False
        records, data_offset, record_size = found
        if (records.get("byteorder") != sys.byteorder.encode() or data_offset + nbytes > info.length
                or record_size not in (None, nbytes)
                or _saved_layout(records.get("data.pkl", b"")) != (target.dtype, tuple(target.shape), 0)):
            return False
        if nbytes:
            # The tensor's first bytes came with the head: copied from it, not read again, so
            # the bytes checksummed are the bytes loaded.
            dest = memoryview(target.reshape(-1).view(torch.uint8).numpy())
            filled = max(0, min(nbytes, len(head) - data_offset))
            dest[:filled] = head[data_offset:data_offset + filled]
            stream.seek(info.offset + data_offset + filled)
            while filled < nbytes:
                # A slice at a time, each checksummed as it arrives, while the kernel reads
                # ahead: the crc32 of the last slice is all that is left after the last read.
                n = stream.readinto(dest[filled:filled + _READ_SLICE])
                if not n:
                    raise EOFError(f"{info.relative_path}: ended {nbytes - filled} bytes early in {req.storage_index.fqn!r}")
                crc.add(info.offset + data_offset + filled, dest[filled:filled + n])
                filled += n
        stream.seek(info.offset + data_offset + nbytes)
        after = stream.read(min(24, info.length - data_offset - nbytes))
        crc.add(info.offset + data_offset + nbytes, after)
        if record_size is None and not _ends_record(after, nbytes):
            return False  # the record is not the tensor's size (a forged file): DCP's path reads it or fails
        planner.commit_tensor(req, target)
        return True


class _FileCrc32:
    """The crc32 of one open file from pieces read in increasing order of offset (overlaps
    are skipped, gaps read with ``os.pread`` on the same descriptor)."""

    def __init__(self, fd: int, path: str):
        self.fd, self.path = fd, path
        self.crc = self.done = 0

    def add(self, offset: int, data) -> None:
        if offset + len(data) <= self.done:
            return
        self._read_up_to(offset)
        self.crc = crc32(data[self.done - offset:], self.crc)
        self.done = offset + len(data)

    def finish(self) -> str:
        size = os.fstat(self.fd).st_size
        if size < self.done:
            raise EOFError(f"{self.path} shrank to {size} bytes while being loaded")
        self._read_up_to(size)
        return f"{self.crc:08x}"

    def _read_up_to(self, offset: int) -> None:
        while self.done < offset:
            chunk = os.pread(self.fd, min(offset - self.done, 8 << 20), self.done)
            if not chunk:
                raise EOFError(f"{self.path} ended at byte {self.done} while being checksummed (truncated?)")
            self.crc = crc32(chunk, self.crc)
            self.done += len(chunk)


class _NoCrc32:
    def add(self, offset: int, data) -> None:
        pass


_NO_CRC = _NoCrc32()


_LOCAL_HEADER = struct.Struct("<4sHHHHHIIIHH")  # a zip entry's local header, before its name
_LOCAL_SIGNATURE = b"PK\x03\x04"
_DESCRIPTOR_SIGNATURE = b"PK\x07\x08"  # after an entry written as a stream: its crc32 and sizes


def _tensor_records(head: bytes) -> tuple[dict, int, int | None] | None:
    """What a ``torch.save`` of one tensor writes before the tensor's bytes, read from the
    first bytes of its zip archive: the small records ({"data.pkl": the pickle, "byteorder":
    ..., ...}), the offset of the tensor's bytes (record "data/0") and their size if its
    header gives it (an empty record's does), else None: a data descriptor follows them
    (``_ends_record``). None where the bytes are not laid out so (another writer, a damaged
    file, a storage alignment beyond 4 KiB): DCP's path reads that tensor.

    ``torch.save`` writes its entries as a stream, so a local header holds no sizes: a small
    entry ends at the data descriptor that gives its length, and the next header follows."""
    records: dict = {}
    prefix = None  # the archive's name, "archive/"
    pos = 0
    while pos + _LOCAL_HEADER.size <= len(head):
        signature, _, flags, method, _, _, _, size, _, name_len, extra_len = _LOCAL_HEADER.unpack_from(head, pos)
        name_at = pos + _LOCAL_HEADER.size
        data = name_at + name_len + extra_len
        if signature != _LOCAL_SIGNATURE or method != 0 or data > len(head):
            return None  # not a stored (uncompressed) entry
        name = head[name_at:name_at + name_len].decode("utf-8", "replace")
        prefix = prefix or name.partition("/")[0] + "/"
        if not name.startswith(prefix):
            return None
        if name[len(prefix):] == _STORAGE_RECORD:
            return records, data, None if flags & 0x8 else size
        end = _entry_end(head, data) if flags & 0x8 else None  # else not written as a stream: not torch.save's
        if end is None:
            return None
        records[name[len(prefix):]], pos = head[data:end[0]], end[1]
    return None


def _entry_end(head: bytes, data: int) -> tuple[int, int] | None:
    """(end of the entry whose data starts at ``data``, start of the next entry): at the
    first data descriptor that gives the entry's length (32-bit sizes, or zip64's 64-bit
    ones) and is followed by a local header."""
    found = head.find(_DESCRIPTOR_SIGNATURE, data)
    while found != -1:
        length = found - data
        for size_format, next_entry in (("<I", found + 16), ("<Q", found + 24)):
            if (head[next_entry:next_entry + 4] == _LOCAL_SIGNATURE
                    and struct.unpack_from(size_format, head, found + 8)[0] == length):
                return found, next_entry
        found = head.find(_DESCRIPTOR_SIGNATURE, found + 1)
    return None


def _ends_record(after: bytes, size: int) -> bool:
    """Whether ``after``, the bytes after a streamed record of ``size`` bytes, begin with
    the data descriptor of a record that size (32-bit sizes, or zip64's 64-bit ones)."""
    if not after.startswith(_DESCRIPTOR_SIGNATURE):
        return False
    return (len(after) >= 16 and struct.unpack_from("<II", after, 8) == (size, size)
            or len(after) >= 24 and struct.unpack_from("<QQ", after, 8) == (size, size))


_STORAGE_DTYPES = {name: dtype for dtype, name in torch.storage._dtype_to_storage_type_map().items()}


class _LayoutUnpickler(pickle.Unpickler):
    """Unpickles the ``data.pkl`` of a ``torch.save`` of one tensor into a description of it:
    the only globals it resolves are stand-ins that build tuples."""

    def find_class(self, module: str, name: str):
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return lambda *args: _describe_tensor(*args)  # a fresh one: pickle's BUILD could change a shared one
        if (module, name) == ("collections", "OrderedDict"):
            return dict
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a saved tensor")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and pid[2] == "0"):
            raise pickle.UnpicklingError(f"unexpected storage {pid!r}")
        return ("storage", pid[1])  # its dtype


def _describe_tensor(storage, storage_offset, size, stride, _requires_grad=False, _hooks=None, metadata=None):
    if metadata:  # tensor metadata beyond the layout (torch._utils.set_tensor_metadata): DCP's path
        return None
    return ("tensor", storage, storage_offset, tuple(size), tuple(stride))


def _contiguous_strides(shape: tuple) -> tuple:
    strides, step = [], 1
    for n in reversed(shape):
        strides.append(step)
        step *= max(n, 1)
    return tuple(reversed(strides))


def _saved_layout(pickled: bytes) -> tuple | None:
    """(dtype, shape, storage offset) of the tensor a ``torch.save`` pickle describes, if it
    is one contiguous tensor; None for anything else (DCP's path reads it)."""
    if len(pickled) > _LAYOUT_MAX_BYTES:  # not one plain tensor's; and the scan below is slow
        return None
    return _parse_layout(pickled)


@functools.lru_cache(maxsize=4096)  # same shape and dtype, same bytes: Adam's two states, repeated layers
def _parse_layout(pickled: bytes) -> tuple | None:
    """``_saved_layout``'s work, a pure function of the bytes: cached (its scan and
    unpickling cost 0.2 ms a tensor; at most 4096 entries of at most 4 KiB)."""
    try:
        check_c_unpickle(pickled)
        saved = _LayoutUnpickler(io.BytesIO(pickled)).load()
        _, (_, dtype), offset, shape, stride = saved
        numbers = (offset, *shape, *stride)
        if (saved[0] != "tensor" or not isinstance(dtype, torch.dtype) or len(shape) != len(stride) or len(shape) > 64
                or not all(type(n) is int and 0 <= n < 2**62 for n in numbers)):
            return None
        if math.prod(shape) > 1 and stride != _contiguous_strides(shape):
            return None
        return dtype, shape, offset
    except Exception:  # not the pickle of a plain tensor
        return None


def refused_tensor_record(storage, dirname: str) -> str | None:
    """Why loading would refuse a tensor record of checkpoint ``dirname`` (a forged pickle
    whose checksum was rewritten to match), or None. The checksums cannot tell (a record's
    crc32 is the forger's to set) and discovery reads no tensor record; a load meets it and
    skips the checkpoint. Each record is read as either way of loading it reads it: the
    direct reader takes the tensor's pickle from the front of its slice, ``torch.load`` (DCP's
    path: GPU or resharded targets, object stores) from the zip's directory at its end. Where
    both are the same plain tensor's, nothing more is read; anything else is loaded with
    ``torch.load(weights_only=True)``, as DCP's path would (reading that tensor's bytes).
    Raises ``OSError`` when a file cannot be read."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata
    from torch.distributed.checkpoint.utils import _create_file_view

    metadata = reader_for(storage, dirname).read_metadata()
    by_file: dict[str, list] = {}
    for index, info in (metadata.storage_data or {}).items():
        if isinstance(metadata.state_dict_metadata.get(index.fqn), TensorStorageMetadata):
            by_file.setdefault(info.relative_path, []).append((index, info))
    for relative_path, records in sorted(by_file.items()):
        path = storage.join(dirname, relative_path)
        with storage.fs.open(path, "rb") as f:
            for index, info in sorted(records, key=lambda r: r[1].offset):
                where = f"{path}: the record of tensor {index.fqn!r}"  # repr: the name comes from the file
                if not all(type(n) is int and n >= 0 for n in (info.offset, info.length)):
                    return f"{where} has no valid byte range (damaged or forged)"
                try:
                    pickled = torch._C.PyTorchFileReader(_create_file_view(f, info.offset, info.length)).get_record("data.pkl")
                    f.seek(info.offset)
                    found = _tensor_records(f.read(min(info.length, _HEAD_BYTES)))
                    if found is not None and found[0].get("data.pkl") == pickled and _saved_layout(pickled) is not None:
                        continue
                    torch.load(_create_file_view(f, info.offset, info.length), map_location="cpu", weights_only=True)
                except (OSError, MemoryError):
                    raise
                except Exception as e:  # refused, or not an archive torch can read: what the load would meet
                    return f"{where} is not loaded: {unpickling_reason(e)}"
    return None


class ReadAhead:
    """Reads a checkpoint's files front to back in a thread, so that the page cache holds
    them when the load reads them.

    Started when a load starts, it keeps the disk busy from then on. A cold 101 MB load (2
    ranks) spent a fifth of its time before its first read of a shard: finding and verifying
    the checkpoint, DCP's planning, the ranks' agreements, with the disk idle. The ranks'
    own reads then copy from the page cache behind it. When the first and last slices of
    every file are in the page cache already (a restart on a node that read them), it reads
    nothing: reading them again would only take CPU from the ranks' reads. It reads at most half
    the memory available when it starts, so that what it reads first is not evicted before
    the ranks get there.

    It reads with ``sendfile`` into ``/dev/null``: the kernel reads the pages into the page
    cache as a ``read`` would, and copies them nowhere (``_Sink``: where that cannot be, it
    reads into a scratch buffer). The ranks' own reads of the same files run beside it on the
    node's cores and slow it: reading into a buffer, in cold 101 MB loads (2 ranks, 2 cores),
    it took 0.98x one process's cold read of the files while the ranks waited, 1.07x while
    both cores only copied memory, 1.19-1.21x while the ranks read. Its own copy added to
    that: against the read into a buffer, taking turns in one run (medians of 8-24 loads),
    the loads' ratio to the cold read was lower in 11 runs of 11 (8 at 101 MB, 2 at 403 MB,
    1 at 1611 MB), by 0.02-0.20.

    Measured and not chosen: the kernel's ``posix_fadvise(WILLNEED)`` of the whole files
    (slower than no read-ahead: it queues every request at once, ahead of the small reads
    that finding the checkpoint needs); ``WILLNEED`` a few slices ahead, or
    ``madvise(MADV_POPULATE_READ)`` of a mapping, instead of reading (loads 1.4-1.6x a cold
    read); ``POSIX_FADV_SEQUENTIAL`` (slower); 4 or 8 MiB slices, two threads on two files,
    or each rank starting at another file (no difference within the noise); and skipping
    each slice the page cache holds (a rank ahead of it then made two streams of one).

    ``find`` (run in the thread) names the files; only regular files are read (a FIFO or a
    device named like a shard is passed over). Errors end it quietly: it only warms the
    cache, and the load reports what it finds itself."""

    def __init__(self, find: Callable[[], list[str]]):
        self.find = find
        self.bytes_read = 0
        self._wanted: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ckpt-read-ahead", daemon=True)
        self._thread.start()

    def keep_only(self, directory: str) -> None:
        """The load chose the checkpoint in ``directory``: stop if the files being read are
        another's (the newest failed to verify, or a mirror's is newer)."""
        self._wanted = os.path.abspath(directory)

    def close(self, wait_until_done: bool = False, timeout: float | None = None) -> bool:
        """Stop (at the next slice: a read of at most 2 MiB) and wait for the thread; or,
        ``wait_until_done``, wait until it has read every file. Whether it has ended."""
        if not wait_until_done:
            self._stop.set()
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _reading(self, path: str) -> bool:
        return not self._stop.is_set() and self._wanted in (None, os.path.dirname(os.path.abspath(path)))

    def _run(self) -> None:
        try:
            paths = self.find()
            if all(_in_page_cache(path) for path in paths):
                return
            budget = psutil.virtual_memory().available // 2
            with _Sink() as sink:
                for path in paths:
                    fd = _open_regular(path)
                    if fd is None:
                        continue
                    try:
                        offset = 0
                        while self._reading(path) and self.bytes_read < budget:
                            n = sink.read(fd, offset)
                            if not n:
                                break
                            offset += n
                            self.bytes_read += n
                    finally:
                        os.close(fd)
                    if not self._reading(path):
                        return
        except Exception:  # a missing or unreadable file, a root being deleted: the load reports what it finds
            return


class _Sink:
    """Where the read-ahead's bytes go: ``/dev/null`` through ``sendfile`` (no copy), or a
    scratch buffer where that cannot be: not Linux, a ``/dev/null`` that is missing or not the
    null device (a regular file there would fill with the checkpoint, a FIFO block the open),
    or a kernel, file system or sandbox that refuses the ``sendfile``."""

    _FALLBACK_ERRNOS = (errno.EINVAL, errno.ENOSYS, errno.ENOTSOCK, errno.EOPNOTSUPP, errno.EPERM, errno.EACCES)

    def __init__(self):
        self._scratch: bytearray | None = None
        self._null = _open_null_device() if hasattr(os, "sendfile") and sys.platform.startswith("linux") else None

    def read(self, fd: int, offset: int) -> int:
        """Bring up to a slice of ``fd`` at ``offset`` into the page cache; the bytes read."""
        if self._null is not None:
            try:
                return os.sendfile(self._null, fd, offset, _READ_SLICE)
            except OSError as e:
                if e.errno not in self._FALLBACK_ERRNOS:
                    raise
                self.close()
        if self._scratch is None:
            self._scratch = bytearray(_READ_SLICE)
        if hasattr(os, "preadv"):
            return os.preadv(fd, [self._scratch], offset)
        os.lseek(fd, offset, os.SEEK_SET)  # sendfile never moved it
        return os.readv(fd, [self._scratch])

    def close(self) -> None:
        if self._null is not None:
            os.close(self._null)
            self._null = None

    def __enter__(self):
        return self

    def __exit__(self, *_exc):
        self.close()


def _open_null_device() -> int | None:
    """A descriptor of Linux's null device (character device 1:3) at ``os.devnull``, or None."""
    try:
        fd = os.open(os.devnull, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    info = os.fstat(fd)
    if stat.S_ISCHR(info.st_mode) and info.st_rdev == os.makedev(1, 3):
        return fd
    os.close(fd)
    return None


def _open_regular(path: str) -> int | None:
    """A read-only descriptor of ``path`` if it is a regular file (not a link: the load
    opens only files its metadata names; never blocking on a FIFO), else None."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return None
    if stat.S_ISREG(os.fstat(fd).st_mode):
        return fd
    os.close(fd)
    return None


def _in_page_cache(path: str) -> bool:
    """Whether the page cache holds the file at ``path``: its first and last slices, as
    ``mincore`` on a mapping of it tells (no I/O, unlike a read; a sample, as checking every
    page of a large file took milliseconds of CPU the ranks' reads need). False where the
    platform cannot tell, and for a file this process neither owns nor may write (mincore
    then reports every page as there)."""
    fd = _open_regular(path)
    if fd is None:
        return False
    try:
        info = os.fstat(fd)
        libc = _libc()
        if info.st_size == 0:
            return True
        if (libc is None or not hasattr(mmap, "PROT_READ")
                or not (os.geteuid() in (0, info.st_uid) or os.access(path, os.W_OK))):
            return False
        size = info.st_size
        address = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if address in (None, ctypes.c_void_p(-1).value):
            return False
        try:
            for start in {0, max(0, size - _READ_SLICE) // mmap.PAGESIZE * mmap.PAGESIZE}:
                length = min(_READ_SLICE, size) if start == 0 else size - start
                resident = ctypes.create_string_buffer((length + mmap.PAGESIZE - 1) // mmap.PAGESIZE)
                if libc.mincore(address + start, length, resident) != 0 or resident.raw.translate(_RESIDENT_BIT).count(0):
                    return False
            return True
        finally:
            libc.munmap(address, size)
    finally:
        os.close(fd)


_RESIDENT_BIT = bytes(i & 1 for i in range(256))  # mincore's flags: bit 0 is "resident", the rest are reserved


@functools.lru_cache(maxsize=1)
def _libc():
    """The C library's mmap, munmap and mincore (None where there are none)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
        return libc
    except (OSError, AttributeError, TypeError):  # not a C library with these (not Linux)
        return None


def reader_for(storage, dirname: str, checksum=()):
    """The DCP reader for checkpoint ``dirname`` under ``storage`` (a ``Storage``): direct
    reads on a local disk (taking the crc32s of the files in ``checksum`` as it reads them),
    fsspec's reader (with the root's options) elsewhere; both read ``.metadata`` through the
    restricted unpickler."""
    if storage.is_local:
        return DirectFileSystemReader(storage.join(dirname), checksum)
    return fsspec_reader(storage.url_of(dirname), storage.options)
