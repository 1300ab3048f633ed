"""How often does a restart after one SIGKILL succeed? Three arms, interleaved, same run.

    python bench/restart_reliability.py --trials 12

Each trial runs bench/restart_worker.py on 2 workers with 3 restarts allowed; rank 1
SIGKILLs itself once. A trial is ok if the launcher exits 0, hung if it still runs after
--timeout seconds (its whole process tree is then killed), failed otherwise.
  stock:     `torchrun --standalone`, the script calls `dist.init_process_group("gloo")`
  our-init:  `torchrun --standalone`, the script calls `launcher.worker.init_process_group()`
  ftlaunch:  `ftlaunch`, the script calls plain `dist.init_process_group("gloo")`
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

from launcher.proctree import kill_tree

HERE = os.path.dirname(os.path.abspath(__file__))


def trial(mode: str, timeout: float) -> tuple[str, int, float]:
    if mode == "ftlaunch":
        launcher = [sys.executable, "-m", "launcher.cli", "--run-dir", tempfile.mkdtemp(prefix="reliability-")]
    else:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--monitor-interval=0.1"]
    cmd = [*launcher, "--nproc-per-node=2", "--max-restarts=3", os.path.join(HERE, "restart_worker.py")]
    env = {**os.environ, "INIT_MODE": "ours" if mode == "our-init" else "stock", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.path.dirname(HERE)}
    start = time.monotonic()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
        outcome = "ok" if proc.returncode == 0 else "failed"
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        out, _ = proc.communicate()
        outcome = "hung"
    return outcome, out.count("connectFullMesh"), time.monotonic() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds before a trial counts as hung")
    args = parser.parse_args()
    results = {"stock": [], "our-init": [], "ftlaunch": []}
    for i in range(args.trials):
        for mode in results:  # interleaved, so both see the same machine load
            outcome, mesh_errors, seconds = trial(mode, args.timeout)
            results[mode].append((outcome, mesh_errors, seconds))
            print(f"trial {i + 1:2d} {mode:8s}: {outcome:6s} connectFullMesh lines {mesh_errors:2d}  {seconds:5.1f} s", flush=True)
    print("\n| init | ok | failed | hung | runs with connectFullMesh errors |\n|---|---|---|---|---|")
    for mode, rows in results.items():
        count = {k: sum(r[0] == k for r in rows) for k in ("ok", "failed", "hung")}
        print(f"| {mode} | {count['ok']}/{len(rows)} | {count['failed']} | {count['hung']} | {sum(r[1] > 0 for r in rows)} |")


if __name__ == "__main__":
    main()
