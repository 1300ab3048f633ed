"""Save at 2 workers, resume at 1: the epoch goes on from the same global position, so every
sample of the epoch is trained on exactly once, summed over both runs and all ranks."""

from __future__ import annotations

from procs import DIGITS_TRAIN_SAMPLES, assert_each_sample_once, effective_steps, latest_committed, load_checkpoint, read_trace, run, torchrun_cmd

STEPS_PER_EPOCH = 23  # ceil(1438 / 64)


def test_two_workers_then_one_sees_every_sample_once(tmp_path):
    ckpt = tmp_path / "ckpt"
    total = 3 * STEPS_PER_EPOCH
    common = ["--ckpt-dir", str(ckpt), "--trace-samples", "--save-every-steps", "10", "--max-steps", str(total)]
    # Two workers die at step 33 (a worker raises; nothing restarts them): step 30 is the
    # newest commit, 7 steps into epoch 1. Then one worker carries on from there to the end.
    first = run(torchrun_cmd(2, *common, "--inject", "raise:rank=0:step=33"), timeout=180)
    assert first.returncode != 0 and "injected fault at step 33" in first.output, first.tail()
    second = run(torchrun_cmd(1, *common), timeout=180)
    assert second.returncode == 0, second.tail()
    assert "resumed from step 30 (committed checkpoint, saved at world size 2; now 1)" in second.output

    all_records = read_trace(tmp_path / "ckpt")
    # 31..33 were lost; rank 1 has normally begun step 34 (a step is traced before it runs)
    # by the time torchrun stops it.
    assert max(r["step"] for r in all_records if r["resumed_from"] == 0) in (33, 34)
    records = effective_steps(all_records)
    assert_each_sample_once(records, 3)
    # The epoch that changed world size really was split across both runs and world sizes.
    assert {r["resumed_from"] for r in records if r["epoch"] == 1} == {0, 30}
    assert {r["step"] for r in records} == set(range(1, total + 1))

    final = latest_committed(ckpt)
    assert final.step == total and final.world_size == 1
    state = load_checkpoint(ckpt / f"step-{final.step:08d}", tmp_path)
    assert state["progress"]["samples_seen"] == 3 * DIGITS_TRAIN_SAMPLES
    assert (state["data"]["epoch"], state["data"]["position"]) == (3, 0)
