"""Several ftlaunch agents ("nodes") on loopback around one `ftlaunch rendezvous` store: a
node is killed whole (agent, fork server, workers) and the others carry on at the smaller
world size; no sample of an epoch is skipped or seen twice."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest

from procs import (DIGITS_TRAIN_SAMPLES, REPO, assert_each_sample_once, network_namespace, effective_steps, finish, kill_tree, latest_committed, load_checkpoint, read_events, read_trace,
                   start, wait_for_event, wait_for_file, wait_until)

STEPS_PER_EPOCH, EPOCHS = 23, 6


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


def node_cmd(endpoint, tmp_path, i, *launch_args, script_args=()):
    return [sys.executable, "-m", "launcher.cli", "--nnodes", "2:3", "--nproc-per-node", "1", *launch_args,
            "--rdzv-endpoint", endpoint, "--rdzv-id", "multinode-test", "--run-dir", str(tmp_path / f"node{i}"),
            str(REPO / "train.py"), "--ckpt-dir", str(tmp_path / "ckpt"), "--epochs", str(EPOCHS),
            "--save-every-steps", "10", "--keep-last", "0", "--trace-samples", "--run-dir", str(tmp_path / "shared"),
            "--log-every", "50", *script_args]


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
    assert_each_sample_once(records, EPOCHS)
    final = latest_committed(tmp_path / "ckpt")
    assert final.step == EPOCHS * STEPS_PER_EPOCH and final.world_size == 2
    state = load_checkpoint(tmp_path / "ckpt" / f"step-{final.step:08d}", tmp_path)  # it loads
    assert state["progress"]["samples_seen"] == EPOCHS * DIGITS_TRAIN_SAMPLES


@pytest.mark.parametrize("victim", [2, 0], ids=["rank-2", "rank-0"])
def test_survivors_of_a_lost_node_resume_from_memory_at_the_smaller_world_size(rendezvous, tmp_path, victim):
    """Each node has memory of its own (--memory-dir per node, as /dev/shm is per machine) and
    no durable save is due before the end. A node dies whole right after step 30; the two
    survivors hold snapshots of step 30 (the replicated state, and their own RNG states), so
    they resume from them at world size 2, without reading the disk and without redoing a
    step; every sample of every epoch is still seen once. New rank i restores old rank i's
    RNG state, fetched from whichever survivor holds it; when the lost node was rank 0, new
    rank 0 starts a fresh stream instead, and says so."""
    script = lambda i: ("--memory-every", "1", "--memory-dir", str(tmp_path / f"shm{i}"),  # noqa: E731
                        "--save-every-steps", "1000", "--inject", f"kill-node:rank={victim}:step=30")
    nodes = {i: start(node_cmd(rendezvous, tmp_path, i, script_args=script(i)), tmp_path / f"node{i}.log")
             for i in range(3)}
    try:
        for p in nodes.values():
            try:
                p.wait(timeout=300)
            except subprocess.TimeoutExpired:
                pass
    finally:
        for p in nodes.values():
            kill_tree(p.pid)
    codes = {i: p.returncode for i, p in nodes.items()}
    assert sorted(codes.values()) == [-signal.SIGKILL, 0, 0], codes
    survivors = [i for i, code in codes.items() if code == 0]
    logs = "".join((tmp_path / f"node{i}.log").read_text() for i in survivors)
    assert "resumed from the memory snapshots of step 30 taken at world size 3, now 2" in logs, logs[-3000:]
    fresh = "rank(s) [0] start a fresh RNG stream (their predecessors' states were on a lost node)"
    assert ("fresh RNG stream" in logs) == (victim == 0) and (fresh in logs or victim != 0), logs[-3000:]
    assert "loaded checkpoint" not in logs
    events = [e for i in survivors for e in read_events(tmp_path / f"node{i}")]
    resumed = [e for e in events if e["event"] == "resumed"]
    assert resumed and {(e["step"], e["source"], e["world_size"]) for e in resumed} == {(30, "memory", 2)}, resumed

    records = effective_steps(read_trace(tmp_path / "shared"))
    assert_each_sample_once(records, EPOCHS)
    final = latest_committed(tmp_path / "ckpt")
    assert final.step == EPOCHS * STEPS_PER_EPOCH and final.world_size == 2
    for i in survivors:  # freed at the end; the lost node's memory went with it
        assert not any((tmp_path / f"shm{i}").iterdir())


def test_a_node_that_joins_gets_the_state_from_the_others_memory(rendezvous, tmp_path):
    """Scale-up: two nodes train (memory tier every 5 steps, no durable save before the end);
    a third node joins, the two nodes' workers put the step they reached in the memory tier
    and pause, TorchElastic restarts the group at world size 3, and it resumes from that
    step, the new node getting the state from rank 0's snapshot over the network: no disk
    read, no step run twice, and every sample of every epoch seen once."""
    epochs = 40
    script = lambda i: ("--memory-every", "5", "--memory-dir", str(tmp_path / f"shm{i}"),  # noqa: E731
                        "--save-every-steps", "100000", "--epochs", str(epochs))
    nodes = {i: start(node_cmd(rendezvous, tmp_path, i, script_args=script(i)), tmp_path / f"node{i}.log")
             for i in (0, 1)}
    try:
        wait_for_event([tmp_path / "node0", tmp_path / "node1"], "first_step", timeout=180, procs=nodes.values())
        nodes[2] = start(node_cmd(rendezvous, tmp_path, 2, script_args=script(2)), tmp_path / "node2.log")
        results = {i: finish(p, tmp_path / f"node{i}.log", timeout=300) for i, p in nodes.items()}
    finally:
        for p in nodes.values():
            kill_tree(p.pid)
    for result in results.values():
        assert result.returncode == 0, result.tail()
    logs = "".join(r.output for r in results.values())
    assert "taken at world size 2, now 3" in logs and "got the state from rank" in logs, logs[-4000:]
    assert "loaded checkpoint" not in logs
    events = [e for i in nodes for e in read_events(tmp_path / f"node{i}")]
    resumed = [e for e in events if e["event"] == "resumed"]
    assert resumed and all((e["source"], e["world_size"]) == ("memory", 3) for e in resumed), resumed
    # Both nodes' workers paused at the step the group of 3 resumed from (the agent that saw
    # the join first asked; the other one may have seen that agent restart first).
    paused = [e for e in events if e["event"] == "paused"]  # rank 0's
    assert [e["step"] for e in paused] == [resumed[0]["step"]], (paused, resumed)
    assert [e["step"] for e in events if e["event"] == "workers_paused"][:1] == [resumed[0]["step"]], events
    assert not [e for e in events if e["event"] in ("node_left", "pause_failed", "worker_failed")], events

    launches: dict[int, set] = {}  # step -> the generations that traced it
    for record in read_trace(tmp_path / "shared"):
        launches.setdefault(record["step"], set()).add(record["launch"])
    assert not [step for step, gens in launches.items() if len(gens) > 1], "a step ran twice"

    assert_each_sample_once(effective_steps(read_trace(tmp_path / "shared")), epochs)
    final = latest_committed(tmp_path / "ckpt")
    assert final.step == epochs * STEPS_PER_EPOCH and final.world_size == 3
    for i in nodes:
        assert not any((tmp_path / f"shm{i}").iterdir())


def test_cluster_command_kill_and_restart_a_node(tmp_path):
    """`ftlaunch cluster`: 3 nodes up; node 1 killed -> 2 nodes go on; node 1 started again ->
    the group grows back to 3; the run completes with every sample of every epoch once."""
    cluster_dir = tmp_path / "cluster"
    ckpt, shared = tmp_path / "ckpt", tmp_path / "shared"
    epochs = 100  # long enough to still run when the replacement node has joined
    up = start([sys.executable, "-m", "launcher.cli", "cluster", "up", "--dir", str(cluster_dir), "--nodes", "3", "--",
                "--nproc-per-node", "1", str(REPO / "train.py"), "--ckpt-dir", str(ckpt), "--epochs", str(epochs),
                "--save-every-steps", "10", "--keep-last", "0", "--trace-samples", "--run-dir", str(shared),
                "--log-every", "50"], tmp_path / "up.log")
    control = [sys.executable, "-m", "launcher.cli", "cluster"]
    node_dirs = [cluster_dir / f"node{i}" for i in range(3)]
    try:
        wait_for_event(node_dirs, "save_commit", timeout=180, procs=up)
        run_checked(control + ["kill", "--dir", str(cluster_dir), "--node", "1"])
        wait_for(lambda: world_sizes(node_dirs)[-1:] == [2], up)
        run_checked(control + ["start", "--dir", str(cluster_dir), "--node", "1"])
        wait_for(lambda: world_sizes(node_dirs)[-1:] == [3], up)
        result = finish(up, tmp_path / "up.log", timeout=240)
    finally:
        kill_tree(up.pid)
    assert result.returncode == 0, result.tail()
    sizes = world_sizes(node_dirs)
    assert sizes[0] == 3 and 2 in sizes and sizes[-1] == 3, sizes
    records = effective_steps(read_trace(shared))
    assert_each_sample_once(records, epochs)
    final = latest_committed(ckpt)
    assert final.step == epochs * STEPS_PER_EPOCH and final.world_size == 3


def run_checked(cmd):
    """Run a control command; fail the test unless it exits 0."""
    from procs import run

    result = run(cmd, timeout=60)
    assert result.returncode == 0, result.output
    return result


def world_sizes(node_dirs) -> list[int]:
    """World size of each rendezvous, in time order, from every node's events."""
    events = [e for d in node_dirs if (d / "events.jsonl").exists() for e in read_events(d)]
    return [e["world_size"] for e in sorted(events, key=lambda e: e["time"]) if e["event"] == "rendezvous"]


def wait_for(condition, proc, timeout=120):
    wait_until(condition, timeout, proc, "the condition", poll=0.1)


def test_node_killed_during_a_save_never_leaves_a_loaded_partial(rendezvous, tmp_path):
    """Rank 1's whole node dies after the shards of step 20 are written, before the commit:
    the survivors resume from step 10, never from the partial step 20. (The durable tier
    alone: with the memory tier the survivors would resume from their snapshots instead.)"""
    inject = ("--inject", "kill-node-before-commit:rank=1:step=20")
    nodes = {i: start(node_cmd(rendezvous, tmp_path, i, *inject, script_args=("--memory-every", "0")),
                      tmp_path / f"node{i}.log") for i in range(3)}
    try:
        results = {}
        for i, proc in nodes.items():
            results[i] = finish(proc, tmp_path / f"node{i}.log", timeout=240)
    finally:
        for p in nodes.values():
            kill_tree(p.pid)
    killed = [i for i, r in results.items() if r.returncode == -signal.SIGKILL]  # its agent was SIGKILLed
    assert len(killed) == 1, {i: (r.returncode, r.tail(5)) for i, r in results.items()}
    assert (tmp_path / "shared" / "faults" / "kill-node-before-commit.rank1.step20.fired").exists()
    survivors = [r for i, r in results.items() if i != killed[0]]
    assert all(r.returncode == 0 for r in survivors), [r.tail() for r in survivors]
    output = "\n".join(r.output for r in survivors)
    assert "resumed from step 10 (committed checkpoint, saved at world size 3; now 2)" in output
    assert "skipping checkpoint" in output and "step-00000020/manifest.json: no commit record" in output
    assert latest_committed(tmp_path / "ckpt").world_size == 2


@pytest.fixture
def netns_node():
    """A network namespace joined to this one by a veth pair: a "node" whose link we can cut.
    Needs root and iproute2; skipped with the reason elsewhere."""
    with network_namespace() as net:
        if isinstance(net, str):
            pytest.skip(net)
        yield net


def test_node_whose_link_is_cut_is_detected_and_the_group_recovers(netns_node, tmp_path):
    import subprocess

    net = netns_node
    port_file = tmp_path / "port"
    store = start([sys.executable, "-m", "launcher.cli", "rendezvous", "--host", net["host_ip"], "--port", "0",
                   "--port-file", str(port_file)], tmp_path / "rendezvous.log")
    nodes = {}
    try:
        wait_for_file(port_file, store)
        endpoint = f"{net['host_ip']}:{port_file.read_text()}"

        def cmd(i, addr, ifname, prefix=()):
            base = node_cmd(endpoint, tmp_path, i, "--local-addr", addr, "--hang-timeout", "5")
            base[base.index("--epochs") + 1] = "100"  # still running after the cut and the recovery
            return [*prefix, "env", f"GLOO_SOCKET_IFNAME={ifname}", *base]

        nodes = {i: start(cmd(i, net["host_ip"], net["host_if"]), tmp_path / f"node{i}.log") for i in (0, 1)}
        nodes[2] = start(cmd(2, net["ns_ip"], net["ns_if"], ("ip", "netns", "exec", net["ns"])), tmp_path / "node2.log")
        run_dirs = [tmp_path / f"node{i}" for i in range(3)]
        wait_for_event(run_dirs, "save_commit", timeout=180, procs=nodes.values())
        subprocess.run(["ip", "link", "set", net["host_if"], "down"], check=True)  # the cable is cut
        results = {i: finish(nodes[i], tmp_path / f"node{i}.log", timeout=300) for i in (0, 1)}
    finally:
        for p in [*nodes.values(), store]:
            kill_tree(p.pid)
    for result in results.values():
        assert result.returncode == 0, result.tail()
    events = [e for i in (0, 1) for e in read_events(tmp_path / f"node{i}")]
    # Silence, not an error, gave it away: the cut node's rendezvous keep-alive (3 s), or its
    # workers' heartbeats (--hang-timeout 5), whichever the survivors saw first.
    detected = [e for e in events if e["event"] == "node_left" or (e["event"] == "hang_detected" and e["phase"] == "training")]
    assert detected, [e["event"] for e in events]
    assert not [e for e in events if e["event"] == "hang_detected" and e["phase"] != "training"]
    sizes = [e["world_size"] for e in sorted(events, key=lambda e: e["time"]) if e["event"] == "rendezvous"]
    assert sizes[0] == 3 and sizes[-1] == 2, sizes
    assert latest_committed(tmp_path / "ckpt").world_size == 2


def test_node_with_a_broken_device_leaves_and_the_others_go_on(rendezvous, tmp_path):
    """Node 2's worker fails at start in every generation (a failed GPU, simulated). After
    --crash-loop-limit failures in a row there, node 2's agent leaves with a non-zero exit and
    the rendezvous stays open: nodes 0 and 1 notice it is gone, re-form at world size 2 and
    finish, every sample of every epoch trained exactly once."""
    flags = ("--crash-loop-limit", "2", "--restart-backoff", "0.1")
    nodes = {i: start(node_cmd(rendezvous, tmp_path, i, *flags,
                               *(("--inject", "fail-at-start:rank=0:step=0") if i == 2 else ())),
                      tmp_path / f"node{i}.log") for i in range(3)}
    try:
        results = {i: finish(p, tmp_path / f"node{i}.log", timeout=300) for i, p in nodes.items()}
    finally:
        for p in nodes.values():
            kill_tree(p.pid)
    assert results[2].returncode == 1, results[2].tail()
    assert "result: failed: this node's workers failed at start 2 times in a row" in results[2].output
    assert "the node leaves the job and the other nodes go on without it" in results[2].output
    for i in (0, 1):
        assert results[i].returncode == 0, results[i].tail()
    events = [e for i in (0, 1) for e in read_events(tmp_path / f"node{i}")]
    assert any(e["event"] == "node_left" for e in events), "the survivors never noticed node 2 leave"
    resumed = [e for e in events if e["event"] in ("resumed", "fresh_start")]
    assert resumed[-1]["world_size"] == 2
    assert_each_sample_once(effective_steps(read_trace(tmp_path / "shared")), EPOCHS)
    final = latest_committed(tmp_path / "ckpt")
    assert final.step == EPOCHS * STEPS_PER_EPOCH and final.world_size == 2
