"""The fault injector's node kill: it must take the agent even when the worker's own parent
dies first (the kernel's parent-death signal would otherwise end the worker mid-kill)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import psutil

from procs import REPO, kill_tree, wait_until

# agent -> server (dies with the agent, as the fork server does) -> worker (dies with the
# server, as a pre-warmed worker does). The worker injects the node kill, then waits until its
# parent is dead, then writes a marker: without ``outlive_parent`` it is killed first.
TREE = r"""
import os, subprocess, sys, time
import psutil
role, out = sys.argv[1], sys.argv[2]
if role == "agent":
    os.environ["FTLAUNCH_AGENT_PID"] = str(os.getpid())
    subprocess.run([sys.executable, __file__, "server", out])
elif role == "server":
    from launcher.bootstrap import die_with_parent
    die_with_parent()
    subprocess.run([sys.executable, __file__, "worker", out])
else:
    from launcher.bootstrap import die_with_parent
    from launcher.faults import _kill_node
    die_with_parent()
    open(out + ".pid", "w").write(str(os.getpid()))
    server = psutil.Process(os.getppid())
    _kill_node()
    deadline = time.monotonic() + 30
    while server.is_running() and server.status() != psutil.STATUS_ZOMBIE and time.monotonic() < deadline:
        time.sleep(0.01)  # sleep-ok: polling for the parent's death, with a deadline
    open(out, "w").write("the worker outlived its parent and finished the node kill")
"""


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_node_kill_takes_the_agent_even_when_the_workers_parent_dies_first(tmp_path):
    script, out = tmp_path / "tree.py", tmp_path / "done"
    script.write_text(TREE)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    agent = subprocess.Popen([sys.executable, str(script), "agent", str(out)], env=env, start_new_session=True)
    try:
        assert agent.wait(timeout=60) == -signal.SIGKILL
        pid_file = tmp_path / "done.pid"
        wait_until(pid_file.exists, timeout=10, what="the worker's pid file")
        worker = int(pid_file.read_text())
        wait_until(lambda: out.exists() or _gone(worker), timeout=30, what="the worker to finish")
        assert out.exists(), "the worker was killed with its parent before it finished killing the node"
    finally:
        kill_tree(agent.pid)
