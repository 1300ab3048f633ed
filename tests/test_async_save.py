"""Async saves: a save in flight is never committed by a crash, a failed background write is
reported and commits nothing, host memory stays bounded, and a busy writer waits or skips."""

from __future__ import annotations

import copy
import ctypes
import logging
import os
import re
import subprocess
import threading

import psutil
import pytest
import torch

from checkpoint import SKIPPED, CheckpointError, CheckpointManager, Observer, Storage, find_latest
from conftest import REFERENCE_ARGS, REFERENCE_TIMEOUT
from procs import assert_training_state_equal, latest_committed, load_checkpoint, run, torchrun_cmd


def test_sigkill_while_background_write_in_flight(reference, tmp_path):
    """Rank 1 dies the moment step 30 is staged: 30 is never committed, 20 loads, and the
    finished run is bitwise equal to the uninterrupted one. (The memory tier is off: it would
    resume from its snapshot of step 30, see tests/test_memory_tier.py.)"""
    _, expected = reference
    ckpt = tmp_path / "ckpt"
    result = run(torchrun_cmd(2, "--ckpt-dir", str(ckpt), *REFERENCE_ARGS, "--async-save", "thread", "--memory-every", "0",
                              "--inject", "kill-while-writing:rank=1:step=30", max_restarts=1),
                 timeout=REFERENCE_TIMEOUT)
    assert result.returncode == 0, result.tail()
    assert "[fault] rank 1: injecting kill-while-writing at step 30" in result.output, result.tail()
    assert "step 30 staged" in result.output, result.tail()
    assert result.output.count("exitcode: -9") == 1, result.tail()
    assert re.findall(r"resumed from step (\d+)", result.output) == ["20"], result.tail()
    generation0 = result.output.split("exitcode: -9")[0]
    assert "committed checkpoint step 20" in generation0 and "committed checkpoint step 30" not in generation0
    # After the first save, a rank stages only the replicated tensors DCP has it write (half).
    staged = {int(step): float(mib) for step, mib in re.findall(r"step (\d+) staged in [\d.]+ s \(([\d.]+) MiB\)", generation0)}
    assert staged[20] < 0.7 * staged[10], staged
    manifest = latest_committed(ckpt)
    assert manifest.step == 50 and manifest.restart_generation == 1
    assert_training_state_equal(load_checkpoint(ckpt / "step-00000050", tmp_path), expected)


# -- in-process: the library on its own ----------------------------------------------------

def _model(width: int = 64, layers: int = 2) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])


def _train_step(model, opt, step: int) -> None:
    x = torch.randn(8, model[0].in_features, generator=torch.Generator().manual_seed(step))
    opt.zero_grad()
    model(x).pow(2).mean().backward()
    opt.step()


@pytest.fixture
def can_go_read_only(tmp_path):
    """A directory and a function that makes it read-only for real: a tmpfs remounted
    read-only (as root, chmod would not stop writes), or chmod as an ordinary user."""
    root = tmp_path / "ro"
    root.mkdir()
    if os.geteuid() != 0:
        yield root, lambda: [os.chmod(p, 0o555) for p, _, _ in os.walk(root)], \
            lambda: [os.chmod(p, 0o755) for p, _, _ in os.walk(root)]
        return
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(root)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")

    def remount(mode: str):
        subprocess.run(["mount", "-o", f"remount,{mode}", str(root)], check=True, capture_output=True)

    yield root, lambda: remount("ro"), lambda: remount("rw")
    subprocess.run(["umount", "-l", str(root)], check=False)


def test_background_write_failure_is_reported_and_commits_nothing(can_go_read_only, caplog):
    root, make_read_only, make_writable = can_go_read_only
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    twin = copy.deepcopy(model)  # trained identically, never checkpointed
    twin_opt = torch.optim.AdamW(twin.parameters(), lr=1e-2)

    class ReadOnlyAtStep4(Observer):
        def before_commit(self, step: int) -> None:  # runs in the background thread, shards written
            if step == 4:
                make_read_only()

    ckpt = CheckpointManager(root, model=model, optimizer=opt, async_mode="thread", save_every_steps=2,
                             keep_last=0, observer=ReadOnlyAtStep4(), save_failures_allowed=0)
    caplog.set_level(logging.ERROR, logger="checkpoint")
    failure = None
    for step in range(1, 11):
        _train_step(model, opt, step)
        _train_step(twin, twin_opt, step)
        try:
            ckpt.maybe_save(step)
        except CheckpointError as e:
            failure = (step, str(e))
            assert find_latest(Storage(root), "hash").step == 2  # the previous commit stays
            assert not (root / "step-00000004" / "manifest.json").exists()
            make_writable()
    ckpt.close()

    assert failure is not None, "the failed background save was never reported"
    step, message = failure
    assert step == 6, failure  # raised by the next save, the same step on every rank
    assert "background save of step 4 failed (nothing of it committed; the previous commit stays)" in caplog.text
    assert message.endswith("(1 saves in a row failed; save_failures_allowed is 0)") and \
        message.count("saves in a row failed") == 1, message
    assert "step-00000004" in message and ("Read-only file system" in message or "Permission denied" in message)
    assert "previous committed checkpoint stays" in message
    assert "\n" not in message
    # Training went on untouched: the live model equals the never-checkpointed twin bitwise,
    # and the checkpoints after the failure commit and load normally.
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)
    assert find_latest(Storage(root), "hash").step == 10
    fresh = _model()
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    assert CheckpointManager(root, model=fresh, optimizer=fresh_opt).load().step == 10
    for a, b in zip(fresh.parameters(), twin.parameters()):
        assert torch.equal(a, b)



def test_failed_saves_within_the_allowance_let_training_go_on(can_go_read_only, caplog):
    """The default: a storage outage costs the saves it hits (one line each), not the job;
    the saves after it commit. One failure more than ``save_failures_allowed`` raises."""
    root, make_read_only, make_writable = can_go_read_only
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    failed = []

    class Outage(Observer):
        def before_commit(self, step: int) -> None:
            if step in (4, 6):
                make_read_only()

        def save_failed(self, step: int, error: str) -> None:
            failed.append(step)
            make_writable()

    ckpt = CheckpointManager(root, model=model, optimizer=opt, async_mode="thread", save_every_steps=2,
                             keep_last=0, observer=Outage(), save_failures_allowed=2)
    caplog.set_level(logging.INFO, logger="checkpoint")
    for step in range(1, 11):
        _train_step(model, opt, step)
        ckpt.maybe_save(step)
    ckpt.close()
    assert failed == [4, 6]  # each learnt at the next save, which then went ahead
    assert find_latest(Storage(root), "hash").step == 10
    assert not (root / "step-00000004" / "manifest.json").exists()
    assert not (root / "step-00000006" / "manifest.json").exists()
    assert "the save of step 4 failed; training goes on (1 more failed save(s) in a row allowed)" in caplog.text
    assert "the save of step 6 failed; training goes on (0 more failed save(s) in a row allowed)" in caplog.text

    # Three failures in a row with two allowed: the third raises, naming the count.
    ckpt = CheckpointManager(root, model=model, optimizer=opt, async_mode="off", save_every_steps=2,
                             keep_last=0, save_failures_allowed=2)
    make_read_only()
    outcomes = []
    with pytest.raises(CheckpointError, match="3 saves in a row failed; save_failures_allowed is 2"):
        for step in range(12, 20, 2):
            outcomes.append(ckpt.maybe_save(step).outcome)
    make_writable()
    ckpt.close()
    assert outcomes == ["failed", "failed"]
    assert find_latest(Storage(root), "hash").step == 10

def test_host_memory_stays_bounded_over_20_async_saves(tmp_path):
    model = _model(width=1024, layers=8)  # 8.4 M params: ~100 MB with AdamW's two moments
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    _train_step(model, opt, 0)
    state_bytes = 3 * sum(p.numel() * p.element_size() for p in model.parameters())
    ckpt = CheckpointManager(tmp_path, model=model, optimizer=opt, async_mode="thread", keep_last=2, verify="size")
    proc = psutil.Process()

    def resident() -> int:
        # Freed memory that glibc's arenas keep for reuse is not a leak, but it counts in the RSS:
        # in one CI run the RSS grew by 30 MB over these 20 saves (it moves by 0.1 MB over 40 in
        # a process of its own here). malloc_trim hands every arena's free pages back to the
        # system first, so what is measured is memory that is still in use.
        if trim is not None:
            trim(0)
        return proc.memory_info().rss

    try:
        trim = ctypes.CDLL(None).malloc_trim
    except AttributeError:  # not glibc: measure as is
        trim = None
    for step in range(1, 7):  # warm-up: staging buffers, DCP's and the allocator's first-use growth (4 saves
        # left the writer thread's malloc arena still growing once in a fresh CI process: 21.9 MB)
        ckpt.save(step)
        _train_step(model, opt, step)
        ckpt.wait()
    warm = resident()
    peak = warm
    for step in range(7, 27):
        ckpt.save(step)
        _train_step(model, opt, step)  # training goes on while the write is in flight
        peak = max(peak, proc.memory_info().rss)
        ckpt.wait()
        peak = max(peak, proc.memory_info().rss)
    end = resident()
    ckpt.close()
    assert ckpt.stats.staging_bytes <= 1.01 * state_bytes  # one copy of the state, reused
    # A leak of even 5% of the state per save would add 100% over 20 saves.
    assert end - warm < 0.2 * state_bytes, f"grew {(end - warm) / 1e6:.1f} MB over 20 saves"
    assert peak - warm < 0.5 * state_bytes, f"peak {(peak - warm) / 1e6:.1f} MB above the warm level"
    assert find_latest(Storage(tmp_path), "hash").step == 26


@pytest.mark.parametrize("if_busy", ["wait", "skip"])
def test_a_save_due_while_one_is_in_flight_waits_or_skips(tmp_path, caplog, if_busy):
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    release = threading.Event()

    class HoldStep1(Observer):
        def before_commit(self, step: int) -> None:
            if step == 1:
                assert release.wait(60), "the test never released step 1"

    ckpt = CheckpointManager(tmp_path, model=model, optimizer=opt, async_mode="thread", if_busy=if_busy,
                             save_every_steps=1, observer=HoldStep1())
    ckpt.maybe_save(1)  # held in the background until released
    assert ckpt.poll() is None  # still in flight: nothing to report, nothing raised
    if if_busy == "wait":
        threading.Timer(0.2, release.set).start()
        ckpt.maybe_save(2)  # blocks until step 1 is committed, then stages step 2
        assert ckpt.last_committed in (1, 2)
        assert ckpt.wait().step == 2
    else:
        with caplog.at_level(logging.WARNING, logger="checkpoint"):
            assert ckpt.maybe_save(2).outcome == SKIPPED
        assert "skipping the save of step 2: step 1 is still being written" in caplog.text
        assert not (tmp_path / "step-00000002").exists()
        threading.Timer(0.2, release.set).start()
        ckpt.save(3)  # an explicit save (the last one, say) waits instead of skipping
        assert ckpt.wait().step == 3
    ckpt.close()
    committed = sorted(int(p.name.split("-")[1]) for p in tmp_path.glob("step-*") if (p / "manifest.json").exists())
    assert committed == ([1, 2] if if_busy == "wait" else [1, 3])


@pytest.mark.parametrize("async_mode", ["off", "thread"])
def test_parallel_files_are_checksummed_while_written_and_torch_save_is_untouched(tmp_path, async_mode):
    import torch.utils.serialization.config as serialization_config

    model = _model(width=256, layers=4)
    opt = torch.optim.AdamW(model.parameters())
    _train_step(model, opt, 0)
    ckpt = CheckpointManager(tmp_path, model=model, optimizer=opt, async_mode=async_mode, io_threads=3)
    ckpt.save(1)
    ckpt.close()
    record = find_latest(Storage(tmp_path), "hash")  # every listed crc32 recomputed from disk
    assert record is not None and record.step == 1
    assert sorted(n for n in record.files if n.endswith(".distcp")) == ["__0_0.distcp", "__0_1.distcp", "__0_2.distcp"]
    assert serialization_config.save.compute_crc32 is True  # our writers switched it off for themselves only
    fresh = _model(width=256, layers=4)
    fresh_opt = torch.optim.AdamW(fresh.parameters())
    CheckpointManager(tmp_path, model=fresh, optimizer=fresh_opt).load()
    for a, b in zip(fresh.parameters(), model.parameters()):
        assert torch.equal(a, b)


def test_an_async_save_holds_the_state_of_its_step_while_training_goes_on(tmp_path):
    """The background write starts only after the live model and optimizer have moved on
    (the writer thread is held busy): the checkpoint must still hold the staged step."""
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    _train_step(model, opt, 1)
    at_save = copy.deepcopy({"model": model.state_dict(), "optim": opt.state_dict()})
    ckpt = CheckpointManager(tmp_path, model=model, optimizer=opt, async_mode="thread")
    gate = threading.Event()
    ckpt._background._executor.submit(gate.wait, 60)  # the writer thread is busy until the gate opens
    ckpt.save(1)
    for step in (2, 3):
        _train_step(model, opt, step)  # the live tensors change in place
    gate.set()
    assert ckpt.wait().step == 1
    ckpt.close()
    fresh = _model(layers=2)
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    CheckpointManager(tmp_path, model=fresh, optimizer=fresh_opt).load()
    for name, value in fresh.state_dict().items():
        assert torch.equal(value, at_save["model"][name]), name
    for (_, a), (_, b) in zip(sorted(fresh_opt.state_dict()["state"].items()), sorted(at_save["optim"]["state"].items())):
        assert all(torch.equal(a[k], b[k]) for k in ("exp_avg", "exp_avg_sq"))
    assert not torch.equal(next(model.parameters()), next(fresh.parameters()))  # training did move on


def test_a_failed_time_based_save_waits_a_whole_interval_before_the_next_try(can_go_read_only):
    """Without it, a failed save stays due, and an outage uses up the allowance in a few
    steps instead of a few save intervals."""
    root, make_read_only, make_writable = can_go_read_only
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ckpt = CheckpointManager(root, model=model, optimizer=opt, async_mode="off", save_every_seconds=3600,
                             keep_last=0, save_failures_allowed=1)
    make_read_only()
    ckpt._last_save_time -= 3600  # the first save is due now; the next one an hour later
    try:
        outcomes = [ckpt.maybe_save(step) for step in range(1, 6)]
    finally:
        make_writable()
    ckpt.close()
    assert [r.outcome if r else None for r in outcomes] == ["failed", None, None, None, None]
