"""The checkpoint benchmark runs end to end (tiny state) and reports every arm and target."""

from __future__ import annotations

import json
import sys

from procs import REPO, run


def test_checkpoint_bench_small(tmp_path):
    out = tmp_path / "bench"
    result = run([sys.executable, str(REPO / "bench" / "checkpoint_bench.py"), "--state-mb", "4", "--saves", "1",
                  "--save-every", "2", "--rounds", "1", "--loads", "1", "--out", str(out)], timeout=300)
    assert result.returncode == 0, result.tail()
    report = json.loads((out / "checkpoint-bench.json").read_text())
    assert list(report["arms"]) == ["A", "B", "C", "D", "E", "M"]
    for arm in report["arms"].values():
        assert arm["stall_s"] > 0 and arm["durable_s"] >= arm["stall_s"] * 0.5 and arm["load_s"] > 0
        assert arm["bytes"] > 3 * 10**6  # the state really went to disk (M: to shared memory)
    assert 0 < report["arms"]["E"]["staging_bytes"] <= 1.01 * report["state_bytes"]  # this rank's share
    assert len(report["targets"]) == 13 and report["memory_every"] >= 1
    assert 0 < report["ranks_fresh_memcpy_Bps"] and 0 < report["param_bytes"] < report["state_bytes"]
    table = (out / "checkpoint-bench.md").read_text()
    assert "| E: ours, async |" in table and table in result.output.replace("\r", "")
    assert (out / "checkpoint-bench.png").stat().st_size > 10_000
    assert not (out / "ckpt").exists() or not any((out / "ckpt").iterdir())  # checkpoints cleaned up
