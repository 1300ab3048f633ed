"""``ftlaunch cluster``: the docker-compose cluster without Docker, on loopback.

    ftlaunch cluster up --dir runs/cluster --nodes 3 -- --nproc-per-node 1 train.py --ckpt-dir runs/cluster/ckpt
    ftlaunch cluster kill --dir runs/cluster --node 2      # (another terminal) node 2 dies whole
    ftlaunch cluster start --dir runs/cluster --node 2     # a replacement node 2 joins

``up`` starts a rendezvous store (``ftlaunch rendezvous``) and N ftlaunch agents, each in a
session (process group) of its own with its run directory ``DIR/node<i>`` and log
``DIR/node<i>.log``, and returns when no node is left running. ``kill`` SIGKILLs a node's
whole process tree (agent, fork server, workers, which TorchElastic puts in sessions of
their own); ``start`` launches a node with the same arguments.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


from .proctree import ProcessId, kill_tree


def _node_command(state: dict, node: int) -> list[str]:
    return [sys.executable, "-m", "launcher.cli", "--nnodes", f"{state['min_nodes']}:{state['nodes']}",
            "--rdzv-endpoint", f"127.0.0.1:{state['port']}", "--rdzv-id", state["run_id"],
            "--run-dir", os.path.join(state["dir"], f"node{node}"), *state["agent_args"]]


def start_node(state: dict, node: int) -> int:
    log = open(os.path.join(state["dir"], f"node{node}.log"), "ab")
    proc = subprocess.Popen(_node_command(state, node), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    with open(os.path.join(state["dir"], f"node{node}.pid"), "w") as f:
        f.write(ProcessId.of(proc.pid).to_text())  # pid and start time: a reused pid is not our node
    return proc.pid


def _node_process(state: dict, node: int) -> ProcessId | None:
    """The node's agent, if that very process still runs."""
    try:
        with open(os.path.join(state["dir"], f"node{node}.pid")) as f:
            proc = ProcessId.from_text(f.read())
    except (FileNotFoundError, ValueError):
        return None
    return proc if proc.alive() else None


def kill_node(state: dict, node: int) -> None:
    proc = _node_process(state, node)
    if proc is None:
        raise SystemExit(f"ftlaunch cluster: node {node} is not running")
    kill_tree(proc.pid)


def _running_nodes(state: dict) -> list[int]:
    return [node for node in range(state["nodes"]) if _node_process(state, node) is not None]


def up(directory: str, nodes: int, min_nodes: int, agent_args: list[str]) -> int:
    directory = os.path.abspath(directory)
    os.makedirs(directory, exist_ok=True)
    port_file = os.path.join(directory, "rendezvous.port")
    if os.path.exists(port_file):
        os.unlink(port_file)
    store = subprocess.Popen([sys.executable, "-m", "launcher.cli", "rendezvous", "--host", "127.0.0.1", "--port", "0",
                              "--port-file", port_file], stdout=open(os.path.join(directory, "rendezvous.log"), "ab"),
                             stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not os.path.exists(port_file):
            if store.poll() is not None or time.monotonic() > deadline:
                print("ftlaunch cluster: the rendezvous store did not start; see rendezvous.log", file=sys.stderr)
                return 1
            time.sleep(0.05)  # waiting for the store's port file, with a deadline
        state = {"dir": directory, "nodes": nodes, "min_nodes": min_nodes, "port": int(open(port_file).read()),
                 "run_id": f"cluster-{os.getpid()}", "agent_args": agent_args}
        with open(os.path.join(directory, "cluster.json"), "w") as f:
            json.dump(state, f)
        for node in range(nodes):
            start_node(state, node)
        print(f"ftlaunch cluster: {nodes} nodes up (store 127.0.0.1:{state['port']}); logs in {directory}", flush=True)
        while _running_nodes(state):
            time.sleep(0.5)  # watching pid files: nodes may be killed and started by other commands
        print("ftlaunch cluster: no node left running", flush=True)
        return 0
    finally:
        store.kill()
        store.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ftlaunch cluster", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.error = lambda message: parser.exit(2, f"ftlaunch cluster: error: {message} (see --help)\n")
    sub = parser.add_subparsers(dest="command", required=True)
    p_up = sub.add_parser("up", help="start a store and N nodes; return when no node runs")
    p_up.add_argument("--dir", required=True)
    p_up.add_argument("--nodes", type=int, default=3)
    p_up.add_argument("--min-nodes", type=int, default=0, help="fewest nodes the job runs on (default: nodes - 1)")
    p_up.add_argument("agent_args", nargs=argparse.REMAINDER, help="-- then ftlaunch's agent flags, script and its args")
    for name in ("kill", "start"):
        p = sub.add_parser(name, help=f"{name} one node")
        p.add_argument("--dir", required=True)
        p.add_argument("--node", type=int, required=True)
    args = parser.parse_args(argv)
    if args.command == "up":
        agent_args = args.agent_args[1:] if args.agent_args[:1] == ["--"] else args.agent_args
        min_nodes = args.min_nodes or max(1, args.nodes - 1)
        if not agent_args or not 1 <= min_nodes <= args.nodes:
            parser.error("give the agent flags and the script after --, and 1 <= --min-nodes <= --nodes")
        return up(args.dir, args.nodes, min_nodes, agent_args)
    try:
        state = json.load(open(os.path.join(args.dir, "cluster.json")))
    except FileNotFoundError:
        parser.error(f"no cluster in {args.dir}: start one with `ftlaunch cluster up --dir {args.dir} ...`")
    if not 0 <= args.node < state["nodes"]:
        parser.error(f"--node must be 0..{state['nodes'] - 1}")
    if args.command == "kill":
        kill_node(state, args.node)
    else:
        if args.node in _running_nodes(state):
            parser.error(f"node {args.node} is running; kill it first")
        start_node(state, args.node)
    return 0
