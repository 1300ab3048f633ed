"""``ftlaunch report``: the timeline picture and Markdown of a real run with a SIGKILL, checked
by what the picture shows (its pixels), not only that a file appeared."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from procs import ftlaunch_cmd, run

pytest.importorskip("matplotlib")

RED = (214, 39, 40)  # matplotlib's tab:red: a failure
GEN0_BAR = tuple(0.7 * c + 0.3 * 255 for c in (31, 119, 180))  # tab:blue at alpha 0.7 on white
GEN1_BAR = tuple(0.7 * c + 0.3 * 255 for c in (255, 127, 14))  # tab:orange at alpha 0.7
COMMIT = (44, 160, 44)  # tab:green ticks


def pixels(png, rgb, tol: int = 12) -> int:
    import matplotlib.image

    image = matplotlib.image.imread(str(png))[..., :3] * 255
    return int((np.abs(image - np.array(rgb)).max(axis=2) <= tol).sum())


def report(run_dir, out):
    return run([sys.executable, "-m", "launcher.cli", "report", str(run_dir), "-o", str(out)], timeout=120)


def test_report_of_a_run_with_a_sigkill(tmp_path):
    run_dir = tmp_path / "run"
    job = run(ftlaunch_cmd(2, "--run-dir", str(run_dir), "--inject", "kill:rank=1:step=30", script_args=(
        "--ckpt-dir", str(tmp_path / "ckpt"), "--max-steps", "60", "--save-every-steps", "10", "--width", "8")),
        timeout=240)
    assert job.returncode == 0, job.tail()
    png = tmp_path / "run.png"
    result = report(run_dir, png)
    assert result.returncode == 0, result.tail()
    md = (tmp_path / "run.md").read_text()
    assert "![timeline](run.png)" in md and "failures: 1 x signal SIGKILL" in md and "result: succeeded" in md
    assert pixels(png, RED) > 100  # the failure's line and label
    assert pixels(png, GEN0_BAR) > 2000 and pixels(png, GEN1_BAR) > 2000  # two generations
    assert pixels(png, COMMIT) > 50

    # The same run with its failure taken out of the events: no red anywhere.
    clean = tmp_path / "clean"
    clean.mkdir()
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    (clean / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events
                                                if e["event"] not in ("worker_failed", "hang_detected")))
    assert report(clean, tmp_path / "clean.png").returncode == 0
    assert pixels(tmp_path / "clean.png", RED) == 0


def test_report_of_a_directory_that_is_not_a_run_is_one_line(tmp_path):
    result = report(tmp_path, tmp_path / "x.png")
    assert result.returncode == 2
    assert result.output.strip().count("\n") == 0 and "give an ftlaunch --run-dir" in result.output, result.output
