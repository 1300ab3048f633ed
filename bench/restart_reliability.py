"""How often does a torchrun restart after one SIGKILL succeed? Stock init vs ours, same run.

    python bench/restart_reliability.py --trials 12

Each trial: `torchrun --standalone --nproc-per-node=2 --max-restarts=3` of bench/restart_worker.py;
rank 1 SIGKILLs itself once; the trial counts as ok if torchrun exits 0, hung if it is still
running after --timeout seconds (then its whole process tree is killed), failed otherwise.
Stock = `dist.init_process_group("gloo")`; ours = `launcher.worker.init_process_group()`.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import psutil

HERE = os.path.dirname(os.path.abspath(__file__))


def trial(mode: str, timeout: float) -> tuple[str, int, float]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "--max-restarts=3", "--monitor-interval=0.1", os.path.join(HERE, "restart_worker.py")]
    env = {**os.environ, "INIT_MODE": mode, "OMP_NUM_THREADS": "1"}
    start = time.monotonic()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
        outcome = "ok" if proc.returncode == 0 else "failed"
    except subprocess.TimeoutExpired:
        tree = psutil.Process(proc.pid).children(recursive=True) + [psutil.Process(proc.pid)]
        for p in tree:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        out, _ = proc.communicate()
        outcome = "hung"
    return outcome, out.count("connectFullMesh"), time.monotonic() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds before a trial counts as hung")
    args = parser.parse_args()
    results = {"stock": [], "ours": []}
    for i in range(args.trials):
        for mode in results:  # interleaved, so both see the same machine load
            outcome, mesh_errors, seconds = trial(mode, args.timeout)
            results[mode].append((outcome, mesh_errors, seconds))
            print(f"trial {i + 1:2d} {mode:5s}: {outcome:6s} connectFullMesh lines {mesh_errors:2d}  {seconds:5.1f} s", flush=True)
    print("\n| init | ok | failed | hung | runs with connectFullMesh errors |\n|---|---|---|---|---|")
    for mode, rows in results.items():
        count = {k: sum(r[0] == k for r in rows) for k in ("ok", "failed", "hung")}
        print(f"| {mode} | {count['ok']}/{len(rows)} | {count['failed']} | {count['hung']} | {sum(r[1] > 0 for r in rows)} |")


if __name__ == "__main__":
    main()
