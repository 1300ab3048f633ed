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


def test_cluster_kill_checks_the_process_identity(tmp_path):
    """A pid file names a pid *and* its start time: when the node is gone and its pid now
    belongs to another process, `ftlaunch cluster kill` refuses instead of killing it."""
    import json
    import subprocess
    import sys

    from launcher.proctree import ProcessId

    stranger = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        (tmp_path / "cluster.json").write_text(json.dumps({"dir": str(tmp_path), "nodes": 1, "min_nodes": 1, "port": 1,
                                                           "run_id": "x", "agent_args": []}))
        real = ProcessId.of(stranger.pid)
        (tmp_path / "node0.pid").write_text(ProcessId(real.pid, real.started - 50).to_text())  # same pid, older process
        result = run([sys.executable, "-m", "launcher.cli", "cluster", "kill", "--dir", str(tmp_path), "--node", "0"],
                     timeout=60)
        assert result.returncode != 0 and "node 0 is not running" in result.output, result.output
        assert stranger.poll() is None, "a process that merely reuses the node's pid was killed"
        (tmp_path / "node0.pid").write_text(real.to_text())
        assert run([sys.executable, "-m", "launcher.cli", "cluster", "kill", "--dir", str(tmp_path), "--node", "0"],
                   timeout=60).returncode == 0
        assert stranger.wait(timeout=10) == -signal.SIGKILL
    finally:
        stranger.kill()
        stranger.wait()
