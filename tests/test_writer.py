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
        pytest.skip("the test directory's file system refuses O_DIRECT")
    probe.abort()
    os.unlink(tmp_path / "probe")
    return tmp_path


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
def test_every_byte_arrives_whatever_the_write_sizes(direct_dir, sizes):
    """The file holds exactly the bytes written, padding never shows, and the descriptor is
    O_DIRECT's to the end."""
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
    monkeypatch.setattr(os, "pwrite", lambda fd, data, offset: sent.append(len(data)) or real_pwrite(fd, data, offset))
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
    """EINVAL at the open (tmpfs before Linux 6.6, some FUSE file systems): the save goes
    through the page cache with write-behind, and commits."""
    real_open = os.open

    def refusing_open(path, flags, *args, **kwargs):
        if flags & getattr(os, "O_DIRECT", 0):
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", refusing_open)
    assert direct_io.open_direct(tmp_path / "refused") is None
    model = nn.Linear(512, 512)
    mgr = CheckpointManager(tmp_path / "ckpt", model=model)
    mgr.save(1)
    mgr.close()
    assert verify(Storage(tmp_path / "ckpt"), "step-00000001", "hash")[1] is None


def test_a_write_refused_mid_file_goes_on_without_o_direct_and_later_files_skip_it(direct_dir, monkeypatch):
    """EINVAL at a write (the disk needs a larger alignment): the file drops O_DIRECT, goes on
    with the same bytes, and leaves no pages in the page cache; the next file on that file
    system is not opened with O_DIRECT."""
    real_pwrite = os.pwrite
    refused = []

    def refusing_pwrite(fd, data, offset):
        if _is_direct(fd):
            refused.append(offset)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", refusing_pwrite)
    path = direct_dir / "file"
    f = direct_io.open_direct(path)
    data = random.Random(1).randbytes(BUFFER + 12345)
    f.write(data)
    os.fsync(f.fileno())
    assert not _is_direct(f.fileno())
    f.close()
    assert refused == [0]
    from test_commit_protocol import _on_tmpfs, _resident_fraction
    if not _on_tmpfs(path):
        assert _resident_fraction(path) < 0.1
    assert path.read_bytes() == data
    assert direct_io.open_direct(direct_dir / "next") is None


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

    model = nn.Linear(1024, 1024)
    mgr = CheckpointManager(direct_dir / "ckpt", model=model, async_mode="off")
    try:
        with pytest.raises(CheckpointError, match="Input/output error"):
            mgr.save(1)
    finally:
        mgr.close()
    assert find_latest(Storage(direct_dir / "ckpt"), "hash") is None


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
