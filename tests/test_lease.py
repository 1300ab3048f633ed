"""One live job per checkpoint root: the lease (checkpoint/lease.py)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

import psutil
import pytest

from checkpoint.lease import Lease, LeaseHeldError
from procs import TRAIN, finish, ftlaunch_cmd, latest_committed, run, start, train_cmd, wait_for_event


def plant(root, **fields):
    """A lease file as another process would have left it."""
    record = {"host": socket.gethostname(), "pid": 1, "started": psutil.Process(1).create_time(), "run_id": "",
              "generation": 0, "token": "theirs", "since": time.time(), "renewed": time.time(), **fields}
    (root / "lease.json").write_text(json.dumps(record))
    return record


@pytest.fixture
def other_process():
    proc = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    yield proc
    proc.kill()
    proc.wait()


def test_live_holder_is_named_and_refused(tmp_path, other_process):
    plant(tmp_path, pid=other_process.pid, started=psutil.Process(other_process.pid).create_time(), run_id="job-a")
    with pytest.raises(LeaseHeldError, match=rf"in use by another job: pid {other_process.pid} on host "
                                             rf"{socket.gethostname()} since .* \(run id job-a, generation 0\)"):
        Lease(str(tmp_path)).acquire()


@pytest.mark.parametrize("case", ["dead-pid", "reused-pid", "older-generation", "not-renewed"])
def test_dead_holder_is_taken_over(tmp_path, other_process, monkeypatch, case):
    live = {"pid": other_process.pid, "started": psutil.Process(other_process.pid).create_time()}
    if case == "dead-pid":
        other_process.kill()
        other_process.wait()
        plant(tmp_path, **live)
    elif case == "reused-pid":  # the pid runs, but it is not the process that took the lease
        plant(tmp_path, pid=live["pid"], started=live["started"] - 100)
    elif case == "older-generation":
        monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-a")
        monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "3")
        plant(tmp_path, **live, run_id="job-a", generation=2, host="another-node")
    else:
        plant(tmp_path, **live, host="another-node", renewed=time.time() - 120)
    lease = Lease(str(tmp_path)).acquire()
    try:
        assert json.loads((tmp_path / "lease.json").read_text())["token"] == lease.record["token"]
        lease.check()
    finally:
        lease.release()
    assert not (tmp_path / "lease.json").exists()


def test_frozen_holder_that_lost_its_lease_does_not_commit(tmp_path):
    frozen = Lease(str(tmp_path), ttl=60).acquire()
    frozen._stop.set()  # frozen: no more renewals
    record = json.loads((tmp_path / "lease.json").read_text())
    (tmp_path / "lease.json").write_text(json.dumps({**record, "renewed": time.time() - 120, "pid": 1,
                                                     "host": "elsewhere"}))
    taker = Lease(str(tmp_path), ttl=60).acquire()
    with pytest.raises(LeaseHeldError, match="no longer holds the lease"):
        frozen.check()
    taker.release()


def test_late_renewal_gives_the_lease_up_instead_of_clobbering_a_taker(tmp_path):
    """A holder stopped near its TTL (between its check and its write) must not write its
    record over one that another job may have written meanwhile: it gives the lease up."""
    lease = Lease(str(tmp_path), ttl=60).acquire()
    lease._stop.set()
    lease._renewed -= 50  # as if this process had been stopped for 50 s of its 60 s TTL
    before = (tmp_path / "lease.json").read_text()
    with pytest.raises(LeaseHeldError, match="did not renew it for 50 s"):
        lease._write_renewed()
    assert (tmp_path / "lease.json").read_text() == before  # not written
    with pytest.raises(LeaseHeldError, match="no longer holds the lease"):
        lease.check()
    lease.release()


def test_second_job_on_the_same_root_gets_one_line_and_the_first_is_unharmed(tmp_path):
    ckpt, run_dir, log = tmp_path / "ckpt", tmp_path / "run", tmp_path / "first.log"
    first = start(ftlaunch_cmd(1, "--run-dir", str(run_dir), script=TRAIN,
                               script_args=("--ckpt-dir", str(ckpt), "--max-steps", "3000", "--log-every", "500")), log)
    try:
        wait_for_event(run_dir, "save_commit", timeout=120, procs=first)
        second = run(train_cmd("--ckpt-dir", str(ckpt), "--max-steps", "3000"), timeout=120)
        assert second.returncode == 2, second.tail()
        lines = [l for l in second.output.splitlines() if "error" in l]
        assert len(lines) == 1 and "is in use by another job: pid" in lines[0], second.output
        assert first.poll() is None, "the first job must go on"
    finally:
        psutil.Process(first.pid).kill()  # ftlaunch SIGKILLed: its workers die with it
        finish(first, log, timeout=30)
    third = run(train_cmd("--ckpt-dir", str(ckpt), "--max-steps", "3000", "--log-every", "1000"), timeout=300)
    assert third.returncode == 0, third.tail()
    assert "resumed from step" in third.output
    assert latest_committed(ckpt).step == 3000
