"""Several ftlaunch agents ("nodes") on loopback around one `ftlaunch rendezvous` store: a
node is killed whole (agent, fork server, workers) and the others carry on at the smaller
world size; no sample of an epoch is skipped or seen twice."""

from __future__ import annotations

import sys
from collections import Counter

import pytest

from procs import (REPO, effective_steps, finish, kill_tree, latest_committed, read_events, read_trace, start,
                   wait_for_event, wait_for_file)

TRAIN_SAMPLES, STEPS_PER_EPOCH, EPOCHS = 1438, 23, 6


@pytest.fixture
def rendezvous(tmp_path):
    port_file = tmp_path / "port"
    server = start([sys.executable, "-m", "launcher.cli", "rendezvous", "--port", "0", "--port-file", str(port_file)],
                   tmp_path / "rendezvous.log")
    try:
        wait_for_file(port_file, server)
        yield f"127.0.0.1:{port_file.read_text()}"
    finally:
        kill_tree(server.pid)


def node_cmd(endpoint, tmp_path, i):
    return [sys.executable, "-m", "launcher.cli", "--nnodes", "2:3", "--nproc-per-node", "1",
            "--rdzv-endpoint", endpoint, "--rdzv-id", "multinode-test", "--run-dir", str(tmp_path / f"node{i}"),
            str(REPO / "train.py"), "--ckpt-dir", str(tmp_path / "ckpt"), "--epochs", str(EPOCHS),
            "--save-every-steps", "10", "--keep-last", "0", "--trace-samples", "--run-dir", str(tmp_path / "shared"),
            "--log-every", "50"]


@pytest.mark.parametrize("victim", [2, 0], ids=["a-later-node", "the-first-node"])
def test_node_loss_scales_down_and_every_sample_is_seen_once(rendezvous, tmp_path, victim):
    nodes = {i: start(node_cmd(rendezvous, tmp_path, i), tmp_path / f"node{i}.log") for i in range(3)}
    try:
        # Kill the whole node (its agent, fork server and workers) after the first commit.
        run_dirs = [tmp_path / f"node{i}" for i in range(3)]
        commit = wait_for_event(run_dirs, "save_commit", timeout=180, procs=nodes.values())
        assert commit["step"] == 10
        kill_tree(nodes[victim].pid)
        results = {i: finish(p, tmp_path / f"node{i}.log", timeout=240) for i, p in nodes.items() if i != victim}
    finally:
        for p in nodes.values():
            kill_tree(p.pid)
    for i, result in results.items():
        assert result.returncode == 0, result.tail()
    events = [e for i in results for e in read_events(tmp_path / f"node{i}")]
    rendezvous_sizes = [e["world_size"] for e in sorted(events, key=lambda e: e["time"]) if e["event"] == "rendezvous"]
    assert rendezvous_sizes[0] == 3 and rendezvous_sizes[-1] == 2, rendezvous_sizes  # the scale-down
    resumed = [e for e in events if e["event"] == "resumed"]
    assert resumed and resumed[-1]["world_size"] == 2

    records = effective_steps(read_trace(tmp_path / "shared"))
    for epoch in range(EPOCHS):
        seen = Counter(i for r in records if r["epoch"] == epoch for i in r["idx"])
        assert all(n == 1 for n in seen.values()), f"epoch {epoch}: samples seen twice"
        assert sorted(seen) == list(range(TRAIN_SAMPLES)), f"epoch {epoch}: samples skipped"
    final = latest_committed(tmp_path / "ckpt")
    assert final.step == EPOCHS * STEPS_PER_EPOCH and final.world_size == 2
