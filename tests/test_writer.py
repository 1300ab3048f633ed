"""The O_DIRECT file that local checkpoint files are written through (checkpoint/direct_io.py):
exact bytes whatever the write sizes, each byte sent once in a save, the fall-backs where
O_DIRECT is refused, and errors that fail the save instead of vanishing."""

from __future__ import annotations

import errno
import fcntl
import os
import random
from pathlib import Path

import pytest
import torch
from torch import nn

from checkpoint import CheckpointError, CheckpointManager, Storage, find_latest
from checkpoint import direct_io
from checkpoint.manifest import verify

BUFFER = direct_io.BUFFER_BYTES
ALIGN = direct_io.ALIGN
SMALL = direct_io.SMALL_WRITE


@pytest.fixture
def direct_dir(tmp_path, monkeypatch) -> Path:
    """tmp_path, where its file system takes O_DIRECT writes (a refusal another test caused
    is forgotten)."""
    monkeypatch.setattr(direct_io, "_refused_devices", set())
    if not direct_io.ENABLED:
        pytest.skip("no O_DIRECT here (not Linux, or FTCKPT_DIRECT_IO=0)")
    probe = direct_io.open_direct(tmp_path / "probe")
    if probe is None:
        pytest.skip("O_DIRECT is not used on the test directory's file system")
    try:
        probe.write(bytes(ALIGN))
        probe.fileno()
        if not _is_direct(probe.fileno()):
            pytest.skip("the test directory's disk refuses 4 KiB-aligned O_DIRECT writes")
    finally:
        probe.abort()
    os.unlink(tmp_path / "probe")
    monkeypatch.setattr(direct_io, "_refused_devices", set())
    return tmp_path


def _fds_under(directory: Path) -> list[str]:
    """The files under ``directory`` that this process holds open (other threads' files, a
    lease renewal's say, are elsewhere)."""
    import gc

    gc.collect()  # a file object some earlier test dropped
    held = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except FileNotFoundError:  # closed meanwhile
            continue
        if target.startswith(str(directory)):
            held.append(target)
    return held


def _a_save_fails_and_commits_nothing(directory: Path, model: nn.Module, error: str) -> None:
    """A sync save into ``directory / "ckpt"`` raises ``error``; nothing is committed and no
    descriptor under ``directory`` is left open."""
    mgr = CheckpointManager(directory / "ckpt", model=model, async_mode="off")
    try:
        with pytest.raises(CheckpointError, match=error):
            mgr.save(1)
    finally:
        mgr.close()
    assert find_latest(Storage(directory / "ckpt"), "hash") is None
    assert _fds_under(directory) == []


def _is_direct(fd: int) -> bool:
    return bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT)


@pytest.mark.parametrize("sizes", [
    [],  # an empty file
    [1],
    [ALIGN],  # ends on a block
    [BUFFER],  # fills the buffer exactly
    [BUFFER - 3, 3, ALIGN + 1],  # fills it in two writes, then goes on
    [5, 2 * BUFFER + 17],  # a write larger than the buffer
    [100, SMALL, SMALL - 1, 3 * ALIGN],  # both copies, under and over the GIL
])
@pytest.mark.parametrize("copy", ["streaming", "memmove"])
def test_every_byte_arrives_whatever_the_write_sizes(direct_dir, monkeypatch, sizes, copy):
    """The file holds exactly the bytes written, padding never shows, and the descriptor is
    O_DIRECT's to the end; with the streaming-store copy and with memmove (no C extension)."""
    if copy == "memmove":
        monkeypatch.setattr(direct_io, "_streamcopy", None)
    elif direct_io._streamcopy is None:
        pytest.skip("checkpoint/_streamcopy.c is not built here")
    rng = random.Random(len(sizes))
    path = direct_dir / "file"
    f = direct_io.open_direct(path)
    assert f is not None and _is_direct(f.fileno())
    expected = bytearray()
    for size in sizes:
        data = rng.randbytes(size)
        assert f.write(memoryview(data)) == size
        expected += data
    f.flush()
    assert _is_direct(f.fileno())
    f.close()
    f.close()  # twice: nothing more
    assert path.read_bytes() == expected


def test_asking_for_the_descriptor_mid_file_sends_the_end_and_later_writes_go_on(direct_dir):
    """``fileno`` sends the partly filled end (the caller may fsync); writes after it resend
    that block whole, and ``close`` sends (and fsyncs) what came after."""
    rng = random.Random(2)
    path = direct_dir / "file"
    f = direct_io.open_direct(path)
    expected = bytearray()
    for size in [10, ALIGN - 10, 3, BUFFER, 7]:
        data = rng.randbytes(size)
        f.write(data)
        expected += data
        assert _is_direct(f.fileno())  # every write was aligned
        assert path.read_bytes() == expected
    data = rng.randbytes(ALIGN + 5)
    f.write(data)
    expected += data
    f.close()  # no fileno after the last write
    assert path.read_bytes() == expected


def test_a_save_sends_each_byte_once(direct_dir, monkeypatch):
    """DCP flushes after every item it writes (many small ones: biases, AdamW's step counts);
    none of those may cost a write of its own. Every byte goes to the disk once, with at
    most one padded block per file."""
    sent = []
    real_pwrite = os.pwrite

    def counting_pwrite(fd, data, offset):
        if "step-00000001" in os.readlink(f"/proc/self/fd/{fd}"):
            sent.append(len(data))
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", counting_pwrite)
    model = nn.Sequential(*[nn.Linear(64, 64) for _ in range(100)], nn.Linear(64, 40000))  # 10 MiB + 200 small
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 64)).sum().backward()
    opt.step()
    mgr = CheckpointManager(direct_dir / "ckpt", model=model, optimizer=opt)
    mgr.save(1)
    mgr.close()
    files = [p for p in (direct_dir / "ckpt" / "step-00000001").iterdir() if p.is_file()]
    written = [p for p in files if p.name.endswith(".distcp") or p.name == ".metadata"]
    assert written and sum(p.stat().st_size for p in written) > BUFFER
    assert sum(sent) == sum(-(-p.stat().st_size // ALIGN) * ALIGN for p in written)
    assert verify(Storage(direct_dir / "ckpt"), "step-00000001", "hash")[1] is None


def test_a_file_system_that_refuses_o_direct_at_the_open_gets_write_behind(tmp_path, monkeypatch):
    """EINVAL at the open (some FUSE file systems): the save goes through the page cache with
    write-behind (its shard is not left in the page cache) and commits; the refusal is
    remembered, so later files do not try again."""
    monkeypatch.setattr(direct_io, "_refused_devices", set())
    real_open = os.open
    tried = []

    def refusing_open(path, flags, *args, **kwargs):
        if flags & getattr(os, "O_DIRECT", 0):
            tried.append(path)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", refusing_open)
    model = nn.Linear(2048, 2048)  # 16 MiB
    mgr = CheckpointManager(tmp_path / "ckpt", model=model)
    mgr.save(1)
    mgr.close()
    assert len(tried) <= 1  # the first file's open at most (none where O_DIRECT is not used anyway)
    from test_commit_protocol import _on_tmpfs, _resident_fraction, shard_files
    shard = max(shard_files(tmp_path / "ckpt" / "step-00000001"), key=lambda p: p.stat().st_size)
    if not _on_tmpfs(shard):
        assert _resident_fraction(shard) < 0.1
    assert verify(Storage(tmp_path / "ckpt"), "step-00000001", "hash")[1] is None


@pytest.mark.parametrize("where", ["first block", "the padded end"])
def test_a_write_refused_mid_file_goes_on_without_o_direct_and_later_files_skip_it(direct_dir, monkeypatch, where):
    """EINVAL at a write (the disk needs a larger alignment), at the first block or only at
    the padded end: the file drops O_DIRECT, goes on with the same bytes, writes behind and
    leaves no pages in the page cache. A refused whole buffer holds for the next file on that
    file system, which skips O_DIRECT; a refused end alone does not."""
    real_pwrite = os.pwrite
    refused = []

    def refusing_pwrite(fd, data, offset):
        if _is_direct(fd) and (where == "first block" or len(data) < BUFFER):
            refused.append(offset)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", refusing_pwrite)
    path = direct_dir / "file"
    f = direct_io.open_direct(path)
    try:
        data = random.Random(1).randbytes(3 * BUFFER + 12345)
        f.write(data)
        os.fsync(f.fileno())
        assert not _is_direct(f.fileno())
    finally:
        f.close()
    assert refused == [0 if where == "first block" else 3 * BUFFER]
    from test_commit_protocol import _on_tmpfs, _resident_fraction
    if not _on_tmpfs(path):
        assert _resident_fraction(path) < 0.1
    assert path.read_bytes() == data
    monkeypatch.setattr(os, "pwrite", real_pwrite)
    following = direct_io.open_direct(direct_dir / "next")
    assert (following is None) == (where == "first block")
    if following is not None:
        following.abort()


def test_a_short_write_sends_its_last_block_again_and_keeps_o_direct(direct_dir, monkeypatch):
    """A write that takes only part of its bytes (a disk nearly full) and ends mid-block: the
    block is sent again whole, the file keeps O_DIRECT, and nothing is remembered against the
    file system."""
    real_pwrite = os.pwrite
    offsets = []

    def short_once(fd, data, offset):
        offsets.append(offset)
        if len(offsets) == 1:  # O_DIRECT writes whole blocks: a count that ends mid-block, as a
            # kernel could report one, after an aligned write
            return real_pwrite(fd, memoryview(data)[:len(data) - 2 * ALIGN], offset) - 100
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", short_once)
    path = direct_dir / "file"
    f = direct_io.open_direct(path)
    try:
        data = random.Random(3).randbytes(BUFFER + 5)
        f.write(data)
        assert _is_direct(f.fileno())
    finally:
        f.close()
    assert offsets[:2] == [0, BUFFER - 3 * ALIGN]
    assert path.read_bytes() == data
    assert not direct_io._refused_devices


def test_a_write_error_fails_the_save_and_close_sends_nothing_more(direct_dir, monkeypatch):
    """EIO from a write is raised (not taken for a refusal of O_DIRECT); after it the file
    refuses every call but close, which writes nothing and closes the descriptor; a save that
    meets it commits nothing."""
    calls = []

    def failing_pwrite(fd, data, offset):
        calls.append(offset)
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "pwrite", failing_pwrite)
    f = direct_io.open_direct(direct_dir / "file")
    with pytest.raises(OSError, match="Input/output error"):
        f.write(bytes(BUFFER))
    with pytest.raises(OSError, match="an earlier write to this checkpoint file failed"):
        f.fileno()
    with pytest.raises(OSError, match="an earlier write to this checkpoint file failed"):
        f.write(b"x")
    f.close()
    assert calls == [0] and f.closed

    _a_save_fails_and_commits_nothing(direct_dir, nn.Linear(1024, 1024), "Input/output error")


def test_a_save_that_fails_between_writes_closes_its_files_without_writing(direct_dir, monkeypatch):
    """An error that is not the file's own (here torch.save raising partway through the
    shard): the file is closed and sends nothing more, no descriptor is left open, and the
    save commits nothing."""
    import torch.distributed.checkpoint.filesystem as dcp_filesystem

    real_save = torch.save
    saved = []

    def failing_save(obj, f, *args, **kwargs):
        saved.append(1)
        if len(saved) == 3:
            raise RuntimeError("injected failure in torch.save")
        return real_save(obj, f, *args, **kwargs)

    sent = []
    real_pwrite = os.pwrite
    monkeypatch.setattr(os, "pwrite", lambda fd, data, offset: sent.append(offset) or real_pwrite(fd, data, offset))
    monkeypatch.setattr(dcp_filesystem.torch, "save", failing_save)
    _a_save_fails_and_commits_nothing(direct_dir, nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8)),
                                      "injected failure in torch.save")
    assert sent == []  # small items, all still in the buffer: nothing reached the file


def test_a_checkpoint_written_with_o_direct_loads_bit_exact(direct_dir):
    """Tensors of sizes that leave every kind of end (a few bytes, a block and one, a whole
    buffer and more) come back equal byte for byte."""
    torch.manual_seed(0)
    model = nn.ModuleDict({"a": nn.Linear(3, 1), "b": nn.Linear(1024, 1), "c": nn.Linear(1024, 2049)})
    mgr = CheckpointManager(direct_dir, model=model)
    mgr.save(1)
    mgr.close()
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    mgr = CheckpointManager(direct_dir, model=model)
    assert mgr.load().step == 1
    mgr.close()
    for key, value in model.state_dict().items():
        assert torch.equal(value, saved[key]), key


@pytest.mark.skipif(not direct_io.ENABLED, reason="no O_DIRECT here (not Linux, or FTCKPT_DIRECT_IO=0)")
def test_o_direct_is_used_exactly_on_the_file_systems_listed(tmp_path, monkeypatch):
    """statfs's answer for the test directory and /dev/shm agrees with the kernel's mount
    table, and decides whether a file is opened with O_DIRECT (a broken statfs would quietly
    turn O_DIRECT off everywhere, or on for tmpfs)."""
    from test_commit_protocol import _mount_point

    monkeypatch.setattr(direct_io, "_refused_devices", set())
    magic = {"ext2": 0xEF53, "ext3": 0xEF53, "ext4": 0xEF53, "xfs": 0x58465342, "btrfs": 0x9123683E,
             "f2fs": 0xF2F52010, "tmpfs": 0x01021994, "overlay": 0x794C7630}
    with open("/proc/mounts") as f:
        mounts = {fields[1]: fields[2] for fields in (line.split() for line in f)}
    for directory in [tmp_path, Path("/dev/shm")]:
        if not directory.is_dir():
            continue
        kind = mounts.get(_mount_point(directory))
        if kind not in magic:
            continue
        assert direct_io._file_system_type(str(directory)) == magic[kind], (directory, kind)
        probe = directory / f"ftckpt-test-{os.getpid()}"
        f = direct_io.open_direct(probe)
        try:
            assert (f is not None) == (kind in ("ext2", "ext3", "ext4", "xfs", "f2fs", "overlay")), (directory, kind)
        finally:
            if f is not None:
                f.abort()
            probe.unlink(missing_ok=True)
