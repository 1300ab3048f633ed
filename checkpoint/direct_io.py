"""Writing a new local checkpoint file with O_DIRECT: from a page-aligned buffer straight to
the disk, past the page cache.

Why: through the page cache every byte is copied into new pages that the kernel must find,
account, write back and (write-behind, ``writer.py``) drop again. On this project's CI machine
(ext4 on a virtio disk, a KVM guest) one process writing 50 MB into a new file and fsyncing
it took 1.3-2.8 ms per MB that way, nearly all of it the kernel's CPU time, against 0.55-0.78
ms per MB with O_DIRECT, of which 0.03-0.12 ms of kernel CPU. A checkpoint is written once and
read only after a failure, so leaving it out of the page cache costs nothing later.

Only on Linux, and only on the local block-device file systems where O_DIRECT really goes
past the page cache (ext4, XFS, f2fs, and overlayfs, which hands it to the one below):
elsewhere (NFS, where every direct write is a synchronous round trip; tmpfs, which takes
O_DIRECT and caches anyway; btrfs, which since Linux 6.14 turns direct writes to checksummed
files into buffered ones written back one call at a time; FUSE) ``open_direct`` returns None
and the caller writes through the page cache with write-behind.

How: the bytes collect in an 8 MiB buffer (writes of 64 KiB or more are copied with the GIL
released); each full buffer goes to the file in one ``pwrite``. The end that does not fill a
buffer goes out, padded with zeros to the 4 KiB alignment and then truncated back to the
file's true size, when the descriptor is asked for (``fileno``: DCP asks for it to fsync the
file, after the last write) or at ``close``. ``flush`` sends nothing: DCP calls it after every
item it writes, small ones too, and each would cost a synchronous write of the partly filled
block. A write the disk refuses (EINVAL: it needs a larger alignment) makes the file go on
without O_DIRECT, writing behind through the page cache; when a whole buffer was refused,
later files on that file system skip O_DIRECT too (a refused padded end alone costs each
file one refused write).
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import sys
import threading

import numpy as np

try:  # non-temporal stores: the copied bytes do not push training's data out of the CPU caches
    from . import _streamcopy
except ImportError:  # not built: a plain memmove (which releases the GIL too)
    _streamcopy = None

ENABLED = (sys.platform.startswith("linux") and hasattr(os, "O_DIRECT")
           and os.environ.get("FTCKPT_DIRECT_IO", "1") != "0")  # 0: off (for measuring)
BUFFER_BYTES = 8 << 20
ALIGN = 4096  # file offsets and lengths: a multiple of any disk's logical block size in common use
SMALL_WRITE = 64 << 10  # below this, a copy under the GIL costs less than releasing it
# statfs f_type of the file systems O_DIRECT is used on: ext2/3/4, XFS, f2fs, overlayfs.
DIRECT_FILE_SYSTEMS = {0xEF53, 0x58465342, 0xF2F52010, 0x794C7630}
_REFUSED = {errno.EINVAL, errno.EOPNOTSUPP, getattr(errno, "ENOTSUP", errno.EOPNOTSUPP)}
_refused_devices: set[int] = set()  # file systems that refused an O_DIRECT open or write


def _load_statfs():
    libc = ctypes.CDLL(None, use_errno=True)
    for name in ("statfs64", "statfs"):  # statfs64: 32-bit glibc's plain one overflows on large disks
        fn = getattr(libc, name, None)
        if fn is not None:
            fn.argtypes = (ctypes.c_char_p, ctypes.c_void_p)
            return fn
    return None


_statfs = _load_statfs() if ENABLED else None


def _file_system_type(directory: str) -> int | None:
    """statfs's f_type (Linux: the first field, a C long), None where it cannot be had."""
    if _statfs is None:
        return None
    result = ctypes.create_string_buffer(256)  # struct statfs is 120 bytes on 64-bit Linux
    if _statfs(os.fsencode(directory), result) != 0:
        return None
    return ctypes.c_ulong.from_buffer(result).value & 0xFFFFFFFF


def open_direct(path) -> DirectFile | None:
    """``path``, a new file, opened for an O_DIRECT write; None where O_DIRECT is not used
    there (the caller then writes through the page cache). Any other error is raised."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    try:
        device = os.stat(directory).st_dev
    except OSError:
        return None  # the caller's own open reports what is wrong
    if device in _refused_devices:
        return None
    if _file_system_type(directory) not in DIRECT_FILE_SYSTEMS:
        _refused_devices.add(device)
        return None
    try:
        return DirectFile(path, device)
    except OSError as e:
        if e.errno in _REFUSED:
            _refused_devices.add(device)
            return None
        raise


class DirectFile:
    """A write-only file: ``write``, ``fileno`` (everything written is in the file by then),
    ``flush`` (sends nothing), ``close`` and, on an error path, ``abort``."""

    def __init__(self, path: str, device: int | None = None):
        self._buffer, self._address = _take_buffer()
        try:
            self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_DIRECT, 0o666)
        except BaseException:
            _give_back_buffer(self._buffer, self._address)
            raise
        self._device = device
        self._direct = True
        self._used = 0  # bytes in the buffer
        self._sent = 0  # of those, the ones whose blocks are in the file for good (aligned)
        self._offset = 0  # the file offset of the buffer's first byte
        self._all_sent = True  # every byte written is in the file
        self._failed = False
        self.closed = False

    def write(self, data) -> int:
        self._check()
        view = memoryview(data).cast("B")
        source = np.frombuffer(view, np.uint8).ctypes.data if len(view) >= SMALL_WRITE else None
        capacity = len(self._buffer)
        done = 0
        while done < len(view):
            take = min(len(view) - done, capacity - self._used)
            if source is None:
                self._buffer[self._used:self._used + take] = view[done:done + take]
            elif _streamcopy is not None:
                _streamcopy.copy(self._address + self._used, source + done, take)
            else:
                ctypes.memmove(self._address + self._used, source + done, take)
            self._used += take
            done += take
            self._all_sent = False
            if self._used == capacity:
                self._send(capacity, remember=True)
                if not self._direct:
                    self._write_behind(self._offset + capacity)
                self._offset += capacity
                self._used = self._sent = 0
        return len(view)

    def _send(self, end: int, remember: bool = False) -> None:
        """The buffer's bytes from the first not yet in the file for good up to ``end``;
        ``remember``: a refusal of O_DIRECT holds for later files on this file system too."""
        try:
            with memoryview(self._buffer) as buffer:
                start = self._sent
                while start < end:
                    try:
                        n = os.pwrite(self._fd, buffer[start:end], self._offset + start)
                    except OSError as e:
                        if e.errno in _REFUSED and self._direct and start % ALIGN == 0:
                            self._drop_direct(remember)  # the disk needs a larger alignment
                            continue
                        raise
                    if n <= 0:
                        raise OSError(errno.EIO, "writing the checkpoint file failed: a write made no progress")
                    if self._direct and n % ALIGN:  # a short write (a disk nearly full): its block again, whole
                        if n < ALIGN:
                            self._drop_direct(remember=False)  # not one block: on without alignment
                        else:
                            n -= n % ALIGN
                    start += n
        except BaseException:
            self._failed = True
            raise

    def _drop_direct(self, remember: bool = True) -> None:
        """Goes on through the page cache; ``remember``: later files on this file system too."""
        import fcntl

        fcntl.fcntl(self._fd, fcntl.F_SETFL, fcntl.fcntl(self._fd, fcntl.F_GETFL) & ~os.O_DIRECT)
        self._direct = False
        if remember and self._device is not None:
            _refused_devices.add(self._device)

    def _write_behind(self, end: int) -> None:
        """Without O_DIRECT: start writing out what is in the page cache, and drop what is
        written by now (the rest goes at close, after the fsync). Advice only."""
        try:
            os.posix_fadvise(self._fd, 0, end, os.POSIX_FADV_DONTNEED)
        except OSError:
            pass

    def _send_the_rest(self) -> None:
        if self._all_sent:
            return
        try:
            padded = -(-self._used // ALIGN) * ALIGN
            self._buffer[self._used:padded] = bytes(padded - self._used)
            self._send(padded)
            if padded != self._used:
                os.ftruncate(self._fd, self._offset + self._used)
        except BaseException:
            self._failed = True
            raise
        self._sent = self._used - self._used % ALIGN  # a partly filled block is sent again, whole
        self._all_sent = True

    def _check(self) -> None:
        if self.closed:
            raise ValueError("I/O operation on a closed checkpoint file")
        if self._failed:
            raise OSError(errno.EIO, "an earlier write to this checkpoint file failed")

    def fileno(self) -> int:
        """The descriptor, once every byte written is in the file (the caller may fsync it)."""
        self._check()
        self._send_the_rest()
        return self._fd

    def flush(self) -> None:
        self._check()

    def close(self) -> None:
        """Sends what ``fileno`` has not (and then fsyncs it: a caller that asked for the
        descriptor before its last write may have fsynced too early)."""
        if self.closed:
            return
        try:
            if not self._failed and not self._all_sent:
                self._send_the_rest()
                os.fsync(self._fd)
            if not self._direct:
                self._write_behind(0)  # the whole file: clean after the fsync, dropped
        finally:
            self.abort()

    def abort(self) -> None:
        """Closes the file without sending anything more (a write or the save failed)."""
        if not self.closed:
            self.closed = True
            _give_back_buffer(self._buffer, self._address)
            self._buffer = None
            os.close(self._fd)


_free_buffers: list[tuple[mmap.mmap, int]] = []  # kept between saves: a new buffer's first fill faults
_free_buffers_lock = threading.Lock()


def _take_buffer() -> tuple[mmap.mmap, int]:
    with _free_buffers_lock:
        while _free_buffers:
            buffer, address = _free_buffers.pop()
            if len(buffer) == BUFFER_BYTES:
                return buffer, address
    buffer = mmap.mmap(-1, BUFFER_BYTES, flags=mmap.MAP_PRIVATE)  # page-aligned, as O_DIRECT needs
    return buffer, ctypes.addressof(ctypes.c_char.from_buffer(buffer))


def _give_back_buffer(buffer: mmap.mmap, address: int) -> None:
    with _free_buffers_lock:
        if len(_free_buffers) < 4:
            _free_buffers.append((buffer, address))


def _forget_buffers_in_a_child() -> None:
    global _free_buffers_lock
    _free_buffers_lock = threading.Lock()  # a thread of the parent may have held it at the fork
    _free_buffers.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_buffers_in_a_child)
