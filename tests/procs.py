"""Running real training processes from tests: hard timeouts, whole-tree kills, and the oracle.

TorchElastic starts each worker in a session of its own, so killing the launcher's process
group is not enough: on timeout we kill every descendant found by psutil, then the group.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from launcher import contract
from launcher.proctree import kill_tree  # the one tree kill, shared (bench/chaos.py imports it from here)

REPO = Path(__file__).resolve().parent.parent
TRAIN = str(REPO / "train.py")


@dataclass
class Result:
    returncode: int
    output: str

    def tail(self, n: int = 60) -> str:
        return "\n".join(self.output.splitlines()[-n:])


def run(cmd: list[str], timeout: float, cwd: str | Path = REPO, env_extra: dict | None = None) -> Result:
    """Run ``cmd`` in a new session; on timeout kill its whole tree and fail the test."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env_extra or {})}
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        out, _ = proc.communicate()
        raise AssertionError(f"timed out after {timeout}s: {' '.join(cmd)}\n" + "\n".join(out.splitlines()[-60:]))
    finally:
        if proc.poll() is None:
            kill_tree(proc.pid)
    return Result(proc.returncode, out)


def train_cmd(*args: str) -> list[str]:
    """``python train.py ARGS`` (one process, no torchrun)."""
    return [sys.executable, TRAIN, *args]


def torchrun_cmd(nproc: int, *args: str, max_restarts: int = 0) -> list[str]:
    """Stock torchrun, c10d rendezvous on a free port (``--standalone``)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            f"--max-restarts={max_restarts}", "--monitor-interval=0.1", TRAIN, *args]


def ftlaunch_cmd(nproc: int, *launch_args: str, script: str = TRAIN, script_args: tuple = ()) -> list[str]:
    """``ftlaunch`` with its defaults, as a user would run it."""
    return [sys.executable, "-m", "launcher.cli", f"--nproc-per-node={nproc}", *launch_args, script, *script_args]


def start(cmd: list[str], log_path: Path, cwd: str | Path = REPO, env_extra: dict | None = None) -> subprocess.Popen:
    """Start ``cmd`` in a new session with its output in ``log_path`` (for tests that act on
    a running job); pair with ``finish``."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env_extra or {})}
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=open(log_path, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def finish(proc: subprocess.Popen, log_path: Path, timeout: float) -> Result:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        raise AssertionError(f"timed out after {timeout}s\n" + "\n".join(log_path.read_text().splitlines()[-60:]))
    finally:
        if proc.poll() is None:
            kill_tree(proc.pid)
    return Result(proc.returncode, log_path.read_text())


def wait_for_event(run_dirs, name: str, timeout: float, procs=()) -> dict:
    """Block until an ``events.jsonl`` in ``run_dirs`` (one dir or several) has an event
    ``name``; fail on timeout or when one of ``procs`` exits first."""
    dirs = [Path(run_dirs)] if isinstance(run_dirs, (str, Path)) else [Path(d) for d in run_dirs]
    found: list[dict] = []

    def seen() -> bool:
        found.extend(e for d in dirs for e in events_of(d, name))
        return bool(found)

    wait_until(seen, timeout, procs, f"event {name!r} in {[str(d) for d in dirs]}")
    return found[0]


def wait_for_file(path: Path, proc: subprocess.Popen, timeout: float = 60) -> None:
    wait_until(Path(path).exists, timeout, proc, f"file {path}")


# -- what a forger does (tests/test_safe_load.py, bench/chaos.py) ---------------------------------
class Payload:
    """Unpickling this runs ``touch MARKER``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def rerecord(step_dir: Path, name: str, data: bytes) -> None:
    """Write ``data`` as ``name`` and make the commit record agree (sizes and crc32s are no
    secret: someone who can write the directory can rewrite them)."""
    import json
    import zlib

    (Path(step_dir) / name).write_bytes(data)
    record = json.loads((Path(step_dir) / "manifest.json").read_text())
    record["files"][name] = {"size": len(data), "crc32": f"{zlib.crc32(data) & 0xffffffff:08x}"}
    (Path(step_dir) / "manifest.json").write_text(json.dumps(record))


def forge_metadata(step_dir: Path, marker: Path) -> None:
    """A code-running ``.metadata`` with a commit record rewritten to match it."""
    import pickle

    rerecord(step_dir, ".metadata", pickle.dumps(Payload(marker)))


def read_events(run_dir: Path) -> list[dict]:
    return contract.read_events(str(run_dir))


def events_of(run_dir: Path, name: str) -> list[dict]:
    """The events called ``name`` in ``run_dir``'s events.jsonl, oldest first."""
    return [e for e in read_events(run_dir) if e["event"] == name]


def effective_steps(records: list[dict]) -> list[dict]:
    """Sample-trace records of the steps that count: a step run by a generation that then died
    before committing it is run again by a later one; keep the latest generation's copy."""
    latest: dict[int, float] = {}
    for r in records:
        latest[r["step"]] = max(latest.get(r["step"], 0.0), r["launch"])
    return [r for r in records if r["launch"] == latest[r["step"]]]


@contextlib.contextmanager
def network_namespace(subnet: str = "10.213.0"):
    """A network namespace joined to this one by a veth pair: a "node" whose link can be cut
    (``ip link set HOST_IF down``). Yields a dict (ns, host_if, ns_if, host_ip, ns_ip), or a
    string saying why it cannot be made here (needs root and iproute2). Removed on exit."""
    import shutil

    if os.geteuid() != 0 or shutil.which("ip") is None:
        yield "needs root and iproute2 (`ip netns`) to make a node with its own network"
        return
    tag = f"{os.getpid() % 10000}"
    ns, host_if, ns_if = f"ftl-ns{tag}", f"ftlh{tag}", f"ftlp{tag}"
    host_ip, ns_ip = f"{subnet}.1", f"{subnet}.2"
    steps = [["ip", "netns", "add", ns], ["ip", "link", "add", host_if, "type", "veth", "peer", "name", ns_if],
             ["ip", "link", "set", ns_if, "netns", ns], ["ip", "addr", "add", f"{host_ip}/24", "dev", host_if],
             ["ip", "link", "set", host_if, "up"],
             ["ip", "netns", "exec", ns, "ip", "addr", "add", f"{ns_ip}/24", "dev", ns_if],
             ["ip", "netns", "exec", ns, "ip", "link", "set", ns_if, "up"],
             ["ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up"]]
    try:
        for step in steps:
            done = subprocess.run(step, capture_output=True, text=True)
            if done.returncode != 0:
                yield f"cannot build a network namespace here: {' '.join(step)}: {done.stderr.strip()}"
                return
        yield {"ns": ns, "host_if": host_if, "ns_if": ns_if, "host_ip": host_ip, "ns_ip": ns_ip}
    finally:
        subprocess.run(["ip", "netns", "delete", ns], capture_output=True)
        subprocess.run(["ip", "link", "delete", host_if], capture_output=True)


DIGITS_TRAIN_SAMPLES = 1438  # sklearn's digits: 1,797 minus the 20% test split


def assert_each_sample_once(records: list[dict], epochs: int, samples: int = DIGITS_TRAIN_SAMPLES) -> None:
    """The exactness oracle for elastic runs: in every epoch, every sample index was trained
    on exactly once (``records``: the effective steps of a sample trace)."""
    from collections import Counter

    for epoch in range(epochs):
        seen = Counter(i for r in records if r["epoch"] == epoch for i in r["idx"])
        repeated = [i for i, n in seen.items() if n > 1]
        assert not repeated, f"epoch {epoch}: samples trained on twice: {repeated[:10]}"
        skipped = sorted(set(range(samples)) - set(seen))
        assert not skipped and len(seen) == samples, f"epoch {epoch}: {len(skipped)} samples skipped: {skipped[:10]}"


def read_trace(run_dir: Path) -> list[dict]:
    import json

    records = []
    for path in sorted((Path(run_dir) / "samples").glob("rank*.jsonl")):
        records += [json.loads(line) for line in path.read_text().splitlines()]
    return records


def latest_committed(ckpt_dir: str | Path):
    from checkpoint import Storage, find_latest

    manifest = find_latest(Storage(ckpt_dir), "hash")
    assert manifest is not None, f"no committed checkpoint in {ckpt_dir}"
    return manifest


def load_checkpoint(step_dir: str | Path, tmp: Path) -> dict:
    """A DCP checkpoint directory as one flat-keyed dict, through DCP's own converter."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = tmp / f"{Path(step_dir).name}-{os.getpid()}-{len(list(tmp.iterdir()))}.pt"
    dcp_to_torch_save(str(step_dir), str(out))
    return torch.load(out, weights_only=False)


def compare_training_state(a: dict, b: dict) -> list[str]:
    """The keys of model and optimizer state that differ (tensors bitwise, ``torch.equal``);
    [] when equal. Raises when either holds no tensor at all."""
    flat_a, flat_b = {}, {}
    for part in ("model", "optim"):
        flat_a.update(_flatten(a.get(part, {}), f"{part}."))
        flat_b.update(_flatten(b.get(part, {}), f"{part}."))
    for flat in (flat_a, flat_b):
        assert any(isinstance(v, torch.Tensor) for v in flat.values()), "no tensors to compare"
    diffs = sorted(set(flat_a) ^ set(flat_b))
    for key in sorted(set(flat_a) & set(flat_b)):
        x, y = flat_a[key], flat_b[key]
        same = torch.equal(x, y) if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) else x == y
        if not same:
            diffs.append(key)
    return diffs


def assert_training_state_equal(a: dict, b: dict) -> None:
    """Every tensor of model and optimizer state bitwise equal (``torch.equal``)."""
    assert [k for k in a if k in ("model", "optim")] == [k for k in b if k in ("model", "optim")]
    diffs = compare_training_state(a, b)
    assert not diffs, f"differs: {diffs[:5]}"


def wait_until(predicate, timeout: float, procs=(), what: str = "condition", poll: float = 0.05) -> None:
    """Poll ``predicate`` until it is true; fail on timeout or when one of ``procs`` (a
    process, several, or None) exits first."""
    import time

    procs = [procs] if isinstance(procs, subprocess.Popen) else [p for p in (procs or ()) if p is not None]
    deadline = time.monotonic() + timeout
    while not predicate():
        exited = [p for p in procs if p.poll() is not None]
        if exited:
            raise AssertionError(f"process exited ({exited[0].returncode}) before {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} within {timeout}s")
        time.sleep(poll)  # sleep-ok: polling files with a deadline, not synchronizing processes


def _flatten(obj, prefix: str) -> dict:
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    if isinstance(obj, list) and any(isinstance(v, (dict, torch.Tensor)) for v in obj):
        out = {}
        for i, v in enumerate(obj):
            out.update(_flatten(v, f"{prefix}{i}."))
        return out
    return {prefix.rstrip("."): obj}
