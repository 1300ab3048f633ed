"""``ftlaunch --metrics-port``: a real HTTP scrape of a run that has a SIGKILL, before and after
the failure; bad flags and a taken port are one line."""

from __future__ import annotations

import signal
import socket
import urllib.request

from procs import events_of, finish, ftlaunch_cmd, run, start, wait_until, wait_for_event

TIMEOUT = 240


def scrape(port: int) -> dict[str, float]:
    """The endpoint's samples: ``{'ftlaunch_failures_total{kind="signal SIGKILL"}': 1.0, ...}``."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        assert response.status == 200
        text = response.read().decode()
    samples = {}
    for line in text.splitlines():
        if line.startswith("ftlaunch_"):
            name, value = line.rsplit(" ", 1)  # a label value may hold spaces
            samples[name] = float(value)
    return samples


def test_metrics_move_with_a_sigkill(tmp_path):
    run_dir = tmp_path / "run"
    log = tmp_path / "job.log"
    job = start(ftlaunch_cmd(2, "--run-dir", str(run_dir), "--metrics-port", "0",
                             "--inject", "kill:rank=1:step=300", script_args=(
                                 "--ckpt-dir", str(tmp_path / "ckpt"), "--max-steps", "100000",
                                 "--save-every-steps", "20", "--width", "8")), log)
    try:
        port = wait_for_event(run_dir, "metrics", TIMEOUT, job)["port"]
        def beats_past_a_commit() -> bool:
            live = scrape(port)
            return live["ftlaunch_last_committed_step"] >= 20 and live["ftlaunch_step"] >= 20 \
                and live["ftlaunch_steps_per_second"] > 0

        wait_until(beats_past_a_commit, TIMEOUT, job, "a first commit, and the beats past it")
        before = scrape(port)
        assert before["ftlaunch_restarts_total"] == 0 and before["ftlaunch_hangs_total"] == 0
        assert not any(k.startswith("ftlaunch_failures_total") for k in before)
        assert before["ftlaunch_last_committed_step"] >= 20 and before["ftlaunch_save_durable_seconds_count"] >= 1

        # After the SIGKILL: the next generation's first step (the recovery is then complete).
        wait_until(lambda: len(events_of(run_dir, "first_step")) >= 2, TIMEOUT, job, "the restarted first step")
        after = scrape(port)
        assert after["ftlaunch_restarts_total"] == 1
        assert after['ftlaunch_failures_total{kind="signal SIGKILL"}'] == 1
        assert after["ftlaunch_recovery_seconds_count"] == 1 and 0 < after["ftlaunch_recovery_seconds_sum"] < 60
        assert after["ftlaunch_steps_redone_count"] == 1
        assert after["ftlaunch_last_committed_step"] >= before["ftlaunch_last_committed_step"]
    finally:
        job.send_signal(signal.SIGTERM)  # a graceful stop: commit and exit 0
    result = finish(job, log, TIMEOUT)
    assert result.returncode == 0, result.tail()


def test_bad_or_taken_metrics_port_is_one_line(tmp_path):
    result = run(ftlaunch_cmd(1, "--metrics-port", "70000", script_args=("--max-steps", "1")), timeout=60)
    assert result.returncode == 2 and "--metrics-port must be a port number" in result.output, result.output
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run(ftlaunch_cmd(1, "--run-dir", str(tmp_path / "run"), "--metrics-port", str(port),
                                  script_args=("--ckpt-dir", str(tmp_path / "ckpt"), "--max-steps", "1")), timeout=120)
    assert result.returncode == 2, result.tail()
    assert f"ftlaunch: error: --metrics-port {port} on 127.0.0.1: Address already in use" in result.output, result.tail()
