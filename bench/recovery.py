"""Recovery time after a SIGKILL: ftlaunch against stock torchrun, in one run.

    python bench/recovery.py --trials 3

Each trial trains the digits CNN on 2 workers (``train.py``) and SIGKILLs rank 1 right after
step 25 (``--inject kill:rank=1:step=25``; the last commit is step 20). Arms, interleaved:
  stock:  ``torchrun --standalone --max-restarts=1`` (TorchElastic defaults), ``--memory-every 0``
  ours:   ``ftlaunch`` (defaults), ``--memory-every 0``: resumes from the durable commit of step 20
  memory: ``ftlaunch`` and ``train.py --memory-every 1``: resumes from the memory snapshot of
          step 24 (the kill fires after step 25, before its snapshot)
The time from the kill to the first completed step of the new group is split into phases:
  detection   kill -> the agent logs the failure        (kill time: the fault marker's mtime)
  stop        -> the agent starts the next rendezvous    (survivors stopped)
  rendezvous  -> the agent starts the new workers
  worker start-> rank 0 has imported torch and formed its process group
  load        -> rank 0 loaded the checkpoint (and built model and data)
  first step  -> rank 0 finished its first step
Agent times come from TorchElastic's own log lines (``LOGLEVEL=INFO``), worker times from the
events rank 0 writes to ``$FTLAUNCH_RUN_DIR/events.jsonl`` (set for both arms). The floor,
"worker start + load + one step", is the first generation's start-to-first-step plus the
resumed generation's load time, measured in the same trials.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOG_LINE = re.compile(r"^[IWE](\d\d)(\d\d) (\d\d):(\d\d):(\d\d)\.(\d{6}) .*?\] (.*)$")
PHASES = ("detection", "stop", "rendezvous", "worker start", "load", "first step")
TRAIN = ["train.py", "--max-steps", "40", "--save-every-steps", "10", "--inject", "kill:rank=1:step=25"]


def log_times(output: str) -> list[tuple[float, str]]:
    year = dt.date.today().year
    out = []
    for line in output.splitlines():
        m = LOG_LINE.match(line)
        if m:
            mo, d, h, mi, s, us = map(int, m.groups()[:6])
            out.append((dt.datetime(year, mo, d, h, mi, s, us).timestamp(), m.group(7)))
    return out


def after(times, needle: str, t0: float) -> float:
    return next(t for t, msg in times if t >= t0 and needle in msg)


def trial(arm: str, work: str) -> dict:
    extra = ["--memory-every", "1" if arm == "memory" else "0"]  # train.py's default would be "auto"
    run_dir, ckpt = os.path.join(work, "run"), os.path.join(work, "ckpt")
    env = {**os.environ, "LOGLEVEL": "INFO", "OMP_NUM_THREADS": "1", "FTLAUNCH_RUN_DIR": run_dir}
    os.makedirs(run_dir)
    if arm == "stock":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "--max-restarts=1"]
    else:
        cmd = [sys.executable, "-m", "launcher.cli", "--nproc-per-node=2", "--run-dir", run_dir]
    done = subprocess.run(cmd + TRAIN + extra + ["--ckpt-dir", ckpt], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    if done.returncode != 0:
        raise SystemExit(f"{arm} trial failed:\n{(done.stdout + done.stderr)[-3000:]}")
    times = log_times(done.stdout + done.stderr)
    events = [json.loads(l) for l in open(os.path.join(run_dir, "events.jsonl"))]
    ev = lambda name, gen: next(e["time"] for e in events if e["event"] == name and e.get("generation") == gen)
    kill = os.stat(os.path.join(ckpt, "faults", "kill.rank1.step25.fired")).st_mtime_ns / 1e9
    points = [kill, after(times, "failed (exitcode", kill), after(times, "Rendezvous'ing worker group", kill),
              after(times, "Starting worker group", kill), ev("worker_ready", 1), ev("resumed", 1), ev("first_step", 1)]
    first_start = after(times, "Starting worker group", 0)
    resumed = next(e for e in events if e["event"] == "resumed")
    return {"phases": [b - a for a, b in zip(points, points[1:])], "total": points[-1] - points[0],
            "floor": ev("first_step", 0) - first_start + resumed["load_seconds"], "redone": 25 - resumed["step"],
            "source": resumed.get("source", "disk")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=3)
    args = parser.parse_args()
    results = {"stock": [], "ours": [], "memory": []}
    for i in range(args.trials):
        for arm in results:
            work = tempfile.mkdtemp(prefix=f"recovery-{arm}-")
            try:
                r = trial(arm, work)
            finally:
                shutil.rmtree(work, ignore_errors=True)
            results[arm].append(r)
            print(f"trial {i + 1} {arm:6s}: kill -> first step {r['total']:.2f} s, {r['redone']} steps redone "
                  f"(from {r['source']})  "
                  + "  ".join(f"{p} {x:.2f}" for p, x in zip(PHASES, r["phases"])), flush=True)
    med = {arm: {"phases": [statistics.median(r["phases"][k] for r in rs) for k in range(len(PHASES))],
                 "total": statistics.median(r["total"] for r in rs),
                 "range": (min(r["total"] for r in rs), max(r["total"] for r in rs)),
                 "redone": statistics.median(r["redone"] for r in rs)} for arm, rs in results.items()}
    floor = statistics.median(r["floor"] for arm in ("stock", "ours") for r in results[arm])
    print(f"\nmedian of {args.trials} trials, seconds\n\n| phase | stock torchrun | ftlaunch | ftlaunch + memory tier |"
          "\n|---|---|---|---|")
    for k, phase in enumerate(PHASES):
        print(f"| {phase} | " + " | ".join(f"{med[arm]['phases'][k]:.2f}" for arm in results) + " |")
    print("| **kill -> first step** | " + " | ".join(
        f"**{med[arm]['total']:.2f}** ({med[arm]['range'][0]:.2f}-{med[arm]['range'][1]:.2f})" for arm in results) + " |")
    print("| steps redone | " + " | ".join(f"{med[arm]['redone']:g}" for arm in results) + " |")
    print(f"\nfloor (worker start + disk load + one step, same trials): {floor:.2f} s")
    print(f"ftlaunch / stock = {med['ours']['total'] / med['stock']['total']:.2f}  (goal <= 0.5)")
    print(f"ftlaunch / floor = {med['ours']['total'] / floor:.2f}  (goal <= 1.3)")
    print(f"memory tier: kill -> first step {med['memory']['total']:.2f} s (goal <= 0.5 s), "
          f"{med['memory']['total'] / med['stock']['total']:.2f}x stock (goal <= 0.2x)")


if __name__ == "__main__":
    main()
