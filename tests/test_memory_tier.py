"""The memory tier: snapshots in node-local shared memory that a restarted group resumes
from, bit-exactly, without reading the disk; and that are never trusted when torn, damaged
or another root's."""

from __future__ import annotations

import copy
import json
import logging
import os
import signal
import subprocess
import sys

import pytest
import torch

from checkpoint import CheckpointManager
from checkpoint.memory import MemorySnapshots
from conftest import REFERENCE_ARGS, REFERENCE_TIMEOUT
from procs import (REPO, Payload, assert_training_state_equal, events_of, ftlaunch_cmd, kill_tree, latest_committed, load_checkpoint,
                   run, torchrun_cmd)
from test_exact_resume import resumed_steps


def test_killed_workers_resume_from_memory_bit_exactly(reference, tmp_path):
    """Durable saves only at the end; two SIGKILLs. Each restart resumes from the step before
    the kill (the kill fires after a step, before that step's snapshot), from memory, and the
    run ends bit-equal to the uninterrupted reference."""
    _, expected = reference
    ckpt, shm = tmp_path / "ckpt", tmp_path / "shm"
    faults = ["kill:rank=1:step=23", "kill:rank=0:step=41"]
    cmd = torchrun_cmd(2, "--ckpt-dir", str(ckpt), *REFERENCE_ARGS, "--save-every-steps", "200",
                       "--memory-every", "1", "--memory-dir", str(shm),
                       *[a for f in faults for a in ("--inject", f)], max_restarts=len(faults))
    result = run(cmd, timeout=REFERENCE_TIMEOUT)
    assert result.returncode == 0, result.tail()
    assert result.output.count("exitcode: -9") == 2, result.tail()
    assert resumed_steps(result.output) == [22, 40], result.tail()
    assert result.output.count("resumed from the memory snapshot") == 2, result.tail()
    assert "loaded checkpoint" not in result.output  # no disk read
    manifest = latest_committed(ckpt)
    assert manifest.step == 50 and manifest.restart_generation == 2
    assert_training_state_equal(load_checkpoint(ckpt / "step-00000050", tmp_path), expected)
    assert not any(shm.iterdir()), "shared memory left behind after the run finished"


def test_the_default_auto_interval_resumes_from_memory_bit_exactly(reference, tmp_path):
    """train.py's default memory tier ("auto"; a budget that lets this small model snapshot
    every step or two) under ftlaunch: the kill after step 35 resumes from a memory snapshot
    newer than the commit of step 30, and the run ends bit-equal to the reference."""
    _, expected = reference
    ckpt, shm, run_dir = tmp_path / "ckpt", tmp_path / "shm", tmp_path / "run"
    result = run(ftlaunch_cmd(2, "--run-dir", str(run_dir), "--max-restarts", "1",
                              script_args=("--ckpt-dir", str(ckpt), *REFERENCE_ARGS, "--memory-overhead", "0.5",
                                           "--memory-dir", str(shm), "--inject", "kill:rank=1:step=35")),
                 timeout=REFERENCE_TIMEOUT)
    assert result.returncode == 0, result.tail()
    assert "memory tier: a snapshot takes" in result.output and "under 50% of the time" in result.output
    [resumed] = events_of(run_dir, "resumed")
    assert resumed["source"] == "memory" and 30 < resumed["step"] <= 34, resumed
    assert_training_state_equal(load_checkpoint(ckpt / "step-00000050", tmp_path), expected)
    assert not any(shm.iterdir())


def test_ftlaunch_summary_says_the_restart_came_from_memory(reference, tmp_path):
    _, expected = reference
    ckpt, shm, run_dir = tmp_path / "ckpt", tmp_path / "shm", tmp_path / "run"
    result = run(ftlaunch_cmd(2, "--run-dir", str(run_dir), "--max-restarts", "1",
                              script_args=("--ckpt-dir", str(ckpt), *REFERENCE_ARGS, "--save-every-steps", "200",
                                           "--memory-every", "1", "--memory-dir", str(shm),
                                           "--inject", "kill:rank=1:step=23")), timeout=REFERENCE_TIMEOUT)
    assert result.returncode == 0, result.tail()
    assert "rank 1 signal SIGKILL at step 23: resumed from step 22 (memory), 1 steps and" in result.output, result.tail()
    assert [(e["step"], e["source"]) for e in events_of(run_dir, "resumed")] == [(22, "memory")]
    assert_training_state_equal(load_checkpoint(ckpt / "step-00000050", tmp_path), expected)
    assert not any(shm.iterdir())


def test_a_job_that_ends_for_good_commits_its_memory_snapshot_before_exit(reference, tmp_path):
    """No restart left (--max-restarts 0), durable saves every 200 steps: the kill at step 23
    ends the job. ftlaunch's last generation commits the memory snapshot of step 22 and frees
    the shared memory; the job exits 1 and says so. A relaunch resumes from step 22 on disk
    and ends bit-equal to the uninterrupted reference."""
    _, expected = reference
    ckpt, shm = tmp_path / "ckpt", tmp_path / "shm"
    args = ("--ckpt-dir", str(ckpt), *REFERENCE_ARGS, "--save-every-steps", "200", "--memory-every", "1",
            "--memory-dir", str(shm))
    first = run(ftlaunch_cmd(2, "--run-dir", str(tmp_path / "run1"), "--max-restarts", "0",
                             script_args=(*args, "--inject", "kill:rank=1:step=23")), timeout=REFERENCE_TIMEOUT)
    assert first.returncode == 1, first.tail()
    assert "result: failed: all 0 restarts used" in first.output, first.tail()
    assert "memory tier: the snapshot of step 22 was committed to the durable tier before exit" in first.output
    assert "attempts: 1 (0 restarts)" in first.output and "not recovered (no restart followed)" in first.output
    assert latest_committed(ckpt).step == 22
    assert not any(shm.iterdir()), "shared memory left behind"
    second = run(ftlaunch_cmd(2, "--run-dir", str(tmp_path / "run2"), script_args=args), timeout=REFERENCE_TIMEOUT)
    assert second.returncode == 0, second.tail()
    assert "resumed from step 22 (committed checkpoint" in second.output, second.tail()
    assert_training_state_equal(load_checkpoint(ckpt / "step-00000050", tmp_path), expected)


def test_snapshots_an_earlier_run_left_on_the_same_root_are_removed(tmp_path, monkeypatch, caplog):
    """A launcher SIGKILLed (or a node that lost power) leaves its run's snapshots in shared
    memory. The next run on the same root removes them; another root's stay."""
    caplog.set_level(logging.INFO, logger="checkpoint")
    shm = tmp_path / "shm"
    left = {}
    for root, run_id in (("ckpt", "killed-run"), ("other", "other-run")):
        monkeypatch.setenv("TORCHELASTIC_RUN_ID", run_id)
        model, opt, ckpt = _job(tmp_path / root, shm)
        _train(model, opt, ckpt, [1])
        left[root] = ckpt.memory_dir
        ckpt._lease.release()  # the process "dies": no close(), its snapshots stay
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "next-run")
    model, opt, ckpt = _job(tmp_path / "ckpt", shm)
    assert not os.path.exists(left["ckpt"]) and os.path.isdir(left["other"])
    assert f"removed the memory snapshots an earlier run on this root left in {left['ckpt']}" in caplog.text
    ckpt.close()


def _job(root, shm, **options):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    ckpt = CheckpointManager(root, model=model, optimizer=opt, memory_every=1, memory_dir=str(shm), **options)
    return model, opt, ckpt


def _train(model, opt, ckpt, steps) -> dict:
    """Train ``steps`` with a snapshot (and a durable save every 2 steps) per step; the
    weights after each step."""
    after = {}
    for step in steps:
        model(torch.randn(4, 8)).sum().backward()
        opt.step()
        opt.zero_grad()
        ckpt.maybe_save(step)
        after[step] = copy.deepcopy(model.state_dict())
    return after


def _equal(model, weights) -> bool:
    return all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), weights.values()))


def _damage(snapshots: MemorySnapshots, step: int, how: str) -> None:
    """Damage the slot of ``step`` the ways its header can tell: its data cut short (a full
    or meddled-with tmpfs), or its non-tensor part overwritten with junk."""
    slot = snapshots.complete()[step][0]
    path = os.path.join(snapshots.dir, f"slot{slot}.data")
    if how == "truncate":
        os.truncate(path, 100)
        return
    with open(os.path.join(snapshots.dir, f"slot{slot}.json")) as f:
        start, length = json.load(f)["skeleton"]
    with open(path, "r+b") as f:
        f.seek(start)
        f.write(b"\xff" * length)


def test_a_damaged_slot_is_skipped_and_both_damaged_fall_back_to_disk(tmp_path, caplog):
    root, shm = tmp_path / "ckpt", tmp_path / "shm"
    model, opt, ckpt = _job(root, shm, save_every_steps=2)
    after = _train(model, opt, ckpt, range(1, 6))  # durable 2 and 4; memory 4 and 5
    _damage(ckpt._memory.snapshots, 5, "truncate")  # the process "dies" here (no close)

    caplog.set_level(logging.INFO, logger="checkpoint")
    model, opt, again = _job(root, shm, save_every_steps=2)
    assert again.load().step == 4 and again.resumed_from_memory
    assert _equal(model, after[4])
    assert "some memory snapshots are not usable: rank 0: step 5: data shorter than its header says" in caplog.text

    after = _train(model, opt, again, range(5, 7))  # memory 5 and 6 (4 was kept until 6 replaced it)
    for step in (5, 6):
        _damage(again._memory.snapshots, step, "garble")
    caplog.clear()
    model, opt, third = _job(root, shm, save_every_steps=2)
    assert third.load().step == 6 and not third.resumed_from_memory  # the durable commit of step 6
    assert _equal(model, after[6])
    line = [r.getMessage() for r in caplog.records if "not resuming from memory" in r.getMessage()]
    assert len(line) == 1 and "step 5: unreadable" in line[0] and "step 6: unreadable" in line[0], caplog.text
    third.close()
    assert not any(shm.iterdir())


def test_one_copy_per_node_of_the_replicated_state(tmp_path):
    """Under DDP the node's first rank keeps the weights and optimizer state for every rank
    of the node; the others snapshot only their own part and read the rest from its slot of
    the same step. A step that rank lacks, or holds damaged, is no step for the others."""
    shm = tmp_path / "shm"
    leader = MemorySnapshots(str(shm), "/nonexistent-root", "run", 0, 2, "id")
    other = MemorySnapshots(str(shm), "/nonexistent-root", "run", 1, 2, "id", node_copy=(0, ("model", "optim")))

    def state(rank, step):
        return {"model": {"w": torch.full((1 << 20,), float(step))}, "optim": {"state": {0: {"m": torch.full((4,), step)}}},
                "train": {"step": step, "rank": rank}}

    for step in (1, 2, 3):
        assert leader.snapshot(step, state(0, step)) > 4 << 20
        if step < 3:  # rank 1 is killed before its snapshot of step 3
            assert other.snapshot(step, state(1, step)) < 64 << 10  # its own part only
    assert sorted(leader.complete()) == [2, 3] and sorted(other.complete()) == [1, 2]
    assert other.complete()[1][1] == "rank 0's copy of the replicated state lacks it"
    got = other.read(2)
    assert got["train"] == {"step": 2, "rank": 1} and bool((got["model"]["w"] == 2).all())
    assert torch.equal(got["optim"]["state"][0]["m"], torch.full((4,), 2))
    _damage(leader, 2, "truncate")
    assert other.complete()[2][1] == "rank 0's copy of the replicated state: data shorter than its header says"
    # A node lost before the group shrank to 2 ranks left rank 2's slots on this machine.
    MemorySnapshots(str(shm), "/nonexistent-root", "run", 2, 3, "id").snapshot(1, state(2, 1))
    other.remove()
    leader.remove()
    assert sorted(os.listdir(leader.run_dir)) == ["owner.json", "rank2"]
    leader.remove_other_ranks(range(0, 2))  # what the node's first rank does when the job is done
    assert not any(shm.iterdir())


def test_a_worker_that_dies_before_its_first_snapshot_leaves_no_shared_memory(tmp_path):
    """Nothing is made in shared memory before the first snapshot, which writes the run's
    owner.json with it (a directory without one is never cleaned up by a later run)."""
    model, opt, ckpt = _job(tmp_path / "ckpt", tmp_path / "shm")
    ckpt._lease.release()  # the worker "dies" here, without close()
    assert not any((tmp_path / "shm").iterdir())


def test_a_forged_snapshot_never_runs_code(tmp_path, caplog):
    """The newest slot rewritten by someone who can write shared memory: its non-tensor part
    replaced by a pickle that runs a command, the header's size made to match."""
    import pickle

    root, shm, marker = tmp_path / "ckpt", tmp_path / "shm", tmp_path / "pwned"
    model, opt, ckpt = _job(root, shm)
    after = _train(model, opt, ckpt, range(1, 4))
    slot = ckpt._memory.snapshots.complete()[3][0]
    header_path = os.path.join(ckpt._memory.snapshots.dir, f"slot{slot}.json")
    header = json.load(open(header_path))
    start, _ = header["skeleton"]
    data = open(os.path.join(ckpt._memory.snapshots.dir, f"slot{slot}.data"), "rb").read()[:start] + pickle.dumps(Payload(marker))
    open(os.path.join(ckpt._memory.snapshots.dir, f"slot{slot}.data"), "wb").write(data)
    header.update(size=len(data), skeleton=[start, len(data) - start])
    json.dump(header, open(header_path, "w"))

    caplog.set_level(logging.INFO, logger="checkpoint")
    model, opt, again = _job(root, shm)
    assert again.load().step == 2 and again.resumed_from_memory  # the other slot
    assert not marker.exists()
    assert _equal(model, after[2])
    assert "refers to posix.system" in caplog.text
    again.close()


def test_a_root_made_again_never_resumes_from_an_older_jobs_memory(tmp_path, caplog):
    root, shm = tmp_path / "ckpt", tmp_path / "shm"
    model, opt, ckpt = _job(root, shm)
    _train(model, opt, ckpt, range(1, 4))
    ckpt._lease.release()  # the job is gone, its memory is not; the user starts afresh
    import shutil
    shutil.rmtree(root)
    root.mkdir()
    caplog.set_level(logging.INFO, logger="checkpoint")
    model, opt, fresh = _job(root, shm)
    assert fresh.load() is None and not fresh.resumed_from_memory
    assert "taken for another checkpoint root" in caplog.text
    fresh.close()


KILLED_MID_COPY = r"""
import sys, torch
from checkpoint.memory import MemorySnapshots
snapshots = MemorySnapshots(sys.argv[1], "/nonexistent-root", "run", 0, 1, "id")
state = {"w": torch.zeros(20_000_000), "step": 0}
for step in range(1, 1000):
    state["w"].fill_(step)
    state["step"] = step
    snapshots.snapshot(step, state)
    print(step, flush=True)
"""


def test_a_kill_in_the_middle_of_a_copy_leaves_the_other_slot_whole(tmp_path):
    """A real SIGKILL while an 80 MB snapshot is being copied: every slot that still has a
    header holds exactly the state of its step, and at least one does."""
    script = tmp_path / "snap.py"
    script.write_text(KILLED_MID_COPY)
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path / "shm")], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, start_new_session=True)
    try:
        for line in proc.stdout:
            if int(line) >= 3:
                os.kill(proc.pid, signal.SIGKILL)  # copying step 4 (the copy is most of a step)
                break
        assert proc.wait(timeout=60) == -signal.SIGKILL
    finally:
        kill_tree(proc.pid)
    snapshots = MemorySnapshots(str(tmp_path / "shm"), "/nonexistent-root", "run", 0, 1, "id")
    complete = {step: problem for step, (_, problem) in snapshots.complete().items()}
    good = [step for step, problem in complete.items() if problem is None]
    assert good, complete
    for step in good:
        state = snapshots.read(step)
        assert state["step"] == step and bool((state["w"] == step).all())


@pytest.fixture
def tiny_tmpfs(tmp_path):
    """A real 1 MiB tmpfs (needs root and mount; skipped where the machine has neither)."""
    where = tmp_path / "tiny"
    where.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(where)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    yield where
    subprocess.run(["umount", "-l", str(where)], capture_output=True)


def test_shared_memory_too_small_for_two_slots_is_one_line_before_training(tiny_tmpfs, tmp_path):
    result = run([sys.executable, "train.py", "--ckpt-dir", str(tmp_path / "c"), "--width", "64", "--max-steps", "3",
                  "--memory-every", "1", "--memory-dir", str(tiny_tmpfs)], timeout=120)
    assert result.returncode == 2, result.output
    lines = [line for line in result.output.splitlines() if "error" in line]
    assert len(lines) == 1 and "the memory tier needs 2 slots x" in lines[0] and "--shm-size=" in lines[0], result.output
    assert "step 1/" not in result.output and "Traceback" not in result.output


def test_an_unusable_memory_dir_is_one_line(tmp_path):
    """Asked for by number, an unusable directory is an error before training; under "auto"
    (the default) the job trains without the tier and says so in one line."""
    (tmp_path / "a-file").write_text("not a directory")
    args = ["--max-steps", "3", "--memory-dir", str(tmp_path / "a-file")]
    result = run([sys.executable, "train.py", "--ckpt-dir", str(tmp_path / "c"), *args, "--memory-every", "1"],
                 timeout=120)
    assert result.returncode == 2 and "the memory tier cannot use" in result.output, result.output
    assert "Traceback" not in result.output
    result = run([sys.executable, "train.py", "--ckpt-dir", str(tmp_path / "d"), *args], timeout=120)
    assert result.returncode == 0, result.output
    assert result.output.count("the memory tier is off: the memory tier cannot use") == 1, result.output
    assert "finished at step 3" in result.output


FILLS_THE_TMPFS = r"""
import sys, torch
from checkpoint.memory import MemorySnapshots, MemoryTierError
snapshots = MemorySnapshots(sys.argv[1], "/root", "run", 0, 1, "id")
try:
    snapshots.snapshot(1, {"w": torch.ones(1_000_000)})  # 4 MB into 1 MiB
except MemoryTierError as e:
    print("refused:", e)
"""


def test_a_full_tmpfs_is_an_error_not_a_sigbus(tiny_tmpfs, tmp_path):
    script = tmp_path / "fill.py"
    script.write_text(FILLS_THE_TMPFS)
    result = run([sys.executable, str(script), str(tiny_tmpfs)], timeout=60)
    assert result.returncode == 0, result.output  # a write through a mapping of a full tmpfs is a SIGBUS (-7)
    assert "refused: cannot write a memory snapshot of step 1" in result.output and "No space left" in result.output


def test_the_memory_tier_does_not_change_an_adam_run(tmp_path):
    """Sizing the state at start-up must not run DCP's get_state_dict, which steps an empty
    optimizer once to make its state (an Adam's step count would differ)."""
    weights = {}
    for every in (0, 1):
        torch.manual_seed(0)
        model = torch.nn.Linear(8, 2)
        opt = torch.optim.AdamW(model.parameters(), lr=0.01)
        ckpt = CheckpointManager(tmp_path / f"c{every}", model=model, optimizer=opt, memory_every=every,
                                 memory_dir=str(tmp_path / "shm"))
        _train(model, opt, ckpt, range(1, 4))
        weights[every] = copy.deepcopy(model.state_dict())
        ckpt.close()
    assert all(torch.equal(a, b) for a, b in zip(weights[0].values(), weights[1].values()))


def test_a_durable_save_lost_to_the_failure_is_made_after_a_memory_resume(tmp_path):
    """Saves every 2 steps; the save of step 4 fails before its commit (the job dies there).
    The restart resumes from memory at 4 and owes the durable save: step 5 is committed."""
    from checkpoint import Observer

    class FailStep4(Observer):
        def before_commit(self, step):
            if step == 4:
                raise RuntimeError("died before the commit")

    root, shm = tmp_path / "ckpt", tmp_path / "shm"
    # The job dies of it: no failed save is allowed to pass (the default lets training go on).
    model, opt, ckpt = _job(root, shm, save_every_steps=2, observer=FailStep4(), save_failures_allowed=0)
    with pytest.raises(Exception, match="died before the commit"):
        _train(model, opt, ckpt, range(1, 5))
    model, opt, again = _job(root, shm, save_every_steps=2)
    assert again.load().step == 4 and again.resumed_from_memory and again.last_committed == 2
    _train(model, opt, again, [5])
    assert latest_committed(root).step == 5
    again.close()


def _auto_run(tmp_path, name, features, overhead, matmuls, steps):
    """A model of ``features``² weights under memory_every="auto"; each step does ``matmuls``
    512² matmuls of work. The tier's interval after ``steps`` steps, and the steps its slots hold."""
    torch.manual_seed(0)
    model = torch.nn.Linear(features, features)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)  # no optimizer state: the snapshot is the weights
    ckpt = CheckpointManager(tmp_path / name, model=model, optimizer=opt, memory_every="auto",
                             memory_overhead=overhead, memory_dir=str(tmp_path / "shm"))
    work = torch.randn(512, 512)
    for step in range(1, steps + 1):
        for _ in range(matmuls):
            work = torch.tanh(work @ work)
        ckpt.maybe_save(step)
    held = sorted(ckpt._memory.snapshots.complete())
    interval = ckpt._memory.interval
    ckpt.close()
    return interval, held


def test_auto_interval_keeps_snapshots_within_the_overhead_budget(tmp_path, caplog):
    """"auto" snapshots every step while it measures (20 steps), then every N steps, N the
    smallest interval at which the measured snapshot cost stays within the budget."""
    from checkpoint.memory_tier import TUNE_AFTER
    caplog.set_level(logging.INFO, logger="checkpoint")
    # 64 MiB of weights (a copy: over ten ms) next to a step of about a millisecond.
    interval, held = _auto_run(tmp_path, "slow", 4096, 0.5, 1, TUNE_AFTER + 60)
    assert interval > 1, caplog.text
    line = next(r.message for r in caplog.records if "memory tier: a snapshot takes" in r.message)
    assert f"one snapshot every {interval} step(s)" in line and "under 50% of the time" in line
    last = TUNE_AFTER + 60
    due = [s for s in range(TUNE_AFTER + 1, last + 1) if s % interval == 0]
    assert held == ([TUNE_AFTER - 1, TUNE_AFTER] + due)[-2:], (held, interval)  # the two newest snapshots
    # A small model next to a step of a few ms: every step.
    interval, held = _auto_run(tmp_path, "fast", 64, 0.9, 20, TUNE_AFTER + 5)
    assert interval == 1 and held == [TUNE_AFTER + 4, TUNE_AFTER + 5]


@pytest.mark.parametrize("value, message", [("-1", "--memory-every must be auto or an integer >= 0, got '-1'"),
                                            ("often", "--memory-every must be auto or an integer >= 0"),
                                            ("2.5", "--memory-every must be auto or an integer >= 0")])
def test_memory_flags_are_validated(tmp_path, value, message):
    result = run([sys.executable, "train.py", "--ckpt-dir", str(tmp_path / "c"), "--memory-every", value], timeout=60)
    assert result.returncode == 2 and message in result.output, result.output


def test_a_regroup_only_follows_a_change_of_the_group():
    """Which (step, world size, holders) a changed group may resume from memory; an
    unchanged group whose ranks hold no step in common (one rank's tier went off) may not:
    that rank's RNG state would be lost, so it loads from disk as before."""
    from checkpoint.memory_tier import regroup_candidates
    full = lambda rank, size, step: (rank, size, step, True)  # noqa: E731
    # One node, ranks 0 and 1; rank 1's tier went off (only rank 0's full slots remain).
    assert regroup_candidates([[full(0, 2, 7)], [full(0, 2, 7)]], [(0, 2), (0, 2)], 2, None) == []
    # Three nodes of one rank each; the last was lost: world size 3 -> 2.
    lost = [[full(0, 3, 7), full(0, 3, 8)], [full(1, 3, 7), full(1, 3, 8)]]
    assert regroup_candidates(lost, [(0, 1), (1, 1)], 2, None) == [(8, 3, [0, 1]), (7, 3, [0, 1])]
    assert regroup_candidates(lost, [(0, 1), (1, 1)], 2, 8) == [(8, 3, [0, 1])]  # none older than the disk
    # The first node was lost and a new one took its place: world size 2 again, ranks renumbered.
    renumbered = [[full(1, 2, 8)], []]
    assert regroup_candidates(renumbered, [(0, 1), (1, 1)], 2, None) == [(8, 2, [0])]
    # A node joined two that keep their numbers: world size 2 -> 3, the new node holds nothing.
    joined = [[full(0, 2, 9)], [full(1, 2, 9)], []]
    assert regroup_candidates(joined, [(0, 1), (1, 1), (2, 1)], 3, None) == [(9, 2, [0, 1])]
    # Slots that are not the replicated state in full (another rank's node copy, or per-rank state).
    assert regroup_candidates([[(1, 3, 8, False)], [(2, 3, 8, False)]], [(0, 1), (1, 1)], 2, None) == []
