"""Nothing of a launch outlives its agent: SIGKILL ftlaunch and every process it started dies
(parent-death signals down the chain); a worker's own children die with its generation."""

from __future__ import annotations

import signal
import time

import psutil
import pytest

from procs import REPO, TRAIN, finish, ftlaunch_cmd, run, start, wait_for_event


def wait_gone(pids, timeout: float) -> list[int]:
    """The pids still alive (zombies count as gone) after up to ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        alive = []
        for pid in pids:
            try:
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    alive.append(pid)
            except psutil.NoSuchProcess:
                pass
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.1)  # sleep-ok: polling process table with a deadline


@pytest.mark.parametrize("prewarm", [True, False], ids=["prewarm", "no-prewarm"])
def test_sigkilled_ftlaunch_takes_every_process_with_it(tmp_path, prewarm):
    run_dir, log = tmp_path / "run", tmp_path / "log"
    flags = [] if prewarm else ["--no-prewarm"]
    proc = start(ftlaunch_cmd(2, "--run-dir", str(run_dir), *flags, script=TRAIN,
                              script_args=("--ckpt-dir", str(tmp_path / "ckpt"), "--epochs", "200")), log)
    try:
        wait_for_event(run_dir, "first_step", timeout=120, procs=proc)
        tree = [p.pid for p in psutil.Process(proc.pid).children(recursive=True)]
        assert len(tree) >= 2
        proc.send_signal(signal.SIGKILL)  # the launcher alone: no process-group kill
        proc.wait(timeout=30)
        alive = wait_gone(tree, timeout=20)
        assert not alive, [(p, psutil.Process(p).cmdline()) for p in alive]
    finally:
        finish(proc, log, timeout=30)


def test_children_of_a_failed_generation_do_not_survive_the_restart(tmp_path):
    children = tmp_path / "children"
    children.mkdir()
    result = run(ftlaunch_cmd(2, "--run-dir", str(tmp_path / "run"), "--max-restarts", "1",
                              script=str(REPO / "tests/scripts/spawns_child.py")),
                 timeout=120, env_extra={"CHILDREN_DIR": str(children)})
    assert result.returncode == 0, result.tail()
    leftover = int((children / "gen0.pid").read_text())
    assert not wait_gone([leftover], timeout=10), "generation 0's child outlived its worker"
