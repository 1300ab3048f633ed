"""The direct reader finds a tensor's bytes from the front of its ``torch.save`` archive.

``_tensor_records`` walks the zip's local headers instead of opening the archive by its
directory (at the end, after the tensor's bytes: read first, it broke the readahead of a cold
load). It must agree with torch's own zip reader on every tensor torch.save writes, and give
up (None: DCP's path reads the tensor) on anything laid out otherwise."""

from __future__ import annotations

import io
import struct

import pytest
import torch

from checkpoint.reader import _HEAD_BYTES, _tensor_records

TENSORS = {
    "float32 matrix": torch.randn(64, 32),
    "bfloat16": torch.randn(5, 3).bfloat16(),
    "int64": torch.arange(7),
    "bool": torch.tensor([True, False, True]),
    "0-dim": torch.tensor(3.5),
    "empty": torch.empty(0, 3),
    "many dims": torch.zeros([1] * 30),
    "a view's whole storage": torch.randn(10)[2:7],
}


def saved(tensor: torch.Tensor) -> bytes:
    buf = io.BytesIO()
    torch.save(tensor, buf)
    return buf.getvalue()


@pytest.mark.parametrize("name", TENSORS)
def test_the_front_of_the_archive_gives_what_its_directory_says(name):
    data = saved(TENSORS[name])
    archive = torch._C.PyTorchFileReader(io.BytesIO(data))
    found = _tensor_records(data[:_HEAD_BYTES])
    assert found is not None, "torch.save's layout changed: every tensor would take DCP's slower path"
    records, offset, size = found
    assert offset == archive.get_record_offset("data/0")
    assert size in (None, archive.get_record_size("data/0"))  # None: a descriptor after the bytes says it
    assert records["data.pkl"] == archive.get_record("data.pkl")
    assert records["byteorder"] == archive.get_record("byteorder")


def test_anything_laid_out_otherwise_is_left_to_dcp():
    data = saved(torch.randn(16))
    pickle_size = _tensor_records(data)[0]["data.pkl"].__len__()
    first_descriptor = data.index(b"PK\x07\x08")
    compressed = bytearray(data)
    compressed[8:10] = struct.pack("<H", 8)  # the first entry says "deflated"
    sizes_in_header = bytearray(data)
    sizes_in_header[6:8] = struct.pack("<H", 0)  # no data descriptors: not torch.save's stream
    wrong_length = bytearray(data)
    wrong_length[first_descriptor + 8:first_descriptor + 12] = struct.pack("<I", pickle_size + 1)
    renamed = data.replace(b"archive/data/0", b"archive/data/1", 1)
    for damaged in (b"", b"not a zip file at all", data[:40], data[:first_descriptor + 8], bytes(compressed),
                    bytes(sizes_in_header), bytes(wrong_length), renamed):
        assert _tensor_records(damaged) is None, damaged[:60]


def test_a_descriptor_lookalike_inside_the_pickle_is_passed_over():
    """The descriptor is found by its signature; a pickle that happens to hold those bytes
    must not end the entry early (its length field would not match)."""
    data = saved(torch.randn(4))
    archive = torch._C.PyTorchFileReader(io.BytesIO(data))
    pickled = archive.get_record("data.pkl")
    # The pickle with a descriptor's signature and a local header's after its STOP opcode.
    decoy = pickled + b"PK\x07\x08" + struct.pack("<III", 0, 7, 7) + b"PK\x03\x04"
    buf = io.BytesIO()
    writer = torch._C.PyTorchFileWriter(buf)
    writer.write_record("data.pkl", decoy, len(decoy))
    writer.write_record("byteorder", b"little", 6)
    writer.write_record("data/0", archive.get_record("data/0"), archive.get_record_size("data/0"))
    writer.write_end_of_file()
    written = buf.getvalue()
    records, offset, _ = _tensor_records(written[:_HEAD_BYTES])
    reread = torch._C.PyTorchFileReader(io.BytesIO(written))
    assert records["data.pkl"] == decoy and offset == reread.get_record_offset("data/0")


def _save_one(directory, tensor: torch.Tensor):
    import torch.distributed.checkpoint as dcp

    dcp.save({"a": tensor}, storage_writer=dcp.FileSystemWriter(str(directory)), no_dist=True)
    metadata = dcp.FileSystemReader(str(directory)).read_metadata()  # our own file: plain pickle is fine
    (index, info), = metadata.storage_data.items()
    return metadata, index, info


def _load_one(directory, shape) -> torch.Tensor:
    import torch.distributed.checkpoint as dcp

    from checkpoint.reader import DirectFileSystemReader

    target = {"a": torch.full(shape, -1.0)}
    dcp.load(target, storage_reader=DirectFileSystemReader(str(directory)), no_dist=True)
    return target["a"]


def test_a_tensor_record_shorter_than_the_tensor_is_not_read_as_it(tmp_path):
    """A forged slice: the pickle says (100, 10) float32, its storage record holds 3900 of
    the 4000 bytes. Read by the front, the last 100 bytes would be the zip's trailer; the
    descriptor after the record says its size, so the load must fail instead."""
    import dataclasses
    import pickle

    metadata, index, info = _save_one(tmp_path, torch.randn(100, 10))
    original = torch._C.PyTorchFileReader(io.BytesIO(saved(torch.zeros(100, 10))))
    buf = io.BytesIO()
    writer = torch._C.PyTorchFileWriter(buf)
    for name in ("data.pkl", ".format_version", ".storage_alignment", "byteorder"):
        record = original.get_record(name)
        writer.write_record(name, record, len(record))
    writer.write_record("data/0", b"\x11" * 3900, 3900)
    writer.write_end_of_file()
    forged = buf.getvalue()
    (tmp_path / info.relative_path).write_bytes(forged)
    metadata.storage_data[index] = dataclasses.replace(info, offset=0, length=len(forged))
    (tmp_path / ".metadata").write_bytes(pickle.dumps(metadata))
    from torch.distributed.checkpoint.api import CheckpointException

    with pytest.raises(CheckpointException, match=r"record size \(3900 bytes\) does not match"):  # DCP's path
        _load_one(tmp_path, (100, 10))


def test_a_layout_the_front_cannot_give_still_loads_through_dcps_path(tmp_path):
    """Storage records aligned to 16 KiB start past the first 8 KiB: DCP's path reads them."""
    from torch.utils.serialization import config

    tensor = torch.randn(100, 10)
    default = config.save.storage_alignment
    config.save.storage_alignment = 16384  # (pytest's monkeypatch would delete it on undo)
    try:
        _, _, info = _save_one(tmp_path, tensor)
    finally:
        config.save.storage_alignment = default
    head = (tmp_path / info.relative_path).read_bytes()[info.offset:info.offset + _HEAD_BYTES]
    assert _tensor_records(head) is None
    assert torch.equal(_load_one(tmp_path, (100, 10)), tensor)


def test_the_crc32s_taken_while_reading_are_the_files(tmp_path):
    """The reader checksums the files it is asked to from the bytes it reads (tensors read
    directly, the rest read by DCP's path in between, trailers): the result must be each
    whole file's crc32."""
    import torch.distributed.checkpoint as dcp

    from checkpoint import CheckpointManager, Storage
    from checkpoint.reader import DirectFileSystemReader

    torch.manual_seed(0)
    state = {"transposed": torch.randn(4, 6).t(), "bf16": torch.randn(5, 3).bfloat16(), "empty": torch.empty(0, 3),
             "scalar": torch.tensor(3.5), "big": torch.randn(300, 300)}
    CheckpointManager(tmp_path, model=torch.nn.Linear(6, 4), state={"extra": state}).save(1)
    step_dir = tmp_path / "step-00000001"
    shards = sorted(p.name for p in step_dir.glob("*.distcp"))
    reader = DirectFileSystemReader(str(step_dir), checksum=shards)
    target = {f"extra.{k}": torch.zeros_like(v) for k, v in state.items()}
    dcp.load(target, storage_reader=reader, no_dist=True)
    storage = Storage(step_dir)
    assert reader.crc32s == {name: storage.crc32(str(step_dir / name)) for name in shards}
    assert all(torch.equal(target[f"extra.{k}"], v) for k, v in state.items())


def test_a_flipped_byte_that_no_read_touches_still_fails_the_load(tmp_path, caplog):
    """A byte in a tensor's zip trailer (its central directory), which the direct read
    skips: the checksum reads the gaps, so the checkpoint still falls back."""
    import logging

    from torch.distributed.checkpoint import FileSystemReader

    from test_commit_protocol import loaded_step, save_steps

    snaps = save_steps(tmp_path, [10, 20])
    step_dir = tmp_path / "step-00000020"
    metadata = FileSystemReader(str(step_dir)).read_metadata()  # our own file: plain pickle is fine here
    info = next(info for index, info in sorted(metadata.storage_data.items(), key=lambda kv: kv[0].fqn)
                if index.fqn.startswith("model."))
    shard = step_dir / info.relative_path
    data = bytearray(shard.read_bytes())
    data[info.offset + info.length - 30] ^= 0xFF  # in the end-of-directory record
    shard.write_bytes(data)
    with caplog.at_level(logging.WARNING):
        step, model = loaded_step(tmp_path, verify="hash")
    assert step == 10
    assert all(torch.equal(v, snaps[10][k]) for k, v in model.state_dict().items())
    assert any(str(shard) in r.getMessage() and "crc32" in r.getMessage() for r in caplog.records)


def _on_tmpfs(path) -> bool:
    """Whether ``path`` lies on a tmpfs (whose pages cannot be dropped: they are the file)."""
    import os

    path = os.path.realpath(path)
    best, fstype = "", ""
    with open("/proc/self/mounts") as mounts:
        for line in mounts:
            _, mountpoint, kind, *_ = line.split()
            if (path == mountpoint or path.startswith(mountpoint.rstrip("/") + "/")) and len(mountpoint) > len(best):
                best, fstype = mountpoint, kind
    return fstype == "tmpfs"


def _evict(paths) -> None:
    import os

    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)  # dirty pages are not dropped
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def test_read_ahead_reads_a_cold_checkpoint_into_the_page_cache_and_leaves_a_warm_one(tmp_path, monkeypatch):
    """A load starts a ReadAhead of the newest checkpoint's files: cold, it reads every byte
    (so the ranks' reads find them in the page cache), with ``sendfile``; warm, it reads none
    (that would only take CPU from the ranks); files it cannot open, and a FIFO named like a shard
    (whose open would block), are passed over; it leaves no descriptor open."""
    import os

    from checkpoint import CheckpointManager
    from checkpoint.manager import _newest_committed_files
    from checkpoint.reader import ReadAhead, _in_page_cache
    from checkpoint.storage import Storage

    if _on_tmpfs(tmp_path):
        pytest.skip(f"{tmp_path} is on a tmpfs: its pages cannot be dropped")
    model = torch.nn.Linear(1000, 1000)  # 4 MB: two 2 MiB slices and a part one
    manager = CheckpointManager(tmp_path, model=model)
    manager.save(3)
    manager.save(7)
    (tmp_path / "step-00000009").mkdir()  # newer, but never committed: not what a load reads
    files = _newest_committed_files(Storage(tmp_path))
    names = [os.path.basename(f) for f in files]
    assert {os.path.dirname(f) for f in files} == {str(tmp_path / "step-00000007")}
    assert names[:2] == ["manifest.json", ".metadata"] and names[2:] == sorted(names[2:]) and len(names) > 2
    size = sum(os.path.getsize(f) for f in files)
    _evict(files)
    assert not any(_in_page_cache(f) for f in files[2:])

    descriptors = len(os.listdir("/proc/self/fd"))
    fifo = str(tmp_path / "step-00000007" / "__99_0.distcp")
    os.mkfifo(fifo)
    sent = []
    sendfile = os.sendfile

    def counted(*args):
        sent.append(args)
        return sendfile(*args)

    monkeypatch.setattr(os, "sendfile", counted)
    cold = ReadAhead(lambda: files + [fifo, str(tmp_path / "gone")])
    assert cold.close(wait_until_done=True, timeout=60), "the read-ahead did not end (blocked on the FIFO?)"
    assert cold.bytes_read == size
    assert sent, "the read-ahead did not use sendfile"
    assert len(os.listdir("/proc/self/fd")) == descriptors
    assert all(_in_page_cache(f) for f in files)
    assert all(_resident_pages(f) == _pages(f) for f in files)  # every page, not the sampled slices
    os.unlink(fifo)

    warm = ReadAhead(lambda: files)
    assert warm.close(wait_until_done=True, timeout=60)
    assert warm.bytes_read == 0
    assert _newest_committed_files(Storage(tmp_path / "empty")) == []


def _pages(path) -> int:
    import mmap
    import os
    return -(-os.path.getsize(path) // mmap.PAGESIZE)


def _resident_pages(path) -> int:
    """How many of the file's pages the page cache holds (mincore over a mapping of all of it)."""
    import ctypes
    import mmap
    import os

    from checkpoint.reader import _libc

    libc = _libc()
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            return 0
        address = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        assert address not in (None, ctypes.c_void_p(-1).value)
        try:
            resident = ctypes.create_string_buffer(_pages(path))
            assert libc.mincore(address, size, resident) == 0, ctypes.get_errno()
            return sum(b & 1 for b in resident.raw)
        finally:
            libc.munmap(address, size)
    finally:
        os.close(fd)


def test_read_ahead_reads_into_a_buffer_where_sendfile_cannot_be_used(tmp_path, monkeypatch):
    """Where ``sendfile`` refuses to send a file to /dev/null (a kernel or file system that
    cannot splice it, a sandbox), or /dev/null is missing or not the null device (a regular
    file there must not fill with the checkpoint), the read-ahead reads into a buffer instead:
    every page still arrives, and nothing is left open. Any other error ends it (the load
    reports what it finds)."""
    import errno
    import os

    from checkpoint import CheckpointManager
    from checkpoint.manager import _newest_committed_files
    from checkpoint.reader import ReadAhead, _in_page_cache
    from checkpoint.storage import Storage

    if _on_tmpfs(tmp_path):
        pytest.skip(f"{tmp_path} is on a tmpfs: its pages cannot be dropped")
    CheckpointManager(tmp_path / "root", model=torch.nn.Linear(1000, 1000)).save(7)
    files = _newest_committed_files(Storage(tmp_path / "root"))
    size = sum(os.path.getsize(f) for f in files)
    descriptors = len(os.listdir("/proc/self/fd"))
    sendfile = os.sendfile

    def read_ahead_cold() -> ReadAhead:
        _evict(files)
        assert not any(_in_page_cache(f) for f in files[2:])
        read_ahead = ReadAhead(lambda: files)
        assert read_ahead.close(wait_until_done=True, timeout=60)
        assert len(os.listdir("/proc/self/fd")) == descriptors
        return read_ahead

    for refusal in (errno.EINVAL, errno.ENOTSOCK, errno.EPERM):
        calls = []

        def refused(*args, refusal=refusal):
            calls.append(args)
            raise OSError(refusal, os.strerror(refusal))

        monkeypatch.setattr(os, "sendfile", refused)
        assert read_ahead_cold().bytes_read == size and len(calls) == 1, refusal
        assert all(_resident_pages(f) == _pages(f) for f in files)

    sent = []
    monkeypatch.setattr(os, "sendfile", lambda *args: sent.append(args) or sendfile(*args))
    not_null = tmp_path / "not-null"
    not_null.write_bytes(b"")
    for devnull in (str(not_null), str(tmp_path / "missing")):
        monkeypatch.setattr(os, "devnull", devnull)
        assert read_ahead_cold().bytes_read == size and not sent, devnull
        assert all(_resident_pages(f) == _pages(f) for f in files)
    assert not_null.read_bytes() == b""
    monkeypatch.undo()

    calls = []

    def failing(*args):
        calls.append(args)
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "sendfile", failing)
    assert read_ahead_cold().bytes_read == 0 and len(calls) == 1


def test_read_ahead_stops_when_the_load_chose_another_checkpoint(tmp_path):
    """Discovery may pass the newest checkpoint over (it fails to verify, or the mirror's is
    newer): the read-ahead must not go on reading it."""
    import os
    import threading

    from checkpoint import CheckpointManager
    from checkpoint.manager import _newest_committed_files
    from checkpoint.reader import ReadAhead
    from checkpoint.storage import Storage

    if _on_tmpfs(tmp_path):
        pytest.skip(f"{tmp_path} is on a tmpfs: its pages cannot be dropped")
    CheckpointManager(tmp_path, model=torch.nn.Linear(1000, 1000)).save(7)
    files = _newest_committed_files(Storage(tmp_path))
    for chosen, expected in ((str(tmp_path / "step-00000003"), 0),
                             (str(tmp_path / "step-00000007"), sum(os.path.getsize(f) for f in files))):
        _evict(files)
        listed = threading.Event()
        read_ahead = ReadAhead(lambda: listed.wait(60) and files)
        read_ahead.keep_only(chosen)
        listed.set()
        assert read_ahead.close(wait_until_done=True, timeout=60)
        assert read_ahead.bytes_read == expected, chosen


def test_a_load_reads_ahead_once_per_node_and_only_for_plain_parameters(tmp_path, monkeypatch):
    """Local rank 0 reads ahead; another local rank, or a model with parameters of another
    type (sharded: DTensor, FSDP's flat parameters), does not. The read-ahead ends with the
    load, whether it loaded or failed."""
    import threading

    import checkpoint.manager
    from checkpoint import CheckpointError, CheckpointManager

    started = []

    class Counted(checkpoint.manager.ReadAhead):
        def __init__(self, find):
            started.append(self)
            super().__init__(find)

    class Flat(torch.nn.Parameter):  # what FSDP's FlatParameter is to the check
        pass

    monkeypatch.setattr(checkpoint.manager, "ReadAhead", Counted)
    CheckpointManager(tmp_path, model=torch.nn.Linear(300, 300)).save(5)
    assert CheckpointManager(tmp_path, model=torch.nn.Linear(300, 300)).load().step == 5
    assert len(started) == 1 and started[0].close(timeout=0)
    with pytest.raises(CheckpointError):  # another model's checkpoint: refused before any read
        CheckpointManager(tmp_path, model=torch.nn.Linear(30, 30)).load()
    assert len(started) == 2 and started[1].close(timeout=0)
    assert not [t for t in threading.enumerate() if t.name == "ckpt-read-ahead"]

    monkeypatch.setenv("LOCAL_RANK", "1")
    assert CheckpointManager(tmp_path, model=torch.nn.Linear(300, 300)).load().step == 5
    monkeypatch.setenv("LOCAL_RANK", "0")
    sharded = torch.nn.Linear(300, 300)
    sharded.weight = Flat(sharded.weight.detach().clone())
    assert CheckpointManager(tmp_path, model=sharded).load().step == 5
    assert len(started) == 2
