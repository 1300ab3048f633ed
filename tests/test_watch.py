"""How ftlaunch watches scripts that are not ours, and how it ends: a plain torchrun script is
watched through its optimizer steps (no code change), never killed for silence by a timer
its user did not set, and a job that did not finish exits non-zero and says why."""

from __future__ import annotations

import re

import pytest

from procs import REPO, events_of, ftlaunch_cmd, run

PLAIN = str(REPO / "tests" / "scripts" / "plain_ddp.py")
TIMEOUT = 180


def test_plain_script_with_optimizer_steps_outlives_the_startup_timeout(tmp_path):
    """About 20 s of optimizer steps under a 12 s --startup-timeout: its steps are heartbeats,
    so it is training, not starting, and finishes (it was killed every generation before)."""
    run_dir = tmp_path / "run"
    result = run(ftlaunch_cmd(2, "--run-dir", str(run_dir), "--startup-timeout", "12", "--max-restarts", "1",
                              script=PLAIN, script_args=("2000", "--optimizer")), timeout=TIMEOUT)
    assert result.returncode == 0, result.tail()
    assert not events_of(run_dir, "hang_detected"), result.tail()
    assert result.output.count("plain done") == 2 and "result: succeeded" in result.output


def test_silent_plain_script_is_not_timed_out_by_default(tmp_path):
    """No optimizer, no Reporter: no heartbeat at all. Without an explicit --startup-timeout
    nothing may call it hung, however short --hang-timeout is."""
    run_dir = tmp_path / "run"
    result = run(ftlaunch_cmd(2, "--run-dir", str(run_dir), "--hang-timeout", "1", "--max-restarts", "0",
                              script=PLAIN, script_args=("600",)), timeout=TIMEOUT)
    assert result.returncode == 0, result.tail()
    assert not events_of(run_dir, "hang_detected")


def test_restarts_used_up_by_hangs_is_a_failure(tmp_path):
    """The issue's repro: a silent script under an explicit --startup-timeout 5 is killed in
    both generations. ftlaunch used to print 'result: succeeded' and exit 0."""
    run_dir = tmp_path / "run"
    result = run(ftlaunch_cmd(2, "--run-dir", str(run_dir), "--startup-timeout", "5", "--max-restarts", "1",
                              "--restart-backoff", "0", script=PLAIN, script_args=("3000",)), timeout=TIMEOUT)
    assert result.returncode == 1, result.tail()
    assert "result: failed: all 1 restart used (--max-restarts); last failure: rank" in result.output
    assert "made no progress" in result.output
    summary = result.output.split("== ftlaunch summary")[1]
    assert "None" not in summary and "step -1" not in summary, summary
    # A script that reports no steps: what its failures cost is unknown, not 0.
    assert "steps lost: unknown; time lost: unknown" in summary and "last committed step: none" in summary, summary
    assert len(events_of(run_dir, "hang_detected")) >= 2
    assert events_of(run_dir, "result")[0]["exit_code"] == 1


@pytest.mark.parametrize("prewarm", [True, False], ids=["prewarm", "no-prewarm"])
def test_sigstopped_plain_worker_is_found_by_its_optimizer_steps(tmp_path, prewarm):
    run_dir = tmp_path / "run"
    flags = [] if prewarm else ["--no-prewarm"]
    result = run(ftlaunch_cmd(2, "--run-dir", str(run_dir), "--hang-timeout", "4", "--max-restarts", "1", *flags,
                              script=PLAIN, script_args=("300", "--optimizer", "--stop-rank", "1",
                                                         "--stop-step", "50")), timeout=TIMEOUT)
    assert result.returncode == 0, result.tail()
    hang = events_of(run_dir, "hang_detected")[0]
    assert (hang["rank"], hang["phase"], hang["step"]) == (1, "training", 50), hang
    assert 4 <= hang["silent_seconds"] <= 4 + 10, hang
    assert "plain done rank 1 generation 1" in result.output
    assert re.search(r"rank 1 hang \(training\) at step 50: restarted; steps and time lost unknown", result.output)
