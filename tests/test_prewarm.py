"""The pre-warm fork server runs a script as `python script` would: argv, cwd, environment,
stdout/stderr, exit codes and signal deaths all come through to the client."""

from __future__ import annotations

import subprocess
import sys

import psutil
import pytest

from procs import REPO, kill_tree, run

PROBE = str(REPO / "tests" / "scripts" / "probe.py")


@pytest.fixture(scope="module")
def fork_server(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("fs") / "s.sock")
    server = subprocess.Popen([sys.executable, "-u", "-m", "launcher.prewarm", "serve", "--modules", "torch",
                               "--socket", path], cwd=REPO, start_new_session=True)
    yield path
    kill_tree(server.pid)


def client(socket_path, *args, cwd):
    return run([sys.executable, "-m", "launcher.prewarm", "run", "--socket", socket_path, "-u", PROBE, *args],
               timeout=120, cwd=cwd, env_extra={"PROBE": "hello"})


@pytest.mark.parametrize("how, code", [("0", 0), ("3", 3), ("kill", -9), ("raise", 1)])
def test_worker_runs_like_a_fresh_interpreter(fork_server, tmp_path, how, code):
    result = client(fork_server, how, "--flag", cwd=tmp_path)
    assert result.returncode == code, result.output
    assert f"argv=['{how}', '--flag'] cwd={tmp_path} probe=hello main=__main__" in result.output
    assert "to stderr" in result.output
    if how == "raise":
        assert "ValueError: probe raised" in result.output


def test_killing_the_client_kills_its_worker(fork_server, tmp_path):
    sleeper = tmp_path / "sleeper.py"
    sleeper.write_text("import os, time\nopen('pid', 'w').write(str(os.getpid()))\nprint('up', flush=True)\n"
                       "time.sleep(600)  # sleep-ok: a worker that would outlive its client\n")
    proc = subprocess.Popen([sys.executable, "-m", "launcher.prewarm", "run", "--socket", fork_server, str(sleeper)],
                            cwd=tmp_path, stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert proc.stdout.readline().strip() == "up"
        worker = int((tmp_path / "pid").read_text())
        assert worker != proc.pid
        proc.kill()  # what TorchElastic does to a failed group
        proc.wait(timeout=30)
        psutil.Process(worker).wait(timeout=30)  # raises NoSuchProcess if already gone: also fine
    except psutil.NoSuchProcess:
        pass
    finally:
        kill_tree(proc.pid)
    assert not psutil.pid_exists(worker) or psutil.Process(worker).status() == psutil.STATUS_ZOMBIE


def test_without_a_fork_server_the_client_runs_a_plain_interpreter(tmp_path):
    result = run([sys.executable, "-m", "launcher.prewarm", "run", "--socket", str(tmp_path / "none.sock"),
                  "-u", PROBE, "3"], timeout=120, cwd=tmp_path, env_extra={"PROBE": "plain"})
    assert result.returncode == 3, result.output
    assert "no fork server" in result.output and "probe=plain main=__main__" in result.output
