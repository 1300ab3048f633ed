"""The commit protocol of the checkpoint library, in one process on real files.

Every test damages a checkpoint the way the field does (a save that died before its record,
a truncated shard, a flipped byte, a garbage record) and asserts which step loads.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.distributed.checkpoint import FileSystemReader

from checkpoint import (ALREADY_COMMITTED, CheckpointError, CheckpointManager, CheckpointMismatchError, Storage,
                        find_latest)
import checkpoint.direct_io
import checkpoint.reader
import checkpoint.retention
import checkpoint.storage
import checkpoint.writer
from checkpoint.manifest import verify

from procs import load_checkpoint, run


class Counter:
    def __init__(self):
        self.value = 0

    def state_dict(self):
        return {"value": self.value}

    def load_state_dict(self, state):
        self.value = state["value"]


def make_job(root, seed=0, hidden=8, **kwargs):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, hidden), nn.ReLU(), nn.Linear(hidden, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3)
    counter = Counter()
    kwargs.setdefault("keep_last", 0)
    mgr = CheckpointManager(root, model=model, optimizer=opt, scheduler=sched, state={"counter": counter}, **kwargs)
    return mgr, model, opt, sched, counter


def train_step(model, opt, sched, counter):
    loss = model(torch.randn(3, 4)).square().sum()
    opt.zero_grad()
    loss.backward()
    opt.step()
    sched.step()
    counter.value += 1


def save_steps(tmp_path, steps, **kwargs):
    mgr, model, opt, sched, counter = make_job(tmp_path, **kwargs)
    snapshots = {}
    for step in steps:
        train_step(model, opt, sched, counter)
        mgr.save(step, {"loss": 1.0 / step})
        snapshots[step] = {k: v.clone() for k, v in model.state_dict().items()}
    return snapshots


def loaded_step(root, **kwargs):
    mgr, model, *_ = make_job(root, seed=123, **kwargs)
    manifest = mgr.load()
    return (manifest.step if manifest else None), model


def shard_files(step_dir: Path) -> list[Path]:
    return sorted(step_dir.glob("*.distcp"))


def flip_a_tensor_byte(step_dir: Path) -> Path:
    """A same-size corruption only a checksum sees: one byte flipped inside a model tensor of
    the step's shard (a byte of a pickled item, e.g. the RNG state, would also fail the
    safe-load check that every verification runs). Returns the shard."""
    metadata = FileSystemReader(str(step_dir)).read_metadata()  # our own file: plain pickle is fine here
    info = next(info for index, info in sorted(metadata.storage_data.items(), key=lambda kv: kv[0].fqn)
                if index.fqn.startswith("model."))
    shard = step_dir / info.relative_path
    data = bytearray(shard.read_bytes())
    data[info.offset + info.length // 2] ^= 0xFF
    shard.write_bytes(data)
    return shard


def test_round_trip_restores_everything_bitwise(tmp_path):
    mgr, model, opt, sched, counter = make_job(tmp_path)
    for _ in range(4):
        train_step(model, opt, sched, counter)
    torch.manual_seed(777)
    mgr.save(4, {"loss": 0.5})
    expected_next_random = torch.rand(3)

    mgr2, model2, opt2, sched2, counter2 = make_job(tmp_path, seed=99)
    manifest = mgr2.load()
    assert manifest.step == 4 and manifest.metadata["loss"] == 0.5 and manifest.world_size == 1
    for (k, a), b in zip(model.state_dict().items(), model2.state_dict().values()):
        assert torch.equal(a, b), k
    for a, b in zip(opt.state_dict()["state"].values(), opt2.state_dict()["state"].values()):
        assert torch.equal(a["momentum_buffer"], b["momentum_buffer"])
    assert sched2.state_dict() == sched.state_dict()
    assert counter2.value == 4
    assert torch.equal(torch.rand(3), expected_next_random), "torch RNG state was not restored"


@pytest.mark.parametrize("saved_as", ["tensors", "tuples of an older checkpoint"])
def test_python_numpy_and_torch_rngs_are_restored_exactly(tmp_path, monkeypatch, saved_as):
    """Python's and numpy's RNG states are saved as int64 tensors (read by the fast tensor
    path; as pickled tuples, discovery unpickled each rank's with torch's pure-Python
    unpickler); a checkpoint holding the tuples still loads them."""
    import random

    import numpy as np
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    import checkpoint.state

    if saved_as != "tensors":
        monkeypatch.setattr(checkpoint.state, "_ints_tensor", lambda state, _to_ints: state)
    mgr, model, opt, sched, counter = make_job(tmp_path)
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    random.gauss(0, 1), np.random.randn(3)  # both keep a cached gaussian: part of the state
    mgr.save(1)
    expected = (random.random(), random.gauss(0, 1), np.random.randn(3).tolist(), torch.rand(3).tolist())
    monkeypatch.undo()
    saved = FileSystemReader(str(tmp_path / "step-00000001")).read_metadata().state_dict_metadata
    assert all(isinstance(saved[f"rng.rank_0.{name}"], TensorStorageMetadata) == (saved_as == "tensors")
               for name in ("python", "numpy"))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    assert make_job(tmp_path)[0].load().step == 1
    assert (random.random(), random.gauss(0, 1), np.random.randn(3).tolist(), torch.rand(3).tolist()) == expected


def test_ftckpt_diff_compares_rng_states_saved_in_either_form(tmp_path, monkeypatch):
    """The same RNG states, saved as tuples by an older version and as tensors now: equal to
    ``ftckpt diff``; a different python RNG state: that item differs."""
    import random

    import numpy as np

    import checkpoint.state

    def save(root, python_seed, tuples):
        with monkeypatch.context() as patch:
            if tuples:
                patch.setattr(checkpoint.state, "_ints_tensor", lambda state, _to_ints: state)
            mgr = make_job(root)[0]
            random.seed(python_seed), np.random.seed(2), torch.manual_seed(3)
            mgr.save(1)

    save(tmp_path / "old", 1, tuples=True)
    save(tmp_path / "new", 1, tuples=False)
    save(tmp_path / "other", 5, tuples=False)
    diff = [sys.executable, "-m", "checkpoint.cli", "diff"]
    same = run([*diff, str(tmp_path / "old"), "1", str(tmp_path / "new"), "1"], timeout=120)
    assert same.returncode == 0 and " 0 differ" in same.output, same.output
    other = run([*diff, str(tmp_path / "old"), "1", str(tmp_path / "other"), "1"], timeout=120)
    assert other.returncode == 1 and "1 differ" in other.output, other.output
    assert any(line.startswith("rng.rank_0.python: (3, (") for line in other.output.splitlines()), other.output


def test_partial_directory_without_record_is_ignored(tmp_path, caplog):
    snaps = save_steps(tmp_path, [10, 20, 30])
    (tmp_path / "step-00000030" / "manifest.json").unlink()  # died after shards, before commit
    (tmp_path / "step-00000040").mkdir()  # died while writing the first shard
    with caplog.at_level(logging.WARNING):
        step, model = loaded_step(tmp_path)
    assert step == 20
    assert torch.equal(model.state_dict()["0.weight"], snaps[20]["0.weight"])
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("step-00000030/manifest.json" in w and "no commit record" in w for w in warnings)
    assert any("step-00000040/manifest.json" in w for w in warnings)


@pytest.mark.parametrize("verify", ["size", "hash"])
def test_truncated_shard_falls_back(tmp_path, caplog, verify):
    save_steps(tmp_path, [10, 20])
    shard = shard_files(tmp_path / "step-00000020")[0]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with caplog.at_level(logging.WARNING):
        step, _ = loaded_step(tmp_path, verify=verify)
    assert step == 10
    assert any(str(shard) in r.getMessage() and "truncated" in r.getMessage() for r in caplog.records)


def test_checksum_mismatch_falls_back(tmp_path, caplog):
    """The crc32s are checked while the load reads the files: the bad step was read into the
    live model before its checksum failed, and the step before must overwrite all of it."""
    snaps = save_steps(tmp_path, [10, 20])
    shard = flip_a_tensor_byte(tmp_path / "step-00000020")  # same size, one flipped byte
    # The cheap check cannot see a same-size corruption; that is what "hash" is for.
    assert find_latest(Storage(tmp_path), "size").step == 20
    with caplog.at_level(logging.WARNING):
        step, model = loaded_step(tmp_path, verify="hash")
    assert step == 10
    assert all(torch.equal(v, snaps[10][k]) for k, v in model.state_dict().items())
    assert any(str(shard) in r.getMessage() and "crc32" in r.getMessage() for r in caplog.records)
    assert [p.name.split(".")[0] for p in (tmp_path / "quarantine").iterdir()] == ["step-00000020"]
    assert find_latest(Storage(tmp_path), "size").step == 10


def test_a_same_size_change_to_dcp_metadata_falls_back_before_the_load_plans_from_it(tmp_path, caplog):
    """The shards' crc32s are checked while loading, but DCP's .metadata is checked first: the
    load's plan and its key check come from it (a renamed key would have been a model mismatch)."""
    snaps = save_steps(tmp_path, [10, 20])
    metadata = tmp_path / "step-00000020" / ".metadata"
    data = metadata.read_bytes()
    assert b"model.0.weight" in data
    metadata.write_bytes(data.replace(b"model.0.weight", b"model.0.weighu", 1))
    with caplog.at_level(logging.WARNING):
        step, model = loaded_step(tmp_path, verify="hash")
    assert step == 10
    assert all(torch.equal(v, snaps[10][k]) for k, v in model.state_dict().items())
    assert any(".metadata: crc32" in r.getMessage() for r in caplog.records)


def test_a_corrupt_only_checkpoint_found_while_loading_is_never_a_silent_fresh_start(tmp_path):
    """Found bad while loading, with nothing before it: the live state holds part of it, so
    even a job that allows a fresh start must not train on; it is quarantined, and the next
    start is a clean fresh one."""
    save_steps(tmp_path, [10])
    flip_a_tensor_byte(tmp_path / "step-00000010")
    with pytest.raises(CheckpointError, match="none verifies: .*crc32"):
        loaded_step(tmp_path, verify="hash")
    save_steps(tmp_path / "again", [10])
    flip_a_tensor_byte(tmp_path / "again" / "step-00000010")
    with pytest.raises(CheckpointError, match="crc32 .*partly overwritten by it, so this process cannot start fresh"):
        loaded_step(tmp_path / "again", verify="hash", allow_fresh_start=True)
    assert loaded_step(tmp_path / "again", verify="hash", allow_fresh_start=True)[0] is None


def test_a_flipped_byte_deep_inside_a_large_tensor_fails_its_checksum(tmp_path, caplog, monkeypatch):
    """The load reads a large tensor a slice at a time and checksums each as it arrives: a
    byte flipped in its last slice (well past the first 2 MiB) must still fail the crc32."""
    snaps = save_steps(tmp_path, [10, 20], hidden=400_000)  # a 6.4 MB weight
    weight = snaps[20]["0.weight"].numpy().tobytes()
    assert len(weight) > 3 * checkpoint.reader._READ_SLICE
    shard = shard_files(tmp_path / "step-00000020")[0]
    data = bytearray(shard.read_bytes())
    start = data.find(weight)
    assert start > 0
    data[start + len(weight) - 1000] ^= 0xFF  # in the weight's last slice
    shard.write_bytes(data)
    reread = []  # bytes the checksum had to read itself (gaps): the weight must not be one
    read_up_to = checkpoint.reader._FileCrc32._read_up_to

    def watched(self, offset):
        reread.append(max(0, offset - self.done))
        read_up_to(self, offset)

    monkeypatch.setattr(checkpoint.reader._FileCrc32, "_read_up_to", watched)
    with caplog.at_level(logging.WARNING):
        step, model = loaded_step(tmp_path, verify="hash", hidden=400_000)
    assert step == 10
    assert all(torch.equal(v, snaps[10][k]) for k, v in model.state_dict().items())
    assert any(str(shard) in r.getMessage() and "crc32" in r.getMessage() for r in caplog.records)
    assert 0 < sum(reread) < 2**20, reread  # zip trailers only: the slices were checksummed as loaded


def test_a_commit_record_that_lists_a_fifo_is_refused_not_read(tmp_path):
    """A forged commit record naming a FIFO as a shard (size 0 matches it) must be refused by
    discovery: reading it to check its crc32 would wait forever for a writer."""
    mgr, model, opt, sched, counter = make_job(tmp_path)
    for step in (10, 20):
        train_step(model, opt, sched, counter)
        mgr.save(step)
    mgr.close()  # the root's lease: the load below runs in another process
    step_dir = tmp_path / "step-00000020"
    os.mkfifo(step_dir / "__9_0.distcp")
    record = json.loads((step_dir / "manifest.json").read_text())
    record["files"]["__9_0.distcp"] = {"size": 0, "crc32": "00000000", "sha256": ""}
    (step_dir / "manifest.json").write_text(json.dumps(record))
    code = ("import sys; sys.path[:0] = [sys.argv[2], sys.argv[3]]\n"
            "from test_commit_protocol import loaded_step\n"
            "print('loaded', loaded_step(sys.argv[1], verify='hash')[0])")
    result = run([sys.executable, "-c", code, str(tmp_path), str(Path(__file__).parent.parent),
                  str(Path(__file__).parent)], timeout=120)
    assert result.returncode == 0, result.tail()
    assert "loaded 10" in result.output and "not a regular file" in result.output, result.tail()


@pytest.mark.parametrize("damage", ["garbage", "empty", "wrong-version", "missing-file", "deleted"])
def test_bad_record_falls_back(tmp_path, caplog, damage):
    save_steps(tmp_path, [10, 20])
    record = tmp_path / "step-00000020" / "manifest.json"
    if damage == "garbage":
        record.write_bytes(b"{not json")
    elif damage == "empty":
        record.write_bytes(b"")
    elif damage == "wrong-version":
        data = json.loads(record.read_text())
        data["format_version"] = 99
        record.write_text(json.dumps(data))
    elif damage == "missing-file":
        shard_files(tmp_path / "step-00000020")[0].unlink()
    else:
        record.unlink()
    with caplog.at_level(logging.WARNING):
        step, _ = loaded_step(tmp_path)
    assert step == 10
    assert any("step-00000020" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)


def test_nothing_committed_loads_nothing(tmp_path):
    mgr, model, *_ = make_job(tmp_path)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert mgr.load() is None
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("async_mode", ["off", "thread"])
def test_committed_step_is_never_overwritten(tmp_path, async_mode):
    mgr, model, opt, sched, counter = make_job(tmp_path, async_mode=async_mode)
    train_step(model, opt, sched, counter)
    mgr.save(5, wait=True)
    first = find_latest(Storage(tmp_path))
    step_dir = tmp_path / "step-00000005"
    before = {p.name: p.read_bytes() for p in step_dir.iterdir()}
    train_step(model, opt, sched, counter)  # different weights, same step number
    if async_mode == "off":
        assert mgr.save(5).outcome == ALREADY_COMMITTED
    else:  # the writer thread prepares the save (off the training thread) and writes nothing
        mgr.save(5)
        assert mgr.wait() is None
    assert {p.name: p.read_bytes() for p in step_dir.iterdir()} == before
    assert find_latest(Storage(tmp_path)).files == first.files
    mgr.close()


@pytest.mark.parametrize("async_mode", ["off", "thread"])
def test_stale_uncommitted_save_of_same_step_is_replaced(tmp_path, async_mode):
    mgr, model, opt, sched, counter = make_job(tmp_path, async_mode=async_mode)
    stale = tmp_path / "step-00000005"
    stale.mkdir()
    (stale / "__7_0.distcp").write_bytes(b"left by a crashed generation")
    train_step(model, opt, sched, counter)
    mgr.save(5)
    mgr.wait()
    manifest = find_latest(Storage(tmp_path))
    assert manifest.step == 5
    assert not (stale / "__7_0.distcp").exists()
    assert "__7_0.distcp" not in manifest.files
    mgr.close()


def test_a_directory_mirror_gets_every_commit_and_is_loaded_from(tmp_path):
    """``mirror=`` a plain directory (the S3 mirror: tests/test_s3.py): each commit is copied
    there, record last, retention runs there, and an empty local root resumes from it."""
    mirror = tmp_path / "mirror"
    mgr, model, opt, sched, counter = make_job(tmp_path / "local", mirror=str(mirror), keep_last=1)
    for step in (1, 2):
        train_step(model, opt, sched, counter)
        mgr.save(step)
    mgr.close()
    assert sorted(p.name for p in mirror.iterdir() if p.name.startswith("step-")) == ["step-00000002"]
    manifest, reason = verify(Storage(mirror), "step-00000002", "hash")
    assert reason is None and manifest.step == 2
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    fresh, fresh_model, *_ = make_job(tmp_path / "empty", seed=1, mirror=str(mirror))
    assert fresh.load().step == 2
    assert all(torch.equal(weights[k], v) for k, v in fresh_model.state_dict().items())
    fresh.close()


def test_retention_keeps_last_k_and_sweeps_stale(tmp_path):
    mgr, model, opt, sched, counter = make_job(tmp_path, keep_last=2, keep_every=20)
    (tmp_path / "step-00000003").mkdir()  # stale uncommitted, older than anything committed
    for step in (10, 20, 30, 40):
        train_step(model, opt, sched, counter)
        mgr.save(step)
    (tmp_path / "step-00000099").mkdir()  # newer than the newest commit: could be in flight
    train_step(model, opt, sched, counter)
    mgr.save(50)
    names = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("step-"))
    assert names == ["step-00000020", "step-00000040", "step-00000050", "step-00000099"]
    assert find_latest(Storage(tmp_path)).step == 50


def test_retention_never_deletes_newest(tmp_path):
    save_steps(tmp_path, [10, 20, 30])
    for step in (20, 30):  # same-size corruption: their records still pass the size check
        flip_a_tensor_byte(tmp_path / f"step-{step:08d}")
    mgr, model, opt, sched, counter = make_job(tmp_path, keep_last=2)
    assert mgr.load().step == 10
    train_step(model, opt, sched, counter)
    mgr.save(15)
    # keep_last=2 alone would keep 20 and 30; the newest commit (15) must survive regardless.
    assert (tmp_path / "step-00000015" / "manifest.json").exists()
    assert find_latest(Storage(tmp_path), "hash").step == 15


def test_resaving_a_step_whose_commit_fails_verification(tmp_path, caplog):
    save_steps(tmp_path, [10, 20])
    mgr, model, opt, sched, counter = make_job(tmp_path)
    assert mgr.load().step == 20
    flip_a_tensor_byte(tmp_path / "step-00000020")  # after the load (which would quarantine it)
    train_step(model, opt, sched, counter)
    with caplog.at_level(logging.WARNING):
        manifest = mgr.save(20).manifest
    assert manifest is not None, "a corrupt commit must not block saving the step again"
    assert any("re-saving step 20" in r.getMessage() for r in caplog.records)
    assert find_latest(Storage(tmp_path), "hash").step == 20


def test_schedule_by_steps_and_seconds(tmp_path):
    mgr, *_ = make_job(tmp_path, save_every_steps=5)
    assert [s for s in range(1, 16) if mgr.should_save(s)] == [5, 10, 15]
    timed, *_ = make_job(tmp_path, save_every_seconds=3600)
    assert not timed.should_save(1)
    timed._last_save_time -= 3601  # an hour "passed" without sleeping for it
    assert timed.should_save(2)


def test_memory_url_round_trip():
    root = f"memory://ckpt-{os.getpid()}"
    mgr, model, opt, sched, counter = make_job(root)
    train_step(model, opt, sched, counter)
    mgr.save(1)
    train_step(model, opt, sched, counter)
    mgr.save(2)
    storage = Storage(root)
    assert not storage.is_local and find_latest(storage).step == 2
    step, model2 = loaded_step(root)
    assert step == 2 and torch.equal(model2.state_dict()["0.weight"], model.state_dict()["0.weight"])


def test_other_model_gives_clear_mismatch_error(tmp_path):
    save_steps(tmp_path, [10])
    mgr, *_ = make_job(tmp_path, hidden=16)
    with pytest.raises(CheckpointMismatchError) as info:
        mgr.load()
    message = str(info.value)
    assert "model.0.weight (checkpoint [8, 4], this run [16, 4])" in message
    assert "\n" not in message


@pytest.mark.parametrize("root_kind", ["under-a-file", "proc"])
def test_unwritable_root_fails_at_construction(tmp_path, root_kind):
    if root_kind == "under-a-file":
        (tmp_path / "file").write_text("x")
        root = tmp_path / "file" / "ckpt"
    else:
        root = Path("/proc/ckpt-not-allowed")
    with pytest.raises(CheckpointError, match="is not writable"):
        make_job(root)


@pytest.mark.parametrize("kwargs", [{"keep_last": -1}, {"save_every_steps": -5}, {"verify": "md5"}])
def test_bad_arguments_are_rejected(tmp_path, kwargs):
    with pytest.raises(ValueError):
        make_job(tmp_path, **kwargs)


def test_plain_dcp_tooling_reads_a_checkpoint(tmp_path):
    snaps = save_steps(tmp_path, [7])
    converted = load_checkpoint(tmp_path / "step-00000007", tmp_path)
    assert torch.equal(converted["model"]["0.weight"], snaps[7]["0.weight"])
    assert converted["counter"] == {"value": 1}


def test_load_reads_every_kind_of_tensor_exactly(tmp_path, monkeypatch):
    """Whole contiguous tensors are read straight into the live ones; views, odd dtypes,
    0-dim and empty tensors take DCP's general path or the direct one: all must match."""
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 4)
    extra = {"transposed": torch.randn(4, 6).t(), "sliced": torch.randn(10)[2:7], "bf16": torch.randn(5, 3).bfloat16(),
             "scalar": torch.tensor(3.5), "empty": torch.empty(0, 3), "ints": torch.arange(7, dtype=torch.int64),
             "flags": torch.tensor([True, False, True])}
    saved = {k: v.clone() for k, v in extra.items()}
    CheckpointManager(tmp_path, model=model, state={"extra": extra}).save(1)
    fresh_model = torch.nn.Linear(6, 4)
    fresh = {k: torch.zeros_like(v) for k, v in extra.items()}
    general = []  # what DCP's own reader was left with
    original = FileSystemReader.read_data
    monkeypatch.setattr(FileSystemReader, "read_data", lambda self, plan, planner: general.extend(
        item.storage_index.fqn for item in plan.items) or original(self, plan, planner))
    CheckpointManager(tmp_path, model=fresh_model, state={"extra": fresh}).load()
    assert "extra.transposed" in general, general  # its strides are not contiguous
    assert not {"model.weight", "model.bias", "extra.bf16", "extra.ints", "extra.flags", "extra.scalar"} & set(general)
    for k, v in saved.items():
        assert fresh[k].dtype == v.dtype and torch.equal(fresh[k], v), k
    assert torch.equal(fresh_model.weight, model.weight) and torch.equal(fresh_model.bias, model.bias)


def test_retention_counts_only_verified_checkpoints_and_quarantines_corrupt(tmp_path, caplog):
    """Two same-size bit flips used to keep their keep_last slots (the size check passed) while
    retention deleted the good checkpoints around them."""
    save_steps(tmp_path, [10, 20, 30], keep_last=3)
    for step in (20, 30):
        flip_a_tensor_byte(tmp_path / f"step-{step:08d}")
    mgr, model, opt, sched, counter = make_job(tmp_path, keep_last=2)
    assert mgr.load().step == 10
    train_step(model, opt, sched, counter)
    with caplog.at_level(logging.WARNING):
        mgr.save(40)
    steps = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("step-"))
    assert steps == ["step-00000010", "step-00000040"], steps  # the good ones, both kept
    quarantined = sorted(p.name.split(".")[0] for p in (tmp_path / "quarantine").iterdir())
    assert quarantined == ["step-00000020", "step-00000030"]
    assert sum("quarantined checkpoint step" in r.getMessage() for r in caplog.records) == 2
    assert find_latest(Storage(tmp_path), "hash").step == 40


def test_retention_reads_each_checkpoint_once(tmp_path, monkeypatch):
    """Hash verification for retention is cached by file name, size and mtime, and the
    checkpoint just written is known good: ten saves re-read nothing."""
    mgr, model, opt, sched, counter = make_job(tmp_path, keep_last=3)
    reads = []
    original = Storage.crc32
    monkeypatch.setattr(Storage, "crc32", lambda self, path: reads.append(path) or original(self, path))
    for step in range(1, 11):
        train_step(model, opt, sched, counter)
        mgr.save(step)
    assert reads == []
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("step-"))[-3:] == \
        ["step-00000008", "step-00000009", "step-00000010"]


def test_unreadable_newest_checkpoint_is_skipped(tmp_path, caplog):
    """An OSError on a file of the newest checkpoint (here EISDIR on its record; EIO and EACCES
    alike) skips that checkpoint with one warning instead of aborting discovery."""
    save_steps(tmp_path, [10, 20])
    record = tmp_path / "step-00000020" / "manifest.json"
    record.unlink()
    record.mkdir()
    with caplog.at_level(logging.WARNING):
        step, _ = loaded_step(tmp_path)
    assert step == 10
    assert any("step-00000020" in r.getMessage() and "IsADirectoryError" in r.getMessage()
               for r in caplog.records if r.levelno == logging.WARNING)


def test_retention_leaves_an_unreadable_checkpoint_alone(tmp_path, caplog):
    """An I/O error (EIO, EACCES; here EISDIR on its record) may pass: retention must neither
    quarantine the checkpoint nor count it; it stays where it is, skipped with a warning."""
    save_steps(tmp_path, [10, 20, 30], keep_last=3)
    record = tmp_path / "step-00000020" / "manifest.json"
    saved_record = record.read_bytes()
    record.unlink()
    record.mkdir()
    mgr, model, opt, sched, counter = make_job(tmp_path, keep_last=2)
    assert mgr.load().step == 30
    train_step(model, opt, sched, counter)
    with caplog.at_level(logging.WARNING):
        mgr.save(40)
    assert not (tmp_path / "quarantine").exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("step-")) == \
        ["step-00000020", "step-00000030", "step-00000040"]  # 10 deleted: 30 and 40 are the two kept
    assert any("leaves checkpoint step 20 alone" in r.getMessage() for r in caplog.records)
    record.rmdir()
    record.write_bytes(saved_record)  # the disk recovers: the checkpoint is whole again
    assert find_latest(Storage(tmp_path), "hash").step == 40
    assert verify(Storage(tmp_path), "step-00000020", "hash")[1] is None


def test_all_corrupt_refuses_fresh_start_unless_allowed(tmp_path):
    save_steps(tmp_path, [10, 20])
    for step in (10, 20):
        flip_a_tensor_byte(tmp_path / f"step-{step:08d}")
    with pytest.raises(CheckpointError, match=r"none verifies: step-00000020 \(.*crc32.*step-00000010 .*"
                                              r"allow_fresh_start=True; train.py --allow-fresh-start"):
        loaded_step(tmp_path)
    assert loaded_step(tmp_path, allow_fresh_start=True)[0] is None


def _resident_fraction(path: Path) -> float:
    """The share of ``path``'s pages in the page cache (mincore on a mapping of it)."""
    import ctypes
    import mmap

    size = path.stat().st_size
    with open(path, "rb") as f:
        mapping = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY)
    try:
        pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
        vec = (ctypes.c_ubyte * pages)()
        address = ctypes.c_void_p(ctypes.addressof(ctypes.c_char.from_buffer(mapping)))
        libc = ctypes.CDLL(None, use_errno=True)
        assert libc.mincore(address, ctypes.c_size_t(size), vec) == 0, ctypes.get_errno()
        return sum(v & 1 for v in vec) / pages
    finally:
        mapping.close()


def _on_tmpfs(path: Path) -> bool:
    mount = _mount_point(path)
    with open("/proc/mounts") as f:
        return any(fields[1] == mount and fields[2] == "tmpfs" for fields in (line.split() for line in f))


def _mount_point(path: Path) -> str:
    path = path.resolve()
    while not os.path.ismount(path):
        path = path.parent
    return str(path)


@pytest.mark.skipif(checkpoint.writer._sync_file_range is None, reason="write-behind is Linux only")
@pytest.mark.parametrize("mode", ["direct", "write-behind", "plain"])
def test_a_saved_checkpoint_does_not_stay_in_the_page_cache(tmp_path, monkeypatch, mode):
    """O_DIRECT, or write-behind where O_DIRECT cannot be used: a committed checkpoint's bytes
    are on disk and out of the page cache (where they would pile up as dirty pages and push
    out what training uses); with neither, they stay cached (the control: the measurement
    sees the difference)."""
    if _on_tmpfs(tmp_path):
        pytest.skip("the test directory is on tmpfs: its pages are the files, nothing to drop")
    if mode == "direct":
        probe = checkpoint.direct_io.open_direct(tmp_path / "probe")
        if probe is None:
            pytest.skip("the test directory's file system refuses O_DIRECT")
        probe.abort()
        os.unlink(tmp_path / "probe")
    monkeypatch.setattr(checkpoint.direct_io, "ENABLED", mode == "direct")
    monkeypatch.setattr(checkpoint.writer, "WRITE_BEHIND", mode == "write-behind")
    opened = []
    open_direct = checkpoint.direct_io.open_direct
    monkeypatch.setattr(checkpoint.direct_io, "open_direct", lambda path: opened.append(open_direct(path)) or opened[-1])
    model = nn.Linear(4096, 4096)  # 64 MiB of weights: more than one write-behind window
    mgr = CheckpointManager(tmp_path, model=model)
    mgr.save(1)
    mgr.close()
    if mode == "direct":
        assert opened and None not in opened  # every file was written with O_DIRECT
    else:
        assert not opened
    shard = max(shard_files(tmp_path / "step-00000001"), key=lambda p: p.stat().st_size)
    assert shard.stat().st_size > checkpoint.writer.WRITE_BEHIND_BYTES
    resident = _resident_fraction(shard)
    assert resident < 0.1 if mode != "plain" else resident > 0.5, resident
    assert verify(Storage(tmp_path), "step-00000001", "hash")[1] is None  # (reads it into the cache)


@pytest.mark.skipif(checkpoint.writer._sync_file_range is None, reason="write-behind is Linux only")
def test_a_write_behind_error_is_raised_not_dropped(tmp_path):
    """Waiting on writeback consumes the file's error (the fsync after it returns 0): an
    error from sync_file_range must fail the save, never be passed over."""
    with open(tmp_path / "shard", "wb") as raw:
        stream = checkpoint.writer._ChecksumStream(raw, write_behind=True)
        stream._fd = 10**6  # not an open file: EBADF, as an EIO would come back
        with pytest.raises(OSError, match="writing the checkpoint file failed"):
            stream.write(bytes(checkpoint.writer.WRITE_BEHIND_BYTES))


@pytest.mark.parametrize("failing_rank", [0, 1])
def test_a_read_that_fails_on_one_rank_fails_the_load_on_every_rank(tmp_path, failing_rank):
    """Each rank plans and reads its checkpoint alone (no DCP collectives): a read error on
    one rank must still reach every rank as the same error, or the others would train on."""
    script = Path(__file__).parent / "scripts" / "load_fails_on_one_rank.py"
    result = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(script),
                  str(tmp_path / "ckpt"), str(failing_rank)], timeout=180)
    assert result.returncode == 0, result.tail()
    for rank in range(2):
        outcome = (tmp_path / "ckpt" / f"outcome-{rank}.txt").read_text()
        assert outcome.startswith("CheckpointError: loading checkpoint ") and outcome.endswith(
            f"failed: rank {failing_rank}: OSError: injected read error on rank {failing_rank}"), (rank, outcome)


@pytest.mark.parametrize("shard_index", [0, 1])
def test_a_corrupt_shard_in_any_ranks_share_falls_back_on_every_rank(tmp_path, shard_index):
    """The ranks check the shards' crc32s a share each while loading: a flipped byte in
    either shard file must send every rank back to the step before, bitwise."""
    script = Path(__file__).parent / "scripts" / "corrupt_shard_on_load.py"
    result = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(script),
                  str(tmp_path / "ckpt"), str(shard_index)], timeout=180)
    assert result.returncode == 0, result.tail()
    for rank in range(2):
        assert (tmp_path / "ckpt" / f"outcome-{rank}.txt").read_text() == "step 10 exact True", rank
    assert [p.name.split(".")[0] for p in (tmp_path / "ckpt" / "quarantine").iterdir()] == ["step-00000020"]


def test_retention_deletes_in_the_background_and_sweeps_what_a_dead_process_left(tmp_path):
    """A deleted checkpoint leaves the root at once (renamed aside) and its files go in a
    background thread; ``close`` waits for them, and a directory set aside by a process that
    died before deleting it goes at the next retention."""
    left = tmp_path / ".deleting-step-00000001-0badc0de"
    (left / "sub").mkdir(parents=True)
    (left / "sub" / "shard.distcp").write_bytes(b"x" * 1000)
    mgr, model, opt, sched, counter = make_job(tmp_path, keep_last=2)
    for step in range(1, 6):
        train_step(model, opt, sched, counter)
        mgr.save(step)
        steps = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("step-"))
        assert steps == [f"step-{s:08d}" for s in range(max(1, step - 1), step + 1)], steps  # gone at once
    mgr.close()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(("step-", ".deleting-"))) == \
        ["step-00000004", "step-00000005"]


@pytest.mark.parametrize("async_mode", ["off", "thread"])
def test_a_checkpoints_directory_entry_is_made_durable_at_its_commit_and_a_deletion_right_away(
        tmp_path, monkeypatch, async_mode):
    """A save fsyncs nothing in the root before its data is written: an fsync right after
    retention deleted files waits for the disk to discard their blocks (20-70 ms per 100 MB
    here), which delayed the whole save. The new directory's entry is made durable at the
    commit, before the commit record appears; retention's deletion thread fsyncs the root
    itself, so that discard happens there, not in the next save. The fsyncs are watched
    (the real ones still run)."""
    synced = []  # (directory, thread name, whether the step's shards / commit record existed)

    def watched(directory):
        step_dir = Path(directory) / "step-00000002"
        synced.append((os.path.abspath(directory), threading.current_thread().name,
                       bool(shard_files(step_dir)), (step_dir / "manifest.json").exists()))
        fsync_dir(directory)

    fsync_dir = checkpoint.storage.fsync_dir
    monkeypatch.setattr(checkpoint.storage, "fsync_dir", watched)
    monkeypatch.setattr(checkpoint.retention, "fsync_dir", watched)
    mgr, model, opt, sched, counter = make_job(tmp_path, keep_last=1, async_mode=async_mode)
    train_step(model, opt, sched, counter)
    mgr.save(1)
    mgr.wait()
    synced.clear()
    train_step(model, opt, sched, counter)
    mgr.save(2)  # retention then deletes step 1
    mgr.close()
    root = os.path.abspath(tmp_path)
    by_saver = [(shards, record) for directory, thread, shards, record in synced
                if directory == root and not thread.startswith("ckpt-delete")]
    assert by_saver == [(True, False)], synced  # once, after the data, before the record
    assert any(directory == root and thread.startswith("ckpt-delete") for directory, thread, *_ in synced), synced
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(("step-", ".deleting-"))) == ["step-00000002"]


def test_a_process_that_ends_without_close_still_finishes_its_deletions(tmp_path):
    """Retention's deletions run in daemon threads, which the interpreter would kill at
    exit: a script that saves and ends without ``close()`` must not leave them half done."""
    stale = tmp_path / "ckpt" / "step-00000001"  # a save that died: no record, many files
    stale.mkdir(parents=True)
    for i in range(20000):
        (stale / f"f{i}").touch()
    script = ("import sys, torch; sys.path.insert(0, sys.argv[1]); from checkpoint import CheckpointManager; "
              "CheckpointManager(sys.argv[2], model=torch.nn.Linear(2, 2)).save(2)")
    result = subprocess.run([sys.executable, "-c", script, str(Path(__file__).parents[1]), str(tmp_path / "ckpt")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir() if p.name.startswith(("step-", ".deleting-"))) == \
        ["step-00000002"]


@contextlib.contextmanager
def small_disk(path: Path, size: str, kind: str = "tmpfs"):
    """A real disk of ``size`` ("10m") at ``path``: a tmpfs, or (``kind="ext4"``) an ext4 file
    system in an image file, loop-mounted, which checkpoint files are written to with
    O_DIRECT as on a real disk; the test is skipped where none can be mounted."""
    path.mkdir()
    if kind == "ext4":
        image = path.with_name(path.name + ".img")
        with open(image, "wb") as f:
            f.truncate(int(size.rstrip("m")) << 20)
        try:
            made = subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], capture_output=True).returncode == 0
        except FileNotFoundError:
            made = False
        if not made:
            pytest.skip("cannot make an ext4 file system here (mkfs.ext4)")
        mount = ["mount", "-o", "loop", str(image), str(path)]
    else:
        mount = ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)]
    if subprocess.run(mount, capture_output=True).returncode:
        pytest.skip(f"cannot mount a {kind} here (needs root with CAP_SYS_ADMIN{', and a loop device' if kind == 'ext4' else ''})")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_a_save_on_a_disk_with_room_for_two_waits_for_the_deletion_of_the_third(tmp_path, monkeypatch):
    """Retention deletes in the background; on a disk with room for keep_last + 1
    checkpoints the next save must wait for that deletion, not fail with a full disk. The
    deletion is held until the save says it waits (without the wait: "No space left")."""
    release = threading.Event()
    real_rmtree = shutil.rmtree

    def held_rmtree(path, *args, **kwargs):
        if os.path.basename(path).startswith(".deleting-"):
            assert release.wait(60), "the save never waited for the deletion"
        return real_rmtree(path, *args, **kwargs)

    class ReleaseWhenTheSaveWaits(logging.Handler):
        def emit(self, record):
            if record.getMessage().startswith("waiting for retention to finish deleting"):
                release.set()

    logger = logging.getLogger("checkpoint")
    handler = ReleaseWhenTheSaveWaits()
    level = logger.level
    mgr = None
    with small_disk(tmp_path / "disk", "10m") as disk:
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        monkeypatch.setattr(shutil, "rmtree", held_rmtree)
        try:
            torch.manual_seed(0)
            model = nn.Linear(1024, 1024)  # 4.2 MB a checkpoint: two fit in 10 MiB, three do not
            mgr = CheckpointManager(disk, model=model, keep_last=1)
            for step in (1, 2, 3):
                with torch.no_grad():
                    model.weight.add_(1.0)
                mgr.save(step)
            mgr.close()
            mgr = None
            assert release.is_set()
            assert sorted(p.name for p in disk.iterdir() if p.name.startswith(("step-", ".deleting-"))) == \
                ["step-00000003"]
            saved = model.weight.detach().clone()
            fresh = nn.Linear(1024, 1024)
            mgr = CheckpointManager(disk, model=fresh)
            assert mgr.load().step == 3
            assert torch.equal(fresh.weight, saved)
        finally:
            release.set()
            if mgr is not None:
                mgr.close()
            logger.removeHandler(handler)
            logger.setLevel(level)


@pytest.mark.parametrize("kind", ["tmpfs", "ext4"])
def test_a_save_that_fills_the_disk_says_so_and_leaves_no_partial_files(tmp_path, kind):
    """torch.save's zip writer fails a full disk with "unexpected pos N vs M" (through the
    page cache, tmpfs) and the O_DIRECT writer with ENOSPC (ext4): the error must name the
    full disk, and the failed save's files must go (they would hold the disk full and fail
    every later save), leaving the committed checkpoint as it was."""
    with small_disk(tmp_path / "disk", "10m" if kind == "tmpfs" else "16m", kind) as disk:  # ext4 keeps some
        probe = checkpoint.direct_io.open_direct(disk / "probe")
        assert (probe is not None) == (kind == "ext4" and checkpoint.direct_io.ENABLED)
        if probe is not None:
            probe.abort()
            (disk / "probe").unlink()
        model = nn.Linear(1024, 1024)  # 4.2 MB a checkpoint
        mgr = CheckpointManager(disk, model=model, keep_last=0)
        try:
            mgr.save(1)
            committed = {p.name: p.read_bytes() for p in (disk / "step-00000001").iterdir()}
            ballast = disk / "other-data"
            ballast.write_bytes(b"\0" * (shutil.disk_usage(disk).free - (2 << 20)))  # someone else's: no room for step 2
            free = shutil.disk_usage(disk).free
            with pytest.raises(CheckpointError, match=re.escape(f"disk holding {disk} is full") +
                               ".*the previous committed checkpoint stays"):
                mgr.save(2)
            assert sorted(p.name for p in disk.iterdir() if p.name.startswith("step-")) == ["step-00000001"]
            assert shutil.disk_usage(disk).free >= free - (64 << 10)  # a lease renewal's file at most
            assert {p.name: p.read_bytes() for p in (disk / "step-00000001").iterdir()} == committed
            ballast.unlink()  # the space comes back: the next save succeeds
            mgr.save(3)
        finally:
            mgr.close()
        assert sorted(p.name for p in disk.iterdir() if p.name.startswith("step-")) == \
            ["step-00000001", "step-00000003"]
