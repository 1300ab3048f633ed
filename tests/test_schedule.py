"""Time-based saves under torchrun: rank 0's clock decides and every rank follows, so the
ranks never disagree about a save step (a disagreement would deadlock the save)."""

from __future__ import annotations

import json

from procs import latest_committed, run, torchrun_cmd


def test_time_based_saves_agree_across_ranks(tmp_path):
    ckpt = tmp_path / "ckpt"
    result = run(torchrun_cmd(2, "--ckpt-dir", str(ckpt), "--epochs", "4", "--save-every-steps", "0",
                              "--save-every-seconds", "0.05", "--keep-last", "0"), timeout=180)
    assert result.returncode == 0, result.tail()
    steps = sorted(int(p.name.split("-")[1]) for p in ckpt.glob("step-*") if (p / "manifest.json").exists())
    assert len(steps) >= 3, f"expected several timed saves, got {steps}"
    assert steps[-1] == 92
    final = latest_committed(ckpt)
    assert final.world_size == 2 and final.metadata["test_accuracy"] > 0.5
    # Each commit holds both ranks' shards: both ranks took part in every save.
    for step in steps:
        files = json.loads((ckpt / f"step-{step:08d}" / "manifest.json").read_text())["files"]
        assert {"__0_0.distcp", "__1_0.distcp"} <= set(files), (step, files)
