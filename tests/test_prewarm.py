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


def test_prewarmed_worker_sees_what_a_plain_interpreter_sees(fork_server, tmp_path):
    """argv (a script's own -u kept), sys.path (the script's folder first, not the server's
    cwd), cwd, environment, CPU affinity (what --numa-binding sets on the client), umask and
    rlimits: the same for a forked worker as for `python -u script`."""
    import json
    import os
    import resource

    probe = str(REPO / "tests" / "scripts" / "fidelity_probe.py")
    cpu = min(os.sched_getaffinity(0))

    def narrowed():  # what numactl or a scheduler does to a worker before it starts
        os.sched_setaffinity(0, {cpu})
        os.umask(0o027)
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, 512), hard))

    def seen(cmd):
        out = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120, preexec_fn=narrowed,
                             env={**os.environ, "PROBE": "fidelity"})
        assert out.returncode == 0, out.stderr
        return json.loads(next(l for l in out.stdout.splitlines() if l.startswith("PROBE "))[6:])

    args = [probe, "-u", "--x", "-u"]
    plain = seen([sys.executable, "-u", *args])
    forked = seen([sys.executable, "-m", "launcher.prewarm", "run", "--socket", fork_server, "-u", *args])
    assert forked["argv"] == plain["argv"] == args
    assert forked["affinity"] == plain["affinity"] == [cpu]
    assert forked["umask"] == plain["umask"] == 0o027
    assert forked == plain


def test_prewarmed_worker_exits_as_the_interpreter_does(fork_server, tmp_path):
    """A non-daemon thread still running when the script ends is joined, and atexit handlers
    run, before the status goes back (os._exit skipped both: an async save in flight was lost
    and the exit code said 0)."""
    script = tmp_path / "ending.py"
    script.write_text(
        "import atexit, sys, threading\n"
        "atexit.register(lambda: print('atexit ran', flush=True))\n"
        "def late():\n"
        "    threading.main_thread().join()  # runs on after the script's last line\n"
        "    print('thread finished', flush=True)\n"
        "threading.Thread(target=late).start()\n"
        "sys.exit(4)\n")
    for cmd in ([sys.executable, "-u", str(script)],
                [sys.executable, "-m", "launcher.prewarm", "run", "--socket", fork_server, "-u", str(script)]):
        result = run(cmd, timeout=120, cwd=tmp_path)
        assert result.returncode == 4, result.output
        assert result.output.splitlines()[-2:] == ["thread finished", "atexit ran"], result.output
