"""Checkpoints on S3, against a real S3-compatible server on loopback (moto's, in a process of
its own: ``tests/s3.py``): exact resume after a SIGKILL, the server killed in the middle of an
upload and back, damaged objects skipped at discovery, a bucket that does not exist."""

from __future__ import annotations

import json
import re
import shutil
import socket
import sys

import pytest

pytest.importorskip("s3fs")
pytest.importorskip("moto")

from checkpoint import Storage, find_latest, step_dir_name, verify  # noqa: E402
from conftest import REFERENCE_ARGS, REFERENCE_TIMEOUT as TIMEOUT  # noqa: E402
from procs import (assert_training_state_equal, finish, kill_tree, load_checkpoint, run, start,  # noqa: E402
                   torchrun_cmd, train_cmd, wait_until)
from s3 import S3Server  # noqa: E402

BUCKET = "ckpts"
# Synchronous saves: the tests assert which step a restart resumes from (as test_exact_resume).
# No memory tier: the resume must come from S3.
ARGS = [*REFERENCE_ARGS, "--async-save", "off", "--memory-every", "0"]


@pytest.fixture
def s3(tmp_path, monkeypatch):
    """A fresh server with one bucket; this test process and the jobs it starts reach it
    through the standard AWS variables."""
    server = S3Server(tmp_path).start()
    try:
        for name, value in server.env().items():
            monkeypatch.setenv(name, value)
        server.make_bucket(BUCKET)
        yield server
    finally:
        server.kill()


def download(server: S3Server, url: str, tmp_path) -> object:
    """A checkpoint directory on S3, copied to the local disk, as the oracle's dict."""
    local = tmp_path / url.rstrip("/").rsplit("/", 1)[-1]
    server.client().get(url.removeprefix("s3://") + "/", str(local), recursive=True)
    return load_checkpoint(local, tmp_path)


def test_sigkilled_worker_resumes_bit_exactly_from_s3(reference, s3, tmp_path):
    _, expected = reference
    root = f"s3://{BUCKET}/exact"
    result = run(torchrun_cmd(2, "--ckpt-dir", root, "--run-dir", str(tmp_path / "run"), *ARGS,
                              "--inject", "kill:rank=1:step=35", max_restarts=1), timeout=TIMEOUT)
    assert result.returncode == 0, result.tail()
    assert "exitcode: -9" in result.output and re.findall(r"resumed from step (\d+)", result.output) == ["30"], \
        result.tail()
    manifest = find_latest(Storage(root), "hash")  # every crc32 recomputed from the objects
    assert manifest.step == 50 and manifest.restart_generation == 1
    assert_training_state_equal(download(s3, f"{root}/{step_dir_name(50)}", tmp_path), expected)


def test_server_killed_mid_upload_costs_that_save_only(reference, tmp_path, monkeypatch):
    """The server dies in the middle of the upload of step 20: that save fails in one line and
    commits nothing, step 10 stays loadable, training goes on; the server comes back with what
    it held, and the later saves commit. The final state equals the uninterrupted run's."""
    _, expected = reference
    server = S3Server(tmp_path).start(die_on_put=f"{step_dir_name(20)}/")
    try:
        for name, value in server.env().items():  # the port stays the same across the restart
            monkeypatch.setenv(name, value)
        server.make_bucket(BUCKET)
        root = f"s3://{BUCKET}/outage"
        log = tmp_path / "job.log"
        job = start(torchrun_cmd(2, "--ckpt-dir", root, "--run-dir", str(tmp_path / "run"), *REFERENCE_ARGS,
                                 "--memory-every", "0"), log)
        wait_until(lambda: server.proc.poll() is not None, TIMEOUT, job, "the server's death mid-upload")
        wait_until(lambda: "background save of step 20 failed" in log.read_text(), TIMEOUT, job,
                   "the failed save's line")
        server.start()  # the same port, with the objects it held before
        result = finish(job, log, TIMEOUT)
        assert result.returncode == 0, result.tail()

        failures = [line for line in result.output.splitlines() if "save of step 20 failed" in line]
        assert len(failures) == 2, failures  # the moment it failed (rank 0), and the count at the next save
        assert "nothing of it committed; the previous commit stays" in failures[0]
        assert "training goes on" in failures[1]
        storage = Storage(root)
        assert not storage.exists(storage.join(step_dir_name(20), "manifest.json"))
        assert verify(storage, step_dir_name(10), "hash")[1] is None  # the previous commit, intact
        manifest = find_latest(storage, "hash")
        assert manifest.step == 50
        assert_training_state_equal(download(server, f"{root}/{step_dir_name(50)}", tmp_path), expected)
    finally:
        server.kill()


def test_truncated_and_missing_objects_are_skipped_at_discovery(s3, tmp_path):
    root = f"s3://{BUCKET}/damaged"
    args = ["--ckpt-dir", root, "--max-steps", "30", "--save-every-steps", "10", "--keep-last", "0",
            "--width", "8", "--memory-every", "0", "--async-save", "off"]
    first = run(train_cmd(*args), timeout=TIMEOUT)
    assert first.returncode == 0, first.tail()
    client = s3.client()
    prefix = f"{BUCKET}/damaged"
    shard30 = f"{prefix}/{step_dir_name(30)}/__0_0.distcp"
    client.pipe_file(shard30, client.cat_file(shard30)[:100])  # truncated
    client.rm(f"{prefix}/{step_dir_name(20)}/__0_0.distcp")  # missing

    # ftckpt sees the same on S3 as discovery will.
    listed = run([sys.executable, "-m", "checkpoint.cli", "ls", root, "--json"], timeout=120)
    assert listed.returncode == 0, listed.tail()
    assert {r["step"]: r["state"] for r in json.loads(listed.output)} == {10: "committed", 20: "corrupt",
                                                                          30: "corrupt"}
    checked = run([sys.executable, "-m", "checkpoint.cli", "verify", root, "--hash"], timeout=120)
    assert checked.returncode == 1 and "1 of 3 committed checkpoint(s) verify" in checked.output, checked.output

    again = run(train_cmd(*args), timeout=TIMEOUT)
    assert again.returncode == 0, again.tail()
    skipped = [line for line in again.output.splitlines() if "skipping checkpoint" in line]
    assert len(skipped) == 2, again.tail()
    assert "step-00000030/__0_0.distcp: 100 bytes, the commit record says" in skipped[0], skipped
    assert "step-00000020/__0_0.distcp: listed in the commit record but missing" in skipped[1], skipped
    assert "resumed from step 10" in again.output, again.tail()
    assert find_latest(Storage(root), "hash").step == 30  # saved again over the damaged one


def test_a_bucket_that_does_not_exist_is_one_line(s3, tmp_path):
    result = run(train_cmd("--ckpt-dir", "s3://no-such-bucket/x", "--max-steps", "5",
                           "--run-dir", str(tmp_path)), timeout=120)
    assert result.returncode != 0
    errors = [line for line in result.output.splitlines() if "error" in line.lower()]
    assert errors and "bucket 'no-such-bucket' does not exist; create it first" in errors[-1], result.tail()
    assert not s3.client().exists("no-such-bucket")  # not created behind the user's back

    # An endpoint nobody listens on is said so, not "no such bucket".
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    result = run(train_cmd("--ckpt-dir", f"s3://{BUCKET}/x", "--max-steps", "5", "--run-dir", str(tmp_path)),
                 timeout=180, env_extra={"AWS_ENDPOINT_URL": f"http://127.0.0.1:{closed}", "AWS_MAX_ATTEMPTS": "1"})
    assert result.returncode != 0
    errors = [line for line in result.output.splitlines() if "error" in line.lower()]
    assert errors and "cannot reach the bucket of checkpoint root" in errors[-1], result.tail()


def test_a_fresh_node_resumes_from_the_mirror_bit_exactly(reference, s3, tmp_path):
    """--ckpt-dir local, --mirror on S3. The job freezes at step 35 (rank 1 SIGSTOPs itself; rank
    0 waits in the all-reduce while its mirror thread goes on); once step 30 is on the mirror it
    is SIGKILLed whole: the node is lost, its disk with it. The same command on an empty local
    root resumes from the mirror's step 30 and ends bit-equal to an uninterrupted run; the
    mirror then holds step 50 too."""
    _, expected = reference
    local, mirror = tmp_path / "local", f"s3://{BUCKET}/mirror"
    args = ["--ckpt-dir", str(local), "--mirror", mirror, "--run-dir", str(tmp_path / "run"), *ARGS]
    log = tmp_path / "first.log"
    job = start(torchrun_cmd(2, *args, "--inject", "hang:rank=1:step=35"), log)
    try:
        client = s3.client()
        wait_until(lambda: client.exists(f"{BUCKET}/mirror/{step_dir_name(30)}/manifest.json"), TIMEOUT, job,
                   "step 30 on the mirror")
    finally:
        kill_tree(job.pid)
        job.wait(timeout=60)
    shutil.rmtree(local)

    result = run(torchrun_cmd(2, *args), timeout=TIMEOUT)
    assert result.returncode == 0, result.tail()
    assert re.findall(r"resumed from step (\d+)", result.output) == ["30"], result.tail()
    assert f"loaded checkpoint step 30 from {mirror}/{step_dir_name(30)}" in result.output, result.tail()
    assert_training_state_equal(load_checkpoint(local / step_dir_name(50), tmp_path), expected)
    assert find_latest(Storage(mirror), "hash").step == 50  # the last commit got there before the exit
    assert_training_state_equal(download(s3, f"{mirror}/{step_dir_name(50)}", tmp_path), expected)
