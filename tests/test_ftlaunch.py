"""ftlaunch under real faults: every kind of injected fault is recovered and the run ends
bitwise equal to an uninterrupted one; hangs are detected; crash loops stop; preemption
commits the last step and exits 0; restarts of any script never hang."""

from __future__ import annotations

import re
import signal
import sys
import time

import pytest

from procs import (REPO, assert_training_state_equal, finish, ftlaunch_cmd, latest_committed, load_checkpoint,
                   events_of, read_events, run, start, wait_for_event)

# Synchronous saves: these tests assert which step each restart resumes from (an async save
# may still be in flight when a worker dies a few steps later; see tests/test_async_save.py),
# from the durable tier (the memory tier, on by default in train.py, has tests/test_memory_tier.py).
TRAIN_ARGS = ("--max-steps", "50", "--save-every-steps", "10", "--keep-last", "0", "--log-every", "10",
              "--async-save", "off", "--memory-every", "0")
TIMEOUT = 240


@pytest.fixture(scope="module")
def ftl_reference(tmp_path_factory):
    """The same job under ftlaunch with no fault (conftest's ``reference`` runs another job
    under torchrun; this one must not shadow it)."""
    base = tmp_path_factory.mktemp("ftl-reference")
    result = run(ftlaunch_cmd(2, "--run-dir", str(base / "run"),
                              script_args=("--ckpt-dir", str(base / "ckpt"), *TRAIN_ARGS)), timeout=TIMEOUT)
    assert result.returncode == 0, result.tail()
    assert "failures: none" in result.output
    return load_checkpoint(base / "ckpt" / "step-00000050", tmp_path_factory.mktemp("ftl-reference-pt"))


@pytest.mark.parametrize("faults, failed_rank, kind, resumes", [
    (["kill:rank=1:step=35"], 1, "signal SIGKILL", [30]),
    (["kill-before-commit:rank=0:step=40"], 0, "signal SIGKILL", [30]),
    # Generation 1 dies while loading step 30 (no "resumed" event); generation 2 loads it.
    (["kill:rank=1:step=35", "kill-load:rank=0:step=30"], 1, "signal SIGKILL", [30]),
    (["hang:rank=1:step=35"], 1, "hang (training)", [30]),
    # Stopped in the middle of a save, its peer waiting in the save's gather: both are under
    # the long I/O limit, but the kernel shows rank 1 stopped, so --hang-timeout applies.
    (["hang-before-commit:rank=1:step=40"], 1, "hang (saving)", [30]),
    (["raise:rank=0:step=35"], 0, "exit code 1", [30]),
], ids=["kill", "kill-before-commit", "kill-while-loading", "hang", "hang-mid-save", "raise"])
def test_fault_is_recovered_bit_exactly(ftl_reference, tmp_path, faults, failed_rank, kind, resumes):
    run_dir, ckpt = tmp_path / "run", tmp_path / "ckpt"
    injections = [a for f in faults for a in ("--inject", f)]
    result = run(ftlaunch_cmd(2, "--run-dir", str(run_dir), "--hang-timeout", "3", *injections,
                              script_args=("--ckpt-dir", str(ckpt), *TRAIN_ARGS)), timeout=TIMEOUT)
    assert result.returncode == 0, result.tail()
    assert_training_state_equal(load_checkpoint(ckpt / "step-00000050", tmp_path), ftl_reference)

    events = read_events(run_dir)
    failures = [e for e in events if e["event"] in ("worker_failed", "hang_detected")]
    assert failures[0]["rank"] == failed_rank, failures  # the root cause is named first
    assert [e["step"] for e in events if e["event"] == "resumed"] == resumes
    assert len(events_of(run_dir, "restart")) == len(faults)
    assert f"1 x {kind}" in result.output or f"{len(faults)} x {kind}" in result.output, result.tail()
    if any(f.startswith("kill-load") for f in faults):
        assert any(e["attempt"] == 1 and e["rank"] == 0 and e["phase"] == "loading" for e in failures), failures
    if faults[0].startswith("hang"):
        # A hang costs from the rank's last step, not from its detection: at least --hang-timeout.
        lost = float(re.search(r"time lost: ([\d.]+) s", result.output).group(1))
        assert lost >= 3, result.tail()
    if "kill-before-commit" in faults[0]:
        assert re.search(r"skipping checkpoint .*step-00000040/manifest.json: no commit record", result.output)
    # Per-attempt, per-rank logs from TorchElastic's log spec.
    for attempt in range(len(faults) + 1):
        assert list((run_dir / "logs").glob(f"*/attempt_{attempt}/1/stdout.log")), attempt


def test_sigstopped_worker_is_detected_within_hang_timeout(tmp_path):
    """Also the one test of plain (not pre-warmed) workers under ftlaunch."""
    run_dir = tmp_path / "run"
    result = run(ftlaunch_cmd(2, "--run-dir", str(run_dir), "--hang-timeout", "4", "--inject", "hang:rank=1:step=15",
                              "--no-prewarm",
                              script_args=("--ckpt-dir", str(tmp_path / "ckpt"), "--max-steps", "30")), timeout=TIMEOUT)
    assert result.returncode == 0, result.tail()
    hang = events_of(run_dir, "hang_detected")[0]
    assert hang["rank"] == 1 and hang["phase"] == "training"
    # Detected within --hang-timeout + 10 s of the last step rank 1 finished.
    assert 4 <= hang["silent_seconds"] <= 4 + 10, hang


def test_survivors_of_a_failure_are_killed_at_once(tmp_path):
    """Rank 1 exits 1; rank 0 ignores SIGTERM and blocks (as in an NCCL collective with a dead
    peer). TorchElastic would SIGTERM it and wait 30 s; ftlaunch SIGKILLs it at once, restarts,
    and still names rank 1 as the failure."""
    run_dir = tmp_path / "run"
    result = run(ftlaunch_cmd(2, "--run-dir", str(run_dir), "--max-restarts", "1",
                              script=str(REPO / "tests/scripts/stuck_survivor.py")), timeout=120)
    assert result.returncode == 0, result.tail()
    events = read_events(run_dir)
    started = next(e["time"] for e in events if e["event"] == "workers_started")
    restarted = next(e["time"] for e in events if e["event"] == "restart")
    assert restarted - started < 15, result.tail()  # 30 s and more with TorchElastic's SIGTERM wait
    assert next(e for e in events if e["event"] == "worker_failed")["rank"] == 1, events
    assert "1 x exit code 1" in result.output, result.tail()
    assert result.output.count("stuck_survivor: generation 1") == 2


def test_generation_that_never_starts_is_a_hang(tmp_path):
    run_dir = tmp_path / "run"
    # 10 s: the first generation also waits for the fork server to import torch (2-4 s here).
    result = run(ftlaunch_cmd(2, "--run-dir", str(run_dir), "--startup-timeout", "10",
                              script=str(REPO / "tests/scripts/hangs_at_start.py")), timeout=120)
    assert result.returncode == 0, result.tail()
    hangs = events_of(run_dir, "hang_detected")
    assert [(h["rank"], h["phase"], h["attempt"]) for h in hangs] == [(1, "starting", 0)]  # rank 0 had finished
    assert 10 <= hangs[0]["silent_seconds"] <= 10 + 10
    assert "generation 1 rank 1 done" in result.output


def test_crash_loop_stops_with_a_summary(tmp_path):
    run_dir = tmp_path / "run"
    result = run(ftlaunch_cmd(1, "--run-dir", str(run_dir), "--crash-loop-limit", "2", "--max-restarts", "10",
                              "--restart-backoff", "0.05", script=str(REPO / "tests/scripts/dies_at_start.py")),
                 timeout=120)
    assert result.returncode == 1, result.tail()
    assert "result: failed: 2 restarts in a row made no progress: no newer committed checkpoint" in result.output
    assert "attempts: 3 (2 restarts)" in result.output and "3 x exit code 1" in result.output
    backoffs = [e["backoff_seconds"] for e in events_of(run_dir, "restart")]
    assert backoffs == [0.05, 0.1], backoffs  # exponential
    assert events_of(run_dir, "crash_loop")


def test_three_restarts_of_any_script_all_succeed(tmp_path):
    """A script with a plain init_process_group, killed 3 times in one run: with ftlaunch's
    defaults every restart forms a working group (stock torchrun: about 1 in 4 failed or hung)."""
    result = run(ftlaunch_cmd(2, "--run-dir", str(tmp_path / "run"), "--max-restarts", "3",
                              script=str(REPO / "tests/scripts/stock_worker.py"), script_args=("3",)), timeout=TIMEOUT)
    assert result.returncode == 0, result.tail()
    assert "attempts: 4 (3 restarts)" in result.output
    assert result.output.count("generation 3 rank") == 2
    assert "connectFullMesh" not in result.output


def test_sigterm_commits_the_last_step_and_resumes_bit_exactly(tmp_path):
    args = ("--epochs", "100", "--save-every-steps", "500", "--keep-last", "0", "--trace-samples", "--log-every", "500")
    straight = run(ftlaunch_cmd(2, "--run-dir", str(tmp_path / "run0"),
                                script_args=("--ckpt-dir", str(tmp_path / "straight"), *args)), timeout=TIMEOUT)
    assert straight.returncode == 0, straight.tail()

    ckpt, run_dir, log = tmp_path / "ckpt", tmp_path / "run1", tmp_path / "run1.log"
    proc = start(ftlaunch_cmd(2, "--run-dir", str(run_dir), "--grace-period", "20",
                              script_args=("--ckpt-dir", str(ckpt), *args)), log)
    wait_for_event(run_dir, "first_step", timeout=120, procs=proc)
    signalled = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    first = finish(proc, log, timeout=60)
    assert first.returncode == 0, first.tail()
    assert time.monotonic() - signalled < 20, "ftlaunch must exit within its --grace-period"
    stop = events_of(run_dir, "preempted")[0]
    requested = events_of(run_dir, "stop_requested")[0]
    assert stop["time"] - requested["time"] < 20
    assert 0 < stop["step"] < 2300
    # The committed step is the last step any rank ran: zero steps lost.
    assert latest_committed(ckpt).step == stop["step"]
    import json
    ran = [json.loads(l)["step"] for p in (ckpt / "samples").glob("rank*.jsonl") for l in p.read_text().splitlines()]
    assert max(ran) == stop["step"]
    assert "stopped on request at step" in first.output

    second = run(ftlaunch_cmd(2, "--run-dir", str(tmp_path / "run2"), script_args=("--ckpt-dir", str(ckpt), *args)),
                 timeout=TIMEOUT)
    assert second.returncode == 0, second.tail()
    assert f"resumed from step {stop['step']} " in second.output
    assert_training_state_equal(load_checkpoint(ckpt / "step-00002300", tmp_path),
                                load_checkpoint(tmp_path / "straight" / "step-00002300", tmp_path))


@pytest.mark.parametrize("args, message", [
    (["--hang-timeout", "-1"], "--hang-timeout must be >= 0"),
    (["--inject", "boom:rank=0:step=1"], "unknown kind 'boom'"),
    (["--nnodes", "2:4"], "spans several nodes: give --rdzv-endpoint"),
    (["--no-such-flag"], "unrecognized arguments"),
    (["--nnodes", "2:3", "--rdzv-endpoint", "localhost:"], "must be an integer between 0 and 65536"),
    (["--nproc-per-node", "0"], "--nproc-per-node must be >= 1, got '0'"),  # was a ZeroDivisionError
    (["--run-dir", "/proc/ftlaunch-no-such-dir"], "--run-dir /proc/ftlaunch-no-such-dir: No such file or directory"),
])
def test_bad_flags_get_one_line(tmp_path, args, message):
    result = run([sys.executable, "-m", "launcher.cli", *args, "train.py"], timeout=60)
    assert result.returncode == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.output
