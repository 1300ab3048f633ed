"""Goodput under random failures: stock torchrun, ftlaunch, and ftlaunch with the memory tier,
side by side in one run.

    python bench/goodput.py --mtbf 20 --failures 4

Every arm trains ``train.py`` (the digits CNN, 2 workers) for the same number of steps while
this script SIGKILLs a random worker at exponentially distributed intervals (mean ``--mtbf``
seconds of training) until ``--failures`` kills were made. Arms:

  stock:   ``torchrun --standalone`` + synchronous saves (``--async-save off``: DCP, committed)
  ours:    ``ftlaunch`` + async durable saves only (``--memory-every 0``)
  memory:  ``ftlaunch`` + async durable saves + the memory tier (``--memory-every auto``, the
           trainer's default)

Each arm saves at its Young/Daly interval, sqrt(2 x save cost x MTBF), with the save cost (the
time a save blocks training: the whole save when synchronous, the staging copy when async)
measured in a short calibration run of that save mode first. Goodput = (the wall time of a
fault-free run of the same steps, no saves but the final one) / the arm's wall time. Per arm:
goodput, steps redone per failure (the step any rank had reached when killed minus the step
the next generation resumed from), recovery p50/p95 (kill -> the next generation's first
step), and whether the final weights are bit-equal to the fault-free run's.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import torch  # noqa: E402
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save  # noqa: E402

from launcher.contract import TRAINING, Beat, heartbeat_path, read_events  # noqa: E402

ARMS = ("stock", "ours", "memory")
MODE = {"stock": ["--async-save", "off", "--memory-every", "0"], "ours": ["--memory-every", "0"],
        "memory": ["--memory-every", "auto"]}


def command(arm: str, run_dir: str, ckpt: str, steps: int, save_every: int, launcher: str) -> list[str]:
    """``launcher``: "stock" (torchrun) or "ftlaunch"; ``arm`` sets train.py's save modes."""
    if launcher == "stock":
        head = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                "--max-restarts=100", "--monitor-interval=0.1"]
    else:
        head = [sys.executable, "-m", "launcher.cli", "--nproc-per-node=2", "--max-restarts=100", "--run-dir", run_dir]
    return [*head, "train.py", "--ckpt-dir", ckpt, "--max-steps", str(steps), "--save-every-steps", str(save_every),
            "--keep-last", "2", "--log-every", "1000000", *MODE[arm]]


def launch(cmd: list[str], run_dir: str, log: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FTLAUNCH_RUN_DIR": run_dir}
    os.makedirs(run_dir, exist_ok=True)
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def finish(proc: subprocess.Popen, log: str, timeout: float) -> None:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(proc.args[:4])}... exited {proc.returncode}:\n{open(log).read()[-3000:]}")


def calibrate(arm: str, work: str, steps: int) -> dict:
    """A short fault-free run with a save every 25 steps: the time per step, and what a save
    blocks training for."""
    run_dir, ckpt, log = (os.path.join(work, f"cal-{arm}", x) for x in ("run", "ckpt", "log"))
    proc = launch(command(arm, run_dir, ckpt, steps, 25, "stock" if arm == "stock" else "ftlaunch"), run_dir, log)
    finish(proc, log, 600)
    events = read_events(run_dir)
    first = next(e["time"] for e in events if e["event"] == "first_step")
    end = next(e["time"] for e in events if e["event"] == "finished")
    stalls = [e["stall_seconds"] for e in events if e["event"] == "save_staged"] or \
             [e["seconds"] for e in events if e["event"] == "save_commit" and e["step"] < steps]
    return {"step_seconds": (end - first) / (steps - 1), "save_cost": statistics.median(stalls)}


def beats(run_dir: str) -> list[Beat]:
    return [b for r in (0, 1) if (b := Beat.read(heartbeat_path(run_dir, r))) is not None]


def run_arm(arm: str, work: str, steps: int, save_every: int, mtbf: float, failures: int, seed: int) -> dict:
    """The job with random SIGKILLs: ``failures`` of them, exponential gaps of training time."""
    run_dir, ckpt, log = (os.path.join(work, arm, x) for x in ("run", "ckpt", "log"))
    rng = random.Random(seed)  # the same kill times for every arm
    started = time.time()
    proc = launch(command(arm, run_dir, ckpt, steps, save_every, "stock" if arm == "stock" else "ftlaunch"),
                  run_dir, log)
    kills = []
    due = time.monotonic() + rng.expovariate(1 / mtbf)
    while len(kills) < failures and proc.poll() is None:
        try:
            proc.wait(timeout=max(0.01, min(0.05, due - time.monotonic())))  # polls; the job may end first
            break
        except subprocess.TimeoutExpired:
            pass
        if time.monotonic() < due:
            continue
        live = [b for b in beats(run_dir) if b.phase == TRAINING and _alive(b.os_pid)]
        if len(live) < 2:
            continue  # recovering: the failure waits for training to resume
        victim = rng.choice(live)
        step = max(b.step for b in live)
        os.kill(victim.os_pid, signal.SIGKILL)
        kills.append({"time": time.time(), "step": step, "rank": victim.rank})
        due = time.monotonic() + rng.expovariate(1 / mtbf)
    finish(proc, log, 1800)
    wall = time.time() - started
    events = read_events(run_dir)
    phases = split_wall(events, started, wall, steps)
    redone, recovery = [], []
    for k in kills:
        resumed = next(e for e in events if e["event"] in ("resumed", "fresh_start") and e["time"] > k["time"])
        first = next(e for e in events if e["event"] == "first_step" and e["time"] > k["time"])
        redone.append(k["step"] - resumed["step"])
        recovery.append(first["time"] - k["time"])
    sources = [e.get("source") for e in events if e["event"] == "resumed"]
    intervals = [int(n) for n in re.findall(r"one snapshot every (\d+) step", open(log).read())]  # per generation
    trained = steps + sum(redone)
    phases["step_ms"] = (phases["training"] - sum(recovery)) / trained * 1e3
    return {"wall": wall, "kills": len(kills), "redone": redone, "recovery": recovery, "sources": sources,
            "intervals": intervals, "phases": phases,
            "final": final_weights(ckpt, steps, work, arm)}


def split_wall(events: list[dict], started: float, wall: float, steps: int) -> dict:
    """Where a run's wall time went: start-up (launch -> first step), training (first step ->
    the trainer's last event, recoveries included) and the end (-> the launcher's exit)."""
    first = next(e["time"] for e in events if e["event"] == "first_step")
    last = max(e["time"] for e in events if e["event"] == "finished")
    return {"startup": first - started, "training": last - first, "end": started + wall - last,
            "step_ms": (last - first) / max(1, steps - 1) * 1e3}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def final_weights(ckpt: str, steps: int, work: str, name: str) -> dict:
    path = os.path.join(work, f"{name}.pt")
    dcp_to_torch_save(os.path.join(ckpt, f"step-{steps:08d}"), path)
    state = torch.load(path, weights_only=False)  # written by this benchmark, from our own run
    return {k: v for k, v in state.items() if k.startswith(("model.", "optim."))}


def _phases(p: dict) -> str:
    return (f"start-up {p['startup']:.1f} s, training {p['training']:.1f} s at {p['step_ms']:.2f} ms per step trained "
            f"(recoveries left out), end {p['end']:.1f} s")


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, math.ceil(q * len(xs)) - 1))] if xs else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mtbf", type=float, default=20.0, help="mean seconds between failures")
    parser.add_argument("--failures", type=int, default=4, help="SIGKILLs per arm")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--arms", default=",".join(ARMS), help="which arms to run, e.g. memory")
    parser.add_argument("--save-every", type=int, default=0,
                        help="durable save interval in steps for every arm (default: each arm's Young/Daly interval)")
    parser.add_argument("--memory-every", default="auto", help="the memory arm's --memory-every")
    args = parser.parse_args()
    arms = [a for a in args.arms.split(",") if a]
    if not arms or set(arms) - set(ARMS):
        parser.error(f"--arms must name some of {', '.join(ARMS)}")
    MODE["memory"] = ["--memory-every", args.memory_every]
    work = tempfile.mkdtemp(prefix="goodput-")
    try:
        cal = {"stock": calibrate("stock", work, 300), "ours": calibrate("ours", work, 300)}
        cal["memory"] = cal["ours"]
        step = cal["stock"]["step_seconds"]
        # Enough steps that the kills fit with room to spare: failures x MTBF of training, x 1.5.
        steps = int(math.ceil(1.5 * args.failures * args.mtbf / step / 100) * 100)
        every = {arm: args.save_every or max(1, round(math.sqrt(2 * cal[arm]["save_cost"] * args.mtbf) / step))
                 for arm in ARMS}
        print(f"step {step * 1e3:.1f} ms; save cost: sync {cal['stock']['save_cost'] * 1e3:.1f} ms, async stall "
              f"{cal['ours']['save_cost'] * 1e3:.1f} ms; {steps} steps; Young/Daly save intervals (steps): "
              + ", ".join(f"{arm} {every[arm]}" for arm in ARMS), flush=True)
        ref_dir = os.path.join(work, "reference")
        began = time.time()
        proc = launch(command("stock", os.path.join(ref_dir, "run"), os.path.join(ref_dir, "ckpt"), steps, 0, "stock"),
                      os.path.join(ref_dir, "run"), os.path.join(ref_dir, "log"))
        finish(proc, os.path.join(ref_dir, "log"), 1800)
        fault_free = time.time() - began
        ref_phases = split_wall(read_events(os.path.join(ref_dir, "run")), began, fault_free, steps)
        expected = final_weights(os.path.join(ref_dir, "ckpt"), steps, work, "reference")
        print(f"fault-free run: {fault_free:.1f} s ({_phases(ref_phases)})", flush=True)
        results = {}
        for arm in arms:
            r = results[arm] = run_arm(arm, work, steps, every[arm], args.mtbf, args.failures, args.seed)
            r["goodput"] = fault_free / r["wall"]
            r["exact"] = r["final"].keys() == expected.keys() and all(torch.equal(r["final"][k], expected[k])
                                                                       for k in expected)
            print(f"{arm}: {r['wall']:.1f} s, {r['kills']} kills, redone {r['redone']}, recovery "
                  + ", ".join(f"{x:.2f}" for x in r["recovery"]) + f" s, resumed from {r['sources']}"
                  + (f", memory tier intervals {r['intervals']}" if r["intervals"] else "")
                  + f"; {_phases(r['phases'])}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    names = {"stock": "stock torchrun + sync saves", "ours": "ftlaunch + async durable",
             "memory": "ftlaunch + memory tier"}
    print(f"\nMTBF {args.mtbf:g} s, {args.failures} SIGKILLs per arm, {steps} steps, seed {args.seed}, memory arm "
          f"--memory-every {args.memory_every}\n")
    print("| arm | save every (steps) | goodput | steps redone per failure (median, max) | recovery p50 / p95 (s) "
          "| bit-equal to fault-free |\n|---|---|---|---|---|---|")
    for arm in arms:
        r = results[arm]
        print(f"| {names[arm]} | {every[arm]} | **{r['goodput']:.3f}** | {statistics.median(r['redone']):g}, "
              f"{max(r['redone'])} | {percentile(r['recovery'], 0.5):.2f} / {percentile(r['recovery'], 0.95):.2f} | "
              f"{'yes' if r['exact'] else 'NO'} |")
    if set(arms) != set(ARMS):
        return
    best_other = max(results[a]["goodput"] for a in ("stock", "ours"))
    print(f"\nmemory tier goodput {results['memory']['goodput']:.3f} (goal >= 0.95 and above both others: "
          f"{'met' if results['memory']['goodput'] >= 0.95 and results['memory']['goodput'] > best_other else 'not met'})")


if __name__ == "__main__":
    main()
