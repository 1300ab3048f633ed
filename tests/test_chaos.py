"""The chaos campaign's fixed-seed smoke: every fault kind once or more, on train.py and on a
plain DDP script that uses only the checkpoint library, judged by bench/chaos.py's oracle
(honest exit, bitwise-equal final state, no verified checkpoint lost, no damaged one loaded,
no forged one run, no process left). `make chaos` runs the full campaign."""

from __future__ import annotations

import json
import os
import sys

import pytest

from procs import REPO, run

SMOKE_EPISODES = 16


@pytest.mark.skipif(os.geteuid() != 0, reason="two kinds need root: a tmpfs (disk full) and a network namespace (net cut)")
@pytest.mark.timeout(1800)  # about 16 x 25 s here; the suite's default per-test limit is 300 s
def test_chaos_smoke(tmp_path):
    result = run([sys.executable, str(REPO / "bench" / "chaos.py"), "--episodes", str(SMOKE_EPISODES), "--seed", "7",
                  "--out", str(tmp_path)], timeout=1500)
    episodes = [json.loads(line) for line in (tmp_path / "episodes.jsonl").read_text().splitlines()]
    assert len(episodes) == SMOKE_EPISODES, result.tail()
    kinds = {e["kind"] for e in episodes if "skipped" not in e}
    assert len(kinds) == 14, kinds  # every kind: a whole node killed and a network cut included
    assert {e["script"] for e in episodes} == {"train", "plain"}
    bad = [e for e in episodes if e.get("violations")]
    # A bad episode's folder is kept: its job's log says what the job did (CI keeps no files).
    logs = "".join(f"\n--- the end of episode {e['episode']}'s log ---\n" + "\n".join(
        (tmp_path / f"ep{e['episode']:04d}" / "log").read_text(errors="replace").splitlines()[-80:]) for e in bad)
    assert not bad, "\n".join(f"{e['kind']} ({e['script']}): {e['violations']}" for e in bad) + "\n" + result.tail() + logs
    assert result.returncode == 0, result.tail()
    assert "16 episodes, 16 without violations, 0 with" in result.output
