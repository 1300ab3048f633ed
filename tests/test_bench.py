"""The checkpoint benchmark runs end to end (tiny state) and reports every arm and target."""

from __future__ import annotations

import json
import sys

import pytest

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
    for name in "DE":  # each save against a write of as many bytes next to it
        arm = report["arms"][name]
        assert len(arm["writes_s"]) == len(arm["durables_s"]) == 1 and arm["durable_vs_write"] > 0
    E = report["arms"]["E"]  # its stall against a memcpy of the bytes it staged, next to it
    assert len(E["memcpys_s"]) == len(E["memcpys_with_after_s"]) == len(E["stalls_s"]) == 1
    assert E["stall_vs_memcpy_with_after"] >= E["stall_vs_memcpy"] > 0  # the faster of more copies: a bound no weaker
    assert len(report["targets"]) == 13 and report["memory_every"] >= 1
    assert 0 < report["ranks_fresh_memcpy_Bps"] and 0 < report["param_bytes"] < report["state_bytes"]
    table = (out / "checkpoint-bench.md").read_text()
    assert "| E: ours, async |" in table and table in result.output.replace("\r", "")
    assert (out / "checkpoint-bench.png").stat().st_size > 10_000
    assert not (out / "ckpt").exists() or not any((out / "ckpt").iterdir())  # checkpoints cleaned up


@pytest.mark.timeout(660)
def test_size_sweep_fits_exponents_and_checks_targets_at_every_size(tmp_path):
    out = tmp_path / "sweep"
    result = run([sys.executable, str(REPO / "bench" / "checkpoint_bench.py"), "--sizes", "4,12", "--saves", "1",
                  "--save-every", "2", "--rounds", "1", "--loads", "1", "--out", str(out)], timeout=600)
    assert result.returncode == 0, result.tail()
    sweep = json.loads((out / "checkpoint-sweep.json").read_text())
    assert len(sweep["sizes"]) == 2 and sweep["sizes"][0] < sweep["sizes"][1]
    assert set(sweep["exponents"]) == {"A", "B", "C", "D", "E", "M"}
    assert all(set(k) == {"stall_s", "durable_s", "load_s"} for k in sweep["exponents"].values())
    table = (out / "checkpoint-sweep.md").read_text()
    assert table.count("yes") + table.count("NO") == 12  # 6 targets at each of the 2 sizes
    assert (out / "checkpoint-sweep.png").stat().st_size > 10_000
    assert (out / "checkpoint-bench-4MB.md").exists() and (out / "checkpoint-bench-12MB.md").exists()


@pytest.mark.parametrize("sizes", ["400", "100,100", "100,nan", "100,-4", "a,b"])
def test_size_sweep_refuses_nonsense_sizes(tmp_path, sizes):
    result = run([sys.executable, str(REPO / "bench" / "checkpoint_bench.py"), "--sizes", sizes, "--out", str(tmp_path)],
                 timeout=60)
    assert result.returncode == 2 and "--sizes takes two or more different positive sizes" in result.output, result.output
